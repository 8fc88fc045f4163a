"""Decode speed-ups for the served model on CUDA: static KV cache + torch.compile in shape buckets, sdpa.

    accel = Accelerator(loaded.model, AccelConfig(), device=loaded.device)   # once, after the load
    accel.warm_up(loaded.model, one_processed_row, gen, max_new_tokens=128)          # compile before traffic
    out = accel.generate(model, batch, generation_config=gen, logits_processor=lp, stopping_criteria=sc)

Eager HF decoding with bitsandbytes NF4 spends most of each token in Python and kernel launches (~30 tok/s on an
H100 at batch 1 in bitsandbytes' own benchmark, far below what the memory bandwidth allows). What this
does about it, all on the 4-bit path:
- a static KV cache, so every decode step has the same shapes and `generate` compiles the step with
  `torch.compile(mode="reduce-overhead")` (CUDA graphs). transformers refuses to auto-compile bitsandbytes models
  (its 4-bit quantizer says "not compileable"), but bitsandbytes >= 0.46 compiles and
  0.50 dispatches inference to fused dequant+GEMM kernels through a torch custom op, so the check is lifted for
  this model instance only;
- shape buckets: the batch is padded to the next bucket size (dummy copies of the last row, marked finished from
  the first step and dropped from the output) and the cache length is rounded up to a multiple of
  `cache_bucket`, so a handful of compiled graphs serve every request; caches are kept per (batch, length)
  bucket and reset, not reallocated, so CUDA graphs replay on the same addresses (LRU-evicted over a memory cap);
- sdpa attention (switched to if the model was loaded with eager attention); the 16-bit compute type (bf16, fp16
  before Ampere) is the loader's choice (serve.engine.model.half_dtype) and is reported here.

Settings (AccelConfig; the server reads them from these variables with its others, in serve.config.ServeConfig, so a
bad value stops start-up; this module reads no environment):
    SERVE_ACCEL             auto (default: on with CUDA, off on CPU; Predictor falls back to eager if the warm-up
                            fails) | on (a failed warm-up is an error) | off (plain eager `generate`)
    SERVE_ACCEL_BATCH_BUCKETS  comma-separated batch sizes (default 1,2,4,8,16,32); bigger batches run unpadded
    SERVE_ACCEL_CACHE_BUCKET   KV-cache length granularity in tokens (default 256)
    SERVE_ACCEL_CACHE_GIB      memory kept in pooled KV caches (default: 30% of the GPU's memory)
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
DYNAMO_RECOMPILE_LIMIT = 64  # one compiled decode step per (batch, cache length) bucket; torch's default is 8


@dataclass(frozen=True)
class AccelConfig:
    mode: str = "auto"
    batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
    cache_bucket: int = 256
    cache_gib: float | None = None  # None: 30% of the device's memory
    compile_mode: str | None = "reduce-overhead"  # None with the "eager" backend (it takes no mode)
    compile_backend: str = "inductor"  # tests use "eager" to exercise the compiled path on CPU quickly
    compile_on_cpu: bool = False  # transformers only compiles on accelerators unless told otherwise

    def enabled_for(self, device: str) -> bool:
        """`on`; `auto` on CUDA (or on a CPU told to compile, as tests do)."""
        return self.mode == "on" or (self.mode == "auto" and (str(device).startswith("cuda") or self.compile_on_cpu))


def bucket_batch(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n; n itself when it is over the largest bucket."""
    return next((b for b in buckets if b >= n), n)


