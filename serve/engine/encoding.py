"""Request -> model inputs: the artifact's chat template, tokenizer and image processor, exactly, made cheap.

    encoder = Encoder(loaded.processor)            # once, at load: checks its fast path against the processor
    inputs = encoder.encode(question, image)       # {"input_ids", "attention_mask", "pixel_values", ...} tensors
    inputs = encoder.encode_messages(messages, image)  # a whole conversation: system, user and assistant turns

The saved processor is the definition (training used the same one). Calling it per request costs ~4 ms of CPU,
most of it holding the GIL, for a LLaVA-1.5 image that serve.engine.preshrink already brought to 336x336: generic
argument validation, a float64 rescale and a per-channel normalize of the array, and tokenizing a prompt with its
576 expanded image tokens. The fast path makes the same tensors in a fraction of that:
- pixel values through a lookup table of every (channel, level) pair, read off the processor's own output for a
  probe image that holds every level. That is exact when the image is RGB at the processor's output size, where
  pad, resize and crop leave it as it is and rescale + normalize work pixel by pixel;
- the prompt tokenized with one image token, which is then repeated as many times as the processor expands it.
At load, both paths encode probes, and the fast one is kept only if every tensor comes out identical. Requests
it does not cover (no image, another size or mode) go through the processor.
"""

from __future__ import annotations

import logging
from typing import Any

from serve.engine.errors import ApiError

log = logging.getLogger(__name__)

PROBE_QUESTIONS = ("What is shown in the image?", "Ünïcode,\tTABS and  spaces:\nnew line; digits 0123 ?!")


