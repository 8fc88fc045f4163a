"""Load generator against a running server: a concurrency sweep with a fixed prompt and image set.

    python -m bench.load http://127.0.0.1:8080 [--concurrency 1,4,16,64] [--requests 64] [--max-new-tokens 16]
                         [--stream] [--scrape-every-ms 100] [--server-pid PID] [--out DIR] [--label NAME]

For each concurrency level, that many client threads (keep-alive connections, stdlib only, so the generator
itself costs little CPU) send a bounded number of POST /invocations (JSON: base64 chart image + question,
greedy) while a separate process pings GET /ping every 20 ms. Reported per level: requests/s, output tokens/s (from
each reply's usage.completion_tokens), TTFT and latency p50/p99, the server's own latency_ms p50, /ping p50/p99,
errors by status and code, and peak server RSS (sampled from /proc/PID when --server-pid is given, or psutil).
The pinger runs in its own process, so its numbers are the server's, not the client threads' GIL queue. With
--scrape-every-ms, another process GETs /metrics at that interval (a Prometheus scraper) and the level also reports
the scrapes' p50/p99.

TTFT is the time to the response headers. Unstreamed, they come with the whole answer (TTFT ~= latency); with
--stream (`"stream": true`) the server sends them with the first piece of the answer, so TTFT is the real time to
the first token. Loopback only.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from queue import Empty
from typing import Any
from urllib.parse import urlsplit

from bench.report import machine, markdown_table, percentile, write_report

DEFAULT_LEVELS = (1, 4, 16, 64)
QUESTION = "What type of chart is this, and what is its title?"
PING_INTERVAL_S = 0.02
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Sample:
    ok: bool
    status: int
    latency_ms: float
    ttft_ms: float
    completion_tokens: int = 0
    server_latency_ms: float | None = None
    error_code: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    pings_ms: list[float] = field(default_factory=list)
    ping_failures: int = 0
    wall_s: float = 0.0
    peak_rss_mib: float | None = None
    server_cpu_s: float | None = None  # CPU time (user + system) the server used during the level
    scrapes_ms: list[float] | None = None  # GET /metrics latencies, when a scraper ran
    scrape_failures: int = 0

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.ok]
        lat = [s.latency_ms for s in ok]
        tokens = sum(s.completion_tokens for s in ok)
        errors = Counter(f"{s.status}:{s.error_code}" for s in self.samples if not s.ok)
        server = [s.server_latency_ms for s in ok if s.server_latency_ms is not None]
        return {
            "concurrency": self.concurrency, "requests": len(self.samples), "ok": len(ok),
            "errors": sum(errors.values()), "errors_by_code": dict(errors),
            "wall_s": self.wall_s, "req_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "output_tokens_per_s": tokens / self.wall_s if self.wall_s else 0.0,
            "mean_completion_tokens": tokens / len(ok) if ok else 0.0,
            "ttft_p50_ms": percentile([s.ttft_ms for s in ok], 50),
            "latency_p50_ms": percentile(lat, 50), "latency_p99_ms": percentile(lat, 99),
            "server_latency_p50_ms": percentile(server, 50),
            "pings": len(self.pings_ms), "ping_p50_ms": percentile(self.pings_ms, 50),
            "ping_p99_ms": percentile(self.pings_ms, 99),
            "ping_max_ms": max(self.pings_ms) if self.pings_ms else None, "ping_failures": self.ping_failures,
            "peak_rss_mib": self.peak_rss_mib, "server_cpu_s": self.server_cpu_s,
            "server_cpu_ms_per_request": (1000 * self.server_cpu_s / len(ok)
                                          if self.server_cpu_s is not None and ok else None),
            **({} if self.scrapes_ms is None else {
                "scrapes": len(self.scrapes_ms), "scrape_p50_ms": percentile(self.scrapes_ms, 50),
                "scrape_p99_ms": percentile(self.scrapes_ms, 99), "scrape_failures": self.scrape_failures}),
        }


class Client:
    """One keep-alive HTTP/1.1 connection to the server (reconnects after an error)."""

    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK:
            raise ValueError(f"the load generator only targets http://127.0.0.1 / localhost, got {url!r}")
        self.host, self.port, self.timeout_s = parts.hostname, parts.port or 80, timeout_s
        self.conn: http.client.HTTPConnection | None = None
        self.last_ms = 0.0  # duration of the last request, headers and body

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, float]:
        """(status, body, seconds to the response headers)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        start = time.perf_counter()
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            first_byte = time.perf_counter() - start
            return response.status, response.read(), first_byte
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        finally:
            self.last_ms = (time.perf_counter() - start) * 1000

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def make_bodies(images: list[bytes], max_new_tokens: int, question: str = QUESTION, *, stream: bool = False
                ) -> list[bytes]:
    extra = {"stream": True} if stream else {}
    return [json.dumps({"image": base64.b64encode(img).decode(), "question": question, "temperature": 0,
                        "max_new_tokens": max_new_tokens, **extra}).encode() for img in images]