def buckets_up_to(max_batch: int, buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The buckets a batch of at most `max_batch` rows can be padded to: each below it and the first at or above it.
    Only those are worth compiling at start-up (~35 s each for a 7B model on an H100)."""
    return tuple(b for b in buckets if b < max_batch) + tuple(b for b in buckets if b >= max_batch)[:1]


def bucket_length(n: int, granularity: int) -> int:
    return -(-n // granularity) * granularity


class Accelerator:
    """Owns the compiled decode path of one model. Calls from several threads are safe but serialised: compiled
    generation runs on the process's one compile thread (`_owner_executor`; CUDA graphs are thread-local)."""

    def __init__(self, model: Any, config: AccelConfig | None = None, *, device: str | None = None):
        self.config = config or AccelConfig()
        self.device = str(device or getattr(model, "device", "cpu"))
        self.enabled = self.config.enabled_for(self.device)
        self._caches: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._compiled: set[tuple[int, int]] = set()  # (batch, cache length) shapes generated with so far
        self._warmed_up = False
        self._cache_budget = 0
        if self.enabled:
            self._prepare(model)
        log.info("decode acceleration: %s", self.describe(model))

    # ------------------------------------------------------------------ set-up
    def _prepare(self, model: Any) -> None:
        import torch

        if getattr(model.config, "_attn_implementation", None) == "eager":
            try:
                model.set_attn_implementation("sdpa")
            except (ValueError, ImportError) as e:  # a model without sdpa support keeps eager attention
                log.warning("could not switch attention to sdpa: %s", e)
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), DYNAMO_RECOMPILE_LIMIT))
        if getattr(model, "hf_quantizer", None) is not None:
            _allow_compile(model, self.config.compile_on_cpu)
        self._cache_budget = self._budget_bytes()

    def _budget_bytes(self) -> int:
        import torch

        if self.config.cache_gib is not None:
            return int(self.config.cache_gib * 2**30)
        if self.device.startswith("cuda") and torch.cuda.is_available():
            return int(0.3 * torch.cuda.get_device_properties(torch.device(self.device)).total_memory)
        return 2**30

    def describe(self, model: Any) -> str:
        """One line: what is on (for the start-up log and the GPU benchmark's report)."""
        parts = [f"{'on' if self.enabled else 'off (eager generate)'}",
                 f"attention={getattr(model.config, '_attn_implementation', '?')}",
                 f"dtype={getattr(model, 'dtype', '?')}"]
        compute = _bnb_compute_dtype(model)
        if compute is not None:
            parts.append(f"nf4_compute={compute}")
            parts.append(f"bitsandbytes={_bnb_version()}")
        if self.enabled:
            parts.append(f"static_cache buckets batch={','.join(map(str, self.config.batch_buckets))} "
                         f"length=x{self.config.cache_bucket}, compile={self.config.compile_mode}/"
                         f"{self.config.compile_backend}")
        return " ".join(parts)

    # ------------------------------------------------------------------ generation
    def generate(self, model: Any, batch: Mapping[str, Any], *, generation_config: Any,
                 logits_processor: Any = None, stopping_criteria: Any = None, min_cache_len: int = 0) -> Any:
        """`model.generate(**batch, ...)`; with acceleration on: padded to a bucket, on a pooled static cache, on
        the process's one compile thread (`_owner_executor`), whichever thread calls."""
        if not self.enabled:
            return model.generate(**batch, generation_config=generation_config, logits_processor=logits_processor,
                                  stopping_criteria=stopping_criteria)
        return _on_owner_thread(self._generate_compiled, model, batch, generation_config, logits_processor,
                                stopping_criteria, min_cache_len)

    def _generate_compiled(self, model: Any, batch: Mapping[str, Any], generation_config: Any, logits_processor: Any,
                           stopping_criteria: Any, min_cache_len: int) -> Any:
        from transformers import CompileConfig, LogitsProcessorList, StoppingCriteriaList

        n, width = batch["input_ids"].shape
        size = bucket_batch(n, self.config.batch_buckets) if _paddable(batch, n) else n
        padded = pad_rows(batch, size)
        new_tokens = generation_config.max_new_tokens
        if new_tokens is None:  # a config that bounds the total length instead
            new_tokens = int(generation_config.max_length or 0) - width
        length = self._cache_length(size, max(width + int(new_tokens), min_cache_len))
        gen = copy.deepcopy(generation_config)
        gen.cache_implementation = None  # the cache is ours (pooled), not one generate would build
        gen.disable_compile = False
        compile_config = CompileConfig(fullgraph=False, dynamic=False, mode=self.config.compile_mode,
                                       backend=self.config.compile_backend)
        compile_config._compile_all_devices = self.config.compile_on_cpu or None
        gen.compile_config = compile_config
        lp = LogitsProcessorList([_RealRowsLogits(p, n) for p in (logits_processor or [])])
        sc = StoppingCriteriaList([_RealRowsStop(c, n) for c in (stopping_criteria or [])])
        out = model.generate(**padded, generation_config=gen, logits_processor=lp, stopping_criteria=sc,
                             cache=self._cache(model, size, length))
        self._compiled.add((size, length))
        return out[:n]

    def _cache_length(self, batch: int, need: int) -> int:
        """The shortest cache length already compiled for this batch size that holds `need` tokens, so its graphs
        replay (a text-only request or a shorter question reuses the warmed-up image length instead of compiling
        its own); else `need` rounded up to `cache_bucket`, which compiles a new shape (~35 s for a 7B model on an
        H100, inside that request's time), logged."""
        fitting = [length for b, length in self._compiled if b == batch and length >= need]
        if fitting:
            return min(fitting)
        length = bucket_length(need, self.config.cache_bucket)
        if self._warmed_up:
            log.warning("decode acceleration: compiling a new shape at request time (batch=%d, cache length=%d); "
                        "requests wait for it. Warmed up: %s", batch, length,
                        ", ".join(f"{b}x{n}" for b, n in sorted(self._compiled)))
        return length

    def warm_up(self, model: Any, row: Mapping[str, Any], generation_config: Any, *, max_new_tokens: int) -> float:
        """Compile the decode step for every batch bucket before traffic arrives; returns the seconds it took.

        `row` is one processor output (batch dimension 1, e.g. a blank image and a short question). Each bucket is
        compiled for the cache length a typical request needs (`row`'s prompt + `max_new_tokens`), so the first
        real batch of each size replays instead of compiling for tens of seconds inside a request's time budget.
        """
        if not self.enabled:
            return 0.0
        import time

        import torch

        started = time.perf_counter()
        gen = copy.deepcopy(generation_config)
        gen.max_new_tokens = gen.min_new_tokens = 2  # one decode step: enough to capture its graph
        gen.do_sample, gen.max_length = False, None
        device_row = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in row.items()}
        if isinstance(device_row.get("pixel_values"), torch.Tensor):
            device_row["pixel_values"] = device_row["pixel_values"].to(model.dtype)
        length = int(row["input_ids"].shape[1]) + max_new_tokens
        # generate() runs under no_grad; not inference_mode, whose tensors could not be reset outside it later.
        for size in self.config.batch_buckets:
            self.generate(model, pad_rows(device_row, size), generation_config=gen, min_cache_len=length)
        seconds = time.perf_counter() - started
        self._warmed_up = True
        log.info("decode acceleration warmed up for batch sizes %s in %.1f s",
                 ",".join(map(str, self.config.batch_buckets)), seconds)
        return seconds

    def _cache(self, model: Any, batch: int, length: int) -> Any:
        """A reset static cache for (batch, length); reused across calls so compiled graphs keep their inputs."""
        from transformers import StaticCache

        key = (batch, length)
        cache = self._caches.pop(key, None)
        if cache is None:
            need = _cache_bytes(model, batch, length)
            while self._caches and sum(_cache_bytes(model, *k) for k in self._caches) + need > self._cache_budget:
                evicted, _ = self._caches.popitem(last=False)
                log.info("evicting the KV cache for batch=%d length=%d (memory cap)", *evicted)
            cache = StaticCache(config=model.config, max_cache_len=length)
        else:
            cache.reset()
        self._caches[key] = cache  # most recently used last
        return cache

    @property
    def cached_shapes(self) -> list[tuple[int, int]]:
        return list(self._caches)


