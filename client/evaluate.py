"""`llava-sm eval`: relaxed accuracy of a model on a validation set, with a blank-image control.

    llava-sm eval --data data/validation/dataset.json --model-dir runs/merged          # in-process (torch)
    llava-sm eval --data data/validation/dataset.json --url http://localhost:8080      # a running server
    llava-sm eval --data data/validation/dataset.json --endpoint-name chart-qa         # a SageMaker endpoint

Every human/gpt pair of the LLaVA data becomes one single-turn question about its image, answered greedily.
The same questions are then asked with a plain grey image instead (`--no-blank` skips this): the gap between the
two shows how much the answers depend on the picture. This is the evaluation the training job's eval_report.json
runs too (evaluation/): relaxed accuracy overall, per chart type and per question type when the records carry them
(`chart_type`, `question_types`, as `llava-sm data synth` writes). Writes to --out-dir: eval.json (scores, and any
--compare reports' runs), eval.md (the markdown table, also printed), predictions.jsonl, eval.png (bar chart).
--model-dir loads the model as the server does (NF4 on CUDA by default) and needs the serve extra (torch); the
server and endpoint paths need nothing beyond the light client.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from client import options as o
from client.options import option

log = logging.getLogger(__name__)

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
    quantization: str = option("auto", "--model-dir weights, as the server's SERVE_QUANTIZATION: auto (NF4 on CUDA, "
                                       "unquantized on CPU), nf4, bf16, fp16 or none")
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


# ---- the run ---------------------------------------------------------------------------------------------------

def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Ask, score, write eval.json / eval.md / predictions.jsonl / eval.png; return the report."""
    from evaluation.questions import load_questions
    from evaluation.report import evaluate as run_eval
    from evaluation.report import write_outputs

    questions = load_questions(opts.data, opts.image_folder, question_types=opts.question_types, limit=opts.limit)
    if not questions:
        raise ValueError(f"{opts.data}: no questions to evaluate")
    name = opts.name or opts.source()
    report, predictions = run_eval(questions, {name: answerer(opts)}, blank_control=[name] if opts.blank else [],
                                   max_new_tokens=opts.max_new_tokens)
    runs = report["runs"]
    for path in opts.compare:
        runs = {**json.loads(Path(path).read_text())["runs"], **runs}
    report = {"data": str(opts.data), "source": opts.source(), **report, "runs": runs}
    write_outputs(Path(opts.out_dir), report, predictions)
    return report


def answerer(opts: EvalOptions) -> Any:
    from evaluation.answerers import client_answerer, engine_answerer

    if opts.url or opts.endpoint_name:
        target = {"url": opts.url} if opts.url else {
            "endpoint_name": opts.endpoint_name, "region": opts.region, "profile": opts.profile,
            "endpoint_url": opts.endpoint_url}
        return client_answerer(max_new_tokens=opts.max_new_tokens, concurrency=opts.concurrency,
                               timeout=opts.timeout, retries=opts.retries, **target)
    from serve.engine.model import ModelLoadError, load_artifact
    from serve.engine.predictor import Predictor

    try:
        loaded = load_artifact(opts.model_dir, quantization=opts.quantization, device=opts.device)
    except ModelLoadError as e:
        raise ValueError(f"cannot load {opts.model_dir}: {e}") from None
    predictor = Predictor(loaded, max_new_tokens_cap=max(opts.max_new_tokens, 1))
    return engine_answerer(predictor, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size)


# ---- command line ----------------------------------------------------------------------------------------------

def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="relaxed accuracy on a validation set, with a blank-image control",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_arguments(parser, EvalOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from evaluation.report import EvalFailed
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
