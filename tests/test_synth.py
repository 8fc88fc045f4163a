"""The synthetic chart-QA generator: determinism, answers recomputed from each chart's table, leak-free splits,
user tables (CSV/JSON/JSONL) with every problem reported, and output the trainer's loader reads as is."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from datagen.synth import SynthConfig, generate, main
from datagen.tables import TableError, load_tables
from train.data import load_examples

# An independent statement of the answer rules (not imported from the generator, so a bug there fails here).
TYPE_NAMES = {"pie": "pie", "donut": "donut", "funnel": "funnel", "bar": "vertical bar", "hbar": "horizontal bar",
              "line": "line"}
PIES = ("pie", "donut")


def small(out_dir: Path, **kw) -> SynthConfig:
    """Small, fast charts (120-200 px) unless a test asks otherwise."""
    return SynthConfig(out_dir=str(out_dir), **{"num_charts": 30, "min_size": 120, "max_size": 200,
                                                 "progress": False, "workers": 1, **kw})


def charts(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "charts.jsonl").read_text().splitlines()]


def dataset(out_dir: Path, split: str) -> list[dict]:
    return json.loads((out_dir / split / "dataset.json").read_text())


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "summary.json"}


def shown(rec: dict) -> list[float]:
    total = sum(rec["values"])
    return [round(100 * v / total) for v in rec["values"]] if rec["kind"] in PIES else rec["values"]


def written(value: float, unit: str) -> str:
    text = str(int(value)) if float(value).is_integer() else f"{value:g}"
    return {"%": text + "%", "$": "$" + text}.get(unit, text)


def mentioned(rec: dict, question: str) -> list[int]:
    """Indices of the labels a question names, longest names first (so 'Q1' never shadows 'Q10')."""
    found, rest = [], question
    for i in sorted(range(len(rec["labels"])), key=lambda i: -len(rec["labels"][i])):
        if rec["labels"][i] in rest:
            found.append(i)
            rest = rest.replace(rec["labels"][i], "\0")
    return found


def expected_answer(rec: dict, qtype: str, question: str) -> str:
    values = shown(rec)
    if qtype == "chart_type":
        return TYPE_NAMES[rec["kind"]]
    if qtype == "title":
        return rec["title"]
    if qtype == "count":
        return str(len(rec["labels"]))
    if qtype in ("largest", "smallest"):
        target = max(values) if qtype == "largest" else min(values)
        assert values.count(target) == 1, "a tie must not be asked about"
        return rec["labels"][values.index(target)]
    if qtype == "value":
        (i,) = mentioned(rec, question)
        return f"{values[i]}%" if rec["kind"] in PIES else written(values[i], rec["unit"])
    if qtype == "compare":
        a, b = re.fullmatch(r"Which is larger, (.+) or (.+)\?", question).groups()
        va, vb = values[rec["labels"].index(a)], values[rec["labels"].index(b)]
        assert va != vb
        return a if va > vb else b
    if qtype == "color":
        if rec["kind"] in PIES:
            (i,) = mentioned(rec, question)
            return rec["style"]["colours"][i % len(rec["style"]["colours"])]
        return rec["style"]["colours"][0]
    raise AssertionError(qtype)


def check_answers_and_images(out: Path) -> int:
    from datagen.charts import PALETTES

    n = 0
    for rec in charts(out):
        for qa in rec["qas"]:
            assert qa["answer"] == expected_answer(rec, qa["question_type"], qa["question"]), (rec["id"], qa)
            n += 1
        image = Image.open(out / "images" / rec["image"]).convert("RGB")
        assert image.size == (rec["style"]["width"], rec["style"]["height"])
        pixels = set(image.getdata())
        for name in rec["style"]["colours"][:len(rec["labels"])]:  # every named colour is really drawn
            rgb = tuple(int(PALETTES[rec["style"]["palette"]][name][k:k + 2], 16) for k in (1, 3, 5))
            assert rgb in pixels, (rec["id"], name)
    return n


def test_every_answer_matches_its_table_and_every_colour_is_drawn(tmp_path):
    out = tmp_path / "synth"
    summary = generate(small(out, num_charts=36))
    n = check_answers_and_images(out)
    assert n == summary["train"]["qa_pairs"] + summary["validation"]["qa_pairs"] > 36 * 6
    kinds = {rec["kind"] for rec in charts(out)}
    assert kinds == set(TYPE_NAMES), "36 charts cover every kind"


def test_deterministic_whatever_the_worker_count_and_seed_sensitive(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(small(a, num_charts=12, workers=1))
    generate(small(b, num_charts=12, workers=2))
    generate(small(c, num_charts=12, seed=1))
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    assert len(list((a / "images").glob("*.png"))) == 12


def test_split_by_chart_without_leakage_and_llava_format(tmp_path):
    out = tmp_path / "synth"
    summary = generate(small(out, num_charts=40, val_fraction=0.25))
    train, val = dataset(out, "train"), dataset(out, "validation")
    assert (len(train), len(val)) == (30, 10) == (summary["train"]["charts"], summary["validation"]["charts"])
    assert not {r["image"] for r in train} & {r["image"] for r in val}
    for record in train + val:  # packed: one multi-turn conversation per chart, the image token first
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        assert len(record["question_types"]) == len(turns) // 2
    # Shuffled per chart: a fixed order would teach "the first answer is always the chart type".
    assert len({r["question_types"][0] for r in train}) > 3
    examples = load_examples(out / "train" / "dataset.json", out / "images")  # the trainer reads it as is
    assert len(examples) == 30 and examples[0].messages[0]["content"][0] == {"type": "image"}


def test_unpacked_records_and_question_selection(tmp_path):
    out = tmp_path / "synth"
    generate(small(out, num_charts=6, pack=False, question_types=("title", "count"), val_fraction=0.0))
    rows = dataset(out, "train")
    assert len(rows) == 12 and not dataset(out, "validation")
    assert all(len(r["conversations"]) == 2 and len(r["question_types"]) == 1 for r in rows)
    assert {r["question_types"][0] for r in rows} == {"title", "count"}
    corpus = (out / "corpus.txt").read_text()
    assert all(r["conversations"][1]["value"] in corpus for r in rows)


def test_demo_preset_draws_96px_squares(tmp_path):
    out = tmp_path / "demo"
    assert main([str(out), "--preset", "demo", "-n", "10", "--quiet", "--workers", "1"]) == 0
    recs = charts(out)
    assert {Image.open(out / "images" / r["image"]).size for r in recs} == {(96, 96)}
    assert {qa["question_type"] for r in recs for qa in r["qas"]} <= {"chart_type", "title", "color", "count",
                                                                      "largest"}
    check_answers_and_images(out)


def write_tables(tmp_path: Path) -> dict[str, Path]:
    csv = tmp_path / "tables.csv"
    csv.write_text("chart,title,label,value,kind,unit\n"
                   "1,Screen time,<2 hours,15,pie,\n1,Screen time,2-4 hours,45,pie,\n1,Screen time,4+ hours,40,pie,\n"
                   "2,Occupation,Teachers,1200,funnel,\n2,Occupation,Nurses,800,funnel,\n"
                   "2,Occupation,Artists,300,funnel,\n"
                   "3,Revenue,Q1,2.5,,$\n3,Revenue,Q2,3.75,,$\n")
    tables = [{"title": "Screen time", "labels": ["<2 hours", "2-4 hours", "4+ hours"], "values": [15, 45, 40],
               "kind": "pie"},
              {"title": "Occupation", "labels": ["Teachers", "Nurses", "Artists"], "values": [1200, 800, 300],
               "kind": "funnel"},
              {"title": "Revenue", "labels": ["Q1", "Q2"], "values": ["2.5", 3.75], "unit": "$"}]
    js, jsonl = tmp_path / "tables.json", tmp_path / "tables.jsonl"
    js.write_text(json.dumps({"tables": tables}))
    jsonl.write_text("\n".join(json.dumps(t) for t in tables) + "\n")
    return {"csv": csv, "json": js, "jsonl": jsonl}


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_user_tables_are_drawn_in_variants_and_split_by_table(tmp_path, fmt):
    path = write_tables(tmp_path)[fmt]
    assert [(t.title, t.kind, t.values) for t in load_tables(path)] == [
        ("Screen time", "pie", (15.0, 45.0, 40.0)), ("Occupation", "funnel", (1200.0, 800.0, 300.0)),
        ("Revenue", None, (2.5, 3.75))]
    out = tmp_path / "out"
    # A table's own kind wins over `kinds`; Revenue has none, so it is drawn as one of `kinds`.
    generate(small(out, tables=str(path), variants=3, val_fraction=0.34, kinds=("bar", "hbar", "line")))
    recs = charts(out)
    assert len(recs) == 9 and {r["title"] for r in recs} == {"Screen time", "Occupation", "Revenue"}
    splits_per_table = {}
    for r in recs:
        splits_per_table.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_per_table.values()), "all variants of a table share one split"
    assert {s.pop() for s in splits_per_table.values()} == {"train", "validation"}
    assert {r["kind"] for r in recs if r["title"] == "Screen time"} == {"pie"}
    assert {r["kind"] for r in recs if r["title"] == "Occupation"} == {"funnel"}
    assert {r["kind"] for r in recs if r["title"] == "Revenue"} <= {"bar", "hbar", "line"}
    revenue = [qa["answer"] for r in recs if r["title"] == "Revenue" for qa in r["qas"]
               if qa["question_type"] == "value"]
    assert len(revenue) == 3 and set(revenue) <= {"$2.5", "$3.75"}
    check_answers_and_images(out)


def test_bad_tables_report_every_problem_and_keep_the_old_output(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("title,label,value,kind\nA,x,1,\nA,x,2,\nB,y,ten,\nB,z,3,\nC,p,1,funnel\nC,q,5,funnel\n"
                   "D,only,4,\nE,u,1,spiral\nE,v,2,spiral\n")
    with pytest.raises(TableError) as err:
        load_tables(bad)
    text = "\n".join(err.value.problems)
    for needle in ("row 2: duplicate labels: x", "row 4: value of 'y' is not a number", "row 6: a funnel chart needs",
                   "row 8: a chart needs at least 2", "row 9: unknown kind 'spiral'"):
        assert needle in text
    missing = tmp_path / "missing.csv"
    missing.write_text("name,value\nx,1\n")
    with pytest.raises(TableError, match="missing column.*title, label"):
        load_tables(missing)
    js = tmp_path / "bad.json"
    js.write_text('[{"title": "T", "labels": ["a", "b"], "values": [1]}, 3]')
    with pytest.raises(TableError) as err:
        load_tables(js)
    assert err.value.problems == ["table 1: 2 labels but 1 values",
                                  "table 2: a table must be an object with title, labels and values"]

    out = tmp_path / "out"
    generate(small(out, num_charts=4))
    before = digest(out)
    assert main([str(out), "--tables", str(bad), "--overwrite", "--quiet"]) == 2
    assert digest(out) == before, "a bad tables file must not cost the earlier data set"


def test_cli_reports_all_bad_options_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(out), "--kinds", "pie,spiral", "--questions", "title,mood", "--size", "20", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown chart kind 'spiral'" in err and "unknown question type 'mood'" in err and "image size" in err
    assert main([str(out), "-n", "3", "--size", "100", "--quiet", "--workers", "1"]) == 0
    assert "| charts | 2 | 1 |" in capsys.readouterr().out  # at least one chart is held out
    assert main([str(out), "-n", "3", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(out), "-n", "4", "--size", "100", "--quiet", "--overwrite", "--workers", "1"]) == 0
    assert len(list((out / "images").glob("*.png"))) == 4


def test_llava_sm_data_synth_is_the_same_generator(tmp_path, capsys):
    from client.cli import main as cli

    out = tmp_path / "cli"
    assert cli(["data", "synth", str(out), "-n", "3", "--size", "64", "--quiet", "--workers", "1"]) == 0
    assert "| charts |" in capsys.readouterr().out
    again = tmp_path / "module"
    assert main([str(again), "-n", "3", "--size", "64", "--quiet", "--workers", "1"]) == 0
    assert digest(out) == digest(again)


def test_help_describes_the_generator_in_a_whole_sentence(capsys):
    from datagen.synth import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "bar (vertical and horizontal) and line charts drawn with matplotlib" in out


def test_an_empty_validation_split_is_announced(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    summary = generate(small(tmp_path / "one", num_charts=1))
    assert summary["validation"]["charts"] == 0
    assert json.loads((tmp_path / "one" / "validation" / "dataset.json").read_text()) == []
    assert "no chart is held out for validation (1 chart group(s), --val-fraction 0.1)" in caplog.text
    caplog.clear()
    generate(small(tmp_path / "two", num_charts=2))
    assert "held out" not in caplog.text
