"""What a Prometheus scraper costs the server: requests/s with GET /metrics every 100 ms vs without, on CPU.

    python -m bench.metrics_cost [--model-dir DIR] [--concurrency 16,64] [--requests N] [--rounds 5]
                                 [--scrape-every-ms 100] [--out DIR] [--tiny]

Starts one batched `python -m serve` (SERVE_MAX_BATCH_SIZE=64) on a tiny model, then per round and concurrency level
runs bench.load's level twice, once with a scraper process hitting /metrics every --scrape-every-ms and once
without, in alternating order (the first of the pair changes every round, so a slow spell of a shared machine falls
on both). Reported per level: the median req/s of each, the median of the per-round ratios (with / without, every
round's listed), the server's CPU time per request with and without (read from /proc: steadier than req/s on a
shared machine, since other processes slow the server but do not add to its CPU time), the extra CPU each scrape
costs, and the scrapes' p50/p99 latency under that load. Before the load, the server's CPU time per call of
back-to-back GET /metrics and GET /ping on an idle server, and the size of one scrape.
--tiny runs a seconds-long smoke version (level 4, 24 requests, 2 rounds, 2 new tokens) for the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.load import Client, cpu_seconds, make_bodies, parse_levels, run_level
from bench.report import fmt, machine, markdown_table, percentile, write_report
from bench.run_cpu import server

BATCH_SIZE = 64


def requests_for(concurrency: int) -> int:
    # Long enough for ~50 scrapes at 100 ms on 2 cores (~200 req/s at concurrency 16).
    return max(1024, 64 * concurrency)


def measure(url: str, pid: int, bodies: list[bytes], levels: tuple[int, ...], rounds: int, requests: int | None,
            every_s: float) -> dict[int, list[dict[str, Any]]]:
    """{level: [{"round", "without": summary, "with": summary}, ...]}; the pair's order alternates by round."""
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
    for r in range(rounds):
        for c in levels:
            n = requests if requests is not None else requests_for(c)
            pair = {"round": r}
            for scraping in ((False, True) if r % 2 == 0 else (True, False)):
                result = run_level(url, bodies, c, n, server_pid=pid, scrape_every_s=every_s if scraping else None)
                name = "with" if scraping else "without"
                summary = pair[name] = {**result.summary(), "scrapes_ms": result.scrapes_ms}
                print(f"round {r + 1}/{rounds} concurrency {c} {name} scraper: "
                      f"{summary['req_per_s']:.1f} req/s, {summary['errors']} errors", file=sys.stderr, flush=True)
            runs[c].append(pair)
    return runs


