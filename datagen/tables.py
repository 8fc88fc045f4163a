"""Tables for the synthetic charts: random ones from themed vocabularies, or a user's own from a CSV/JSON file.

A table is what a chart shows and every answer is computed from: a title, category labels, values and a unit.
User files (the blog's augmentation idea: draw your own numbers in many styles):
    CSV, long format, one row per category: columns title, label, value (+ optional chart, kind, unit);
        rows with the same `chart` (or, without that column, the same title) form one table, in file order.
    JSON: a list of {"title", "labels", "values", "kind"?, "unit"?} (or {"tables": [...]}); JSONL: one per line.
Every problem in a file is reported at once, with its row or table number (`TableError.problems`).
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from datagen.charts import KINDS


class TableError(ValueError):
    """A tables file with problems; `.problems` lists every one of them."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Table:
    title: str
    labels: tuple[str, ...]
    values: tuple[float, ...]
    unit: str = ""            # "", "%" or "$": how values are written
    kind: str | None = None   # a fixed chart kind, or None to let the generator choose


@dataclass(frozen=True)
class Theme:
    titles: tuple[str, ...]
    labels: tuple[str, ...]
    ordered: bool = False      # labels have a natural order (months, stages): keep it, good for lines and funnels
    unit: str = ""
    low: int = 10               # value range for bars and lines
    high: int = 99


THEMES: dict[str, Theme] = {
    "occupations": Theme(("Occupations", "Jobs of respondents", "Workforce by occupation", "Who took the survey"),
                         ("Teachers", "Engineers", "Nurses", "Artists", "Farmers", "Lawyers", "Doctors", "Drivers",
                          "Chefs", "Clerks")),
    "screen_time": Theme(("Daily screen time", "Hours on screens per day", "Screen time survey"),
                         ("<1 hour", "1-2 hours", "2-4 hours", "4-6 hours", "6+ hours"), ordered=True, unit="%",
                         low=5, high=45),
    "exercise": Theme(("Weekly exercise", "Days of exercise per week", "How often people exercise"),
                      ("None", "1 day", "2-3 days", "4-5 days", "Daily"), ordered=True, unit="%", low=5, high=45),
    "fruit": Theme(("Fruit sales", "Favourite fruit", "Fruit harvest", "Fruit exports"),
                   ("Apple", "Banana", "Cherry", "Grape", "Kiwi", "Lemon", "Mango", "Orange", "Peach", "Pear",
                    "Plum")),
    "months": Theme(("Monthly revenue", "Revenue by month", "Sales per month"),
                    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
                    ordered=True, unit="$", low=100, high=990),
    "quarters": Theme(("Quarterly sign-ups", "New customers per quarter", "Orders per quarter"),
                      ("Q1", "Q2", "Q3", "Q4"), ordered=True, low=100, high=990),
    "funnel": Theme(("Sales funnel", "Sign-up funnel", "Conversion funnel", "Customer journey"),
                    ("Visitors", "Leads", "Sign-ups", "Trials", "Customers", "Renewals"), ordered=True),
    "hiring": Theme(("Hiring pipeline", "Recruitment funnel", "Applicants by stage"),
                    ("Applicants", "Screened", "Interviewed", "Offered", "Hired"), ordered=True),
    "transport": Theme(("Commute to work", "How people travel", "Transport mode share"),
                       ("Car", "Bus", "Train", "Bike", "Walk", "Tram", "Ferry")),
    "energy": Theme(("Energy sources", "Electricity mix", "Power generation"),
                    ("Solar", "Wind", "Hydro", "Gas", "Coal", "Nuclear")),
    "ages": Theme(("Age of respondents", "Customers by age", "Age groups"),
                  ("Under 18", "18-29", "30-44", "45-59", "60+"), ordered=True),
}
# The demo's small vocabulary: one-word titles and short labels a 96 px chart can show; 8 titles and 10 fruit names
# are few enough choices for a model trained from scratch for minutes to learn.
DEMO_THEMES: dict[str, Theme] = {
    "demo": Theme(("Sales", "Harvest", "Prices", "Exports", "Stock", "Orders", "Demand", "Imports"),
                  ("Apple", "Kiwi", "Fig", "Plum", "Pear", "Lime", "Mango", "Lemon", "Date", "Grape")),
}


def random_table(rng: random.Random, kind: str, themes: dict[str, Theme], min_n: int, max_n: int) -> Table:
    """A table for `kind` with distinct values (largest, smallest and comparisons are never tied)."""
    names = sorted(themes)
    if kind in ("line", "funnel"):  # prefer labels with a natural order (months, stages) when there are some
        names = [n for n in names if themes[n].ordered] or names
    theme = themes[rng.choice(names)]
    n = rng.randint(min_n, min(max_n, len(theme.labels)))
    if theme.ordered:
        start = rng.randint(0, len(theme.labels) - n)
        labels = theme.labels[start:start + n]
    else:
        labels = tuple(rng.sample(theme.labels, n))
    if kind in ("pie", "donut"):
        values, unit = _shares(rng, n), "%"
    elif kind == "funnel":
        values, unit = _funnel_values(rng, n), ""
    else:
        values, unit = tuple(float(v) for v in rng.sample(range(theme.low, theme.high + 1), n)), theme.unit
    return Table(title=rng.choice(theme.titles), labels=labels, values=values, unit=unit, kind=kind)