def final_reply(payload: bytes) -> Any:
    """The reply in a body: the JSON itself, or the last event of a streamed answer (client.stream's parser)."""
    if not payload.startswith(b"data:"):
        return json.loads(payload)
    from client.stream import parse_events

    *_, last = parse_events([payload])
    return last


def one_request(client: Client, body: bytes) -> Sample:
    start = time.perf_counter()
    try:
        status, payload, first_byte = client.request("POST", "/invocations", body)
    except (OSError, http.client.HTTPException) as e:
        ms = (time.perf_counter() - start) * 1000
        return Sample(False, 0, ms, ms, error_code=type(e).__name__)
    ms = (time.perf_counter() - start) * 1000
    try:
        reply = final_reply(payload)
    except ValueError:
        return Sample(False, status, ms, first_byte * 1000, error_code="bad_json")
    if status != 200 or "error" in reply:
        code = reply.get("error", {}).get("code") if isinstance(reply, dict) else None
        return Sample(False, status, ms, first_byte * 1000, error_code=code)
    return Sample(True, status, ms, first_byte * 1000, completion_tokens=int(reply["usage"]["completion_tokens"]),
                  server_latency_ms=reply.get("latency_ms"))


def rss_mib(pid: int | None) -> float | None:
    """Resident memory of process `pid` in MiB (/proc, else psutil); None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - memory is optional information
        return None


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) process `pid` has used, from /proc; None when unknown. Less noisy than req/s on a
    shared machine: other processes slow the server down but do not add to its CPU time."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run_level(url: str, bodies: list[bytes], concurrency: int, requests: int, *, timeout_s: float = 120.0,
              server_pid: int | None = None, scrape_every_s: float | None = None) -> LevelResult:
    """`requests` POSTs spread over `concurrency` threads, /ping every 20 ms, RSS sampled, /metrics every
    `scrape_every_s` when given; bounded, no retries."""
    result = LevelResult(concurrency)
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        client = Client(url, timeout_s)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                sample = one_request(client, bodies[i % len(bodies)])
                with lock:
                    result.samples.append(sample)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, name=f"load-{k}", daemon=True) for k in range(concurrency)]
    # The pinger is its own process: in this one it would wait for the GIL behind `concurrency` client threads
    # and report the load generator's latency instead of the server's.
    # fork: the child only runs ping_loop (stdlib http), and unlike spawn it needs no __main__ guard in callers.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    stop, ready, queue = ctx.Event(), ctx.Event(), ctx.Queue()
    pinger = ctx.Process(target=ping_loop, args=(url, server_pid, stop, ready, queue), name="ping", daemon=True)
    pinger.start()
    ready.wait(timeout=60)  # the load starts once the pinger is pinging
    scraper = scrapes = None
    if scrape_every_s is not None:
        scraping, scrapes = ctx.Event(), ctx.Queue()
        scraper = ctx.Process(target=scrape_loop, args=(url, scrape_every_s, stop, scraping, scrapes), name="scrape",
                              daemon=True)
        scraper.start()
        scraping.wait(timeout=60)
    cpu_before = cpu_seconds(server_pid)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - start
    cpu_after = cpu_seconds(server_pid)
    if cpu_before is not None and cpu_after is not None:
        result.server_cpu_s = cpu_after - cpu_before
    stop.set()
    try:
        result.pings_ms, result.ping_failures, result.peak_rss_mib = queue.get(timeout=30)
    except Empty:  # the pinger died: the level's numbers stand, /ping shows as missing
        result.ping_failures = -1
    pinger.join(timeout=10)
    if scraper is not None:
        try:
            result.scrapes_ms, result.scrape_failures = scrapes.get(timeout=30)
        except Empty:
            result.scrapes_ms, result.scrape_failures = [], -1
        scraper.join(timeout=10)
    return result


def ping_loop(url: str, server_pid: int | None, stop: Any, ready: Any, queue: Any) -> None:
    """GET /ping every 20 ms until `stop`, sampling the server's RSS; puts (ping ms list, failures, peak MiB)."""
    client = Client(url, 5.0)
    pings: list[float] = []
    failures = 0
    peak = rss_mib(server_pid)
    try:
        while True:
            try:
                healthy = client.request("GET", "/ping")[0] == 200
            except (OSError, http.client.HTTPException):
                healthy = False
            if healthy:
                pings.append(client.last_ms)
            else:
                failures += 1
            rss = rss_mib(server_pid)
            if rss is not None:
                peak = max(peak or 0.0, rss)
            ready.set()
            if stop.wait(PING_INTERVAL_S):
                break
    finally:
        client.close()
        queue.put((pings, failures, peak))


