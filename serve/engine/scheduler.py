"""Iteration-level scheduling policy: before each decode step, which waiting requests join the running batch.

    policy = SchedulePolicy(max_batch_size=8, prefill_tokens=2048)
    n = policy.joining(running=3, waiting=[620, 40, 655])   # how many of the queue's head join now

The rules, in order (serve/engine/continuous.py applies them between decode steps, serve/engine/batching.py keeps the
queue they read):
- first come, first served: requests join in queue order, and one that cannot join yet holds back the ones behind
  it, so a long prompt is never starved by a stream of short ones;
- at most `max_batch_size` rows decode together: a request waits in the queue while every slot is taken (the KV
  memory is budgeted for exactly that many rows, serve/engine/decode.py; a request too long for a slot never gets
  this far: `Predictor.prepare` refuses it with `context_length_exceeded`);
- while rows are decoding, the prompts prefilled before one step hold at most `prefill_tokens` tokens: a joining
  row's prefill runs between two decode steps, so this bounds how long a burst of arrivals stalls the answers
  already streaming. At least one request joins per step whatever its length (otherwise a prompt over the budget
  would never run). With nothing decoding there is nothing to stall, and every request that has a slot joins.

Pure Python: no torch, no model, so the rules are tested on their own (tests/test_continuous.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_PREFILL_TOKENS = 2048  # vLLM's default per-step token budget; a LLaVA-1.5 image prompt is ~600 tokens


@dataclass(frozen=True)
class SchedulePolicy:
    max_batch_size: int
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS

    def __post_init__(self):
        if self.max_batch_size < 1 or self.prefill_tokens < 1:
            raise ValueError(f"max_batch_size and prefill_tokens must be >= 1, got {self.max_batch_size} and "
                             f"{self.prefill_tokens}")

    def joining(self, running: int, waiting: Iterable[int]) -> int:
        """How many requests from the head of the queue join before the next step. `running`: rows decoding now;
        `waiting`: the prompt tokens of each queued request, in queue order (read lazily, only as far as needed)."""
        room = self.max_batch_size - running
        if room <= 0:
            return 0
        budget = self.prefill_tokens if running else None
        taken = tokens = 0
        for prompt in waiting:
            if budget is not None and taken and tokens + prompt > budget:
                break
            taken += 1
            tokens += prompt
            if taken == room:
                break
        return taken
