"""`llava-sm eval`: questions from LLaVA data, scores that match what the model really answered (in-process and
through a real server), the blank-image control, the report files, and every error path."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from client.cli import main as cli
from client.evaluate import EvalOptions, evaluate
from datagen.synth import SynthConfig, generate
from demo.pipeline import running_server
from evaluation.questions import blank_png, load_questions
from train.data import DataError
from train.metrics import relaxed_match


@pytest.fixture(scope="module")
def charts(tmp_path_factory) -> Path:
    """4 small charts, 2 held out, 3 questions each: 6 validation questions."""
    out = tmp_path_factory.mktemp("charts")
    generate(SynthConfig(out_dir=str(out), num_charts=4, min_size=64, max_size=96, square=True, workers=1,
                         progress=False, val_fraction=0.5, question_types=("chart_type", "title", "color")))
    return out


def test_questions_are_single_turns_with_their_types(charts):
    data = charts / "validation" / "dataset.json"
    questions = load_questions(data)
    assert len(questions) == 6
    records = json.loads(data.read_text())
    first = questions[0]
    assert first["question"] == records[0]["conversations"][0]["value"].removeprefix("<image>\n")
    assert first["answer"] == records[0]["conversations"][1]["value"]
    assert first["question_type"] == records[0]["question_types"][0]
    assert first["chart_type"] == records[0]["chart_type"]
    assert Path(first["image"]) == charts / "images" / records[0]["image"], "images/ beside the split is found"
    assert all(Path(q["image"]).is_file() and "<image>" not in q["question"] for q in questions)
    assert [q["question_type"] for q in load_questions(data, question_types=["title"])] == ["title", "title"]
    assert len(load_questions(data, limit=4)) == 4
    with pytest.raises(ValueError, match=r"question type\(s\) bogus not in the data; it has: .*title"):
        load_questions(data, question_types=["title", "bogus"])


def test_bad_data_reports_every_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}]}),
        json.dumps({"id": "b", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]}),
        "{not json",
        json.dumps({"id": "d", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                                      {"from": "gpt", "value": "A"}]}),
    ]) + "\n")
    with pytest.raises(DataError) as err:
        load_questions(bad, tmp_path)
    text = "\n".join(err.value.problems)
    assert "row 1 (id 'a')" in text and "no gpt answer" in text
    assert "(id 'b')" not in text, "a conversation without an image is left out, not an error"
    assert "row 3: invalid JSON" in text
    assert "row 4 (id 'd'): image 'gone.png' not found" in text


def test_blank_image_is_a_uniform_grey_png():
    image = Image.open(io.BytesIO(blank_png()))
    assert image.format == "PNG" and image.size == (336, 336) and image.mode == "RGB"
    assert image.getextrema() == ((128, 128),) * 3


def single_turn_copy(data: Path, out: Path, answers: dict[str, str]) -> Path:
    """The data with one record per question, answers replaced where `answers` says (by question id)."""
    rows = []
    for record in json.loads(data.read_text()):
        turns = record["conversations"]
        for k in range(len(turns) // 2):
            answer = answers.get(f"{record['id']}#{k}", turns[2 * k + 1]["value"])
            question = turns[2 * k]["value"].removeprefix("<image>\n")
            rows.append({"id": f"{record['id']}-{k}", "image": record["image"], "chart_type": record["chart_type"],
                         "question_types": [record["question_types"][k]],
                         "conversations": [{"from": "human", "value": "<image>\n" + question},
                                           {"from": "gpt", "value": answer}]})
    out.write_text(json.dumps(rows))
    return out


def predictions(out_dir: Path, run: str) -> list[dict]:
    lines = (out_dir / "predictions.jsonl").read_text().splitlines()
    return [p for p in map(json.loads, lines) if p["run"] == run]


def test_scores_are_exactly_what_the_model_answered_in_process_and_over_http(tiny_artifact, charts, tmp_path):
    data = charts / "validation" / "dataset.json"
    first = tmp_path / "first"
    opts = dict(image_folder=str(charts / "images"), model_dir=tiny_artifact, batch_size=1, max_new_tokens=6)
    evaluate(EvalOptions(data=str(data), out_dir=str(first), name="tiny", **opts))
    said = {p["id"]: p["prediction"] for p in predictions(first, "tiny")}
    # Make every other question's expected answer what the model said: those, and only those, must score.
    planted = {qid: text for i, (qid, text) in enumerate(sorted(said.items())) if i % 2 == 0 and text.strip()}
    assert planted, "the tiny model produced some non-empty text to plant"
    planted_data = single_turn_copy(data, tmp_path / "planted.json", planted)
    second = tmp_path / "second"
    report = evaluate(EvalOptions(data=str(planted_data), out_dir=str(second), name="tiny", **opts))

    tuned, blank = report["runs"]["tiny"], report["runs"]["tiny (blank image)"]
    assert tuned["overall"] == {"n": 6, "correct": len(planted), "accuracy": len(planted) / 6}
    blank_preds = predictions(second, "tiny (blank image)")
    assert blank["overall"]["correct"] == sum(relaxed_match(p["prediction"], p["answer"]) for p in blank_preds)
    assert set(tuned["groups"]) == {"chart_type", "question_type"}
    assert sum(c["n"] for c in tuned["groups"]["question_type"].values()) == 6
    assert (second / "eval.png").read_bytes().startswith(b"\x89PNG")
    assert "| **overall** |" in (second / "eval.md").read_text()

    # The same questions through a real server must get the same greedy answers and the same scores.
    with running_server(tiny_artifact, log_path=tmp_path / "server.log") as url:
        code = cli(["eval", "--data", str(planted_data), "--image-folder", str(charts / "images"), "--url", url,
                    "--name", "served", "--concurrency", "1",
                    "--max-new-tokens", "6", "--no-blank", "--out-dir", str(tmp_path / "served"),
                    "--compare", str(second / "eval.json")])
    assert code == 0
    served = json.loads((tmp_path / "served" / "eval.json").read_text())
    assert list(served["runs"]) == ["tiny", "tiny (blank image)", "served"]
    assert served["runs"]["served"]["overall"] == tuned["overall"]
    assert [p["prediction"] for p in predictions(tmp_path / "served", "served")] == \
           [p["prediction"] for p in predictions(second, "tiny")]


def test_cli_reports_bad_options_together(charts, capsys, tmp_path):
    data = str(charts / "validation" / "dataset.json")
    assert cli(["eval", "--data", data]) == 2
    assert "exactly one of --model-dir, --url or --endpoint-name" in capsys.readouterr().err
    assert cli(["eval", "--data", str(tmp_path / "none.json"), "--url", "ftp://x", "--limit", "0",
                "--model-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    for needle in ("exactly one of", "is not a file", "must start with http", "limit", "is not a directory"):
        assert needle in err


def test_unreachable_server_fails_clearly(charts, capsys, tmp_path):
    from demo.pipeline import free_port

    code = cli(["eval", "--data", str(charts / "validation" / "dataset.json"), "--url",
                f"http://127.0.0.1:{free_port()}", "--limit", "2", "--no-blank", "--retries", "0",
                "--out-dir", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "all 2 questions failed" in err and "connection_error" in err
    assert not (tmp_path / "eval.json").exists(), "no report that looks like a score of 0"


def test_endpoint_answers_are_scored(charts, moto_server, tmp_path):
    """Through InvokeEndpoint (a loopback moto server answering queued replies in order): 1 right of 2."""
    import uuid

    import requests

    questions = load_questions(charts / "validation" / "dataset.json", limit=2)
    replies = [{"answer": questions[0]["answer"], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
               {"answer": "certainly not " + questions[1]["answer"], "usage": {"prompt_tokens": 1,
                                                                                "completion_tokens": 1}}]
    requests.post(f"{moto_server}/moto-api/static/sagemaker/endpoint-results", json={
        "account_id": "123456789012", "region": "us-east-1",
        "results": [{"Body": json.dumps(r), "ContentType": "application/json"} for r in replies]}).raise_for_status()
    code = cli(["eval", "--data", str(charts / "validation" / "dataset.json"), "--endpoint-name",
                f"ep-{uuid.uuid4().hex[:8]}", "--endpoint-url", moto_server, "--region", "us-east-1",
                "--limit", "2", "--concurrency", "1", "--no-blank", "--out-dir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["source"].startswith("ep-") and report["runs"][report["source"]]["overall"]["correct"] == 1
