"""GPU benchmark on a randomly initialised LLaVA-1.5-7B-shaped model, loaded in NF4 exactly as the server loads it.

    python -m bench.gpu [--new-tokens 64] [--requests 32] [--out DIR] [--work-dir DIR]
    python -m bench.gpu --tiny            # a tiny model on whatever device there is, for the test suite

Builds the model from config only (no hub; bench/model7b.py), saved with train.artifact.save_artifact. Loads it
with serve.engine.model.load_artifact(quantization="nf4") and measures in one run, on one 1600x1200 chart image and one
question:

- batch-1 decode tokens/s, eager `generate` vs serve.engine.accel (static cache + torch.compile, buckets): the first
  accelerated call compiles (its time is reported), the timed ones replay; target: >= 3x;
- TTFT at concurrency 1 (image preprocessing + prefill + first token, p50 of several): target: <= 150 ms;
- aggregate output tokens/s for `--requests` concurrent image requests through serve's Predictor + Batcher under
  SERVE_SCHEDULER=batch, sequential (max batch 1) vs batched (max batch = requests), each with serve.engine.accel
  off and on: target >= 10x; accelerated once more with `--long-tokens` answers (the compiled graphs of the same
  cache-length bucket replay);
- continuous batching (SERVE_SCHEDULER=continuous, compiled decoder, batch buckets 1,16,32): the same `--requests`
  concurrent `--long-tokens` answers (aggregate output tokens/s, against the batch scheduler's above), then mixed
  traffic: `--mix-long-clients` clients looping `--mix-long-tokens`-token answers while `--mix-short-clients` send
  one-token requests, whose latency is their time to first token (queue + prefill + first token; encoding is done
  before they are submitted, as the server's request threads do). TTFT p50/p90 under the mix against the same
  requests alone; the batch scheduler's mix for comparison (phase mixed-batch);
- QLoRA fine-tuning (bench/qlora.py in a subprocess, on this model's artifact): NF4, LoRA r=128, projector trained,
  ZeRO-2, bf16, ~650-token image examples: training tokens/s and peak GPU memory.

Random weights would stop at a random end-of-sequence token, so every generation is forced to its full length
(min_new_tokens, and the predictor's EOS pointed at an id the model cannot emit).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.load import QUESTION
from bench.model7b import build_7b_artifact
from bench.preprocess import decode
from bench.report import fmt, machine, markdown_table, write_report

# --phases; decode runs as decode-eager + decode-accel; server-accel-long is server-accel with --long-tokens answers;
# continuous: continuous batching's throughput and mixed traffic; mixed-batch: the batch scheduler's mixed traffic
PHASES = ("decode", "ttft", "server-eager", "server-accel", "server-accel-long", "continuous", "mixed-batch", "qlora")
CONTINUOUS_BUCKETS = (1, 16, 32)  # each compiles for ~35 s on a 7B model: the sizes the continuous phases reach
TARGETS = {"decode_speedup": 3.0, "batched_speedup": 10.0, "ttft_p50_ms": 150.0}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_inputs(encoder: Any, loaded: Any, image: Any) -> dict[str, Any]:
    """What the server feeds the model for `image`: preshrink, then serve.engine.encoding, on the device."""
    from serve.engine.preshrink import preshrink

    small = preshrink(image, loaded.processor.image_processor)  # a new image: `image` is left as it is
    batch = {k: v.to(loaded.device) for k, v in encoder.encode(QUESTION, small).items()}
    batch["pixel_values"] = batch["pixel_values"].to(loaded.model.dtype)
    return batch


def forced(loaded: Any, new_tokens: int):
    import copy

    gen = copy.deepcopy(loaded.generation_config)
    gen.max_new_tokens = gen.min_new_tokens = new_tokens
    gen.do_sample, gen.max_length = False, None
    return gen


def timed_generate(accel: Any, loaded: Any, batch: dict[str, Any], new_tokens: int) -> float:
    sync(loaded.device)
    start = time.perf_counter()
    out = accel.generate(loaded.model, batch, generation_config=forced(loaded, new_tokens))
    sync(loaded.device)
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens, "generation was not forced to full length"
    return time.perf_counter() - start


def decode_speed(loaded: Any, image: Any, new_tokens: int, repeats: int, name: str, accel_config: Any
                 ) -> dict[str, Any]:
    """Batch-1 decode tokens/s of one path (`name`: eager or accel) = (N - 1) / (t(N) - t(1)): prefill and the
    first token cancel out. Warm-up first (compilation, for the accelerated path), then medians."""
    from serve.engine.accel import Accelerator
    from serve.engine.encoding import Encoder

    batch = model_inputs(Encoder(loaded.processor), loaded, image)
    accel = Accelerator(loaded.model, accel_config, device=loaded.device)
    start = time.perf_counter()
    timed_generate(accel, loaded, batch, new_tokens)
    timed_generate(accel, loaded, batch, 1)
    warmup = time.perf_counter() - start
    first = statistics.median(timed_generate(accel, loaded, batch, 1) for _ in range(repeats))
    full = statistics.median(timed_generate(accel, loaded, batch, new_tokens) for _ in range(repeats))
    # NaN when noise swamps the difference (tiny models on a busy CPU); never on a 7B model.
    return {f"{name}_warmup_s": warmup,
            f"{name}_decode_tok_s": (new_tokens - 1) / (full - first) if full > first else float("nan"),
            f"{name}_end_to_end_tok_s": new_tokens / full,
            f"{name}_prefill_first_token_ms": first * 1000,
            f"{name}_describe": accel.describe(loaded.model)}


def ttft(loaded: Any, image_bytes: bytes, repeats: int, accel_config: Any) -> dict[str, Any]:
    """Concurrency 1: decode the PNG bytes, preprocess, prefill, first token (what a streaming client would see),
    on the accelerated path (`ttft_*`) and on eager generate (`eager_ttft_*`), with each part's p50."""
    from serve.engine.accel import AccelConfig, Accelerator
    from serve.engine.encoding import Encoder

    encoder = Encoder(loaded.processor)
    out: dict[str, Any] = {}
    for prefix, cfg in (("", accel_config), ("eager_", AccelConfig(mode="off"))):
        accel = Accelerator(loaded.model, cfg, device=loaded.device)
        parts: dict[str, list[float]] = {"ttft": [], "decode": [], "prepare": [], "first_token": []}
        for i in range(repeats + 1):
            sync(loaded.device)
            start = time.perf_counter()
            image = decode(image_bytes)
            decoded = time.perf_counter()
            batch = model_inputs(encoder, loaded, image)
            sync(loaded.device)
            prepared = time.perf_counter()
            timed_generate(accel, loaded, batch, 1)
            if i == 0:
                continue  # the first includes one-off warm-up
            end = time.perf_counter()
            for name, seconds in (("ttft", end - start), ("decode", decoded - start), ("prepare", prepared - decoded),
                                  ("first_token", end - prepared)):
                parts[name].append(seconds * 1000)
        out[f"{prefix}prefill_profile"] = prefill_profile(accel, loaded, batch)
        out[f"{prefix}ttft_p50_ms"] = statistics.median(parts["ttft"])
        out[f"{prefix}ttft_min_ms"] = min(parts["ttft"])
        out[f"{prefix}ttft_samples_ms"] = parts  # every repeat: the H100 runs saw prefill vary 59-109 ms
        for name in ("decode", "prepare", "first_token"):
            out[f"{prefix}ttft_{name}_p50_ms"] = statistics.median(parts[name])
    return out


