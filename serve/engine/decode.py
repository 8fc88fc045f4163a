"""The model side of continuous batching: the running rows' KV cache, prefill of joining rows, one decode step.

    decoder = DynamicDecoder(model, slots=8, slot_tokens=512)                    # eager: CPU, SERVE_ACCEL=off
    decoder = StaticDecoder(model, slots=8, slot_tokens=2048, accel=config, device="cuda")  # compiled, CUDA graphs
    slots, logits = decoder.join(batch)   # prefill a collated batch of joining rows: a slot and a next-token
                                          # distribution (float32 logits) for each
    logits = decoder.step(tokens)         # one token per running row, in `decoder.rows` order, in; their logits out
    decoder.leave(slots)                  # finished rows free their slots

serve/engine/continuous.py drives it; what to sample, and when a row is done, is decided there.

Layout (both decoders). Every running row writes its next token at one shared cache position `t`, and a row's
tokens sit right-aligned just before it: row i holds its `len_i` tokens at [t - len_i, t); to its left its attention
mask is 0. Each row has its own position ids (its token count), so RoPE sees exactly what the row alone would see,
and the padding-aware causal mask keeps rows from seeing each other's columns or their own left padding. This is
the left-padded layout `generate` uses for a batch, kept alive across joins and leaves:
- a joining row is prefilled (eagerly, with its image) and its prompt's keys and values are placed to end at `t`;
- a finished row's slot is freed; its columns are masked or dropped;
- the cache only has to be as long as the longest running row: columns every row has to its left are dead.
Equal answers: a greedy row's tokens are those it gets alone up to float rounding (masked columns add exact
zeros), which tests/test_continuous.py checks on the real tiny model.

`DynamicDecoder` (eager) keeps the rows packed in one transformers DynamicCache of width `t` that grows by a column
per step (as `generate` does); joining rows are padded to the common width and concatenated, leaving rows are
dropped, and dead columns on the left are cut off after each leave.

`StaticDecoder` (CUDA with SERVE_ACCEL on) keeps one transformers StaticCache of `slots` x `slot_tokens`, allocated
once, so the decode step has fixed shapes and is compiled with `torch.compile(mode="reduce-overhead")` (CUDA graphs,
replayed at fixed addresses). The batch is bucketed (SERVE_ACCEL_BATCH_BUCKETS): a step runs on the first `b`
slots, where `b` is the smallest bucket holding the highest occupied slot, through a StaticCache whose tensors are
views of the first `b` rows of the one allocation; a joining row takes the lowest free slot, so the bucket shrinks
as rows finish. Free slots inside a bucket compute a dummy token that nothing reads. `t` only moves forward; when it
reaches the end (or a joining prompt is longer than `t`), the live window -- the longest running row's columns --
is copied to end at the new `t` (a relocation), which happens at most once per join or leave, because once the
longest row starts at column 0 the cache holds everything it can still generate. Attention reads the whole slot
length each step (masked): a shorter SERVE_MAX_TOTAL_TOKENS is a faster step. At start-up `verify` compares a few
compiled steps with the eager decoder; a mismatch or a compiler failure falls back to the eager decoder under
SERVE_ACCEL=auto (serve/engine/continuous.py).

KV memory: each slot holds `slot_tokens` (the longest request allowed: prompt + new tokens), `slots` rows, budgeted
up front (`kv_bytes_per_token`, `fit_slot_tokens`): the StaticDecoder allocates it at start-up; the DynamicDecoder
never holds more than it (its width is the longest running row).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from serve.engine.accel import AccelConfig, bucket_batch, buckets_up_to, on_compile_thread

log = logging.getLogger(__name__)


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys + values one token takes in the cache, all layers."""
    text = model.config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = 2 if str(getattr(model, "dtype", "")).endswith(("bfloat16", "float16")) else 4
    return 2 * text.num_hidden_layers * heads * head_dim * itemsize


def fit_slot_tokens(*, context: int, requested: int | None, slots: int, per_token: int, budget_bytes: int | None
                    ) -> int:
    """The longest request (prompt + new tokens) a slot holds: `requested`, else the model's context, lowered to
    what `budget_bytes` holds for `slots` rows when a budget applies. ValueError when even that is nothing, or when
    an explicitly requested length does not fit the budget."""
    want = min(requested or context, context)
    if budget_bytes is None:
        return want
    fits = budget_bytes // (slots * per_token)
    if requested and fits < want:
        raise ValueError(f"{slots} rows of {want} tokens need {slots * want * per_token / 2**30:.1f} GiB of KV cache; "
                         f"the budget is {budget_bytes / 2**30:.1f} GiB: lower the total tokens or the batch size, or "
                         "raise the cache budget")
    if fits < 1:
        raise ValueError(f"the KV-cache budget of {budget_bytes / 2**30:.2f} GiB does not hold one token for each of "
                         f"{slots} rows")
    return min(want, fits)


