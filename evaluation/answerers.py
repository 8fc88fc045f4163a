"""Who answers the evaluation questions: the serving engine in this process, or a server / endpoint via the client.

    answer = engine_answerer(predictor, max_new_tokens=16, batch_size=16)
    answer = client_answerer(max_new_tokens=16, concurrency=4, url="http://localhost:8080")
    answers = answer(questions, use_blank)       # one string per question; failures are recorded, scored wrong

The engine answerer decodes images and encodes prompts exactly as the server does (serve.engine), so in-process
answers equal served ones; only it loads torch. Greedy decoding (temperature 0) throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from evaluation.questions import blank_png


class Answerer:
    """`answer(questions, use_blank) -> answers`; `errors` collects one line per question that got no answer."""

    def __init__(self, answer: Callable[[list[dict], bool], list[str]], chunk: int):
        self._answer = answer
        self.chunk = chunk
        self.errors: list[str] = []

    def __call__(self, questions: list[dict], use_blank: bool) -> list[str]:
        return self._answer(questions, use_blank)


def engine_answerer(predictor: Any, *, max_new_tokens: int, batch_size: int = 16,
                    adapter: str | None = None) -> Answerer:
    """Batched greedy answers from a serve.engine Predictor (a loaded artifact, or a model in memory); with
    `adapter`, from that LoRA adapter registered on it."""
    from serve.engine.errors import ApiError
    from serve.engine.images import decode_image
    from serve.engine.types import GenerationRequest

    no_limit = 1 << 30  # local files are trusted; the server's pixel cap is for callers
    shrink_for = predictor.image_processor if adapter is None else predictor.image_processor_for(adapter)
    blank = decode_image(blank_png(), no_limit, shrink_for=shrink_for)

    def image(q: dict) -> Any:
        try:
            return decode_image(Path(q["image"]).read_bytes(), no_limit, shrink_for=shrink_for)
        except (OSError, ApiError) as e:
            raise ValueError(f"{q['id']}: cannot read image {q['image']}: {e}") from None

    def answer(items: list[dict], use_blank: bool) -> list[str]:
        requests = [GenerationRequest(image=blank if use_blank else image(q), question=q["question"],
                                      temperature=0.0, max_new_tokens=max_new_tokens, adapter=adapter)
                    for q in items]
        answers = []
        for q, result in zip(items, predictor.predict(requests), strict=True):
            if isinstance(result, ApiError):
                answerer.errors.append(f"{q['id']}: {result.code}: {result.message}")
                answers.append("")
            else:
                answers.append(result.answer)
        return answers

    answerer = Answerer(answer, chunk=batch_size)
    return answerer


def client_answerer(*, max_new_tokens: int, concurrency: int = 4, timeout: float = 120.0, retries: int = 3,
                    **target: Any) -> Answerer:
    """Answers through client.predict: `url=...` for a server, or `endpoint_name=...` (+ region, profile,
    endpoint_url) for a SageMaker endpoint; `concurrency` requests in flight, which the server batches."""
    from client.invoke import ClientError, predict

    blank = blank_png()

    def one(q: dict, use_blank: bool) -> str:
        try:
            image = blank if use_blank else Path(q["image"]).read_bytes()
        except OSError as e:
            raise ValueError(f"{q['id']}: cannot read image {q['image']}: {e}") from None
        try:
            return predict(image, q["question"], temperature=0.0, max_new_tokens=max_new_tokens, timeout=timeout,
                           retries=retries, **target)
        except ClientError as e:
            answerer.errors.append(f"{q['id']}: {e}")
            return ""

    def answer(items: list[dict], use_blank: bool) -> list[str]:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(lambda q: one(q, use_blank), items))

    answerer = Answerer(answer, chunk=concurrency * 4)
    return answerer