def prefill_profile(accel: Any, loaded: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """One prefill + first token under torch.profiler: wall time against the summed device time of its kernels.
    Kernel time far under wall time means the prefill waits on Python and kernel launches, not on the GPU (the H100
    runs measured this call at 59 and 108 ms; its FLOPs and weight reads need ~30 ms)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if loaded.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        wall = timed_generate(accel, loaded, batch, 1)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return {"wall_ms": wall * 1000, "kernels": len(kernels),
            "kernel_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1000}  # microseconds


async def _submit_all(batcher: Any, requests: list[Any]) -> list[Any]:
    """All at once, each announced first as the server announces a request it is reading (`Batcher.expect`): the
    batcher then gathers the burst instead of starting on whichever request is queued first."""
    for _ in requests:
        batcher.expect()
    return await asyncio.gather(*(batcher.submit([r], expected=True) for r in requests))


def server_throughput(loaded: Any, image: Any, n_requests: int, new_tokens: int, accel_config: Any,
                      n_sequential: int | None = None) -> dict[str, Any]:
    """n concurrent image requests through Predictor + Batcher: sequential (max batch 1) vs batched.

    The sequential server's output tokens/s is a steady per-request rate, so `n_sequential` (<= n) requests measure
    it as well as n would, in a fraction of the time (the time a lent GPU machine is short of)."""
    from serve.engine.predictor import Predictor
    from serve.engine.preshrink import preshrink

    eos = loaded.generation_config.eos_token_id
    loaded.generation_config.eos_token_id = [10**9]  # an id the model cannot emit: every answer runs full length
    try:
        # Predictor warms up (compiles) each bucket at construction: only the two batch sizes used here.
        predictor = Predictor(loaded, max_new_tokens_cap=max(new_tokens, 1), accel=accel_config)
        small = preshrink(image, loaded.processor.image_processor)
        out: dict[str, Any] = {"accel": "on" if predictor.accel.enabled else "off", "new_tokens": new_tokens}
        for name, max_batch, count in (("sequential", 1, min(n_sequential or n_requests, n_requests)),
                                       ("batched", n_requests, n_requests)):
            out.update(_run_server(predictor, small, name, max_batch, count, new_tokens, loaded.device))
            out[f"{name}_requests"] = count
    finally:
        loaded.generation_config.eos_token_id = eos
    seq = out["sequential_output_tok_s"]
    out["batched_speedup"] = out["batched_output_tok_s"] / seq if seq else float("nan")  # nan: every request failed
    return out


def _run_server(predictor: Any, small: Any, name: str, max_batch: int, n_requests: int, new_tokens: int,
                device: str, batcher: Any = None) -> dict[str, Any]:
    """n concurrent requests through a batch-scheduler Batcher of `max_batch` (or through `batcher`, left open)."""
    from serve.engine.batching import Batcher
    from serve.engine.types import GenerationRequest

    def request():
        return GenerationRequest(image=small, question=QUESTION, temperature=0, max_new_tokens=new_tokens)

    own = batcher is None
    if own:
        batcher = Batcher(predictor, max_batch_size=max_batch, max_wait_ms=20, max_queue=4 * n_requests,
                          scheduler="batch").start()
    try:
        # One full batch first: compiles/allocates this batch shape, so the timed run replays.
        asyncio.run(_submit_all(batcher, [request() for _ in range(min(max_batch, n_requests))]))
        sync(device)
        start = time.perf_counter()
        results = asyncio.run(_submit_all(batcher, [request() for _ in range(n_requests)]))
        sync(device)
        wall = time.perf_counter() - start
    finally:
        if own:
            batcher.close(timeout=60)
    done = [r[0] for r in results if hasattr(r[0], "completion_tokens")]
    tokens = sum(r.completion_tokens for r in done)
    return {f"{name}_wall_s": wall, f"{name}_output_tok_s": tokens / wall,
            f"{name}_errors": len(results) - len(done),
            f"{name}_mean_completion_tokens": tokens / max(len(done), 1)}


class ForcedLength:
    """Within it, the artifact's end-of-sequence id is one the model cannot emit: every answer runs its full length
    (random weights would stop at a random EOS). Predictors and engines read it when they are built."""

    def __init__(self, loaded: Any):
        self.loaded = loaded

    def __enter__(self):
        self.eos = self.loaded.generation_config.eos_token_id
        self.loaded.generation_config.eos_token_id = [10**9]

    def __exit__(self, *exc):
        self.loaded.generation_config.eos_token_id = self.eos


def continuous_phase(loaded: Any, image: Any, args: Any, accel_config: Any) -> dict[str, Any]:
    """Continuous batching with the compiled decoder, built once (one compile per bucket): `--requests` concurrent
    `--long-tokens` answers, then the mixed traffic."""
    from serve.engine.batching import Batcher
    from serve.engine.predictor import Predictor
    from serve.engine.preshrink import preshrink

    small = preshrink(image, loaded.processor.image_processor)
    config = dataclasses.replace(accel_config, batch_buckets=tuple(b for b in CONTINUOUS_BUCKETS if b < args.requests)
                                 + (args.requests,))
    with ForcedLength(loaded):
        predictor = Predictor(loaded, max_new_tokens_cap=max(args.long_tokens, args.mix_long_tokens), accel=config,
                              warm_up=False)
        started = time.perf_counter()
        batcher = Batcher(predictor, max_batch_size=args.requests, max_wait_ms=20, max_queue=1024,
                          scheduler="continuous").start()
        out: dict[str, Any] = {"continuous_build_s": time.perf_counter() - started,
                               "continuous_decoder": type(batcher._engine.decoder).__name__,
                               "continuous_slot_tokens": batcher._engine.decoder.slot_tokens}
        try:
            run = _run_server(predictor, small, "continuous", args.requests, args.requests, args.long_tokens,
                              loaded.device, batcher=batcher)
            out.update({"continuous_requests": args.requests, "continuous_new_tokens": args.long_tokens, **run})
            out.update(mixed_traffic(batcher, predictor, small, args, "continuous"))
        finally:
            batcher.close(timeout=120)
    return out


def mixed_batch_phase(loaded: Any, image: Any, args: Any, accel_config: Any) -> dict[str, Any]:
    """The same mixed traffic under SERVE_SCHEDULER=batch (its Predictor compiles batch buckets 1 and --requests)."""
    from serve.engine.batching import Batcher
    from serve.engine.predictor import Predictor
    from serve.engine.preshrink import preshrink

    small = preshrink(image, loaded.processor.image_processor)
    config = dataclasses.replace(accel_config, batch_buckets=(1, args.requests))
    with ForcedLength(loaded):
        predictor = Predictor(loaded, max_new_tokens_cap=args.mix_long_tokens, accel=config)
        batcher = Batcher(predictor, max_batch_size=args.requests, max_wait_ms=20, max_queue=1024,
                          scheduler="batch").start()
        try:
            return mixed_traffic(batcher, predictor, small, args, "batch")
        finally:
            batcher.close(timeout=120)


def mixed_traffic(batcher: Any, predictor: Any, small: Any, args: Any, name: str) -> dict[str, Any]:
    """TTFT of one-token requests alone, then while long answers loop; output tokens/s in the window."""
    return asyncio.run(_mixed(batcher, predictor, small, args, name))


async def _mixed(batcher: Any, predictor: Any, small: Any, args: Any, name: str) -> dict[str, Any]:
    from bench.report import percentile
    from serve.engine.types import GenerationRequest

    loop = asyncio.get_running_loop()

    async def timed(tokens: int) -> tuple[float, float, Any]:
        """(finished at, seconds from submit, outcome); encoded first, off the loop, as the server does."""
        request = GenerationRequest(image=small, question=QUESTION, temperature=0, max_new_tokens=tokens)
        await loop.run_in_executor(None, predictor.prepare, request)
        start = time.perf_counter()
        [outcome] = await batcher.submit([request])
        return time.perf_counter(), time.perf_counter() - start, outcome

    await timed(1)
    alone = [(await timed(1))[1] * 1000 for _ in range(args.mix_alone)]
    done: dict[str, list[tuple[float, float, Any]]] = {"long": [], "short": []}
    stop = asyncio.Event()

    async def client(kind: str, tokens: int) -> None:
        while not stop.is_set():
            done[kind].append(await timed(tokens))

    longs = [asyncio.create_task(client("long", args.mix_long_tokens)) for _ in range(args.mix_long_clients)]
    await asyncio.sleep(2.0)  # every long answer is past its prefill
    start = time.perf_counter()
    shorts = [asyncio.create_task(client("short", 1)) for _ in range(args.mix_short_clients)]
    await asyncio.sleep(args.mix_seconds)
    end = time.perf_counter()
    stop.set()
    await asyncio.gather(*longs, *shorts)
    inside = {k: [(s, o) for t, s, o in v if start <= t <= end] for k, v in done.items()}
    ok = {k: [(s, o) for s, o in v if hasattr(o, "completion_tokens")] for k, v in inside.items()}
    ttft = [s * 1000 for s, _ in ok["short"]]
    tokens = sum(o.completion_tokens for v in ok.values() for _, o in v)
    alone_p50 = percentile(alone, 50)
    return {f"mix_{name}_alone_ttft_p50_ms": alone_p50, f"mix_{name}_ttft_p50_ms": percentile(ttft, 50),
            f"mix_{name}_ttft_p90_ms": percentile(ttft, 90),
            f"mix_{name}_ttft_slowdown": percentile(ttft, 50) / alone_p50 if alone_p50 else float("nan"),
            f"mix_{name}_output_tok_s": tokens / (end - start),
            f"mix_{name}_long_tok_s": sum(o.completion_tokens for _, o in ok["long"]) / (end - start),
            f"mix_{name}_short_requests": len(ok["short"]), f"mix_{name}_long_requests": len(ok["long"]),
            f"mix_{name}_errors": sum(len(inside[k]) - len(ok[k]) for k in inside)}


def qlora_phase(model_dir: Path, args: Any) -> dict[str, Any]:
    """bench/qlora.py in a process of its own (its peak memory is the training's, not the serving model's)."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="bench-qlora-out-") as tmp:
        out = Path(tmp) / "qlora.json"
        cmd = [sys.executable, "-m", "bench.qlora", "--model-dir", str(model_dir), "--out", str(out), "--steps",
               str(args.qlora_steps)] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], timeout=args.qlora_timeout_s,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench.qlora exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
        return {"qlora": json.loads(out.read_text())}