_OWNER_LOCK = threading.Lock()
_OWNER: ThreadPoolExecutor | None = None
_OWNER_LOCAL = threading.local()


def _owner_executor() -> ThreadPoolExecutor:
    """The single worker thread of the process that runs every compiled generation, started on first use.

    torch keeps CUDA-graph trees (what `reduce-overhead` replays) in thread-local state of the thread that first
    used them: replaying from any other thread fails inside inductor (`assert torch._C._is_key_in_tls(...)`),
    which on an H100 turned every request of the CUDA server into a 500 (warm-up ran on the loading thread,
    generation on the batcher's) and broke a second Accelerator whose thread differed from the first's. So all
    compiled work of all accelerators goes through this one thread, whichever thread calls. (A process that
    replayed CUDA graphs on some other thread before its first Accelerator call hits the same limit; the server
    never does.)
    """
    global _OWNER
    with _OWNER_LOCK:
        if _OWNER is None:
            _OWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="accel")
        return _OWNER


def _on_owner_thread(fn: Any, *args: Any) -> Any:
    """`fn(*args)` on the compile thread, waiting for it (directly when already there: a nested call)."""
    if getattr(_OWNER_LOCAL, "inside", False):
        return fn(*args)
    return _owner_executor().submit(_as_owner, fn, *args).result()


