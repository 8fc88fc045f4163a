"""Question-answer pairs for a chart, every answer computed from the chart's table (datagen/synth.py draws them).

Question types (QUESTION_TYPES): chart_type, title, count (categories, or stages of a funnel), largest, smallest,
value (a category's value, or its percentage on a pie/donut), compare (which of two is larger), color (of the bars /
line / funnel, or of one pie slice). Answers are short and normalised: "pie", "Teachers", "4", "15%", "blue".
Questions that the table cannot answer unambiguously (ties for largest, a comparison of equal values) are skipped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datagen.charts import KIND_NAMES, SINGLE_COLOUR_KINDS, Chart, format_value, percentages

QUESTION_TYPES = ("chart_type", "title", "count", "largest", "smallest", "value", "compare", "color")

_PIES = ("pie", "donut")
_ITEM = {"pie": "slice", "donut": "segment", "funnel": "stage", "bar": "bar", "hbar": "bar", "line": "point"}
_TYPE_QUESTIONS = ("What type of chart is this?", "What kind of chart is shown?", "Which chart type is used here?")
_TITLE_QUESTIONS = ("What is the title of the chart?", "What is the chart's title?", "What is this chart titled?")


@dataclass(frozen=True)
class QA:
    """One question about one chart, with its type and its answer."""

    question_type: str
    question: str
    answer: str


def questions_for(chart: Chart, question_types: tuple[str, ...], rng: random.Random) -> list[QA]:
    """One QA per requested question type that the chart can answer, in the order of `question_types`."""
    out = []
    for qtype in question_types:
        qa = _MAKERS[qtype](chart, rng)
        if qa is not None:
            out.append(qa)
    return out


def shown_values(chart: Chart) -> tuple[float, ...]:
    """The numbers a reader sees: whole percentages on pies and donuts, the table's values elsewhere."""
    return tuple(float(p) for p in percentages(chart.values)) if chart.kind in _PIES else chart.values


def _chart_type(chart: Chart, rng: random.Random) -> QA:
    return QA("chart_type", rng.choice(_TYPE_QUESTIONS), KIND_NAMES[chart.kind])


def _title(chart: Chart, rng: random.Random) -> QA:
    return QA("title", rng.choice(_TITLE_QUESTIONS), chart.title)


def _count(chart: Chart, rng: random.Random) -> QA:
    if chart.kind == "funnel":
        question = rng.choice(("How many stages does the funnel have?", "How many stages are in the funnel?"))
    elif chart.kind == "line":
        question = rng.choice(("How many data points does the line have?", "How many points are plotted?"))
    else:
        question = rng.choice(("How many categories are shown?", f"How many {_ITEM[chart.kind]}s are there?"))
    return QA("count", question, str(len(chart.labels)))


def _extreme(chart: Chart, rng: random.Random, largest: bool) -> QA | None:
    values = shown_values(chart)
    target = max(values) if largest else min(values)
    if values.count(target) != 1:
        return None
    word = "largest" if largest else "smallest"
    if chart.kind in _PIES:
        question = rng.choice((f"Which category has the {word} share?", f"Which {_ITEM[chart.kind]} is the {word}?"))
    elif chart.kind == "funnel":
        question = f"Which stage has the {'most' if largest else 'fewest'}?"
    else:
        question = rng.choice((f"Which category has the {'highest' if largest else 'lowest'} value?",
                               f"Which category is the {word}?"))
    return QA("largest" if largest else "smallest", question, chart.labels[values.index(target)])


def _value(chart: Chart, rng: random.Random) -> QA:
    i = rng.randrange(len(chart.labels))
    label = chart.labels[i]
    if chart.kind in _PIES:
        share = percentages(chart.values)[i]
        question = rng.choice((f"What percentage is {label}?", f"What share of the total is {label}?"))
        return QA("value", question, f"{share}%")
    if chart.kind == "funnel":
        question = f"What is the value of the {label} stage?"
    else:
        question = rng.choice((f"What is the value of {label}?", f"What value does {label} have?"))
    return QA("value", question, format_value(chart.values[i], chart.unit))


def _compare(chart: Chart, rng: random.Random) -> QA | None:
    values = shown_values(chart)
    pairs = [(a, b) for a in range(len(values)) for b in range(len(values)) if a != b and values[a] != values[b]]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    winner = a if values[a] > values[b] else b
    question = f"Which is larger, {chart.labels[a]} or {chart.labels[b]}?"
    return QA("compare", question, chart.labels[winner])


def _color(chart: Chart, rng: random.Random) -> QA:
    if chart.kind in SINGLE_COLOUR_KINDS:
        thing = {"funnel": "the funnel", "bar": "the bars", "hbar": "the bars", "line": "the line"}[chart.kind]
        verb = "are" if thing.endswith("s") else "is"
        return QA("color", f"What color {verb} {thing}?", chart.style.colours[0])
    i = rng.randrange(len(chart.labels))
    colour = chart.style.colours[i % len(chart.style.colours)]
    return QA("color", f"What color is the {chart.labels[i]} {_ITEM[chart.kind]}?", colour)


_MAKERS = {
    "chart_type": _chart_type,
    "title": _title,
    "count": _count,
    "largest": lambda chart, rng: _extreme(chart, rng, largest=True),
    "smallest": lambda chart, rng: _extreme(chart, rng, largest=False),
    "value": _value,
    "compare": _compare,
    "color": _color,
}
