"""CPU benchmark of the whole server on a tiny model: sequential (max batch 1) vs dynamic batching, same sweep.

    python -m bench.run_cpu [--model-dir DIR] [--concurrency 1,4,16,64] [--requests N] [--rounds N] [--out DIR]
                            [--tiny]

Builds a tiny `test` artifact (demo.tiny) unless --model-dir is given, then starts `python -m serve` on a free
loopback port twice -- SERVE_MAX_BATCH_SIZE=1, then SERVE_MAX_BATCH_SIZE=--batch-size -- runs bench.load's sweep
against each, stops it, and reports both tables plus batched/sequential requests/s per level. With --rounds N the
two alternate N times and the comparison is the median per level (every round's speed-up is listed). Targets
checked: batched >= 4x sequential req/s at concurrency 16; /ping p99 <= 20 ms under that load.
--tiny runs a seconds-long smoke version (levels 1,4; 8 requests; 2 new tokens) for the test suite.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.load import COLUMNS, parse_levels, sweep
from bench.report import machine, markdown_table, write_report

SPEEDUP_TARGET, SPEEDUP_LEVEL, PING_P99_TARGET_MS = 4.0, 16, 20.0
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} was not ready within {timeout_s:.0f} s")


@contextmanager
def server(model_dir: str, *, batch_size: int, torch_threads: int, log_path: Path, max_wait_ms: float | None = None):
    """`python -m serve` on a free loopback port; yields (url, pid); SIGTERM and wait on exit."""
    port = free_port()
    env = {**os.environ, "SM_MODEL_DIR": model_dir, "SERVE_HOST": "127.0.0.1", "SAGEMAKER_BIND_TO_PORT": str(port),
           "SERVE_MAX_BATCH_SIZE": str(batch_size), "SERVE_MAX_QUEUE": "1024", "SERVE_REQUEST_TIMEOUT_S": "300",
           "SERVE_TORCH_THREADS": str(torch_threads), "SERVE_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if max_wait_ms is not None:
        env["SERVE_MAX_WAIT_MS"] = str(max_wait_ms)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "serve"], env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout_s=180)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def compare(sequential: list[dict[str, Any]], batched: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for s, b in zip(sequential, batched, strict=True):
        rows.append({"concurrency": s["concurrency"], "sequential_req_per_s": s["req_per_s"],
                     "batched_req_per_s": b["req_per_s"],
                     "speedup": b["req_per_s"] / s["req_per_s"] if s["req_per_s"] else float("nan"),
                     "sequential_ping_p99_ms": s["ping_p99_ms"], "batched_ping_p99_ms": b["ping_p99_ms"]})
    return rows


def targets(comparison: list[dict[str, Any]]) -> dict[str, Any]:
    at = next((r for r in comparison if r["concurrency"] == SPEEDUP_LEVEL), None)
    if at is None:
        return {"checked": False, "why": f"concurrency {SPEEDUP_LEVEL} not in the sweep"}
    return {"checked": True, "speedup_at_16": at["speedup"], "speedup_target": SPEEDUP_TARGET,
            "speedup_met": at["speedup"] >= SPEEDUP_TARGET, "ping_p99_ms_at_16": at["batched_ping_p99_ms"],
            "ping_target_ms": PING_P99_TARGET_MS, "ping_met": at["batched_ping_p99_ms"] <= PING_P99_TARGET_MS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="artifact to serve (default: a fresh tiny `test` artifact)")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, help="requests per level (default max(8 x concurrency, 128))")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64, help="SERVE_MAX_BATCH_SIZE of the batched server")
    parser.add_argument("--max-wait-ms", type=float, help="SERVE_MAX_WAIT_MS of the batched server (default: its own)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="alternate sequential and batched runs this many "
                                                               "times; report the medians")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (for tests)")
    parser.add_argument("--out", help="write cpu_compare.json/.md here")
    args = parser.parse_args(argv)
    try:
        levels = parse_levels("1,4" if args.tiny else args.concurrency)
    except ValueError as e:
        parser.error(str(e))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    requests = 8 if args.tiny else args.requests
    max_new = 2 if args.tiny else args.max_new_tokens
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from demo.tiny import build_tiny_artifact

            model_dir = str(build_tiny_artifact(Path(tmp) / "tiny"))
        try:  # one {"sequential": rows, "batched": rows} per round
            runs = [one_round(model_dir, args, levels, requests, max_new, Path(tmp)) for _ in range(args.rounds)]
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
    comparisons = [compare(r["sequential"], r["batched"]) for r in runs]
    summary = median_rounds(comparisons)
    verdict = targets(summary)
    results = runs[-1]
    parts = [
        f"CPU, tiny model, max_new_tokens={max_new}, torch threads={args.torch_threads}",
        "Sequential server (SERVE_MAX_BATCH_SIZE=1)" + (", last round" if args.rounds > 1 else "") + "\n\n"
        + markdown_table(results["sequential"], COLUMNS),
        f"Batched server (SERVE_MAX_BATCH_SIZE={args.batch_size}, SERVE_MAX_WAIT_MS="
        f"{'default' if args.max_wait_ms is None else args.max_wait_ms})"
        + (", last round" if args.rounds > 1 else "") + "\n\n" + markdown_table(results["batched"], COLUMNS),
        f"Batched vs sequential{f', median of {args.rounds} alternating rounds' if args.rounds > 1 else ''}\n\n"
        + markdown_table(summary, SUMMARY_COLUMNS),
        f"Targets: {verdict}"]
    md = "\n\n".join(parts)
    write_report(args.out, "cpu_compare", {"machine": machine(), "max_new_tokens": max_new,
                                           "batch_size": args.batch_size, "rounds": runs,
                                           "comparisons": comparisons, "summary": summary, "targets": verdict}, md)
    errors = sum(r["errors"] for run in runs for rows in run.values() for r in rows)
    return 0 if errors == 0 else 1


def one_round(model_dir: str, args: argparse.Namespace, levels: tuple[int, ...], requests: int | None, max_new: int,
              tmp: Path) -> dict[str, list[dict[str, Any]]]:
    """The sweep against the sequential server, then against the batched one; RuntimeError with the server's log
    when one does not start."""
    results = {}
    for name, batch in (("sequential", 1), ("batched", args.batch_size)):
        log_path = tmp / f"server-{name}.log"
        try:
            with server(model_dir, batch_size=batch, torch_threads=args.torch_threads, log_path=log_path,
                        max_wait_ms=args.max_wait_ms if batch > 1 else None) as (url, pid):
                results[name] = sweep(url, levels, requests=requests, max_new_tokens=max_new, images=4,
                                      server_pid=pid)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n--- server log ---\n{log_path.read_text(errors='replace')[-4000:]}") from None
    return results


SUMMARY_COLUMNS = [("concurrency", "concurrency"), ("sequential_req_per_s", "sequential req/s"),
                   ("batched_req_per_s", "batched req/s"), ("speedup", "speed-up"), ("speedups", "each round"),
                   ("batched_ping_p99_ms", "batched /ping p99 ms")]


def median_rounds(comparisons: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per concurrency level, the median of each number over the rounds, and every round's speed-up. Alternating
    sequential and batched rounds on a shared machine spreads its slow spells over both servers."""
    import statistics

    rows = []
    for level_rows in zip(*comparisons, strict=True):
        row: dict[str, Any] = {"concurrency": level_rows[0]["concurrency"]}
        for key in ("sequential_req_per_s", "batched_req_per_s", "speedup", "sequential_ping_p99_ms",
                    "batched_ping_p99_ms"):
            row[key] = statistics.median(r[key] for r in level_rows)
        row["speedups"] = " ".join(f"{r['speedup']:.1f}" for r in level_rows)
        rows.append(row)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