def _as_owner(fn: Any, *args: Any) -> Any:
    _OWNER_LOCAL.inside = True
    return fn(*args)


def pad_rows(batch: Mapping[str, Any], size: int) -> dict[str, Any]:
    """Every per-row tensor extended to `size` rows by repeating its last row (dummy rows are never returned)."""
    import torch

    out = dict(batch)
    n = batch["input_ids"].shape[0]
    if size == n:
        return out
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            extra = value[-1:].expand(size - n, *value.shape[1:])
            out[key] = torch.cat([value, extra], dim=0)
    return out


def _paddable(batch: Mapping[str, Any], n: int) -> bool:
    # One image per row (or none) is the only layout where "repeat the last row" keeps images and rows aligned.
    pixels = batch.get("pixel_values")
    return pixels is None or pixels.shape[0] == n


class _RealRowsLogits:
    """Runs a caller's logits processor on the real rows only; dummy rows keep their raw scores."""

    def __init__(self, inner: Any, n: int):
        self.inner, self.n = inner, n

    def __call__(self, input_ids, scores):
        import torch

        if scores.shape[0] == self.n:
            return self.inner(input_ids, scores)
        head = self.inner(input_ids[: self.n], scores[: self.n])
        return torch.cat([head, scores[self.n:]], dim=0)


class _RealRowsStop:
    """Runs a caller's stopping criterion on the real rows; dummy rows count as finished from the first step."""

    def __init__(self, inner: Any, n: int):
        self.inner, self.n = inner, n

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if input_ids.shape[0] == self.n:
            return self.inner(input_ids, scores, **kwargs)
        real_scores = scores[: self.n] if isinstance(scores, torch.Tensor) else scores
        done = torch.as_tensor(self.inner(input_ids[: self.n], real_scores, **kwargs), device=input_ids.device)
        done = done.reshape(-1).expand(self.n) if done.numel() == 1 else done
        rest = torch.ones(input_ids.shape[0] - self.n, dtype=torch.bool, device=input_ids.device)
        return torch.cat([done.to(torch.bool), rest])


def _allow_compile(model: Any, on_cpu: bool) -> None:
    """Let `generate` compile this bitsandbytes model's decode step (transformers' quantizer check says no).

    Only the quantizer exception is lifted: the static-cache, device and offload conditions still apply, as does
    `generation_config.disable_compile`.
    """
    import types

    def criteria(self, model_kwargs, generation_config):
        if generation_config.disable_compile:
            return False
        cache = model_kwargs.get("cache")
        if cache is None or not getattr(cache, "is_compileable", False):
            return False
        if self.device.type == "cpu" and not on_cpu:
            return False
        devices = set(getattr(self, "hf_device_map", {}).values())
        return not ("disk" in devices or ("cpu" in devices and len(devices) > 1))

    model._valid_auto_compile_criteria = types.MethodType(criteria, model)


def _cache_bytes(model: Any, batch: int, length: int) -> int:
    text = model.config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = 2 if str(getattr(model, "dtype", "")).endswith(("bfloat16", "float16")) else 4
    return 2 * text.num_hidden_layers * batch * heads * length * head_dim * itemsize


def _bnb_compute_dtype(model: Any) -> str | None:
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            return str(getattr(module, "compute_dtype", None)).replace("torch.", "")
    return None


def _bnb_version() -> str:
    try:
        from importlib.metadata import version

        return version("bitsandbytes")
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"