def _shares(rng: random.Random, n: int) -> tuple[float, ...]:
    """n distinct whole percentages, each at least 4, summing to 100."""
    while True:
        cuts = sorted(rng.sample(range(1, 100), n - 1))
        parts = [b - a for a, b in zip([0] + cuts, cuts + [100], strict=True)]
        if min(parts) >= 4 and len(set(parts)) == n:
            return tuple(float(p) for p in parts)


def _funnel_values(rng: random.Random, n: int) -> tuple[float, ...]:
    """Strictly decreasing stage counts, rounded to a readable number of digits."""
    values = [float(rng.randrange(200, 5000, 10))]
    for _ in range(n - 1):
        nxt = _round_sig(values[-1] * rng.uniform(0.35, 0.85), 2)
        values.append(min(nxt, values[-1] - 1))
    return tuple(values)


def _round_sig(x: float, digits: int) -> float:
    if x < 10:
        return float(max(1, round(x)))
    scale = 10 ** (int(math.floor(math.log10(x))) - digits + 1)
    return float(round(x / scale) * scale)


def compatible_kinds(table: Table, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The kinds that can draw this table: pies need positive values, funnels positive non-increasing ones."""
    positive = all(v > 0 for v in table.values)
    funnel = positive and all(a >= b for a, b in zip(table.values, table.values[1:], strict=False))
    ok = {"pie": positive, "donut": positive, "funnel": funnel}
    return tuple(k for k in kinds if ok.get(k, True))


def load_tables(path: str | Path) -> list[Table]:
    """Tables from a CSV, JSON or JSONL file; raises TableError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise TableError(str(path), ["file not found"])
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raw, problems = _read_csv(path)
    elif suffix in (".json", ".jsonl"):
        raw, problems = _read_json(path, lines=suffix == ".jsonl")
    else:
        raise TableError(str(path), [f"unknown file type {suffix!r}: use .csv, .json or .jsonl"])
    tables = []
    for where, item in raw:
        table, bad = _validate(item)
        problems += [f"{where}: {p}" for p in bad]
        if table is not None:
            tables.append(table)
    if not raw and not problems:
        problems.append("no tables in the file")
    if problems:
        raise TableError(str(path), problems)
    return tables


def _read_csv(path: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        missing = [c for c in ("title", "label", "value") if c not in columns]
        if missing:
            return [], [f"missing column(s): {', '.join(missing)} (found: {', '.join(columns) or 'none'})"]
        groups: dict[str, tuple[str, dict]] = {}
        for row_number, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            key = row.get("chart") or row["title"]
            first, table = groups.setdefault(key, (f"row {row_number}", {
                "title": row["title"], "labels": [], "values": [], "kind": row.get("kind") or None,
                "unit": row.get("unit", ""), "rows": []}))
            table["labels"].append(row["label"])
            table["values"].append(row["value"])
            table["rows"].append(row_number)
    return [(f"table at {first}", t) for first, t in groups.values()], []


def _read_json(path: Path, *, lines: bool) -> tuple[list[tuple[str, dict]], list[str]]:
    text = path.read_text(encoding="utf-8")
    try:
        if lines:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            items = data.get("tables") if isinstance(data, dict) else data
    except json.JSONDecodeError as e:
        return [], [f"invalid JSON: {e}"]
    if not isinstance(items, list):
        return [], ['expected a list of tables (or {"tables": [...]})']
    return [(f"table {i + 1}", item) for i, item in enumerate(items)], []


def _validate(item: object) -> tuple[Table | None, list[str]]:
    if not isinstance(item, dict):
        return None, ["a table must be an object with title, labels and values"]
    problems = []
    title = str(item.get("title") or "").strip()
    if not title:
        problems.append("missing title")
    labels, values = item.get("labels"), item.get("values")
    if not isinstance(labels, list) or not isinstance(values, list):
        return None, problems + ["labels and values must be lists"]
    labels = [str(x).strip() for x in labels]
    if len(labels) != len(values):
        problems.append(f"{len(labels)} labels but {len(values)} values")
    if len(labels) < 2:
        problems.append("a chart needs at least 2 categories")
    if any(not x for x in labels):
        problems.append("empty label")
    if len(set(labels)) != len(labels):
        problems.append("duplicate labels: " + ", ".join(sorted({x for x in labels if labels.count(x) > 1})))
    numbers = []
    for label, value in zip(labels, values, strict=False):
        number = _number(value)
        if number is None:
            problems.append(f"value of {label!r} is not a number: {value!r}")
        numbers.append(number)
    kind = item.get("kind") or None
    if kind is not None and kind not in KINDS:
        problems.append(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    unit = str(item.get("unit") or "")
    if unit not in ("", "%", "$"):
        problems.append(f"unit must be empty, '%' or '$', got {unit!r}")
    if problems:
        return None, problems
    table = Table(title=title, labels=tuple(labels), values=tuple(numbers), unit=unit, kind=kind)
    if kind is not None and kind not in compatible_kinds(table, (kind,)):
        need = "positive values" if kind in ("pie", "donut") else "positive values in non-increasing order"
        return None, [f"a {kind} chart needs {need}"]
    return table, []


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    try:
        number = float(str(value).replace(",", "").strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None
