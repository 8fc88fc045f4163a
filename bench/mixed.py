"""Mixed traffic on CPU: do short answers wait for long ones? The batch and continuous schedulers, same run.

    python -m bench.mixed [--model-dir DIR] [--rounds 3] [--long-clients 4] [--short-clients 8] [--long-tokens 200]
                          [--short-tokens 8] [--seconds 20] [--batch-size 16] [--out DIR] [--tiny]

Builds a tiny `test` artifact (demo.tiny) unless --model-dir is given. Each round starts `python -m serve` with
SERVE_SCHEDULER=batch, then with SERVE_SCHEDULER=continuous (alternating, so a slow spell of a shared machine hits
both), and measures against each:
- alone: short requests one at a time, nothing else running (latency p50/p90);
- mix: `--long-clients` clients loop `--long-tokens`-token requests while `--short-clients` clients loop
  `--short-tokens`-token ones, for `--seconds` after every long client has its first request in flight; counted:
  requests that finished inside that window. Reported: the short requests' latency p50/p90 and its ratio to
  alone (and the p50 of the server's own latency_ms, arrival to answer, which leaves the load generator out),
  the long answers' tokens/s, all answers' tokens/s, /ping p99 (from a separate process).
The summary is the median of each number over the rounds. Last, in this process without a server: a prefill of 1, 2,
4 and 8 joining rows against one decode step of 1, 4 and 12 rows (how long joining stalls the running rows).
Targets checked: continuous short p50 under the mix <= 2x its p50 alone; continuous aggregate tokens/s >= the
batch scheduler's.
Requests are greedy on one chart image; the tiny model may end an answer early (the mean completion tokens of each
group are reported). --tiny is a seconds-long smoke run for the test suite.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.load import QUESTION, Client, Sample, make_bodies, one_request, ping_loop
from bench.report import machine, markdown_table, percentile, write_report
from bench.run_cpu import server

SCHEDULERS = ("batch", "continuous")
SLOWDOWN_TARGET = 2.0  # short p50 under the mix / short p50 alone, continuous scheduler


def timed(client: Client, body: bytes) -> tuple[float, Sample]:
    """(when it finished, the sample)."""
    sample = one_request(client, body)
    return time.perf_counter(), sample


def alone(url: str, body: bytes, count: int) -> list[Sample]:
    client = Client(url, 120.0)
    try:
        one_request(client, body)  # warm-up
        return [one_request(client, body) for _ in range(count)]
    finally:
        client.close()


def mix(url: str, long_body: bytes, short_body: bytes, *, long_clients: int, short_clients: int, seconds: float,
        server_pid: int | None) -> dict[str, Any]:
    """Long and short clients looping for `seconds`; what finished inside the window, and /ping from a process."""
    done: dict[str, list[tuple[float, Sample]]] = {"long": [], "short": []}
    lock = threading.Lock()
    stop = threading.Event()

    def loop(kind: str, body: bytes) -> None:
        client = Client(url, 300.0)
        try:
            while not stop.is_set():
                finished, sample = timed(client, body)
                with lock:
                    done[kind].append((finished, sample))
        finally:
            client.close()

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    ping_stop, ready, queue = ctx.Event(), ctx.Event(), ctx.Queue()
    pinger = ctx.Process(target=ping_loop, args=(url, server_pid, ping_stop, ready, queue), daemon=True)
    pinger.start()
    ready.wait(timeout=60)
    longs = [threading.Thread(target=loop, args=("long", long_body), daemon=True) for _ in range(long_clients)]
    shorts = [threading.Thread(target=loop, args=("short", short_body), daemon=True) for _ in range(short_clients)]
    for t in longs:
        t.start()
    time.sleep(0.5)  # the long requests are generating when the window opens
    start = time.perf_counter()
    for t in shorts:
        t.start()
    time.sleep(seconds)
    end = time.perf_counter()
    stop.set()
    for t in longs + shorts:
        t.join()
    ping_stop.set()
    try:
        pings, ping_failures, peak = queue.get(timeout=30)
    except Exception:  # noqa: BLE001 - the pinger died: the other numbers stand
        pings, ping_failures, peak = [], -1, None
    pinger.join(timeout=10)
    return summarize(done, start, end, pings, ping_failures, peak)


def summarize(done: dict[str, list[tuple[float, Sample]]], start: float, end: float, pings: list[float],
              ping_failures: int, peak_rss: float | None) -> dict[str, Any]:
    inside = {kind: [s for t, s in samples if start <= t <= end] for kind, samples in done.items()}
    seconds = end - start
    short_ok = [s for s in inside["short"] if s.ok]
    long_ok = [s for s in inside["long"] if s.ok]
    errors = sum(1 for samples in inside.values() for s in samples if not s.ok)
    short_lat = [s.latency_ms for s in short_ok]
    short_server = [s.server_latency_ms for s in short_ok if s.server_latency_ms is not None]
    long_tokens = sum(s.completion_tokens for s in long_ok)
    short_tokens = sum(s.completion_tokens for s in short_ok)
    return {"seconds": seconds, "short_requests": len(short_ok), "long_requests": len(long_ok), "errors": errors,
            "short_p50_ms": percentile(short_lat, 50), "short_p90_ms": percentile(short_lat, 90),
            "short_server_p50_ms": percentile(short_server, 50),
            "long_tokens_per_s": long_tokens / seconds, "tokens_per_s": (long_tokens + short_tokens) / seconds,
            "short_mean_tokens": short_tokens / len(short_ok) if short_ok else 0.0,
            "long_mean_tokens": long_tokens / len(long_ok) if long_ok else 0.0,
            "ping_p99_ms": percentile(pings, 99), "pings": len(pings), "ping_failures": ping_failures,
            "peak_rss_mib": peak_rss}


def engine_timings(model_dir: str, torch_threads: int, repeats: int = 20) -> dict[str, Any]:
    """In this process, no server: how long a prefill of k joining rows stalls the running rows, against one decode
    step of n rows (medians, ms). What SERVE_PREFILL_TOKENS bounds."""
    import torch

    from bench.samples import chart_image
    from serve.engine.decode import prefill
    from serve.engine.model import load_artifact
    from serve.engine.predictor import Predictor
    from serve.engine.preshrink import preshrink
    from serve.engine.types import GenerationRequest

    torch.set_num_threads(torch_threads)
    predictor = Predictor(load_artifact(model_dir), max_new_tokens_cap=4096)
    image = preshrink(chart_image(640, 480), predictor.image_processor)

    def row():
        request = GenerationRequest(image=image, question=QUESTION, temperature=0, max_new_tokens=4000)
        predictor.prepare(request)
        return request

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    out: dict[str, Any] = {"prompt_tokens": int(row().inputs["input_ids"].shape[1])}
    with torch.inference_mode():
        for k in (1, 2, 4, 8):
            batch = predictor._collate([predictor._prepare(0, row()) for _ in range(k)])
            prefill(predictor.loaded.model, batch)
            out[f"prefill_{k}_rows_ms"] = median_ms(lambda batch=batch: prefill(predictor.loaded.model, batch))
    engine = predictor.continuous(max_batch_size=16)
    for n in (1, 4, 12):
        engine.step([(row(), lambda outcome: None) for _ in range(n - engine.running)])
        out[f"step_{n}_rows_ms"] = median_ms(engine.step)
    return out


def one_round(model_dir: str, args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    from bench.samples import image_set

    [image] = image_set(1)
    [long_body] = make_bodies([image], args.long_tokens)
    [short_body] = make_bodies([image], args.short_tokens)
    results = {}
    for scheduler in SCHEDULERS:
        log_path = tmp / f"server-{scheduler}.log"
        try:
            with server(model_dir, batch_size=args.batch_size, torch_threads=args.torch_threads, log_path=log_path,
                        extra_env={"SERVE_SCHEDULER": scheduler,
                                   "SERVE_MAX_NEW_TOKENS": str(max(args.long_tokens, args.short_tokens))}) \
                    as (url, pid):
                single = alone(url, short_body, args.alone)
                row = mix(url, long_body, short_body, long_clients=args.long_clients,
                          short_clients=args.short_clients, seconds=args.seconds, server_pid=pid)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n--- server log ---\n{log_path.read_text(errors='replace')[-4000:]}") from None
        single_ms = [s.latency_ms for s in single if s.ok]
        row.update({"scheduler": scheduler, "alone_p50_ms": percentile(single_ms, 50),
                    "alone_p90_ms": percentile(single_ms, 90), "alone_errors": len(single) - len(single_ms)})
        row["slowdown"] = row["short_p50_ms"] / row["alone_p50_ms"]
        results[scheduler] = row
    return results


NUMBERS = ("alone_p50_ms", "alone_p90_ms", "short_p50_ms", "short_p90_ms", "short_server_p50_ms", "slowdown",
           "long_tokens_per_s", "tokens_per_s", "ping_p99_ms", "short_mean_tokens", "long_mean_tokens",
           "short_requests", "long_requests", "errors")
COLUMNS = [("scheduler", "scheduler"), ("alone_p50_ms", "short alone p50 ms"), ("alone_p90_ms", "alone p90 ms"),
           ("short_p50_ms", "short in mix p50 ms"), ("short_p90_ms", "mix p90 ms"),
           ("short_server_p50_ms", "mix p50 in server ms"), ("slowdown", "p50 mix/alone"),
           ("long_tokens_per_s", "long tok/s"), ("tokens_per_s", "all tok/s"), ("ping_p99_ms", "/ping p99 ms"),
           ("short_mean_tokens", "short tokens"), ("long_mean_tokens", "long tokens"), ("errors", "errors")]


def median_rounds(rounds: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for scheduler in SCHEDULERS:
        row: dict[str, Any] = {"scheduler": scheduler}
        for key in NUMBERS:
            row[key] = statistics.median(r[scheduler][key] for r in rounds)
        row["slowdowns"] = " ".join(f"{r[scheduler]['slowdown']:.1f}" for r in rounds)
        rows.append(row)
    return rows


def targets(summary: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["scheduler"]: r for r in summary}
    cont, batch = by["continuous"], by["batch"]
    return {"slowdown": cont["slowdown"], "slowdown_target": SLOWDOWN_TARGET,
            "slowdown_met": cont["slowdown"] <= SLOWDOWN_TARGET,
            "tokens_per_s_vs_batch": cont["tokens_per_s"] / batch["tokens_per_s"] if batch["tokens_per_s"] else None,
            "tokens_per_s_met": cont["tokens_per_s"] >= batch["tokens_per_s"],
            "ping_p99_ms": cont["ping_p99_ms"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mixed", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="artifact to serve (default: a fresh tiny `test` artifact)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long-clients", type=int, default=4)
    parser.add_argument("--short-clients", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=200)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the mixed window")
    parser.add_argument("--alone", type=int, default=30, help="short requests timed alone")
    parser.add_argument("--batch-size", type=int, default=16, help="SERVE_MAX_BATCH_SIZE (default: every client fits)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (for tests)")
    parser.add_argument("--out", help="write mixed.json/.md here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rounds, args.long_clients, args.short_clients, args.long_tokens = 1, 1, 2, 24
        args.short_tokens, args.seconds, args.alone = 4, 1.5, 3
    if min(args.rounds, args.long_clients, args.short_clients, args.long_tokens, args.short_tokens, args.alone,
           args.batch_size) < 1 or args.seconds <= 0:
        parser.error("counts, token numbers and --seconds must be positive")
    with tempfile.TemporaryDirectory(prefix="bench-mixed-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from demo.tiny import build_tiny_artifact

            model_dir = str(build_tiny_artifact(Path(tmp) / "tiny"))
        try:
            rounds = [one_round(model_dir, args, Path(tmp)) for _ in range(args.rounds)]
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        timings = engine_timings(model_dir, args.torch_threads, repeats=3 if args.tiny else 20)
    summary = median_rounds(rounds)
    verdict = targets(summary)
    md = "\n\n".join([
        f"Mixed traffic, CPU: {args.long_clients} clients looping {args.long_tokens}-token answers while "
        f"{args.short_clients} clients loop {args.short_tokens}-token ones, {args.seconds:g} s window, "
        f"SERVE_MAX_BATCH_SIZE={args.batch_size}, torch threads={args.torch_threads}; median of {args.rounds} "
        "alternating rounds",
        markdown_table(summary, COLUMNS),
        "Short p50 mix/alone, each round: " + "; ".join(f"{r['scheduler']} {r['slowdowns']}" for r in summary),
        "In-process, no server (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k.endswith("_ms"))
        + f"; prompts of {timings['prompt_tokens']} tokens",
        f"Targets: {verdict}"])
    write_report(args.out, "mixed", {"machine": machine(), "args": vars(args), "rounds": rounds, "summary": summary,
                                     "engine_timings": timings, "targets": verdict}, md)
    errors = sum(r[s]["errors"] + r[s]["alone_errors"] for r in rounds for s in SCHEDULERS)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
