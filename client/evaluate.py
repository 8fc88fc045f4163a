"""`llava-sm eval`: relaxed accuracy of a model on a validation set, with a blank-image control.

    llava-sm eval --data data/validation/dataset.json --model-dir runs/merged          # in-process (torch)
    llava-sm eval --data data/validation/dataset.json --url http://localhost:8080      # a running server
    llava-sm eval --data data/validation/dataset.json --endpoint-name chart-qa         # a SageMaker endpoint

Every human/gpt pair of the LLaVA data becomes one single-turn question about its image, answered greedily.
The same questions are then asked with a plain grey image instead (`--no-blank` skips this): the gap between the
two shows how much the answers depend on the picture. Scores come from train/metrics.py, the code the trainer's
end-of-training report uses: overall, per chart type and per question type when the records carry them
(`chart_type`, `question_types`, as `llava-sm data synth` writes). Writes to --out-dir: eval.json (scores, and any
--compare reports' runs), eval.md (the markdown table, also printed), predictions.jsonl, eval.png (bar chart).
Only --model-dir loads torch; the server and endpoint paths need nothing beyond the light client.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import struct
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from client import options as o
from client.options import option

log = logging.getLogger(__name__)

GROUP_KEYS = ("chart_type", "question_type")
BLANK_SUFFIX = " (blank image)"
BLANK_GREY = 128
Answerer = Callable[[list[dict[str, Any]], bool], list[str]]


class EvalFailed(RuntimeError):
    """No question got an answer (server down, wrong endpoint): there is nothing to score."""


@dataclasses.dataclass
class EvalOptions:
    data: str | None = option(help="LLaVA JSON/JSONL validation file (e.g. data/validation/dataset.json)",
                              required=True)
    image_folder: str | None = option(help="folder the records' images are relative to (default: ../images "
                                           "beside the data's folder when it exists, else the data's folder)")
    model_dir: str | None = option(help="evaluate this model dir in-process (loads torch)")
    url: str | None = option(help="evaluate a running server at this base URL")
    endpoint_name: str | None = option(help="evaluate this SageMaker endpoint")
    out_dir: str = option("eval", "where eval.json, eval.md, predictions.jsonl and eval.png go")
    name: str | None = option(help="this run's column name (default: the model dir, URL or endpoint name)")
    blank: bool = option(True, "also ask every question with a grey image (the blank-image control)")
    limit: int | None = option(help="evaluate only the first N questions")
    question_types: list[str] = option([], "only these question types")
    compare: list[str] = option([], "eval.json report(s) whose runs join this one's table and chart")
    max_new_tokens: int = option(16, "answer length cap in tokens (answers are short)")
    batch_size: int = option(16, "questions per generate call (--model-dir)")
    concurrency: int = option(4, "requests in flight (--url / --endpoint-name); the server batches them")
    quantization: str = option("none", "--model-dir weights: none (fp32), bf16, fp16, nf4 or auto")
    device: str | None = option(help="--model-dir device: cpu, cuda (default: cuda when available)")
    timeout: float = option(120.0, "seconds per request (--url / --endpoint-name)")
    retries: int = option(3, "extra attempts after a connection failure or a busy (503) server")
    region: str | None = option(help="AWS region (--endpoint-name)")
    profile: str | None = option(help="AWS named profile (--endpoint-name)")
    endpoint_url: str | None = option(help="SageMaker runtime endpoint URL override")

    def problems(self) -> list[str]:
        p = []
        sources = [s for s in (self.model_dir, self.url, self.endpoint_name) if s]
        if len(sources) != 1:
            p.append("give exactly one of --model-dir, --url or --endpoint-name")
        if self.data and not Path(self.data).is_file():
            p.append(f"data: {self.data} is not a file")
        if self.model_dir and not Path(self.model_dir).is_dir():
            p.append(f"model_dir: {self.model_dir} is not a directory")
        p += o.check_url("url", self.url)
        p += o.check_name("endpoint_name", self.endpoint_name)
        p += [f"compare: {c} is not a file" for c in self.compare if not Path(c).is_file()]
        if self.quantization not in ("none", "bf16", "fp16", "nf4", "auto"):
            p.append(f"quantization: {self.quantization!r} is not one of none, bf16, fp16, nf4, auto")
        p += o.check_range("limit", self.limit, 1) + o.check_range("max_new_tokens", self.max_new_tokens, 1)
        p += o.check_range("batch_size", self.batch_size, 1) + o.check_range("concurrency", self.concurrency, 1)
        p += o.check_range("timeout", self.timeout, 0.001) + o.check_range("retries", self.retries, 0)
        return p

    def source(self) -> str:
        return self.model_dir or self.url or self.endpoint_name or "?"


# ---- questions -------------------------------------------------------------------------------------------------

def load_questions(data: str | Path, image_folder: str | Path | None = None, *,
                   question_types: list[str] | tuple[str, ...] = (), limit: int | None = None) -> list[dict]:
    """One single-turn question per human/gpt pair: {id, image (path), question, answer[, chart_type,
    question_type]}. The file is read and checked by the trainer's loader (every problem at once, as DataError)."""
    from train.data import DataError, parse_record, read_records

    data = Path(data)
    folder = Path(image_folder) if image_folder else default_image_folder(data)
    records, problems = read_records(data)
    questions = []
    for row, record in records:
        example, row_problems, _ = parse_record(record, row)
        problems += row_problems
        if example is None:
            continue
        if example.image is None:
            problems.append(f"row {row} (id {example.id!r}): no image; eval asks questions about images")
            continue
        if not (folder / example.image).is_file():
            problems.append(f"row {row} (id {example.id!r}): image {example.image!r} not found in {folder}")
            continue
        types = record.get("question_types") or []
        pairs = zip(example.messages[0::2], example.messages[1::2], strict=False)
        for k, (user, assistant) in enumerate(pairs):
            item = {"id": f"{example.id}#{k}", "image": str(folder / example.image),
                    "question": _text(user), "answer": _text(assistant)}
            if record.get("chart_type"):
                item["chart_type"] = str(record["chart_type"])
            if k < len(types):
                item["question_type"] = str(types[k])
            questions.append(item)
    if problems:
        raise DataError(str(data), problems)
    if question_types:
        known = sorted({q["question_type"] for q in questions if "question_type" in q})
        unknown = sorted(set(question_types) - set(known))
        if unknown:
            raise ValueError(f"{data}: question type(s) {', '.join(unknown)} not in the data; it has: "
                             f"{', '.join(known) or 'no question_types at all'}")
        questions = [q for q in questions if q.get("question_type") in question_types]
    return questions[:limit] if limit else questions