def prefill(model: Any, batch: Mapping[str, Any]) -> tuple[Any, Any]:
    """Run a collated (left-padded) batch of prompts: (its DynamicCache, float32 logits of each row's next token).
    Position ids count each row's real tokens from 0, as `generate` numbers a left-padded batch."""
    mask = batch["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1].float()


class DynamicDecoder:
    """The eager decoder: rows packed in one DynamicCache of width `t` (see the module docstring)."""

    compiled = False

    def __init__(self, model: Any, *, slots: int, slot_tokens: int):
        self.model = model
        self.slots = slots
        self.slot_tokens = slot_tokens
        self.reset()

    def reset(self) -> None:
        """Forget every row (after a failed step: whatever state it left is dropped)."""
        self._cache: Any = None
        self._mask: Any = None  # [rows, t] long: 1 where the row has a token
        self._positions: Any = None  # [rows] long: position id of each row's next token
        self._rows: list[int] = []  # slot id of each cache row

    @property
    def rows(self) -> list[int]:
        return list(self._rows)

    @property
    def width(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    def join(self, batch: Mapping[str, Any]) -> tuple[list[int], Any]:
        free = [s for s in range(self.slots) if s not in self._rows][: batch["input_ids"].shape[0]]
        if len(free) < batch["input_ids"].shape[0]:
            raise RuntimeError(f"{batch['input_ids'].shape[0]} rows joining with {len(free)} slots free")
        cache, logits = prefill(self.model, batch)
        mask = batch["attention_mask"].long()
        self._merge(cache, mask, mask.sum(-1))
        self._rows += free
        return free, logits

    def _merge(self, cache: Any, mask: Any, positions: Any) -> None:
        if self._cache is None:
            self._cache, self._mask, self._positions = cache, mask, positions
            return
        width = max(self.width, mask.shape[1])
        for mine, new in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = _cat_rows(mine.keys, new.keys, width)
            mine.values = _cat_rows(mine.values, new.values, width)
        self._mask = _cat_rows(self._mask, mask, width)
        self._positions = _cat(self._positions, positions)

    def step(self, tokens: list[int]) -> Any:
        import torch

        device = self._mask.device
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(tokens), 1)], dim=1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=self._positions[:, None],
                         cache=self._cache, use_cache=True)
        self._positions = self._positions + 1
        return out.logits[:, -1].float()

    def leave(self, slots: Iterable[int]) -> None:
        import torch

        gone = set(slots)
        keep = [i for i, s in enumerate(self._rows) if s not in gone]
        if not keep:
            self.reset()
            return
        if len(keep) == len(self._rows):
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        dead = int(mask.any(dim=0).long().argmax())  # columns every remaining row has to its left
        mask = mask[:, dead:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, dead:]
            layer.values = layer.values.index_select(0, index)[:, :, dead:]
        self._mask = mask
        self._positions = self._positions.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]


def _pad_left(t: Any, width: int, dim: int) -> Any:
    import torch

    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cat_rows(old: Any, new: Any, width: int) -> Any:
    """Stack two left-padded row blocks (sequence on the last axis for masks, axis 2 for keys/values)."""
    dim = 2 if old.dim() == 4 else 1
    return _cat(_pad_left(old, width, dim), _pad_left(new, width, dim))


def _cat(a: Any, b: Any) -> Any:
    import torch

    return torch.cat([a, b], dim=0)


