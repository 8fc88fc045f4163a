"""The cost of JSON-schema answers: decode tokens/s with and without a json_schema, on the same model and batch.

    python -m bench.constrained [--model-dir DIR] [--batch 1,8] [--new-tokens 48] [--rounds 5] [--out DIR] [--tiny]

In-process (no HTTP): the Predictor the server runs, on a tiny `test` artifact built offline unless --model-dir is
given, on CPU. For each batch size, an unconstrained greedy batch and the same batch with a json_schema on every
row alternate --rounds times (after one warm-up of each). tokens/s = completion tokens / the process's CPU time
for the batch (`time.process_time`: on a shared machine, other processes' load stretches wall time but not this),
with wall-clock tokens/s reported beside it. Reported per batch size: the median tokens/s of each and the median of
the per-round ratios (constrained / unconstrained), plus the first compile of the schema and a cached one. --tiny is
a seconds-long smoke run for the test suite.

Both runs decode exactly --new-tokens per row, so the ratio is the per-token cost of the grammar (mask + advance):
the end-of-sequence token is switched off for the measured model (a random model's EOS would end plain rows early),
and the schema's string has a minLength no run reaches (its grammar is live at every step).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

from bench.report import machine, markdown_table, write_report

QUESTION = "What type of chart is this? Answer in JSON."
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind", "title"],
          "properties": {"kind": {"enum": ["pie", "bar", "line"]}, "title": {"type": "string", "minLength": 10_000}}}
COLUMNS = [("batch", "batch"), ("plain_tok_s", "unconstrained tok/s"), ("constrained_tok_s", "json_schema tok/s"),
           ("ratio", "ratio (median of rounds)"), ("ratios", "each round"), ("wall_ratio", "wall-clock ratio"),
           ("tokens", "tokens per run (plain / json)")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.constrained", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="an artifact to load (default: build a tiny `test` one)")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=48, help="max_new_tokens per row (default 48)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per batch size (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="write constrained.json and constrained.md here")
    parser.add_argument("--tiny", action="store_true", help="smoke run: batch 1,2; 4 tokens; 1 round")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.new_tokens, args.rounds = "1,2", 4, 1
    args.batches = [int(b) for b in args.batch.split(",") if b.strip()]
    if args.rounds < 1 or args.new_tokens < 1 or not args.batches or min(args.batches) < 1:
        parser.error("--rounds, --new-tokens and every --batch size must be >= 1")
    return args


def requests_for(batch: int, new_tokens: int, schema: dict[str, Any] | None) -> list[Any]:
    from PIL import Image

    from serve.engine.types import GenerationRequest

    return [GenerationRequest(image=Image.new("RGB", (48 + 8 * i, 40), (30 * i % 256, 120, 90)), question=QUESTION,
                              temperature=0.0, max_new_tokens=new_tokens, json_schema=schema)
            for i in range(batch)]


def timed_run(predictor: Any, batch: int, new_tokens: int,
              schema: dict[str, Any] | None) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, completion tokens) of one batch, its prompts encoded beforehand as the server
    does."""
    from serve.engine.types import GenerationResult

    requests = requests_for(batch, new_tokens, schema)
    for request in requests:
        predictor.prepare(request)
    cpu, wall = time.process_time(), time.perf_counter()
    outcomes = predictor.predict(requests)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if not all(isinstance(o, GenerationResult) for o in outcomes):
        raise RuntimeError(f"a request failed: {outcomes}")
    return cpu, wall, sum(o.completion_tokens for o in outcomes)


def measure(predictor: Any, batch: int, new_tokens: int, rounds: int) -> dict[str, Any]:
    for schema in (None, SCHEMA):  # warm-up: first-call costs are not what is measured
        timed_run(predictor, batch, new_tokens, schema)
    plain, constrained, ratios, wall_ratios, tokens = [], [], [], [], set()
    for _ in range(rounds):
        p_cpu, p_wall, p_tok = timed_run(predictor, batch, new_tokens, None)
        c_cpu, c_wall, c_tok = timed_run(predictor, batch, new_tokens, SCHEMA)
        plain.append(p_tok / p_cpu)
        constrained.append(c_tok / c_cpu)
        ratios.append(constrained[-1] / plain[-1])
        wall_ratios.append((c_tok / c_wall) / (p_tok / p_wall))
        tokens.add(f"{p_tok} / {c_tok}")
    return {"batch": batch, "plain_tok_s": statistics.median(plain),
            "constrained_tok_s": statistics.median(constrained), "ratio": round(statistics.median(ratios), 3),
            "ratios": " ".join(f"{r:.2f}" for r in ratios), "wall_ratio": round(statistics.median(wall_ratios), 3),
            "wall_ratios": wall_ratios, "tokens": ", ".join(sorted(tokens)), "plain_runs": plain,
            "constrained_runs": constrained}


def compile_times(predictor: Any) -> dict[str, float]:
    """Milliseconds to compile a schema not seen before, and to fetch it from the cache."""
    schema = {**SCHEMA, "description": f"fresh {time.time_ns()}"}  # a key no earlier call cached
    started = time.perf_counter()
    predictor.grammars.compile(schema)
    first = time.perf_counter() - started
    started = time.perf_counter()
    predictor.grammars.compile(schema)
    return {"compile_ms": round(1000 * first, 3), "cached_ms": round(1000 * (time.perf_counter() - started), 3)}


def without_eos(loaded: Any) -> Any:
    """The loaded model with no end-of-sequence token: every row decodes its whole budget."""
    import copy
    import dataclasses

    gen = copy.deepcopy(loaded.generation_config)
    gen.eos_token_id = []
    return dataclasses.replace(loaded, generation_config=gen)


def main(argv: list[str] | None = None) -> int:
    import torch

    from serve.engine.model import load_artifact
    from serve.engine.predictor import Predictor

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from demo.tiny import build_tiny_artifact

            model_dir = str(build_tiny_artifact(f"{tmp}/tiny"))
        loaded = without_eos(load_artifact(model_dir, device="cpu"))
        predictor = Predictor(loaded, max_new_tokens_cap=args.new_tokens)
        rows = [measure(predictor, b, args.new_tokens, args.rounds) for b in args.batches]
        compiled = compile_times(predictor)
    data = {"machine": machine(), "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": args.threads,
            "schema": SCHEMA, "model": args.model_dir or "tiny test artifact", "rows": rows, **compiled}
    markdown = (f"JSON-schema answers vs plain, greedy, {args.new_tokens} new tokens, {args.rounds} alternating "
                f"rounds, {args.threads} torch thread(s), tokens per CPU second; schema compile "
                f"{compiled['compile_ms']} ms "
                f"(cached: {compiled['cached_ms']} ms)\n\n" + markdown_table(rows, COLUMNS))
    write_report(args.out, "constrained", data, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