def default_image_folder(data: Path) -> Path:
    """`llava-sm data synth` puts images/ beside the split folders; otherwise images sit beside the data file."""
    beside_split = data.parent.parent / "images"
    return beside_split if beside_split.is_dir() else data.parent


def _text(message: dict) -> str:
    return "".join(c["text"] for c in message["content"] if c.get("type") == "text").strip()


def blank_png(size: int = 336, grey: int = BLANK_GREY) -> bytes:
    """A uniform grey square PNG, written without PIL (the HTTP path stays dependency-free)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    row = b"\x00" + bytes([grey]) * (3 * size)
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * size, 9))
            + chunk(b"IEND", b""))


# ---- answering: in-process or over HTTP / InvokeEndpoint ------------------------------------------------------

def local_answerer(opts: EvalOptions, errors: list[str]) -> Answerer:
    """Batched greedy answers from a model dir, loaded and decoded exactly as the server does."""
    from serve.engine.errors import ApiError
    from serve.engine.images import decode_image
    from serve.engine.model import ModelLoadError, load_artifact
    from serve.engine.predictor import Predictor
    from serve.engine.types import GenerationRequest

    try:
        predictor = Predictor(load_artifact(opts.model_dir, quantization=opts.quantization, device=opts.device))
    except ModelLoadError as e:
        raise ValueError(f"cannot load {opts.model_dir}: {e}") from None
    blank = decode_image(blank_png(), max_pixels=1 << 30)

    def image(q: dict) -> Any:
        try:
            return decode_image(Path(q["image"]).read_bytes(), max_pixels=1 << 30)
        except (OSError, ApiError) as e:
            raise ValueError(f"{q['id']}: cannot read image {q['image']}: {e}") from None

    def answer(items: list[dict], use_blank: bool) -> list[str]:
        requests = [GenerationRequest(image=blank if use_blank else image(q), question=q["question"],
                                      temperature=0.0, max_new_tokens=opts.max_new_tokens) for q in items]
        answers = []
        for q, result in zip(items, predictor.predict(requests), strict=True):
            if isinstance(result, ApiError):
                errors.append(f"{q['id']}: {result}")
            answers.append(getattr(result, "answer", ""))
        return answers

    return answer


def remote_answerer(opts: EvalOptions, errors: list[str]) -> Answerer:
    """Answers through the client (server URL or endpoint); a failed request scores as wrong and is counted."""
    from client.invoke import ClientError, predict

    blank = blank_png()
    target = {"url": opts.url} if opts.url else {
        "endpoint_name": opts.endpoint_name, "region": opts.region, "profile": opts.profile,
        "endpoint_url": opts.endpoint_url}

    def one(q: dict, use_blank: bool) -> str:
        try:
            return predict(blank if use_blank else Path(q["image"]).read_bytes(), q["question"], temperature=0.0,
                           max_new_tokens=opts.max_new_tokens, timeout=opts.timeout, retries=opts.retries,
                           **target)
        except ClientError as e:
            errors.append(f"{q['id']}: {e}")
            return ""
        except OSError as e:
            raise ValueError(f"{q['id']}: cannot read image {q['image']}: {e}") from None

    def answer(items: list[dict], use_blank: bool) -> list[str]:
        with ThreadPoolExecutor(max_workers=opts.concurrency) as pool:
            return list(pool.map(lambda q: one(q, use_blank), items))

    return answer


def ask_all(questions: list[dict], answer: Answerer, use_blank: bool, chunk: int, label: str) -> list[str]:
    """Answers for every question, `chunk` at a time, with a progress line every ~10%."""
    out: list[str] = []
    step = max(1, len(questions) // 10)
    next_report, started = step, time.monotonic()
    for start in range(0, len(questions), chunk):
        out += answer(questions[start:start + chunk], use_blank)
        if len(out) >= next_report or len(out) == len(questions):
            log.info("%s: %d/%d questions (%.1f s)", label, len(out), len(questions), time.monotonic() - started)
            next_report = len(out) + step
    return out


# ---- the run ---------------------------------------------------------------------------------------------------

def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Ask, score, write eval.json / eval.md / predictions.jsonl / eval.png; return the report."""
    from train.metrics import markdown_table, score

    questions = load_questions(opts.data, opts.image_folder, question_types=opts.question_types, limit=opts.limit)
    if not questions:
        raise ValueError(f"{opts.data}: no questions to evaluate")
    name = opts.name or opts.source()
    errors: list[str] = []
    answer = local_answerer(opts, errors) if opts.model_dir else remote_answerer(opts, errors)
    chunk = opts.batch_size if opts.model_dir else opts.concurrency * 4
    started = time.monotonic()
    runs, predictions = {}, []
    for use_blank in (False, True) if opts.blank else (False,):
        run_name = name + (BLANK_SUFFIX if use_blank else "")
        failed_before = len(errors)
        answers = ask_all(questions, answer, use_blank, chunk, run_name)
        if len(errors) - failed_before >= len(questions):
            raise EvalFailed(f"all {len(questions)} questions failed, e.g. {errors[0]}")
        records = [{**q, "prediction": a, "run": run_name} for q, a in zip(questions, answers, strict=True)]
        runs[run_name] = score(records, GROUP_KEYS)
        predictions += records
    for path in opts.compare:
        runs = {**json.loads(Path(path).read_text())["runs"], **runs}
    report = {"data": str(opts.data), "source": opts.source(), "questions": len(questions), "failed": len(errors),
              "seconds": round(time.monotonic() - started, 1), "runs": runs}
    if errors:
        log.warning("%d question(s) got no answer and count as wrong, e.g. %s", len(errors), errors[0])
    write_outputs(Path(opts.out_dir), report, predictions, markdown_table(runs))
    return report