def gpu_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return "CPU (no CUDA)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=128,
                        help="answer length of the server-accel-long phase (default 128): with short answers the "
                             "prefill, which batching shares least, dominates the accelerated server's ratio")
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests for the batching comparison")
    parser.add_argument("--sequential-requests", type=int, default=8,
                        help="requests timed one by one for the sequential rate (default 8; at most --requests)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mix-long-clients", type=int, default=4)
    parser.add_argument("--mix-short-clients", type=int, default=8)
    parser.add_argument("--mix-long-tokens", type=int, default=256)
    parser.add_argument("--mix-seconds", type=float, default=20.0, help="length of the mixed-traffic window")
    parser.add_argument("--mix-alone", type=int, default=10, help="one-token requests timed alone")
    parser.add_argument("--qlora-steps", type=int, default=12)
    parser.add_argument("--qlora-timeout-s", type=float, default=900)
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    parser.add_argument("--work-dir", help="where the 13.5 GB bf16 artifact is written (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="tiny model, few tokens: a smoke run for the tests")
    parser.add_argument("--out", help="write gpu.json and gpu.md here")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or set(phases) - set(PHASES):
        parser.error(f"--phases: choose from {', '.join(PHASES)}")
    if min(args.new_tokens, args.long_tokens) < 2 or min(args.requests, args.repeats, args.sequential_requests) < 1:
        parser.error("--new-tokens and --long-tokens must be >= 2; --requests, --sequential-requests and --repeats "
                     ">= 1")
    import torch

    from bench.samples import chart_image, encode
    from serve.engine.accel import AccelConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.tiny and device == "cpu":
        parser.error("no CUDA device: the 7B run needs a GPU (use --tiny for a CPU smoke run)")
    if args.tiny:
        args.new_tokens, args.requests, args.repeats = min(args.new_tokens, 4), min(args.requests, 4), 1
        args.long_tokens = min(args.long_tokens, 6)
        args.mix_long_clients, args.mix_short_clients, args.mix_long_tokens = 1, 2, 8
        args.mix_seconds, args.mix_alone = 1.0, 2
    accel_config = AccelConfig(mode="on") if device == "cuda" else AccelConfig(
        mode="on", compile_backend="eager", compile_mode=None, compile_on_cpu=True)  # CPU: capture only
    quantization = "nf4" if device == "cuda" else "none"  # bnb's CPU 4-bit path is tested in tests/test_accel.py
    chart = chart_image(1600, 1200)
    png = encode(chart, "PNG")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=args.work_dir) as tmp:
        return run_phases(args, phases, device, Path(tmp), accel_config, quantization, png)


