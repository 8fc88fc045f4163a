"""JSON-schema answers: constrained decoding with llguidance, as a per-row logits mask inside ordinary batches.

    grammars = JsonGrammars(tokenizer, eos_token_ids)   # once per model (Predictor does it)
    grammar = grammars.compile(schema)                  # request thread: ApiError invalid_json_schema; LRU-cached
    states = [grammar.start(), None, ...]               # generation: one GrammarState per constrained row
    scores = mask_logits(scores, states)                # each step, before sampling: disallowed tokens -> -inf
    states[j].accept(token)                             # each step, after sampling, for every row still running
    states[j].finished                                  # the grammar is complete: end row j, finish_reason "stop"

The per-row protocol is all a decode loop needs, whoever runs it (HF `generate` through `GrammarLogits` and the
predictor's row tracker, or a scheduler that steps rows itself):
- `mask_logits(scores, states)` masks the rows whose state is a live `GrammarState` and returns the other rows
  bit for bit as they were (None marks an unconstrained row, or a row that left the batch). A greedy row then
  takes the argmax among allowed tokens; a sampling row samples among them (its temperature/top_p applied after).
- `accept(token)` advances a row by the token it got; False means the token broke the grammar (never with the
  mask applied), and the row should fail rather than answer invalid JSON.
- `finished` turns True as soon as the grammar admits nothing more: the answer is complete JSON; no EOS token is
  needed. A row whose JSON is still open when max_new_tokens or a stop string ends it is cut like any other
  (finish_reason "length" leaves invalid JSON, as OpenAI's API does).

Answers are JSON with `", "` and `": "` separators (Python's `json.dumps` style) and no other whitespace, so a
model cannot pad an answer with blanks until its token budget runs out. Logits wider than the tokenizer (LLaVA's
lm_head is padded past its vocabulary) are masked past it too. Schema features llguidance does not implement
(`not`, `if`/`then`, `uniqueItems`, ...) are refused with 400 `invalid_json_schema` rather than ignored.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from serve.engine.errors import ApiError

# OpenAI's `response_format: {"type": "json_object"}`: any JSON object.
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
MAX_SCHEMA_CHARS = 64 * 1024  # compiling is linear-ish in the schema; a request body may be megabytes
DEFAULT_CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)
MAX_ERROR_CHARS = 400
# llguidance's JSON compile options, over any "x-guidance" a schema carries: see the module docstring.
COMPILE_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


class JsonGrammar:
    """A compiled schema (immutable, shared by every request with that schema); `start()` gives a row its own
    state."""

    def __init__(self, matcher: Any, vocab_size: int):
        self._prototype = matcher  # never advanced: each row gets a deep copy (microseconds)
        self.vocab_size = vocab_size

    def start(self) -> GrammarState:
        return GrammarState(self._prototype.deep_copy(), self.vocab_size)


class GrammarState:
    """One row's position in its grammar (an llguidance matcher); see the module docstring for the protocol."""

    __slots__ = ("_matcher", "vocab_size")

    def __init__(self, matcher: Any, vocab_size: int):
        self._matcher = matcher
        self.vocab_size = vocab_size

    def accept(self, token_id: int) -> bool:
        """Advance by the row's new token; False: the grammar does not allow it (the state is then `failed`)."""
        return bool(self._matcher.consume_token(int(token_id)))

    @property
    def finished(self) -> bool:
        """The answer so far is complete JSON that admits no further token."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def failed(self) -> bool:
        return self._matcher.is_error()

    def fill_bitmask(self, bitmask: Any, index: int) -> None:
        """Write the allowed next tokens into row `index` of `bitmask` (a C-contiguous numpy int32 array of
        `bitmask_words(vocab_size)` columns; bit t % 32 of word t // 32 set = token t allowed)."""
        row = bitmask[index]
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def mask_logits(scores: Any, states: Sequence[GrammarState | None]) -> Any:
    """`scores` (batch, width) with every live constrained row's disallowed tokens at -inf; rows whose state is None
    (or failed) come back bit for bit as they were. A new tensor: the input is not modified.

    The mask is built on the host (llguidance computes each row's bitmask, numpy unpacks them) and applied with one
    `masked_fill` on the scores' device; on CUDA that is one host-to-device copy of batch x width bytes per step,
    done while the forward pass's queued kernels may still be running."""
    import numpy as np
    import torch

    live = [j for j, s in enumerate(states) if s is not None and not s.failed]
    if not live:
        return scores
    vocab, width = states[live[0]].vocab_size, scores.shape[1]
    bitmask = np.empty((len(live), bitmask_words(vocab)), dtype=np.int32)
    for k, j in enumerate(live):
        states[j].fill_bitmask(bitmask, k)
    n = min(vocab, width)
    # Bit t % 32 of word t // 32 is bit t % 8 of byte t // 8 on little-endian hosts (x86-64, ARM64).
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :n]
    blocked = np.zeros((scores.shape[0], width), dtype=np.bool_)
    for k, j in enumerate(live):
        # A row the grammar left no token (it cannot happen with a consistent tokenizer) keeps its scores: its next
        # token then fails `accept` and the row fails alone, where all -inf would break sampling for the batch.
        if allowed[k].any():
            np.equal(allowed[k], 0, out=blocked[j, :n])
            blocked[j, n:] = True  # past the tokenizer's vocabulary (a wider lm_head): never
    return scores.masked_fill(torch.from_numpy(blocked).to(scores.device), float("-inf"))