def write_outputs(out: Path, report: dict, predictions: list[dict], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval.md").write_text(table + "\n")
    with (out / "predictions.jsonl").open("w") as f:
        f.writelines(json.dumps(p) + "\n" for p in predictions)
    try:
        plot_runs(report["runs"], out / "eval.png")
    except ImportError:
        log.warning("matplotlib is not installed: no eval.png (pip install 'llava-sagemaker[train]')")


def plot_runs(runs: dict[str, dict], path: Path) -> None:
    """Grouped horizontal bars: one group per row of the table (overall, chart types, question types), one bar
    per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("overall", "")]
    for report in runs.values():
        for key, values in report["groups"].items():
            rows += [(key, v) for v in values if (key, v) not in rows]
    names = list(runs)
    height = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.32 * len(rows) * max(1, len(names) * 0.6)), dpi=100)
    for j, run in enumerate(names):
        acc = [_accuracy(runs[run], key, value) for key, value in rows]
        ax.barh([i + j * height for i in range(len(rows))], acc, height=height, label=run)
    ax.set_yticks([i + height * (len(names) - 1) / 2 for i in range(len(rows))],
                  ["overall" if k == "overall" else f"{k}: {v}" for k, v in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("relaxed accuracy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _accuracy(report: dict, key: str, value: str) -> float:
    cell = report["overall"] if key == "overall" else report["groups"].get(key, {}).get(value)
    return cell["accuracy"] if cell else 0.0


# ---- command line ----------------------------------------------------------------------------------------------

def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="relaxed accuracy on a validation set, with a blank-image control",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_arguments(parser, EvalOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from train.data import DataError

    opts, _ = o.resolve(EvalOptions, args, "eval")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = evaluate(opts)
    except (DataError, ValueError) as e:
        print(f"llava-sm eval: {e}", file=sys.stderr)
        return 2
    except EvalFailed as e:
        print(f"llava-sm eval: {e}", file=sys.stderr)
        return 1
    print((Path(opts.out_dir) / "eval.md").read_text(), end="")
    print(f"\n{report['questions']} questions, {report['failed']} failed requests, {report['seconds']} s; "
          f"wrote {opts.out_dir}/eval.json, eval.md, eval.png, predictions.jsonl")
    return 0