def run_phases(args: Any, phases: list[str], device: str, tmp: Path, accel_config: Any, quantization: str,
               png: bytes) -> int:
    """Build and load the model (its artifact stays in `tmp` for the QLoRA phase), run the phases, report."""
    import torch

    from demo.tiny import build_tiny_artifact
    from serve.engine.accel import AccelConfig
    from serve.engine.model import load_artifact
    from serve.http.app import freeze_startup_heap

    started = time.perf_counter()
    path = build_tiny_artifact(tmp / "m") if args.tiny else build_7b_artifact(tmp / "m", device)
    built_s = time.perf_counter() - started
    print(f"[bench.gpu] {time.strftime('%H:%M:%S')} built in {built_s:.0f} s; loading", flush=True)
    loaded = load_artifact(path, quantization=quantization, device=device)
    load_s = time.perf_counter() - started - built_s
    freeze_startup_heap()  # as the server does before traffic: no full collection walks the model mid-measurement
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # serving memory only, not the bf16 build
    image = decode(png)
    results: dict[str, Any] = {"gpu": gpu_name(device), "model": "tiny" if args.tiny else "llava-1.5-7b-shaped",
                               "quantization": loaded.quantization, "new_tokens": args.new_tokens,
                               "requests": args.requests,
                               "sequential_requests": min(args.sequential_requests, args.requests),
                               "build_s": built_s, "load_s": load_s}
    progress(args.out, "loaded", results)
    if "decode" in phases:
        for name, cfg in (("eager", AccelConfig(mode="off")), ("accel", accel_config)):
            phase(args.out, f"decode-{name}", results, lambda name=name, cfg=cfg: decode_speed(
                loaded, image, args.new_tokens, args.repeats, name, cfg))
        if "accel_decode_tok_s" in results and "eager_decode_tok_s" in results:
            results["decode_speedup"] = results["accel_decode_tok_s"] / results["eager_decode_tok_s"]
    if "ttft" in phases:
        phase(args.out, "ttft", results, lambda: ttft(loaded, png, args.repeats, accel_config))
    server_accel = dataclasses.replace(accel_config, batch_buckets=(1, args.requests))
    servers: list[dict[str, Any]] = []
    results["server"] = servers
    for name, cfg, tokens in (("server-eager", AccelConfig(mode="off"), args.new_tokens),
                              ("server-accel", server_accel, args.new_tokens),
                              ("server-accel-long", server_accel, args.long_tokens)):
        if name in phases:
            phase(args.out, name, results, lambda cfg=cfg, tokens=tokens: servers.append(server_throughput(
                loaded, image, args.requests, tokens, cfg, args.sequential_requests)))
    if "continuous" in phases:
        phase(args.out, "continuous", results, lambda: continuous_phase(loaded, image, args, accel_config))
        batched = next((s["batched_output_tok_s"] for s in servers if s["accel"] == "on"
                        and s["new_tokens"] == args.long_tokens), None)
        if batched and results.get("continuous_output_tok_s"):
            results["continuous_vs_batch"] = results["continuous_output_tok_s"] / batched
    if "mixed-batch" in phases:
        phase(args.out, "mixed-batch", results, lambda: mixed_batch_phase(loaded, image, args, accel_config))
    if device == "cuda":
        results["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if "qlora" in phases:
        del loaded
        torch._dynamo.reset()  # compiled graphs keep the serving model and its KV caches alive
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # the training process gets the GPU's memory
        phase(args.out, "qlora", results, lambda: qlora_phase(path, args))
    write_report(args.out, "gpu", {"machine": machine(), "targets": TARGETS, **results}, render(results))
    ok = all(s["sequential_errors"] == s["batched_errors"] == 0 for s in servers)
    ok = ok and not any(v for k, v in results.items() if k.startswith(("mix_", "continuous_")) and k.endswith("errors"))
    return 0 if ok and not results.get("errors") else 1


def phase(out_dir: str | None, name: str, results: dict[str, Any], measure: Any) -> None:
    """Run one measurement (a dict it returns goes into `results`); a failure (a compile error on some torch/driver
    pair, say) goes into results["errors"] and the exit status, and the other measurements still run, so one
    lent-machine run says everything it can."""
    try:
        value = measure()
        if isinstance(value, dict):
            results.update(value)
    except Exception as e:  # noqa: BLE001 - reported in the results and the exit status
        traceback.print_exc()
        results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:2000]
    progress(out_dir, name, results)


