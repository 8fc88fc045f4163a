"""Synthetic chart-QA data in the LLaVA conversation format: pie, donut, funnel, bar (vertical and horizontal) and
line charts drawn with matplotlib, each with question-answer pairs answerable from the image alone.

    python -m datagen OUT_DIR [-n 1000] [--seed 0] [--preset default|demo] [--tables my_tables.csv] ...
    llava-sm data synth OUT_DIR ...            (the same options)

Writes, ready for `python -m train --data_path OUT/train/dataset.json --validation_data_path
OUT/validation/dataset.json --image_folder OUT/images`:
    images/<chart>.png            one image per chart
    train/dataset.json            LLaVA records; the split is by table, so no chart (or table) is in both splits
    validation/dataset.json       each record: id, image, conversations (+ chart_type, question_types per QA pair)
    charts.jsonl                  every chart's table, style, split and QAs (answers are computed from the table)
    corpus.txt                    every question and answer once (`python -m demo.tiny --corpus` for the demo)
    summary.json                  counts per split, chart type and question type
Generation is deterministic: chart i depends only on (seed, i), never on the number of worker processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from datagen.chartqa import QUESTION_TYPES, questions_for
from datagen.charts import BACKGROUNDS, COLOUR_NAMES, FONTS, KINDS, PALETTES, Chart, Style, draw_chart
from datagen.tables import DEMO_THEMES, THEMES, Table, compatible_kinds, load_tables, random_table

log = logging.getLogger(__name__)

OUTPUT_FILES = ("images", "train", "validation", "charts.jsonl", "corpus.txt", "summary.json")


@dataclass(frozen=True)
class SynthConfig:
    """Everything one generation run needs; `problems()` lists every invalid setting at once."""

    out_dir: str
    num_charts: int = 1000           # random charts (ignored with `tables`: each table gives `variants` charts)
    seed: int = 0
    val_fraction: float = 0.1        # share of tables held out for validation
    kinds: tuple[str, ...] = KINDS
    question_types: tuple[str, ...] = QUESTION_TYPES
    min_size: int = 336              # longest image side in pixels, drawn uniformly from [min_size, max_size]
    max_size: int = 672
    square: bool = False             # square images only (otherwise aspect ratios 1:1 to 16:9, both ways)
    min_categories: int = 3
    max_categories: int = 6
    tables: str | None = None        # CSV/JSON/JSONL file of your own tables (datagen/tables.py)
    variants: int = 1                # charts drawn per table of `tables`, each with its own style (and kind)
    pack: bool = True                # one multi-turn conversation per chart (else one record per QA pair)
    vocabulary: str = "default"      # "default" (themed tables) or "demo" (one-word titles, fruit names)
    workers: int = 2
    overwrite: bool = False
    progress: bool = True

    def problems(self) -> list[str]:
        p = []
        if self.num_charts < 1:
            p.append("num_charts must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            p.append("val_fraction must be in [0, 1)")
        p += [f"unknown chart kind {k!r} (known: {', '.join(KINDS)})" for k in self.kinds if k not in KINDS]
        p += [f"unknown question type {q!r} (known: {', '.join(QUESTION_TYPES)})"
              for q in self.question_types if q not in QUESTION_TYPES]
        if not self.kinds:
            p.append("no chart kinds selected")
        if not self.question_types:
            p.append("no question types selected")
        if not 48 <= self.min_size <= self.max_size <= 4096:
            p.append(f"image size must satisfy 48 <= min <= max <= 4096, got {self.min_size}-{self.max_size}")
        if not 2 <= self.min_categories <= self.max_categories <= 8:
            p.append(f"categories must satisfy 2 <= min <= max <= 8, got {self.min_categories}-{self.max_categories}")
        if self.variants < 1:
            p.append("variants must be at least 1")
        if self.vocabulary not in ("default", "demo"):
            p.append("vocabulary must be 'default' or 'demo'")
        if self.workers < 1:
            p.append("workers must be at least 1")
        if self.tables is not None and not Path(self.tables).is_file():
            p.append(f"tables file not found: {self.tables}")
        return p


# The demo preset: 96 px charts a from-scratch LLaVA can read after minutes on a CPU (96 px is the smallest size at
# which its one-word titles stay readable); explicit options still override each value.
PRESETS: dict[str, dict] = {
    "default": {},
    "demo": {"min_size": 96, "max_size": 96, "square": True, "min_categories": 3, "max_categories": 5,
             "vocabulary": "demo", "question_types": ("chart_type", "title", "color", "count", "largest")},
}
_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)


# ---- planning: tables -> charts (pure, seeded per chart) ------------------------------------------------------

def plan_charts(config: SynthConfig) -> list[tuple[Chart, str]]:
    """Every chart to draw with the table group it belongs to (the unit of the train/validation split)."""
    themes = DEMO_THEMES if config.vocabulary == "demo" else THEMES
    planned = []
    if config.tables:
        for t, table in enumerate(load_tables(config.tables)):
            for v in range(config.variants):
                rng = random.Random(f"{config.seed}:table:{t}:{v}")
                kinds = (table.kind,) if table.kind else compatible_kinds(table, config.kinds) or ("bar",)
                chart_id = f"table{t:05d}_{v:02d}"
                planned.append((make_chart(chart_id, rng.choice(kinds), table, config, rng), f"table{t:05d}"))
        return planned
    for i in range(config.num_charts):
        rng = random.Random(f"{config.seed}:chart:{i}")
        kind = rng.choice(config.kinds)
        table = random_table(rng, kind, themes, config.min_categories, config.max_categories)
        planned.append((make_chart(f"chart{i:06d}", kind, table, config, rng), f"chart{i:06d}"))
    return planned


def make_chart(chart_id: str, kind: str, table: Table, config: SynthConfig, rng: random.Random) -> Chart:
    return Chart(id=chart_id, kind=kind, title=table.title, labels=table.labels, values=table.values,
                 unit=table.unit, style=random_style(rng, kind, len(table.labels), config))


def random_style(rng: random.Random, kind: str, n: int, config: SynthConfig) -> Style:
    long_side = rng.randint(config.min_size, config.max_size)
    aspect = 1.0 if config.square else rng.choice(_ASPECTS)
    short_side = max(48, int(round(long_side / aspect)))
    width, height = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
    small = long_side < 200  # small images get relatively larger text, or nothing would be legible
    title_px = long_side * (rng.uniform(0.14, 0.15) if small else rng.uniform(0.045, 0.065))
    label_px = max(7.0, long_side * (rng.uniform(0.075, 0.085) if small else rng.uniform(0.03, 0.04)))
    pies = kind in ("pie", "donut")
    colours = tuple(rng.sample(COLOUR_NAMES, min(n, len(COLOUR_NAMES)))) if pies else (rng.choice(COLOUR_NAMES),)
    return Style(width=width, height=height, font=rng.choice(FONTS), title_px=title_px, label_px=label_px,
                 palette=rng.choice(sorted(PALETTES)), colours=colours,
                 title_loc=rng.choice(("left", "center", "center", "right")), legend=pies and rng.random() < 0.4,
                 grid=rng.random() < 0.3, background=rng.choice(BACKGROUNDS), start_angle=rng.choice((0, 45, 90, 140)))


def split_groups(groups: list[str], val_fraction: float, seed: int) -> set[str]:
    """The validation groups: a seeded share of the distinct groups (at least one when there are two or more)."""
    distinct = sorted(set(groups))
    n_val = int(round(len(distinct) * val_fraction))
    if val_fraction > 0 and len(distinct) > 1:
        n_val = min(max(n_val, 1), len(distinct) - 1)
    random.Random(f"{seed}:split").shuffle(distinct)
    return set(distinct[:n_val])


# ---- records ---------------------------------------------------------------------------------------------------

def chart_record(chart: Chart, group: str, split: str, config: SynthConfig) -> dict:
    """charts.jsonl line: the table, style and QAs (seeded by the chart id, so they never depend on the split).

    The QAs are shuffled: in a packed conversation the first answer after the image would otherwise always be the
    same question type, and a model learns to answer that type whatever it is asked.
    """
    rng = random.Random(f"{config.seed}:qa:{chart.id}")
    qas = questions_for(chart, config.question_types, rng)
    rng.shuffle(qas)
    return {"id": chart.id, "image": f"{chart.id}.png", "split": split, "group": group, "kind": chart.kind,
            "title": chart.title, "labels": list(chart.labels), "values": list(chart.values), "unit": chart.unit,
            "style": asdict(chart.style), "qas": [asdict(qa) for qa in qas]}


def llava_records(rec: dict, pack: bool) -> list[dict]:
    """LLaVA conversation record(s) for one chart; the first human turn of each starts with '<image>\\n'."""
    qas = rec["qas"]
    chunks = [qas] if pack else [[qa] for qa in qas]
    out = []
    for k, chunk in enumerate(chunks):
        turns = []
        for j, qa in enumerate(chunk):
            turns.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + qa["question"]})
            turns.append({"from": "gpt", "value": qa["answer"]})
        out.append({"id": rec["id"] if pack else f"{rec['id']}_{k}", "image": rec["image"], "conversations": turns,
                    "chart_type": rec["kind"], "question_types": [qa["question_type"] for qa in chunk]})
    return out


def summarize(records: list[dict]) -> dict:
    summary: dict = {}
    for split in ("train", "validation"):
        rows = [r for r in records if r["split"] == split]
        summary[split] = {
            "charts": len(rows), "qa_pairs": sum(len(r["qas"]) for r in rows),
            "chart_types": dict(sorted(Counter(r["kind"] for r in rows).items())),
            "question_types": dict(sorted(Counter(q["question_type"] for r in rows for q in r["qas"]).items())),
        }
    return summary


def summary_table(summary: dict) -> str:
    lines = ["| | train | validation |", "|---|---|---|"]
    for key in ("charts", "qa_pairs"):
        lines.append(f"| {key} | {summary['train'][key]} | {summary['validation'][key]} |")
    for group in ("chart_types", "question_types"):
        names = sorted(set(summary["train"][group]) | set(summary["validation"][group]))
        for name in names:
            lines.append(f"| {group[:-1].replace('_', ' ')}: {name} | {summary['train'][group].get(name, 0)} "
                         f"| {summary['validation'][group].get(name, 0)} |")
    return "\n".join(lines)


# ---- the run ---------------------------------------------------------------------------------------------------

def generate(config: SynthConfig) -> dict:
    """Plan, draw and write the whole data set; returns the summary."""
    problems = config.problems()
    if problems:
        raise ValueError("invalid synth config:\n  " + "\n  ".join(problems))
    out = Path(config.out_dir)
    planned = plan_charts(config)  # before touching the output: a bad tables file must not cost an old data set
    _prepare_out_dir(out, config.overwrite)
    val_groups = split_groups([g for _, g in planned], config.val_fraction, config.seed)
    records = [chart_record(c, g, "validation" if g in val_groups else "train", config) for c, g in planned]
    _draw_all([c for c, _ in planned], out / "images", config)
    for split in ("train", "validation"):
        rows = [r for rec in records if rec["split"] == split for r in llava_records(rec, config.pack)]
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / split / "dataset.json").write_text(json.dumps(rows, indent=1) + "\n")
    with (out / "charts.jsonl").open("w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
    texts = sorted({t for rec in records for qa in rec["qas"] for t in (qa["question"], qa["answer"])})
    (out / "corpus.txt").write_text("\n".join(texts) + "\n")
    summary = summarize(records)
    if summary["validation"]["charts"] == 0:
        log.warning("no chart is held out for validation (%d chart group(s), --val-fraction %g): "
                    "validation/dataset.json is empty, so train without --validation_data_path",
                    len({g for _, g in planned}), config.val_fraction)
    (out / "summary.json").write_text(json.dumps({"config": asdict(config), **summary}, indent=2) + "\n")
    return summary


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    for name in existing:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (out / "images").mkdir(parents=True)


def _draw_one(job: tuple[Chart, str]) -> None:
    draw_chart(*job)


def _draw_all(charts: list[Chart], images: Path, config: SynthConfig) -> None:
    from tqdm import tqdm

    jobs = [(c, str(images / f"{c.id}.png")) for c in charts]
    bar = tqdm(total=len(jobs), desc="drawing charts", unit="chart", disable=not config.progress)
    try:
        if config.workers == 1 or len(jobs) < 8:
            for job in jobs:
                _draw_one(job)
                bar.update()
            return
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=config.workers) as pool:
            for _ in pool.map(_draw_one, jobs, chunksize=8):
                bar.update()
    finally:
        bar.close()


# ---- command line ----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The generator's options (shared by `python -m datagen` and `llava-sm data synth`)."""
    parser.add_argument("out_dir", help="output folder (images/, train/, validation/, ...)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="'demo': 96 px square charts, small vocabulary, the questions a CPU demo learns")
    parser.add_argument("-n", "--num-charts", type=int, help="random charts to draw (default 1000)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--val-fraction", type=float, help="share of charts held out for validation (default 0.1)")
    parser.add_argument("--kinds", type=_csv, help=f"chart kinds, comma-separated (default all: {','.join(KINDS)})")
    parser.add_argument("--questions", dest="question_types", type=_csv,
                        help=f"question types, comma-separated (default all: {','.join(QUESTION_TYPES)})")
    parser.add_argument("--size", type=_range, help="longest image side in px, N or MIN-MAX (default 336-672)")
    parser.add_argument("--square", action="store_true", default=None, help="square images only")
    parser.add_argument("--categories", type=_range, help="categories per random chart, N or MIN-MAX (default 3-6)")
    parser.add_argument("--tables", help="CSV/JSON/JSONL file of your own tables to draw instead of random ones")
    parser.add_argument("--variants", type=int, help="charts per table of --tables, each styled differently")
    parser.add_argument("--no-pack", dest="pack", action="store_false", default=None,
                        help="one record per QA pair instead of one multi-turn conversation per chart")
    parser.add_argument("--workers", type=int, help="drawing processes (default: up to 2)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier output")
    parser.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """Defaults < preset < explicit options; logs which values the preset or the command line set."""
    values: dict = {"workers": min(2, os.cpu_count() or 1), **PRESETS[args.preset]}
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("preset", "size", "categories")}
    if args.size is not None:
        given["min_size"], given["max_size"] = args.size
    if args.categories is not None:
        given["min_categories"], given["max_categories"] = args.categories
    names = {f.name for f in fields(SynthConfig)}
    values.update({k: v for k, v in given.items() if k in names})
    config = SynthConfig(**values)
    log.info("synth config (preset %s): %s", args.preset, json.dumps(asdict(config)))
    return config


def run(args: argparse.Namespace) -> int:
    """Entry point shared by both command lines: validate, generate, print the summary."""
    try:
        config = config_from_args(args)
        problems = config.problems()
        if problems:
            raise ValueError("invalid options:\n  " + "\n  ".join(problems))
        summary = generate(config)
    except (ValueError, FileExistsError) as e:  # TableError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(summary))
    charts = sum(split["charts"] for split in summary.values())
    print(f"\nwrote {config.out_dir}: train/dataset.json, validation/dataset.json, images/ ({charts} charts)")
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _range(text: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition("-")
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datagen", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