class StaticDecoder:
    """The compiled decoder: one StaticCache of `slots` x `slot_tokens`, batch buckets as views of it, the decode
    step compiled per bucket (see the module docstring). Everything runs on the process's compile thread
    (serve.engine.accel: CUDA graphs are thread-local), whichever thread calls."""

    compiled = True

    def __init__(self, model: Any, *, slots: int, slot_tokens: int, accel: AccelConfig, device: str):
        import torch
        from transformers import StaticCache

        self.model = model
        self.slot_tokens = slot_tokens
        self.device = device
        self.buckets = self.buckets_for(slots, accel)
        self.slots = slots
        self.rows_allocated = self.buckets[-1]
        text = model.config.get_text_config(decoder=True)
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self._cache = StaticCache(config=model.config, max_cache_len=slot_tokens)
        self._cache.early_initialization(batch_size=self.rows_allocated, num_heads=heads, head_dim=head_dim,
                                         dtype=model.dtype, device=torch.device(device))
        self._views = {b: _view_cache(model.config, self._cache, b) for b in self.buckets}
        self._mask = torch.zeros(self.rows_allocated, slot_tokens, dtype=torch.long, device=device)
        self._forward = torch.compile(model.__call__, fullgraph=False, dynamic=False, backend=accel.compile_backend,
                                      mode=accel.compile_mode)
        self._pad_id = int(getattr(text, "pad_token_id", None) or 0)
        self.reset()

    @staticmethod
    def buckets_for(slots: int, accel: AccelConfig) -> tuple[int, ...]:
        """The batch sizes a step of at most `slots` rows runs at; the last is the rows the cache is allocated for."""
        buckets = buckets_up_to(slots, accel.batch_buckets)
        return buckets if buckets[-1] >= slots else (*buckets, slots)  # over the largest bucket: unpadded

    @classmethod
    def rows_for(cls, slots: int, accel: AccelConfig) -> int:
        return cls.buckets_for(slots, accel)[-1]

    def reset(self) -> None:
        self.t = 0
        self._length = [0] * self.rows_allocated  # tokens each slot holds, ending at t
        self._position = [0] * self.rows_allocated  # position id of each slot's next token
        self._rows: list[int] = []  # occupied slots, in the order rows joined (the logits order)
        self._mask.zero_()

    @property
    def rows(self) -> list[int]:
        return list(self._rows)

    # ------------------------------------------------------------------ join
    def join(self, batch: Mapping[str, Any]) -> tuple[list[int], Any]:
        return on_compile_thread(self._join, batch)

    def _join(self, batch: Mapping[str, Any]) -> tuple[list[int], Any]:
        import torch

        n = batch["input_ids"].shape[0]
        free = [s for s in range(self.slots) if s not in self._rows][:n]
        if len(free) < n:
            raise RuntimeError(f"{n} rows joining with {len(free)} slots free")
        with torch.no_grad():
            cache, logits = prefill(self.model, batch)
            lengths = batch["attention_mask"].long().sum(-1).tolist()
            self._make_room(max(lengths))
            width = batch["input_ids"].shape[1]
            for mine, new in zip(self._cache.layers, cache.layers, strict=True):
                for j, (slot, length) in enumerate(zip(free, lengths, strict=True)):
                    mine.keys[slot, :, self.t - length:self.t].copy_(new.keys[j, :, width - length:])
                    mine.values[slot, :, self.t - length:self.t].copy_(new.values[j, :, width - length:])
            for slot, length in zip(free, lengths, strict=True):
                self._mask[slot].zero_()
                self._mask[slot, self.t - length:self.t] = 1
                self._length[slot] = self._position[slot] = length
        self._rows += free
        return free, logits

    def _make_room(self, prompt: int) -> None:
        """Move `t` so a joining prompt of `prompt` tokens fits before it (t >= prompt) and the next write fits
        (t < slot_tokens)."""
        if not self._rows:
            self._mask.zero_()
            self.t = prompt
        elif self.t < prompt or self.t >= self.slot_tokens:
            self._relocate(max(prompt, self._longest()))

    def _longest(self) -> int:
        return max((self._length[s] for s in self._rows), default=0)

    def _relocate(self, new_t: int) -> None:
        """Copy the live window (the longest row's columns, which hold every running row) to end at `new_t`."""
        width = self._longest()
        if not 0 < new_t < self.slot_tokens or new_t < width:
            raise RuntimeError(f"cannot place {width} live columns to end at {new_t} in {self.slot_tokens}")
        hi = max(self._rows) + 1
        src, dst = slice(self.t - width, self.t), slice(new_t - width, new_t)
        for layer in self._cache.layers:
            for tensor in (layer.keys, layer.values):
                tensor[:hi, :, dst].copy_(tensor[:hi, :, src].clone())
        window = self._mask[:, src].clone()
        self._mask.zero_()
        self._mask[:, dst] = window
        self.t = new_t

    # ------------------------------------------------------------------ step
    def step(self, tokens: list[int]) -> Any:
        return on_compile_thread(self._step, tokens)

    def _step(self, tokens: list[int]) -> Any:
        import torch

        if self.t >= self.slot_tokens:
            self._relocate(self._longest())
        size = bucket_batch(max(self._rows) + 1, self.buckets)
        ids, positions = [self._pad_id] * size, [0] * size
        for slot, token in zip(self._rows, tokens, strict=True):
            ids[slot], positions[slot] = token, self._position[slot]
        host = torch.tensor([ids, positions], dtype=torch.long)
        inputs = host.to(self.device)
        logits = self._run(size, inputs[0][:, None], inputs[1][:, None])
        for slot in self._rows:
            self._length[slot] += 1
            self._position[slot] += 1
        self.t += 1
        return logits[torch.tensor(self._rows, device=logits.device)].float()

    def _run(self, size: int, ids: Any, positions: Any) -> Any:
        """One compiled decode step on the first `size` slots, writing at column t."""
        import torch

        # Every slot of the bucket attends to its own new column, free ones included: a row that attends to nothing
        # at all would make NaNs (harmless to the others, but noise in a debugger).
        self._mask[:size, self.t] = 1
        cache = self._views[size]
        for layer in cache.layers:
            layer.cumulative_length.fill_(self.t)
        with torch.no_grad():
            torch.compiler.cudagraph_mark_step_begin()
            out = self._forward(input_ids=ids, attention_mask=self._mask[:size], position_ids=positions, cache=cache,
                                use_cache=True)
        return out.logits[:, -1]

    def leave(self, slots: Iterable[int]) -> None:
        gone = set(slots)
        for slot in gone & set(self._rows):
            self._length[slot] = 0
        self._rows = [s for s in self._rows if s not in gone]
        if not self._rows:
            self.t = 0

    # ------------------------------------------------------------------ start-up
    def warm_up(self) -> float:
        """Compile (and capture) the decode step of every bucket before traffic; returns the seconds it took."""
        return on_compile_thread(self._warm_up)

    def _warm_up(self) -> float:
        import time

        import torch

        started = time.perf_counter()
        for size in self.buckets:
            for _ in range(3):  # cudagraph trees: a warm-up run, a recording, then a replay
                self.t = 1
                self._run(size, torch.full((size, 1), self._pad_id, dtype=torch.long, device=self.device),
                          torch.zeros((size, 1), dtype=torch.long, device=self.device))
        self.reset()
        seconds = time.perf_counter() - started
        log.info("continuous decode compiled for batch sizes %s (%d slots x %d tokens) in %.1f s",
                 ",".join(map(str, self.buckets)), self.rows_allocated, self.slot_tokens, seconds)
        return seconds