class GrammarLogits:
    """HF `generate`'s logits processor for a batch: `mask_logits` over `states`, a list the caller keeps (the
    predictor's row tracker sets a finished row's entry to None). Place it before any sampling processor."""

    def __init__(self, states: list[GrammarState | None]):
        self.states = states

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        return mask_logits(scores, self.states)


class JsonGrammars:
    """Compiles JSON Schemas against one tokenizer, caching the results (bounded LRU, keyed by the schema's
    canonical JSON). Thread-safe: request threads compile, the generation thread only starts and masks."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int] = (), *, cache_size: int = DEFAULT_CACHE_SIZE):
        self._hf_tokenizer = tokenizer
        self._eos = [int(t) for t in eos_token_ids]
        self._llg_tokenizer: Any = None  # built on first use: about a second for a 32k vocabulary
        self._cache: OrderedDict[str, JsonGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, schema: Any) -> JsonGrammar:
        """The grammar for `schema` (a JSON Schema as a dict). Raises ApiError `invalid_json_schema` for a schema
        that is not valid, uses what the engine cannot enforce, or is over MAX_SCHEMA_CHARS."""
        key = schema_key(schema)
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        grammar = self._build(schema)  # outside the lock: other schemas need not wait (llguidance drops the GIL)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _build(self, schema: dict[str, Any]) -> JsonGrammar:
        import llguidance

        tokenizer = self._tokenizer()
        schema = {k: v for k, v in schema.items() if k != "x-guidance"}  # our options, not the caller's
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPILE_OPTIONS)
        except ValueError as e:
            raise _schema_error(str(e)) from None
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise _schema_error(matcher.get_error())
        return JsonGrammar(matcher, tokenizer.vocab_size)

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._llg_tokenizer is None:
                import llguidance.hf

                try:
                    self._llg_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer,
                                                                       eos_token=self._eos or None)
                except ValueError as e:  # a slow (non-`tokenizers`) tokenizer
                    raise ApiError("invalid_json_schema",
                                   f"json_schema is not available with this model's tokenizer: {e}") from None
            return self._llg_tokenizer


def schema_key(schema: Any) -> str:
    """The schema's canonical JSON (the cache key); ApiError for what is not a JSON object or is too large."""
    if not isinstance(schema, dict):
        raise ApiError("invalid_json_schema", f"json_schema must be a JSON object (a JSON Schema), not "
                                              f"{type(schema).__name__}")
    try:
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ApiError("invalid_json_schema", f"json_schema is not JSON: {e}") from None
    if len(key) > MAX_SCHEMA_CHARS:
        raise ApiError("invalid_json_schema", f"json_schema is {len(key):,} characters as JSON; the most this "
                                              f"server compiles is {MAX_SCHEMA_CHARS:,}")
    return key


def _schema_error(detail: str) -> ApiError:
    detail = " ".join(detail.split())
    if len(detail) > MAX_ERROR_CHARS:
        detail = detail[:MAX_ERROR_CHARS] + "..."
    if "Unimplemented keys" in detail or "not supported" in detail:
        return ApiError("invalid_json_schema", f"json_schema uses something this server cannot enforce: {detail}")
    return ApiError("invalid_json_schema", f"json_schema is not a valid JSON Schema: {detail}")


def parse_answer(answer: str) -> Any:
    """A constrained answer as a Python object, or None when it is not complete JSON (cut by max_new_tokens or a
    stop string)."""
    try:
        return json.loads(answer)
    except ValueError:
        return None


def schema_from_response_format(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's `response_format` -> the engine's `GenerationRequest.json_schema`:
    absent or `{"type": "text"}` -> None; `{"type": "json_object"}` -> ANY_JSON_OBJECT;
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ..., "description": ...}}` ->
    the schema. Raises ApiError `invalid_request` for any other shape (the schema itself is checked when compiled).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ApiError("invalid_request", "response_format must be an object such as {\"type\": \"json_object\"}")
    kind = response_format.get("type")
    extra = sorted(set(response_format) - {"type", "json_schema"})
    if extra or (kind != "json_schema" and "json_schema" in response_format):
        raise ApiError("invalid_request", f"response_format: unexpected field(s) {extra or ['json_schema']}")
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_JSON_OBJECT)
    if kind != "json_schema":
        raise ApiError("invalid_request", f"response_format.type must be \"text\", \"json_object\" or "
                                          f"\"json_schema\", not {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError("invalid_request", "response_format.json_schema must be an object: "
                                          "{\"name\": ..., \"schema\": {...}}")
    unknown = sorted(set(spec) - {"name", "description", "schema", "strict"})
    if unknown:
        raise ApiError("invalid_request", f"response_format.json_schema: unexpected field(s) {unknown}")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ApiError("invalid_request", "response_format.json_schema.schema must be a JSON Schema object")
    return schema
