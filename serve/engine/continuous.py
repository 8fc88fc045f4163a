"""Continuous batching: requests join and leave the running batch between decode steps, so a short answer never
waits for a long one.

    engine = predictor.continuous(max_batch_size=8)   # once, at start-up (on CUDA it compiles its decode step here)
    n = engine.joinable(queued_requests)              # how many from the queue's head join now (the scheduler)
    engine.step([(request, on_outcome), ...])         # they join; every running row gets one more token

The Batcher's generation thread (serve/engine/batching.py, SERVE_SCHEDULER=continuous) calls `step` in a loop:
each iteration prefills the requests that join (serve/engine/scheduler.py decides how many: free slots, a prefill
token budget per step), samples their first token, then runs one decode step for every running row
(serve/engine/decode.py keeps the KV cache), and hands each finished row to its `on_outcome` at once, freeing its
slot for the next request in the queue.

A row behaves exactly as in `Predictor.predict`: its own temperature and top_p (greedy rows take the argmax, and
are what they are alone), its own max_new_tokens, stop strings, deadline and cancellation checked after every
token, streaming through TextStream, and a request that cannot be prepared, or whose streaming callback raises,
fails alone. An exception from the model fails every running row (the Batcher maps it to 503/500 and calls
`abort`).

Where per-row work plugs in (one place each):
- `_process_logits(rows, logits)`: every row's next-token logits before sampling (per-row temperature and top_p
  here; a per-row constraint mask, such as a grammar matcher's, belongs here too, before them);
- `_after_token(row, token)`: every token a row gets, the prefill's first one included (finish checks, streaming;
  per-token timing hooks belong here);
- `_deliver(row, outcome)`: every row's end, result or error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serve.engine.constrained import GrammarState, mask_logits
from serve.engine.decode import DynamicDecoder, StaticDecoder, fit_slot_tokens, kv_bytes_per_token, verify
from serve.engine.errors import ApiError, internal_error
from serve.engine.scheduler import DEFAULT_PREFILL_TOKENS, SchedulePolicy
from serve.engine.textstream import TextStream, cut_at_stop
from serve.engine.types import GenerationRequest, GenerationResult, Outcome

if TYPE_CHECKING:
    from serve.engine.predictor import Predictor, _Row

log = logging.getLogger(__name__)

OnOutcome = Callable[[Outcome], None]


@dataclass(eq=False)
class _Live:
    """A request in the running batch."""
    row: _Row  # the predictor's prepared row: inputs, prompt_tokens, temperature, top_p, max_new_tokens, stop
    request: GenerationRequest
    on_outcome: OnOutcome
    stream: TextStream | None
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    grammar: GrammarState | None = None  # a json_schema row's grammar (serve.engine.constrained)

    @property
    def stop_window(self) -> int:
        # Longest tail (in tokens) that can hold a stop string: a byte-level token is at least one byte.
        return 4 * max((len(s) for s in self.row.stop), default=0) + 4


class ContinuousEngine:
    """Iteration-level scheduling over a Predictor's model; one thread calls `step` (see the module docstring)."""

    def __init__(self, predictor: Predictor, *, max_batch_size: int, prefill_tokens: int = DEFAULT_PREFILL_TOKENS):
        self.predictor = predictor
        self.policy = SchedulePolicy(max_batch_size, prefill_tokens)
        self.eos = set(predictor.loaded.eos_token_ids)
        self.decoder: DynamicDecoder | StaticDecoder = self._build_decoder()
        predictor.limit_total_tokens(self.decoder.slot_tokens)  # prepare() now refuses what a slot cannot hold
        self._running: dict[int, _Live] = {}  # slot -> row
        self._last_step: float | None = None  # when the last decode step's tokens came (inter-token latency)

    # ------------------------------------------------------------------ set-up
    def _build_decoder(self) -> DynamicDecoder | StaticDecoder:
        p = self.predictor
        model, slots = p.loaded.model, self.policy.max_batch_size
        per_token = kv_bytes_per_token(model)
        context = p.loaded.max_positions or 2**31
        if p.accel.enabled:
            rows = StaticDecoder.rows_for(slots, p.accel.config)
            length = fit_slot_tokens(context=context, requested=p.max_total_tokens, slots=rows, per_token=per_token,
                                     budget_bytes=p.accel.cache_budget_bytes)
            decoder = self._compiled_or_fall_back(rows, length)
            if decoder is not None:
                return decoder
        length = fit_slot_tokens(context=context, requested=p.max_total_tokens, slots=slots, per_token=per_token,
                                 budget_bytes=None)
        log.info("continuous batching: eager decode, KV cache up to %d rows x %d tokens (%.1f MiB)", slots, length,
                 slots * length * per_token / 2**20)
        return DynamicDecoder(model, slots=slots, slot_tokens=length)

    def _compiled_or_fall_back(self, rows: int, length: int) -> StaticDecoder | None:
        """The compiled decoder, warmed up and checked against the eager one on a probe; None (logged) when that
        fails under SERVE_ACCEL=auto. Under SERVE_ACCEL=on the failure stops the start-up."""
        from PIL import Image

        p = self.predictor
        model, config = p.loaded.model, p.accel.config
        decoder = None
        try:
            decoder = StaticDecoder(model, slots=self.policy.max_batch_size, slot_tokens=length, accel=config,
                                    device=p.loaded.device)
            decoder.warm_up()
            probe = GenerationRequest(image=Image.new("RGB", (64, 64)), question="What is shown in the image?",
                                      temperature=0.0)
            batch = p._collate([p._prepare(0, probe)])
            problem = verify(decoder, DynamicDecoder(model, slots=1, slot_tokens=length), batch)
            if problem:
                raise RuntimeError(f"the compiled decode step does not compute what the eager one does: {problem}")
        except Exception:
            if config.mode != "auto":
                raise
            log.exception("continuous batching: the compiled decode step failed at start-up; decoding eagerly "
                          "instead (SERVE_ACCEL=off skips the attempt, SERVE_ACCEL=on makes this stop the start-up)")
            del decoder
            _free_cuda_memory()
            return None
        log.info("continuous batching: compiled decode, KV cache %d rows x %d tokens (%.1f GiB) allocated", rows,
                 length, rows * length * kv_bytes_per_token(model) / 2**30)
        return decoder

    # ------------------------------------------------------------------ the loop
    @property
    def running(self) -> int:
        return len(self._running)

    def joinable(self, queued: Iterable[GenerationRequest]) -> int:
        """How many requests from the head of `queued` join at the next step."""
        return self.policy.joining(self.running, (_prompt_tokens(r) for r in queued))

    def step(self, joining: Sequence[tuple[GenerationRequest, OnOutcome]] = ()) -> None:
        """`joining` (at most `joinable` of them) join; every running row gets its next token; finished rows are
        delivered and leave. Raises what the model raises (then call `abort`)."""
        import torch

        with torch.inference_mode() if not self.decoder.compiled else torch.no_grad():
            self._join([self._admit(request, on_outcome) for request, on_outcome in joining])
            self._release()
            if self._running:
                rows = [self._running[slot] for slot in self.decoder.rows]
                logits = self.decoder.step([r.tokens[-1] for r in rows])
                self._take(rows, logits)
                self._release()

    def abort(self, error: ApiError) -> None:
        """After `step` raised: every running row gets `error`, and the KV cache is dropped."""
        for live in self._running.values():
            self._deliver(live, error)
        self._running.clear()
        self.decoder.reset()

    def _admit(self, request: GenerationRequest, on_outcome: OnOutcome) -> _Live | None:
        try:
            if request.adapter is not None:
                raise ApiError("invalid_request", "LoRA adapters are served with SERVE_SCHEDULER=batch (the default); "
                                                  "this server runs the continuous scheduler")
            row = self.predictor._prepare(0, request)
        except ApiError as e:
            on_outcome(e)
            return None
        stream = TextStream(row.stop, request.on_text) if request.on_text else None
        return _Live(row=row, request=request, on_outcome=on_outcome, stream=stream,
                     grammar=row.grammar.start() if row.grammar is not None else None)

    def _join(self, joining: list[_Live | None]) -> None:
        groups: dict[frozenset, list[_Live]] = {}
        for live in joining:  # rows with and without an image have different processor outputs: one prefill each
            if live is not None:
                groups.setdefault(frozenset(live.row.inputs), []).append(live)
        for group in groups.values():
            slots, logits = self.decoder.join(self.predictor._collate([live.row for live in group]))
            for live, slot in zip(group, slots, strict=True):
                live.slot = slot
                self._running[slot] = live
            self._take(group, logits)

    def _take(self, rows: list[_Live], logits: Any) -> None:
        now, stats = time.monotonic(), self.predictor.stats
        fresh = [live for live in rows if not live.tokens]  # a prefill's rows: this is their first token
        for live in fresh:
            stats.first_token(now - live.request.arrival)
        if len(fresh) < len(rows):
            if self._last_step is not None:
                stats.inter_token(now - self._last_step, len(rows) - len(fresh))
            self._last_step = now
        for live, token in zip(rows, self._sample(rows, self._process_logits(rows, logits)), strict=True):
            self._after_token(live, token)

    def _release(self) -> None:
        finished = [slot for slot, live in self._running.items() if live.done]
        if finished:
            self.decoder.leave(finished)
            for slot in finished:
                del self._running[slot]
        if not self._running:
            self._last_step = None

    # ------------------------------------------------------------------ per row
    def _process_logits(self, rows: list[_Live], logits: Any) -> Any:
        """Each row's next-token logits, shaped before sampling: json_schema rows masked to what their grammar
        allows, then per-row temperature and top_p (serve.engine.predictor's _PerRowSampling); greedy rows keep
        their argmax."""
        if any(live.grammar is not None for live in rows):
            logits = mask_logits(logits, [live.grammar for live in rows])
        if all(live.row.temperature <= 0 for live in rows):
            return logits
        from serve.engine.predictor import _PerRowSampling

        return _PerRowSampling([live.row for live in rows])(None, logits)

    def _sample(self, rows: list[_Live], logits: Any) -> list[int]:
        import torch

        if any(live.row.temperature > 0 for live in rows):
            return torch.multinomial(logits.softmax(dim=-1), num_samples=1)[:, 0].tolist()
        return logits.argmax(dim=-1).tolist()

    def _after_token(self, live: _Live, token: int) -> None:
        """The checks `Predictor.predict` makes after every token, in the same order."""
        live.tokens.append(token)
        row, request = live.row, live.request
        if token in self.eos:
            self._finish(live, live.tokens[:-1], "stop")
        elif row.stop and self._stop_hit(live):
            self._finish(live, live.tokens, "stop")
        elif live.grammar is not None and not live.grammar.accept(token):  # advances the grammar
            log.error("a json_schema row got token %d, which its grammar does not allow", token)
            self._fail(live, internal_error())
        elif live.grammar is not None and live.grammar.finished:  # complete JSON: nothing may follow
            self._finish(live, live.tokens, "stop")
        elif len(live.tokens) >= row.max_new_tokens:
            self._finish(live, live.tokens, "length")
        elif request.cancelled or (request.deadline or float("inf")) < time.monotonic():
            self._fail(live, ApiError("timeout", "generation ran past the request's time budget"))
        elif live.stream is not None:
            self._stream(live, self.predictor.decode(live.tokens))

    def _stop_hit(self, live: _Live) -> bool:
        text = self.predictor.decode(live.tokens[-live.stop_window:])
        return any(s in text for s in live.row.stop)

    def _finish(self, live: _Live, token_ids: list[int], reason: str) -> None:
        answer, stopped = cut_at_stop(self.predictor.decode(token_ids), live.row.stop)
        answer, reason = answer.strip(), "stop" if stopped else reason
        if live.stream is not None and not self._stream(live, answer, final=True):
            return
        self._deliver(live, GenerationResult(answer=answer, prompt_tokens=live.row.prompt_tokens,
                                             completion_tokens=len(live.tokens), finish_reason=reason))

    def _stream(self, live: _Live, text: str, *, final: bool = False) -> bool:
        """Hand a streamed row its text; a caller's callback that raises fails that row only."""
        try:
            (live.stream.finish if final else live.stream.update)(text)
            return True
        except Exception:  # noqa: BLE001 - the other rows must go on
            log.exception("streaming callback failed; failing its row")
            self._fail(live, internal_error())
            return False

    def _fail(self, live: _Live, error: ApiError) -> None:
        self._deliver(live, error)

    def _deliver(self, live: _Live, outcome: Outcome) -> None:
        if live.done:
            return
        live.done = True
        live.on_outcome(outcome)


def _prompt_tokens(request: GenerationRequest) -> int:
    """A prepared request's prompt length; 0 for one not prepared yet (it is encoded when it joins)."""
    return int(request.inputs["input_ids"].shape[1]) if request.inputs is not None else 0


def _free_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
