"""What of a row's answer may be shown so far: `TextStream`, fed the decoded text after each token, and `cut_at_stop`.

A streamed prefix is never taken back, so `TextStream` holds back what could still change: the leading whitespace
the final answer strips, trailing whitespace (stripped if the answer ends there), an incomplete UTF-8 character
(decoded as U+FFFD), and a tail that could be the start of a stop string (the answer is cut before it). The pieces
it emits concatenate to the final answer. It runs on the generation thread; serve/http/sse.py puts the pieces on
the wire.
"""


from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string in it, and whether there was one."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TextStream:
    """The part of a row's answer that is safe to show, fed the decoded text of its tokens after each step."""

    def __init__(self, stop: Sequence[str], emit: Callable[[str], None]):
        self.stop = tuple(stop)
        self.emit = emit
        self.sent = ""

    def update(self, text: str) -> None:
        """The decoded text generated so far: emit what newly became safe to show."""
        self._emit_up_to(self._safe(text))

    def finish(self, answer: str) -> None:
        """The final answer: emit whatever of it was held back."""
        self._emit_up_to(answer)

    def _safe(self, text: str) -> str:
        text, _ = cut_at_stop(text.lstrip(), self.stop)
        text = text.rstrip(REPLACEMENT_CHAR)
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold].rstrip()

    def _emit_up_to(self, text: str) -> None:
        # A decode that rewrote what was already sent (rare: tokenizer clean-up) sends nothing more; the final
        # event's answer is the authority.
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            self.emit(delta)