def summarise(runs: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for c, pairs in runs.items():
        ratios = [p["with"]["req_per_s"] / p["without"]["req_per_s"] for p in pairs if p["without"]["req_per_s"]]
        scrapes = [ms for p in pairs for ms in (p["with"]["scrapes_ms"] or [])]
        cpu = {k: [p[k]["server_cpu_ms_per_request"] for p in pairs if p[k]["server_cpu_ms_per_request"]]
               for k in ("with", "without")}
        # The CPU the scraping added, spread over its scrapes: (with - without) per request x requests / scrapes.
        extra = [(p["with"]["server_cpu_s"] - p["without"]["server_cpu_s"] * p["with"]["ok"] / p["without"]["ok"])
                 * 1000 / p["with"]["scrapes"] for p in pairs
                 if p["with"]["server_cpu_s"] is not None and p["without"]["ok"] and p["with"]["scrapes"]]
        rows.append({"concurrency": c,
                     "without_req_per_s": statistics.median(p["without"]["req_per_s"] for p in pairs),
                     "with_req_per_s": statistics.median(p["with"]["req_per_s"] for p in pairs),
                     "ratio": statistics.median(ratios) if ratios else float("nan"),
                     "ratios": " ".join(f"{x:.3f}" for x in ratios), "scrapes": len(scrapes),
                     "scrape_p50_ms": percentile(scrapes, 50), "scrape_p99_ms": percentile(scrapes, 99),
                     "without_cpu_ms_per_request": statistics.median(cpu["without"]) if cpu["without"] else None,
                     "with_cpu_ms_per_request": statistics.median(cpu["with"]) if cpu["with"] else None,
                     "cpu_ms_per_scrape": statistics.median(extra) if extra else None,
                     "errors": sum(p[k]["errors"] for p in pairs for k in ("with", "without"))})
    return rows


def idle_cost(url: str, pid: int, calls: int) -> dict[str, Any]:
    """Server CPU ms per call of `calls` back-to-back GET /metrics, and of as many GET /ping, on an idle server;
    the size of one scrape."""
    client = Client(url, 10.0)
    cost: dict[str, Any] = {}
    try:
        for path in ("/ping", "/metrics"):
            before = cpu_seconds(pid)
            for _ in range(calls):
                status, body, _ = client.request("GET", path)
                if status != 200:
                    raise RuntimeError(f"GET {path} answered {status}")
            after = cpu_seconds(pid)
            cost[f"{path[1:]}_cpu_ms"] = None if before is None or after is None else 1000 * (after - before) / calls
    finally:
        client.close()
    text = body.decode()
    cost["bytes"] = len(body)
    cost["samples"] = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return cost


COLUMNS = [("concurrency", "concurrency"), ("without_req_per_s", "req/s without"),
           ("with_req_per_s", "req/s with scraper"), ("ratio", "with / without"), ("ratios", "each round"),
           ("without_cpu_ms_per_request", "server CPU ms/request without"),
           ("with_cpu_ms_per_request", "server CPU ms/request with"), ("cpu_ms_per_scrape", "server CPU ms/scrape"),
           ("scrapes", "scrapes"), ("scrape_p50_ms", "/metrics p50 ms"), ("scrape_p99_ms", "/metrics p99 ms")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="artifact to serve (default: a fresh tiny `test` artifact)")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--requests", type=int, help="requests per run (default max(1024, 64 x concurrency))")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scrape-every-ms", type=float, default=100.0)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (for tests)")
    parser.add_argument("--out", help="write metrics_cost.json/.md here")
    args = parser.parse_args(argv)
    try:
        levels = parse_levels("4" if args.tiny else args.concurrency)
    except ValueError as e:
        parser.error(str(e))
    if args.rounds < 1 or args.scrape_every_ms <= 0 or (args.requests is not None and args.requests < 1):
        parser.error("--rounds, --requests and --scrape-every-ms must be positive")
    rounds, requests = (2, 24) if args.tiny else (args.rounds, args.requests)
    max_new = 2 if args.tiny else args.max_new_tokens
    from bench.samples import image_set

    bodies = make_bodies(image_set(4), max_new)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from demo.tiny import build_tiny_artifact

            model_dir = str(build_tiny_artifact(Path(tmp) / "tiny"))
        log_path = Path(tmp) / "server.log"
        try:
            with server(model_dir, batch_size=BATCH_SIZE, torch_threads=args.torch_threads, log_path=log_path) as (
                    url, pid):
                run_level(url, bodies, 1, 2, server_pid=pid)  # first-call costs
                idle = idle_cost(url, pid, 50 if args.tiny else 500)
                runs = measure(url, pid, bodies, levels, rounds, requests, args.scrape_every_ms / 1000)
        except RuntimeError as e:
            print(f"{e}\n--- server log ---\n{log_path.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            return 1
    rows = summarise(runs)
    md = (f"CPU, tiny model, SERVE_MAX_BATCH_SIZE={BATCH_SIZE}, max_new_tokens={max_new}, a scrape every "
          f"{args.scrape_every_ms:g} ms vs none, median of {rounds} alternating rounds. Idle server: one scrape "
          f"({idle['bytes']} bytes, {idle['samples']} samples) costs {fmt(idle['metrics_cpu_ms'], 2)} ms of server "
          f"CPU, a /ping {fmt(idle['ping_cpu_ms'], 2)} ms\n\n" + markdown_table(rows, COLUMNS, digits=3))
    write_report(args.out, "metrics_cost", {"machine": machine(), "max_new_tokens": max_new,
                                            "scrape_every_ms": args.scrape_every_ms, "idle": idle,
                                            "summary": rows, "runs": runs}, md)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
