"""CPU benchmark of many LoRA adapters on one server: the same traffic on the base model only, on one adapter, and
spread over 4 adapters (tiny model).

    python -m bench.adapters [--concurrency 1,4,16] [--requests N] [--rounds N] [--rank 8] [--out DIR] [--tiny]

Builds a tiny `test` artifact and 4 LoRA adapters for it (rank --rank on every linear layer of the language model,
plus a trained projector, as `python -m train --export adapter` makes them; their weights are random: the speed does
not depend on what they learned), puts them in the model dir's adapters/ folder so the server loads them at start-up,
starts `python -m serve` once and runs bench.load's levels against it three ways: every request on the base model;
every request on one adapter; request i on adapter i mod 4 (the body's "adapter" field), so batches mix adapters.
The three alternate per round (--rounds N: medians per level). Reported: each table, and per level each adapter
mode's output tokens/s as a share of the base's (tokens, since different adapters stop after different lengths).
On CPU both paths are eager `generate`; the share is what the adapters' LoRA products and the per-adapter
sub-batches cost. --tiny runs a seconds-long smoke version for the test suite.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.load import COLUMNS, parse_levels, run_level
from bench.report import machine, markdown_table, write_report
from bench.run_cpu import server

ADAPTERS = ("a0", "a1", "a2", "a3")
MODES = {"base": (None,), "one adapter": ADAPTERS[:1], "4 adapters": ADAPTERS}
QUESTION = "What type of chart is this, and what is its title?"


def make_adapters(model_dir: Path, rank: int) -> None:
    """`len(ADAPTERS)` random LoRA adapters (and projectors) for the artifact, in its adapters/ folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from serve.engine.adapter_files import BASE_FACTS_FILE, base_facts
    from train.modeling import LORA_TARGET_REGEX, PROJECTOR

    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration.from_pretrained(model_dir)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGET_REGEX,
                                                      modules_to_save=[PROJECTOR]))
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name or "modules_to_save" in param_name:
                param.data += 0.05 * torch.randn_like(param)
        folder = model_dir / "adapters" / name
        peft_model.save_pretrained(folder)
        (folder / BASE_FACTS_FILE).write_text(json.dumps(base_facts(model.config)))


def bodies(adapters: tuple[str | None, ...], max_new_tokens: int, images: int) -> list[bytes]:
    """Request bodies; body i asks about image i mod `images` on adapter i mod len(adapters)."""
    from bench.samples import image_set

    pictures = image_set(images)
    count = max(images, len(adapters))
    out = []
    for i in range(count):
        body: dict[str, Any] = {"image": base64.b64encode(pictures[i % images]).decode(), "question": QUESTION,
                                "temperature": 0, "max_new_tokens": max_new_tokens}
        if adapters[i % len(adapters)] is not None:
            body["adapter"] = adapters[i % len(adapters)]
        out.append(json.dumps(body).encode())
    return out


def one_round(url: str, pid: int, levels: tuple[int, ...], requests: int | None,
              max_new: int) -> dict[str, list[dict[str, Any]]]:
    results = {}
    for mode, adapters in MODES.items():
        payloads = bodies(adapters, max_new, images=4)
        run_level(url, payloads, 1, len(payloads), server_pid=pid)  # warm-up: first calls on each adapter
        results[mode] = [run_level(url, payloads, c, requests or max(8 * c, 64), server_pid=pid).summary()
                         for c in levels]
    return results


def compare(runs: list[dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per level: the median requests/s and output tokens/s of each mode over the rounds, and each adapter mode's
    tokens/s as a share of the base's (tokens, not requests: different adapters stop after different lengths)."""
    rows = []
    for i, level in enumerate(r["concurrency"] for r in runs[0]["base"]):
        row: dict[str, Any] = {"concurrency": level}
        for mode in MODES:
            row[f"{mode} req/s"] = statistics.median(run[mode][i]["req_per_s"] for run in runs)
            row[f"{mode} tok/s"] = statistics.median(run[mode][i]["output_tokens_per_s"] for run in runs)
        for mode in list(MODES)[1:]:
            base = row["base tok/s"]
            row[f"{mode} / base"] = row[f"{mode} tok/s"] / base if base else float("nan")
        rows.append(row)
    return rows


SUMMARY_COLUMNS = [("concurrency", "concurrency"), ("base req/s", "base req/s"), ("base tok/s", "base tok/s"),
                   ("one adapter tok/s", "1 adapter tok/s"), ("4 adapters tok/s", "4 adapters tok/s"),
                   ("one adapter / base", "1 adapter / base"), ("4 adapters / base", "4 adapters / base")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adapters", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, help="requests per level (default max(8 x concurrency, 64))")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters")
    parser.add_argument("--batch-size", type=int, default=16, help="SERVE_MAX_BATCH_SIZE")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="the three modes alternate this many times")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (for tests)")
    parser.add_argument("--out", help="write adapters.json/.md here")
    args = parser.parse_args(argv)
    try:
        levels = parse_levels("1,4" if args.tiny else args.concurrency)
    except ValueError as e:
        parser.error(str(e))
    if args.rounds < 1 or args.rank < 1:
        parser.error("--rounds and --rank must be at least 1")
    requests, max_new = (8, 2) if args.tiny else (args.requests, args.max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        from demo.tiny import build_tiny_artifact

        model_dir = build_tiny_artifact(Path(tmp) / "tiny")
        make_adapters(model_dir, args.rank)
        log_path = Path(tmp) / "server.log"
        try:
            with server(str(model_dir), batch_size=args.batch_size, torch_threads=args.torch_threads,
                        log_path=log_path) as (url, pid):
                runs = [one_round(url, pid, levels, requests, max_new) for _ in range(args.rounds)]
        except RuntimeError as e:
            print(f"{e}\n--- server log ---\n{log_path.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            return 1
    summary = compare(runs)
    rounds = f", median of {args.rounds} alternating rounds" if args.rounds > 1 else ""
    parts = [f"CPU, tiny model, {len(ADAPTERS)} LoRA adapters of rank {args.rank} + projector, "
             f"max_new_tokens={max_new}, SERVE_MAX_BATCH_SIZE={args.batch_size}, torch threads={args.torch_threads}"]
    parts += [f"{mode}{', last round' if args.rounds > 1 else ''}\n\n" + markdown_table(runs[-1][mode], COLUMNS)
              for mode in MODES]
    parts.append(f"Output tokens/s by mode{rounds}\n\n" + markdown_table(summary, SUMMARY_COLUMNS, digits=2))
    write_report(args.out, "adapters", {"machine": machine(), "max_new_tokens": max_new, "rank": args.rank,
                                        "batch_size": args.batch_size, "rounds": runs, "summary": summary},
                 "\n\n".join(parts))
    errors = sum(r["errors"] for run in runs for rows in run.values() for r in rows)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