class Encoder:
    """Renders and encodes one question (+ image) as the processor would. Thread-safe after construction."""

    def __init__(self, processor: Any, *, fast: bool = True):
        self.processor = processor
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self._fast: _FastPath | None = _FastPath.verified(self) if fast else None

    @property
    def fast(self) -> bool:
        return self._fast is not None

    def render_prompt(self, question: str, with_image: bool = True) -> str:
        """The chat template from the model dir, one user turn, ready for the assistant's answer."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def encode(self, question: str, image: Any = None) -> dict[str, Any]:
        """Model inputs (batch dimension 1) for `question` about `image` (a PIL image, or None: text only).
        Raises ApiError invalid_request for a question holding the image placeholder itself."""
        if self.image_token in question:
            raise ApiError("invalid_request", f"the question contains {self.image_token!r}, the model's image "
                                              "placeholder; the server places the image itself: remove it")
        return self._encode_prompt(self.render_prompt(question, with_image=image is not None), image)

    def render_messages(self, messages: list[dict[str, Any]]) -> str:
        """The chat template from the model dir over a whole conversation, ready for the assistant's answer.
        Raises ApiError invalid_request when the template refuses the conversation (its `raise_exception`)."""
        from jinja2 import TemplateError

        try:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:
            raise ApiError("invalid_request", f"the model's chat template refused the conversation: {e}") from None

    def encode_messages(self, messages: list[dict[str, Any]], image: Any = None) -> dict[str, Any]:
        """Model inputs (batch dimension 1) for a conversation in the chat template's content format (system, user
        and assistant turns), `image` going where its one {"type": "image"} part is (None: no image part). Same
        tensors as `encode` for a single user turn of [image, text]; the same fast path for images it covers.
        Raises ApiError invalid_request for text holding the image placeholder, image parts that do not match
        `image`, or a conversation the template refuses."""
        parts = [part for message in messages for part in _parts(message.get("content"))]
        if sum(part.get("type") == "image" for part in parts) != (0 if image is None else 1):
            raise ApiError("invalid_request", "the conversation needs exactly one image part for its image, and "
                                              "none without one")
        if any(self.image_token in str(part.get("text", "")) for part in parts):
            raise ApiError("invalid_request", f"a message contains {self.image_token!r}, the model's image "
                                              "placeholder; the server places the image itself: remove it")
        prompt = self.render_messages(messages)
        if image is not None and prompt.count(self.image_token) != 1:
            raise ApiError("invalid_request", "the model's chat template did not place the image in the prompt "
                                              "(images go in user messages)")
        return self._encode_prompt(prompt, image)

    def _encode_prompt(self, prompt: str, image: Any) -> dict[str, Any]:
        if self._fast is not None and self._fast.covers(image):
            return self._fast.encode(prompt, image)
        return self.processor_encode(prompt, image)

    def processor_encode(self, prompt: str, image: Any) -> dict[str, Any]:
        """The reference: the saved processor itself."""
        return dict(self.processor(images=[image] if image is not None else None, text=[prompt],
                                   return_tensors="pt"))


class _FastPath:
    """Lookup-table pixels + tokenize-then-expand, for RGB images of exactly `size` (width, height)."""

    def __init__(self, tokenizer: Any, image_token_id: int, image_tokens: int, size: tuple[int, int],
                 table: Any, sequence_keys: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens  # how many times the processor repeats the image token
        self.size = size
        self.table = table  # float32 (channels, 256): the processor's value of each level in each channel
        self.sequence_keys = sequence_keys  # the tokenizer outputs the processor returns, besides pixel_values

    @classmethod
    def verified(cls, encoder: Encoder) -> _FastPath | None:
        """Build the fast path from probes and keep it only if it reproduces the processor exactly."""
        try:
            fast = cls._from_probe(encoder)
            problem = fast._mismatch(encoder) if fast is not None else "the processor's output is not mirrored"
        except Exception as e:  # noqa: BLE001 - any surprise in a processor we do not know: use the processor
            fast, problem = None, f"{type(e).__name__}: {e}"
        if problem is not None:
            log.warning("request encoding: the saved processor on every request (fast path off: %s)", problem)
            return None
        log.info("request encoding: fast path (%d image tokens, %dx%d images), checked against the processor",
                 fast.image_tokens, *fast.size)
        return fast

    @classmethod
    def _from_probe(cls, encoder: Encoder) -> _FastPath | None:
        import numpy as np
        import torch

        size = _output_size(encoder.processor.image_processor)
        if size is None:
            return None
        width, height = size
        if width * height < 256:
            return None
        ramp = _image(np.broadcast_to((np.arange(width * height) % 256).astype(np.uint8)[:, None],
                                      (width * height, 3)).reshape(height, width, 3))
        prompt = encoder.render_prompt(PROBE_QUESTIONS[0])
        reference = encoder.processor_encode(prompt, ramp)
        pixels = reference.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or tuple(pixels.shape) != (1, 3, height, width):
            return None
        # Pixel i of the ramp holds level i % 256 in every channel: its first 256 pixels give the whole table.
        table = pixels[0].reshape(3, -1)[:, :256].to(torch.float32).numpy().copy()
        image_token_id = encoder.processor.tokenizer.convert_tokens_to_ids(encoder.image_token)
        image_tokens = int((reference["input_ids"] == image_token_id).sum())
        keys = tuple(k for k in reference if k != "pixel_values")
        return cls(encoder.processor.tokenizer, image_token_id, image_tokens, (width, height), table, keys)

    def _mismatch(self, encoder: Encoder) -> str | None:
        """None when this path gives exactly the processor's tensors on a noise image and the probe questions."""
        import numpy as np

        noise = _image(np.random.default_rng(0).integers(0, 256, (self.size[1], self.size[0], 3), dtype=np.uint8))
        for question in PROBE_QUESTIONS:
            prompt = encoder.render_prompt(question)
            problem = _difference(encoder.processor_encode(prompt, noise), self.encode(prompt, noise))
            if problem is not None:
                return problem
        return None

    def covers(self, image: Any) -> bool:
        return image is not None and getattr(image, "mode", None) == "RGB" and image.size == self.size

    def encode(self, prompt: str, image: Any) -> dict[str, Any]:
        import numpy as np
        import torch

        encoded = self.tokenizer(prompt)
        ids = encoded["input_ids"]
        if ids.count(self.image_token_id) != 1:  # the template placed no image, or a second one: not ours to guess
            raise ApiError("invalid_request", "the prompt does not hold exactly one image placeholder")
        at = ids.index(self.image_token_id)
        out: dict[str, Any] = {}
        for key in self.sequence_keys:
            values = encoded[key]
            expanded = values[:at] + [values[at]] * self.image_tokens + values[at + 1:]
            out[key] = torch.tensor([expanded], dtype=torch.long)
        levels = np.asarray(image).transpose(2, 0, 1)  # (3, height, width) uint8
        pixels = np.stack([np.take(self.table[c], levels[c]) for c in range(3)])
        out["pixel_values"] = torch.from_numpy(pixels[None])
        return out


def _parts(content: Any) -> list[dict[str, Any]]:
    """A message's content as parts: the template format also allows a plain string."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


def _output_size(image_processor: Any) -> tuple[int, int] | None:
    """(width, height) of the processor's pixel_values: its crop size, or the size it resizes a square image to."""
    from serve.engine.preshrink import target_size

    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        width, height = (crop.get("width"), crop.get("height")) if isinstance(crop, dict) else (
            getattr(crop, "width", None), getattr(crop, "height", None))
        return (int(width), int(height)) if width and height else None
    target = target_size(image_processor)  # (height, width)
    return None if target is None else (target[1], target[0])


def _image(array: Any) -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(array))


def _difference(reference: dict[str, Any], fast: dict[str, Any]) -> str | None:
    import torch

    if set(reference) != set(fast):
        return f"outputs {sorted(reference)} vs {sorted(fast)}"
    for key, value in reference.items():
        mine = fast[key]
        if not isinstance(value, torch.Tensor) or value.dtype != mine.dtype or value.shape != mine.shape:
            return f"{key}: {getattr(value, 'dtype', type(value))} {tuple(getattr(value, 'shape', ()))} vs " \
                   f"{mine.dtype} {tuple(mine.shape)}"
        if not torch.equal(value, mine):
            return f"{key} differs"
    return None