def progress(out_dir: str | None, name: str, results: dict[str, Any]) -> None:
    """One line per finished phase, and gpu.partial.json with everything so far: a run cut off by a time limit
    (a lent GPU machine's, say) still leaves its numbers."""
    print(f"[bench.gpu] {time.strftime('%H:%M:%S')} {name} done", flush=True)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gpu.partial.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def render(r: dict[str, Any]) -> str:
    """Markdown for docs/benchmarks.md; a measurement that failed shows as '-' and its error is listed."""
    head = (f"{r['model']} on {r['gpu']}, quantization={r['quantization']}, {r['new_tokens']} forced new tokens, "
            f"build {r['build_s']:.0f} s, load {r['load_s']:.0f} s")
    decode = markdown_table([
        {"path": "eager generate", "tok_s": r.get("eager_decode_tok_s"),
         "first": r.get("eager_prefill_first_token_ms"), "warm": r.get("eager_warmup_s")},
        {"path": "serve.engine.accel",
         "tok_s": r.get("accel_decode_tok_s"), "first": r.get("accel_prefill_first_token_ms"),
         "warm": r.get("accel_warmup_s")}],
        [("path", "batch-1 decode"), ("tok_s", "tokens/s"), ("first", "prefill + 1st token ms"),
         ("warm", "warm-up/compile s")])
    server = markdown_table([
        {"accel": s["accel"], "tokens": s.get("new_tokens"), "seq": s["sequential_output_tok_s"],
         "bat": s["batched_output_tok_s"], "x": s["batched_speedup"]} for s in r["server"]],
        [("accel", "serve.engine.accel"), ("tokens", "new tokens"),
         ("seq", f"sequential out tok/s ({r.get('sequential_requests', '?')} req.)"),
         ("bat", f"batched ({r['requests']}) out tok/s"), ("x", "speed-up")])
    speedups = ", ".join(f"accel {s['accel']} with {s.get('new_tokens', '?')} tokens {fmt(s['batched_speedup'])}x"
                         for s in r["server"]) or "-"
    verdict = "; ".join([
        f"decode speed-up {fmt(r.get('decode_speedup'), 2)}x (target >= {TARGETS['decode_speedup']:g}x)",
        f"batched speed-up {speedups} (target >= {TARGETS['batched_speedup']:g}x)",
        f"TTFT p50 {fmt(r.get('ttft_p50_ms'), 0)} ms (target <= {TARGETS['ttft_p50_ms']:g} ms; image decode "
        f"{fmt(r.get('ttft_decode_p50_ms'), 0)} + preprocess {fmt(r.get('ttft_prepare_p50_ms'), 0)} + prefill and "
        f"first token {fmt(r.get('ttft_first_token_p50_ms'), 0)}; eager generate: "
        f"{fmt(r.get('eager_ttft_p50_ms'), 0)})"])
    prof = r.get("prefill_profile")
    if prof:
        verdict += (f"\n\nOne accelerated prefill + first token, profiled: {fmt(prof['wall_ms'], 0)} ms wall, "
                    f"{prof['kernels']} kernels taking {fmt(prof['kernel_ms'], 0)} ms of device time")
    parts = [head, decode, f"accel: {r.get('accel_describe', '-')}", server, verdict]
    if "continuous_output_tok_s" in r or "mix_batch_ttft_p50_ms" in r:
        parts.append(render_continuous(r))
    if "qlora" in r:
        q = r["qlora"]
        parts.append(f"QLoRA fine-tuning (NF4, LoRA r={q['lora_r']}, projector trained, ZeRO-2, bf16={q['bf16']}, "
                     f"batch {q['batch_size']} x {q['tokens_per_example']} tokens): {fmt(q['tokens_per_s'], 0)} "
                     f"tokens/s ({fmt(q['seconds_per_step_p50'], 2)} s/step over {q['timed_steps']} steps), peak "
                     f"memory {fmt(q.get('peak_allocated_gib'))} GiB allocated / {fmt(q.get('peak_reserved_gib'))} "
                     f"GiB reserved; trainable {q['trainable']}")
    errors = r.get("errors", {})
    if errors:
        parts.append("Failed: " + "; ".join(f"{k}: {v.splitlines()[0] if v else v}" for k, v in errors.items()))
    if r["model"] == "tiny":
        parts.append("(--tiny smoke run: checks the script works; on CPU the compiled path is only captured, "
                     "not code-generated, so these numbers say nothing about GPU speed)")
    return "\n\n".join(parts)


