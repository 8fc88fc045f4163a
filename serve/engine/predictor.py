"""Predictor: a list of generation requests in, one result (or ApiError) per request out, from ONE `generate` call.

    predictor = Predictor(load_artifact(model_dir))
    results = predictor.predict([GenerationRequest(image=pil_image, question="What type of chart is this?")])

Each row keeps its own parameters inside the shared batch: temperature 0 is greedy (exactly the argmax, so a row
answers the same alone or batched), temperature > 0 samples with that row's temperature and top_p (and, with a
seed, from that row's own random generator, so its answer repeats);
max_new_tokens, stop strings and the deadline are checked per row after every token. A row that finishes is
handed to `on_result` at once, so callers of short answers do not wait for the longest row; a request with
`on_text` also gets its answer's pieces while it is generated (serve.engine.textstream). A row that cannot be
prepared (a prompt longer than the model's context) fails alone; the others still run.
A request with a `json_schema` is decoded under that schema's grammar (serve.engine.constrained), row by row: the
other rows of its batch are untouched, and the row finishes ("stop") as soon as its JSON is complete.
Prompts render with the chat template from the model dir (serve.engine.encoding) and pad on the left.
Each row's first token and every later decode step are reported to `stats` (serve.engine.stats), from the times
the stopping criterion already takes: no extra device read.

With `adapters=AdapterLimits(...)` rows may name a LoRA adapter (`GenerationRequest.adapter`, serve/engine/adapters.py):
rows of different adapters and of the base share one generate call on the adapter tree (eager), each answering as its
adapter alone would. When the compiled decode path is on, the base rows of a mixed batch run on it in a call of their
own, so a base answer never depends on what else was batched.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from serve.engine.accel import AccelConfig, Accelerator
from serve.engine.adapters import AdapterLimits, AdapterRegistry
from serve.engine.constrained import GrammarLogits, GrammarState, JsonGrammar, JsonGrammars
from serve.engine.encoding import Encoder
from serve.engine.errors import ApiError, internal_error
from serve.engine.model import LoadedModel
from serve.engine.stats import NO_STATS, Stats
from serve.engine.textstream import TextStream, cut_at_stop
from serve.engine.types import GenerationRequest, GenerationResult, OnResult, Outcome

log = logging.getLogger(__name__)

# Keys of processor outputs that are per-token sequences (padded on the left); every other tensor is per image.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class _Row:
    """A prepared request: its index in the call, processor outputs and resolved parameters."""
    index: int
    inputs: dict[str, Any]
    prompt_tokens: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int | None = None
    grammar: JsonGrammar | None = None  # the request's compiled json_schema
    adapter: str | None = None


class Predictor:
    """Batched generation on a loaded artifact. One thread (the batcher's) calls `predict`; any thread may call
    `prepare`."""

    def __init__(self, loaded: LoadedModel, *, max_new_tokens_cap: int = 1024, accel: AccelConfig | None = None,
                 stats: Stats = NO_STATS, adapters: AdapterLimits | None = None):
        self.loaded = loaded
        self.stats = stats
        # Static cache + compiled decode on CUDA (serve/engine/accel.py); SERVE_ACCEL=off keeps plain eager generate.
        self.accel = Accelerator(loaded.model, accel or AccelConfig(), device=loaded.device)
        self.encoder = Encoder(loaded.processor)
        self.grammars = JsonGrammars(loaded.processor.tokenizer, loaded.eos_token_ids)  # json_schema, compiled
        self.adapters = AdapterRegistry(loaded, adapters, base_encoder=self.encoder) if adapters else None
        gen = loaded.generation_config
        self.max_new_tokens_cap = max_new_tokens_cap
        self.default_max_new_tokens = min(gen.max_new_tokens or 128, max_new_tokens_cap)
        self.default_temperature = float(gen.temperature or 1.0) if gen.do_sample else 0.0
        self.default_top_p = float(gen.top_p) if gen.do_sample and gen.top_p is not None else 1.0
        if self.accel.enabled:
            self._warm_up_or_fall_back()

    def _warm_up_or_fall_back(self) -> None:
        """Compile every batch bucket now, not inside the first requests' time budget. Under SERVE_ACCEL=auto a
        failure (a compiler bug on some GPU/driver/torch combination) leaves eager generate serving, logged with its
        traceback; under SERVE_ACCEL=on it stops the start-up."""
        import dataclasses

        from PIL import Image

        model, gen = self.loaded.model, self.loaded.generation_config
        probe = GenerationRequest(image=Image.new("RGB", (64, 64)), question="What is shown in the image?")
        try:
            self.accel.warm_up(model, self._encode(probe), gen, max_new_tokens=self.default_max_new_tokens)
        except Exception:
            if self.accel.config.mode != "auto":
                raise
            log.exception("decode acceleration failed while warming up: serving with eager generate instead "
                          "(SERVE_ACCEL=off skips the attempt; SERVE_ACCEL=on makes this failure stop the start-up)")
            self.accel = Accelerator(model, dataclasses.replace(self.accel.config, mode="off"),
                                     device=self.loaded.device)

    # ------------------------------------------------------------------ public
    def predict(self, requests: Sequence[GenerationRequest], on_result: OnResult | None = None) -> list[Outcome]:
        """Answer every request; `on_result(i, outcome)` fires once per request as soon as its outcome is known."""
        import torch

        results: list[Outcome | None] = [None] * len(requests)

        def deliver(i: int, outcome: Outcome) -> None:
            results[i] = outcome
            if on_result is not None:
                on_result(i, outcome)

        rows = []
        for i, req in enumerate(requests):
            try:
                rows.append(self._prepare(i, req))
            except ApiError as e:
                deliver(i, e)
        if rows:
            # Leased (adapters loaded if need be) before inference mode: weights loaded here outlive this call.
            with self._adapters_leased(rows, deliver) as rows, torch.inference_mode():
                if rows:
                    self._generate(rows, requests, deliver)
        return [r if r is not None else ApiError("internal_error", "no result") for r in results]

    @property
    def image_processor(self) -> Any:
        """What serve.engine.images shrinks images for, on the request threads (serve.engine.preshrink)."""
        return self.loaded.processor.image_processor

    def image_processor_for(self, adapter: str | None) -> Any:
        """The image processor of requests on `adapter` (its own when it saved a different one)."""
        return self.image_processor if adapter is None else self._registry().encoder(adapter).processor.image_processor

    # ------------------------------------------------------------------ preparation
    def prepare(self, req: GenerationRequest) -> None:
        """Render the prompt, tokenize and preprocess the image now, on the calling thread (the request's), so the
        generation thread only generates. Raises ApiError for a prompt the model's context cannot hold.
        Safe to call from several threads; `predict` does it itself for requests that skipped it.
        A `json_schema` is compiled here too (ApiError invalid_json_schema for a bad one)."""
        req.grammar = self._grammar(req)
        req.inputs = self._encode(req)

    def _grammar(self, req: GenerationRequest) -> JsonGrammar | None:
        if req.grammar is not None or req.json_schema is None:
            return req.grammar
        return self.grammars.compile(req.json_schema)

    def _encode(self, req: GenerationRequest) -> dict[str, Any]:
        encoder = self.encoder if req.adapter is None else self._registry().encoder(req.adapter)
        if req.messages is not None:
            inputs = encoder.encode_messages(req.messages, req.image)
        else:
            inputs = encoder.encode(req.question, req.image)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        context = self.loaded.max_positions
        if context is not None and prompt_tokens >= context:
            raise ApiError("invalid_request", f"the prompt is {prompt_tokens} tokens (image included); the "
                                              f"model's context is {context}: ask a shorter question")
        return inputs

    def _prepare(self, index: int, req: GenerationRequest) -> _Row:
        if req.cancelled or (req.deadline is not None and time.monotonic() > req.deadline):
            raise ApiError("timeout", "the request ran out of its time budget before generation started")
        max_new = self.default_max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
        if max_new > self.max_new_tokens_cap:
            raise ApiError("invalid_request", f"max_new_tokens={max_new} is over this server's cap of "
                                              f"{self.max_new_tokens_cap}")
        grammar = self._grammar(req)
        inputs = req.inputs if req.inputs is not None else self._encode(req)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if self.loaded.max_positions is not None:
            max_new = min(max_new, self.loaded.max_positions - prompt_tokens)
        temperature = self.default_temperature if req.temperature is None else float(req.temperature)
        top_p = self.default_top_p if req.top_p is None else float(req.top_p)
        return _Row(index, inputs, prompt_tokens, temperature, top_p, max_new, tuple(s for s in req.stop if s),
                    req.seed, grammar, req.adapter)

    def _registry(self) -> AdapterRegistry:
        if self.adapters is None:
            raise ApiError("adapter_not_found", "this server serves no adapters (SERVE_MAX_ADAPTERS=0)")
        return self.adapters

    @contextmanager
    def _adapters_leased(self, rows: list[_Row], deliver: OnResult):
        """The rows whose adapters are resident and leased for this call; rows of an adapter that cannot be loaded
        now fail alone."""
        leases, failed = [], {}
        for name in dict.fromkeys(r.adapter for r in rows if r.adapter is not None):
            try:
                leases.append(self._registry().checkout([name], retiring_ok=True))  # accepted before an unload
            except ApiError as e:
                failed[name] = e
        try:
            for r in rows:
                if r.adapter in failed:
                    deliver(r.index, failed[r.adapter])
            yield [r for r in rows if r.adapter not in failed]
        finally:
            for lease in leases:
                lease.release()

    def _collate(self, rows: list[_Row]) -> dict[str, Any]:
        """Left-pad the token sequences, concatenate the per-image tensors."""
        import torch

        width = max(r.prompt_tokens for r in rows)
        pad_id = self.loaded.processor.tokenizer.pad_token_id
        batch: dict[str, Any] = {}
        for key in rows[0].inputs:
            tensors = [r.inputs[key] for r in rows if key in r.inputs]
            if key in SEQUENCE_KEYS:
                fill = pad_id if key == "input_ids" else 0
                tensors = [torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill) for t in tensors]
            batch[key] = torch.cat(tensors, dim=0).to(self.loaded.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.loaded.model.dtype)
        return batch

    # ------------------------------------------------------------------ generation
    def _generate(self, rows: list[_Row], requests: Sequence[GenerationRequest], deliver: OnResult) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        groups: dict[tuple, list[_Row]] = {}
        split_base = self.accel.enabled and any(r.adapter is not None for r in rows)  # base rows stay compiled
        for r in rows:  # rows with and without an image have different processor outputs: one call per kind
            groups.setdefault((frozenset(r.inputs), split_base and r.adapter is None), []).append(r)
        if len(groups) > 1:
            for group in groups.values():
                self._generate(group, requests, deliver)
            return
        batch = self._collate(rows)
        # json_schema rows: one grammar state each, masked before sampling, advanced and dropped by the tracker.
        grammars: list[GrammarState | None] = [r.grammar.start() if r.grammar else None for r in rows]
        tracker = _RowTracker(self, rows, requests, int(batch["input_ids"].shape[1]), deliver, grammars)
        sample = any(r.temperature > 0 for r in rows)
        gen = self._generation_config(max(r.max_new_tokens for r in rows), sample)
        processors = LogitsProcessorList(([GrammarLogits(grammars)] if any(grammars) else [])
                                         + ([_PerRowSampling(rows)] if sample else []))
        stopping = StoppingCriteriaList([tracker])
        if any(r.adapter is not None for r in rows):  # eager, on the adapter tree (serve/engine/lora.py)
            out = self._registry().generate(batch, [r.adapter for r in rows], generation_config=gen,
                                            logits_processor=processors, stopping_criteria=stopping)
        else:
            out = self.accel.generate(self.loaded.model, batch, generation_config=gen, logits_processor=processors,
                                      stopping_criteria=stopping)
        tracker.finish_remaining(out)

    def _generation_config(self, max_new_tokens: int, sample: bool):
        gen = copy.deepcopy(self.loaded.generation_config)
        gen.max_new_tokens = max_new_tokens
        gen.max_length = None
        gen.min_new_tokens = None
        gen.do_sample = sample
        gen.num_beams = 1
        gen.stop_strings = None  # ours are per row (_RowTracker)
        # Sampling parameters live per row in _PerRowSampling; the batch-wide warpers stay neutral.
        gen.temperature, gen.top_p, gen.top_k = (1.0, 1.0, 0) if sample else (None, None, None)
        return gen

    def decode(self, token_ids: list[int]) -> str:
        return self.loaded.processor.tokenizer.decode(token_ids, skip_special_tokens=True)


class _PerRowSampling:
    """Per-row temperature and top_p in one logits processor; greedy rows keep only their argmax, so sampling
    picks it with probability 1 and they stay exactly greedy inside a sampled batch. A sampled row with a seed
    draws its token here, from its own generator, and keeps only that one the same way: its answer depends on its
    seed and its own logits, not on the process's random state or on the other rows of its batch."""

    def __init__(self, rows: list[_Row]):
        self.temperature = [r.temperature for r in rows]
        self.top_p = [r.top_p for r in rows]
        self.seeds = {j: r.seed for j, r in enumerate(rows) if r.seed is not None and r.temperature > 0}
        self._per_row: tuple[Any, ...] | None = None  # (dtype, device, decided, divisor, drop_at): see _constants
        self._generators: dict[int, Any] = {}  # row -> torch.Generator on the scores' device, made at the first step

    def _constants(self, scores):
        """The per-row tensors, built once per generate (scores keep their dtype and device across its steps),
        not re-sent to the device at every token."""
        import torch

        if self._per_row is None or self._per_row[:2] != (scores.dtype, scores.device):
            temps = torch.tensor(self.temperature, dtype=scores.dtype, device=scores.device)
            top_p = torch.tensor(self.top_p, dtype=scores.dtype, device=scores.device)
            greedy = temps <= 0
            divisor = torch.where(greedy, torch.ones_like(temps), temps)[:, None]
            decided = greedy.clone()  # rows whose next token is picked here: greedy and seeded ones
            decided[list(self.seeds)] = True
            self._per_row = (scores.dtype, scores.device, decided, divisor, (1 - top_p)[:, None])
        return self._per_row[2:]

    def __call__(self, input_ids, scores):
        import torch

        decided, divisor, drop_at = self._constants(scores)
        scaled = scores / divisor
        sorted_logits, sorted_idx = torch.sort(scaled, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= drop_at
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        sampled = scaled.masked_fill(drop, float("-inf"))
        tokens = scores.argmax(dim=-1, keepdim=True)
        if self.seeds:
            self._draw_seeded(sampled, tokens)
        one_hot = torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)
        return torch.where(decided[:, None], one_hot, sampled)

    def _draw_seeded(self, sampled, tokens) -> None:
        """Each seeded row's next token into `tokens`, drawn from its distribution by its own generator: one draw
        per step, so the same seed and the same logits give the same tokens."""
        import torch

        for j, seed in self.seeds.items():
            if j not in self._generators:
                self._generators[j] = torch.Generator(device=sampled.device).manual_seed(seed)
            probs = sampled[j].float().softmax(dim=-1)
            tokens[j] = torch.multinomial(probs, 1, generator=self._generators[j])


class _RowTracker:
    """Stopping criterion that watches each row after every token: end of sequence, stop strings, its own
    max_new_tokens, deadline and cancellation. A finished row is delivered immediately and marked done, so the
    batch stops as soon as every row is."""

    def __init__(self, predictor: Predictor, rows: list[_Row], requests: Sequence[GenerationRequest],
                 prompt_width: int, deliver: OnResult, grammars: list[GrammarState | None] | None = None):
        self.predictor = predictor
        self.rows = rows
        self.requests = [requests[r.index] for r in rows]
        self.prompt_width = prompt_width
        self.deliver = deliver
        self.eos = set(predictor.loaded.eos_token_ids)
        self.done = [False] * len(rows)
        self.grammars = grammars if grammars is not None else [None] * len(rows)  # shared with GrammarLogits
        self.streams = [TextStream(r.stop, req.on_text) if req.on_text else None
                        for r, req in zip(rows, self.requests, strict=True)]
        # A streamed row's tokens so far, from each step's last column (already on the host): no extra device read.
        self.tokens: list[list[int]] = [[] for _ in rows]
        # Longest tail (in tokens) that can hold a stop string: a byte-level token is at least one byte.
        self.stop_window = [4 * max((len(s) for s in r.stop), default=0) + 4 for r in rows]
        self.last_step: float | None = None  # when the previous token was generated

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        steps = input_ids.shape[1] - self.prompt_width
        last = input_ids[:, -1].tolist()
        now = time.monotonic()
        self._report_step(now)
        for j, row in enumerate(self.rows):
            if self.done[j]:
                continue
            if last[j] in self.eos:
                self._finish(j, input_ids[j, self.prompt_width:-1].tolist(), steps, "stop")
            elif row.stop and self._stop_hit(j, input_ids):
                self._finish(j, input_ids[j, self.prompt_width:].tolist(), steps, "stop")
            elif self.grammars[j] is not None and not self.grammars[j].accept(last[j]):  # advances the grammar
                log.error("a json_schema row got token %d, which its grammar does not allow", last[j])
                self._fail(j, internal_error())
            elif self.grammars[j] is not None and self.grammars[j].finished:  # complete JSON: nothing may follow
                self._finish(j, input_ids[j, self.prompt_width:].tolist(), steps, "stop")
            elif steps >= row.max_new_tokens:
                self._finish(j, input_ids[j, self.prompt_width:].tolist(), steps, "length")
            elif self.requests[j].cancelled or (self.requests[j].deadline or float("inf")) < now:
                self._fail(j, ApiError("timeout", "generation ran past the request's time budget"))
            elif self.streams[j] is not None:
                self.tokens[j].append(last[j])
                self._stream(j, self.predictor.decode(self.tokens[j]))
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _report_step(self, now: float) -> None:
        """The first step is every row's first token; each later one is an inter-token interval of the rows still
        generating."""
        stats = self.predictor.stats
        if self.last_step is None:
            for req in self.requests:
                stats.first_token(now - req.arrival)
        else:
            stats.inter_token(now - self.last_step, self.done.count(False))
        self.last_step = now

    def finish_remaining(self, output_ids) -> None:
        steps = output_ids.shape[1] - self.prompt_width
        for j in range(len(self.rows)):
            if not self.done[j]:
                self._finish(j, output_ids[j, self.prompt_width:].tolist(), steps, "length")

    def _stop_hit(self, j: int, input_ids) -> bool:
        tail = input_ids[j, max(self.prompt_width, input_ids.shape[1] - self.stop_window[j]):].tolist()
        text = self.predictor.decode(tail)
        return any(s in text for s in self.rows[j].stop)

    def _finish(self, j: int, token_ids: list[int], steps: int, reason: str) -> None:
        row = self.rows[j]
        answer, stopped = cut_at_stop(self.predictor.decode(token_ids), row.stop)
        answer, reason = answer.strip(), "stop" if stopped else reason
        if self.streams[j] is not None and not self._stream(j, answer, final=True):
            return
        self.done[j] = True
        self.grammars[j] = None
        self.deliver(row.index, GenerationResult(answer=answer, prompt_tokens=row.prompt_tokens,
                                                 completion_tokens=steps, finish_reason=reason))

    def _stream(self, j: int, text: str, *, final: bool = False) -> bool:
        """Hand a streamed row its text; a caller's callback that raises fails that row only, not the batch."""
        try:
            (self.streams[j].finish if final else self.streams[j].update)(text)
            return True
        except Exception:  # noqa: BLE001 - the batch's other rows must go on
            log.exception("streaming callback failed; failing its row")
            self._fail(j, internal_error())
            return False

    def _fail(self, j: int, error: ApiError) -> None:
        self.done[j] = True
        self.grammars[j] = None
        self.deliver(self.rows[j].index, error)
