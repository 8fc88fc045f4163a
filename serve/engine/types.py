"""What the engine takes and gives: `GenerationRequest` in, `GenerationResult` (or `ApiError`) out.

Shared by the predictor, the batcher and the HTTP layer that builds requests from payloads; nothing here imports
torch or a web framework.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve.engine.errors import ApiError


@dataclass
class GenerationRequest:
    image: Any  # a PIL RGB image (serve.engine.images decodes it), or None for a text-only question
    question: str
    temperature: float | None = None  # None: the artifact's default; 0: greedy
    top_p: float | None = None
    max_new_tokens: int | None = None
    stop: Sequence[str] = ()
    # Sampling's random draws for this row from its own generator seeded with this, so a sampled answer repeats
    # for the same request (serve.engine.predictor); None: the process-wide generator. No effect when greedy.
    seed: int | None = None
    # A whole conversation instead of `question`, in the chat template's content format: [{"role": "system" |
    # "user" | "assistant", "content": [{"type": "text", "text": ...}, {"type": "image"}]}], the last turn the
    # user's; one {"type": "image"} part where `image` goes (serve.engine.encoding.Encoder.encode_messages).
    messages: list[dict[str, Any]] | None = None
    # A JSON Schema the answer must follow (serve.engine.constrained; {"type": "object"}: any JSON object), or None.
    json_schema: dict[str, Any] | None = None
    deadline: float | None = None  # time.monotonic() by which the answer is due
    adapter: str | None = None  # a LoRA adapter's name (serve/engine/adapters.py); None: the base model
    cancelled: bool = field(default=False, compare=False)  # set when the caller gave up; the row stops
    inputs: dict | None = field(default=None, compare=False, repr=False)  # Predictor.prepare's processor outputs
    grammar: Any = field(default=None, compare=False, repr=False)  # Predictor.prepare's compiled json_schema
    # Streaming: called on the generation thread with each piece of the answer as it becomes safe to show
    # (serve.engine.textstream.TextStream); the pieces concatenate to the result's answer.
    on_text: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    # time.monotonic() when the request arrived: the HTTP layer sets it to when it received the request, so the
    # time to first token and the end-to-end latency (serve.engine.stats) include reading and preparing it.
    arrival: float = field(default_factory=time.monotonic, compare=False, repr=False)


@dataclass
class GenerationResult:
    answer: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"


Outcome = GenerationResult | ApiError
OnResult = Callable[[int, Outcome], None]


class PredictorLike(Protocol):
    """What the batcher and the HTTP layer drive: serve.engine.predictor.Predictor, or a wrapper around one."""

    @property
    def image_processor(self) -> Any:
        """The processor images are pre-shrunk for on the request threads (serve.engine.preshrink)."""

    def image_processor_for(self, adapter: str | None) -> Any:
        """The processor images of requests on a LoRA adapter are pre-shrunk for (its own, if it saved one)."""

    def prepare(self, request: GenerationRequest) -> None:
        """Encode the request (prompt, tokens, pixels) on the calling thread."""

    def predict(self, requests: Sequence[GenerationRequest], on_result: OnResult | None = None) -> list[Outcome]:
        """Answer every request from one batch; `on_result(i, outcome)` fires as each outcome is known."""