def _view_cache(config: Any, base: Any, rows: int) -> Any:
    """A StaticCache over the first `rows` rows of `base` (same memory, same write-position tensors): what a
    `rows`-sized decode step reads and writes. Marked as static addresses, as StaticCache marks its own tensors, so
    CUDA graphs update the one allocation in place instead of copying it."""
    import torch
    from transformers import StaticCache

    view = StaticCache(config=config, max_cache_len=base.layers[0].max_cache_len)
    for mine, theirs in zip(view.layers, base.layers, strict=True):
        mine.__dict__.update(theirs.__dict__)  # dims, dtype, device, is_initialized, cumulative_length
        mine.batch_size = rows
        mine.keys, mine.values = theirs.keys[:rows], theirs.values[:rows]
        torch._dynamo.mark_static_address(mine.keys)
        torch._dynamo.mark_static_address(mine.values)
    return view


def verify(compiled: StaticDecoder, eager: DynamicDecoder, batch: Mapping[str, Any], steps: int = 4,
           tolerance: float = 0.05) -> str | None:
    """Run one probe row (a collated batch of one) through both decoders for `steps` tokens, feeding both the eager
    decoder's greedy tokens; None when the compiled one holds the same keys and values and gives the same logits,
    else what differs. Compared as the mean absolute difference relative to the mean magnitude: fused 16-bit
    kernels round differently (~1%), a cache write that did not reach the cache is off by ~100%."""
    import torch

    with torch.inference_mode():
        _, logits = eager.join(batch)
        want, tokens = [logits[0]], []
        for _ in range(steps):
            tokens.append(int(want[-1].argmax()))
            want.append(eager.step([tokens[-1]])[0])
        eager_kv = [(layer.keys[0], layer.values[0]) for layer in eager._cache.layers]
    _, logits = compiled.join(batch)
    got = [logits[0]]
    for token in tokens:
        got.append(compiled.step([token])[0])
    [slot] = compiled.rows
    # The prompt's columns were copied in eagerly; the last `steps` were written by the compiled step: each part is
    # compared on its own, so a few lost columns are not averaged away by a long prompt.
    parts = {"prompt": (slice(compiled.t - eager.width, compiled.t - steps), slice(0, eager.width - steps)),
             "decoded": (slice(compiled.t - steps, compiled.t), slice(eager.width - steps, eager.width))}
    problems = [_differs("logits", torch.stack(got), torch.stack(want), tolerance)]
    for i, (layer, (keys, values)) in enumerate(zip(compiled._cache.layers, eager_kv, strict=True)):
        for part, (mine, theirs) in parts.items():
            problems.append(_differs(f"layer {i} {part} keys", layer.keys[slot, :, mine], keys[:, theirs], tolerance))
            problems.append(_differs(f"layer {i} {part} values", layer.values[slot, :, mine], values[:, theirs],
                                     tolerance))
    eager.reset()
    compiled.reset()
    found = [p for p in problems if p]
    return "; ".join(found[:3]) if found else None


def _differs(name: str, got: Any, want: Any, tolerance: float) -> str | None:
    got, want = got.float().cpu(), want.float().cpu()
    scale = float(want.abs().mean()) or 1.0
    error = float((got - want).abs().mean()) / scale
    return f"{name} differ by {error:.1%} (allowed {tolerance:.0%})" if error > tolerance else None