def scrape_loop(url: str, every_s: float, stop: Any, ready: Any, queue: Any) -> None:
    """GET /metrics every `every_s` until `stop` (a Prometheus scraper); puts (latency ms list, failures)."""
    client = Client(url, 5.0)
    scrapes: list[float] = []
    failures = 0
    try:
        while True:
            try:
                ok = client.request("GET", "/metrics")[0] == 200
            except (OSError, http.client.HTTPException):
                ok = False
            if ok:
                scrapes.append(client.last_ms)
            else:
                failures += 1
            ready.set()
            if stop.wait(every_s):
                break
    finally:
        client.close()
        queue.put((scrapes, failures))


def default_requests(concurrency: int) -> int:
    # Enough for stable percentiles: >= 128 latencies, and a level long enough for ~100 /ping samples.
    return max(8 * concurrency, 128)


def sweep(url: str, levels: tuple[int, ...], *, requests: int | None, max_new_tokens: int, images: int,
          server_pid: int | None, warmup: int = 2, stream: bool = False, scrape_every_s: float | None = None
          ) -> list[dict[str, Any]]:
    from bench.samples import image_set

    bodies = make_bodies(image_set(images), max_new_tokens, stream=stream)
    run_level(url, bodies, 1, warmup, server_pid=server_pid)  # first-call costs (lazy imports, allocations)
    rows = []
    for c in levels:
        n = requests if requests is not None else default_requests(c)
        rows.append(run_level(url, bodies, c, n, server_pid=server_pid, scrape_every_s=scrape_every_s).summary())
    return rows


COLUMNS = [("concurrency", "concurrency"), ("ok", "ok"), ("errors", "errors"), ("req_per_s", "req/s"),
           ("output_tokens_per_s", "out tok/s"), ("ttft_p50_ms", "TTFT p50 ms"), ("latency_p50_ms", "latency p50 ms"),
           ("latency_p99_ms", "latency p99 ms"), ("ping_p99_ms", "/ping p99 ms"), ("pings", "pings"),
           ("peak_rss_mib", "peak RSS MiB")]
SCRAPE_COLUMNS = [("scrapes", "scrapes"), ("scrape_p50_ms", "/metrics p50 ms"), ("scrape_p99_ms", "/metrics p99 ms")]


def parse_levels(text: str) -> tuple[int, ...]:
    levels = tuple(int(x) for x in text.split(",") if x.strip())
    if not levels or min(levels) < 1:
        raise ValueError("concurrency levels must be positive integers")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8080 (loopback only)")
    parser.add_argument("--concurrency", default=",".join(map(str, DEFAULT_LEVELS)))
    parser.add_argument("--requests", type=int, help="requests per level (default max(8 x concurrency, 128))")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--images", type=int, default=4, help="size of the fixed image set (640x480 charts)")
    parser.add_argument("--stream", action="store_true", help="ask for streamed answers: TTFT is then the time to "
                                                              "the first piece of the answer")
    parser.add_argument("--scrape-every-ms", type=float, help="also GET /metrics at this interval (a Prometheus "
                                                                 "scraper) and report its latency")
    parser.add_argument("--server-pid", type=int, help="sample this process's RSS")
    parser.add_argument("--label", default="load", help="name of the JSON/markdown files")
    parser.add_argument("--out", help="write LABEL.json and LABEL.md here")
    args = parser.parse_args(argv)
    try:
        levels = parse_levels(args.concurrency)
        Client(args.url, 1.0)
    except ValueError as e:
        parser.error(str(e))
    if (args.requests is not None and args.requests < 1) or args.max_new_tokens < 1 or args.images < 1 or (
            args.scrape_every_ms is not None and args.scrape_every_ms <= 0):
        parser.error("--requests, --max-new-tokens, --images and --scrape-every-ms must be positive")
    rows = sweep(args.url, levels, requests=args.requests, max_new_tokens=args.max_new_tokens, images=args.images,
                 server_pid=args.server_pid, stream=args.stream,
                 scrape_every_s=None if args.scrape_every_ms is None else args.scrape_every_ms / 1000)
    ttft = "time to the first piece (streamed)" if args.stream else "time to response headers, = latency unstreamed"
    md = (f"Load sweep against {args.url} (max_new_tokens={args.max_new_tokens}; TTFT = {ttft})\n\n"
          + markdown_table(rows, COLUMNS + (SCRAPE_COLUMNS if args.scrape_every_ms else [])))
    write_report(args.out, args.label, {"machine": machine(), "url": args.url, "max_new_tokens": args.max_new_tokens,
                                        "stream": args.stream, "levels": rows}, md)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