def render_continuous(r: dict[str, Any]) -> str:
    rows = [{"scheduler": name, "alone": r.get(f"mix_{name}_alone_ttft_p50_ms"),
             "p50": r.get(f"mix_{name}_ttft_p50_ms"), "p90": r.get(f"mix_{name}_ttft_p90_ms"),
             "x": r.get(f"mix_{name}_ttft_slowdown"),
             "long": r.get(f"mix_{name}_long_tok_s"), "all": r.get(f"mix_{name}_output_tok_s")}
            for name in ("batch", "continuous")]
    table = markdown_table(rows, [("scheduler", "scheduler"), ("alone", "TTFT alone p50 ms"),
                                  ("p50", "TTFT in mix p50 ms"), ("p90", "p90 ms"), ("x", "mix/alone"),
                                  ("long", "long tok/s"), ("all", "all tok/s")])
    return (f"Continuous batching ({r.get('continuous_decoder', '-')}, slot {r.get('continuous_slot_tokens', '-')} "
            f"tokens, built in {fmt(r.get('continuous_build_s'))} s): {r.get('continuous_requests', '-')} concurrent "
            f"{r.get('continuous_new_tokens', '-')}-token answers at {fmt(r.get('continuous_output_tok_s'), 0)} "
            f"output tok/s ({fmt(r.get('continuous_vs_batch'), 2)}x the batch scheduler's)\n\nMixed traffic: "
            "one-token requests (their latency is their TTFT) while long answers loop\n\n" + table)


if __name__ == "__main__":
    raise SystemExit(main())
