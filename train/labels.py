"""Token ids and labels for training: the prompt comes only from the processor's chat template, the loss only from
the answers.

How labels are made (robust against LLaVA's "tokenization mismatch" bug, which re-tokenised each round separately
and silently zeroed the loss when the pieces disagreed):
1. Render the whole conversation once with `processor.apply_chat_template` (the template saved in the artifact, so
   serving renders the same prompt) and get the character spans of the assistant answers from the template's
   `{% generation %}` blocks (each block is the answer plus its end-of-sequence marker).
2. Tokenise the rendered text once with the processor, which expands `<image>` into the image tokens, with an
   offsets mapping; shift the spans by the expansion the processor reports.
3. A token is labelled when it starts inside a span; everything else (system prompt, questions, role markers,
   image tokens, padding) is IGNORE_INDEX. The last token of every answer must be the EOS token, else we raise.

`--model_max_length` counts the image tokens. An over-long example is cut from the end (never through its image)
if at least one answer token survives, otherwise dropped; `ExampleDataset` logs both counts in one line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from train.data import Example, load_image

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Cheap upper bound on tokens per UTF-8 byte of text: byte-level BPE and byte-fallback SentencePiece never produce
# more tokens than bytes; a few extra for BOS and a SentencePiece word-start marker.
SPECIAL_TOKEN_SLACK = 4
CHARS_PER_TOKEN = 4  # length estimate for grouping; only the order matters


def image_token_count(processor: Any) -> int:
    """How many tokens the processor expands one `<image>` into, measured by running it (no formula to drift)."""
    from PIL import Image

    size = processor.image_processor.crop_size
    dummy = Image.new("RGB", (size["width"], size["height"]))
    ids = processor(text=[processor.image_token], images=[dummy])["input_ids"][0]
    return sum(1 for i in ids if i == processor.image_token_id)


def render_with_spans(processor: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The training text (the processor's chat template) and the character spans of each answer + its EOS."""
    from transformers.utils.chat_template_utils import render_jinja_template

    text = processor.apply_chat_template(messages, tokenize=False)
    # The same variables apply_chat_template passes (bos_token, eos_token, ...), so both renders agree.
    rendered, spans = render_jinja_template(conversations=[messages], chat_template=processor.chat_template,
                                            return_assistant_tokens_mask=True,
                                            **processor.tokenizer.special_tokens_map)
    if rendered[0] != text:
        raise RuntimeError("the chat template rendered differently twice; cannot locate the answers")
    n_answers = sum(m["role"] == "assistant" for m in messages)
    if len(spans[0]) != n_answers:
        raise ValueError(f"the chat template marks {len(spans[0])} answer span(s) for {n_answers} assistant turn(s); "
                         "answers must be wrapped in {% generation %} blocks (see train/templates.py)")
    return text, [tuple(s) for s in spans[0]]


def shift_spans(spans: list[tuple[int, int]], replacements: list[dict]) -> list[tuple[int, int]]:
    """Map character spans of the rendered text into the processor's expanded text (`<image>` -> N tokens)."""
    shifted = []
    for start, end in spans:
        delta = 0
        for r in replacements:
            (old_start, old_end), (new_start, new_end) = r["span"], r["new_span"]
            if old_end <= start:
                delta += (new_end - new_start) - (old_end - old_start)
            elif old_start < end:
                raise ValueError("an image placeholder falls inside an answer")
        shifted.append((start + delta, end + delta))
    return shifted


def label_tokens(input_ids: list[int], offsets: list[list[int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels: the id of each token that starts inside a span; IGNORE_INDEX for the rest (zero-width ones too)."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, ((start, end), token) in enumerate(zip(offsets, input_ids, strict=True)):
        if end > start and any(s <= start < e for s, e in spans):
            labels[i] = token
    return labels


def check_answers_end_with_eos(labels: list[int], offsets: list[list[int]], spans: list[tuple[int, int]],
                               eos_id: int, example_id: str) -> None:
    """Every answer's last labelled token must be EOS, or the model never learns to stop: fail loudly instead."""
    for n, (s, e) in enumerate(spans, start=1):
        inside = [i for i, (start, end) in enumerate(offsets) if end > start and s <= start < e]
        if not inside or labels[inside[-1]] != eos_id:
            raise ValueError(f"example {example_id!r}: answer {n} does not end with the EOS token (id {eos_id}) after "
                             "tokenisation; the chat template and the tokenizer disagree on the end marker")


def fit_to_length(input_ids: list[int], labels: list[int], max_length: int | None,
                  image_token_id: int) -> tuple[list[int], list[int], bool] | None:
    """Cut an over-long example from the end: (ids, labels, truncated), or None when its image or every answer
    token would be cut."""
    if max_length is None or len(input_ids) <= max_length:
        return input_ids, labels, False
    image_positions = [i for i, t in enumerate(input_ids) if t == image_token_id]
    if image_positions and image_positions[-1] >= max_length:
        return None
    if all(label == IGNORE_INDEX for label in labels[:max_length]):
        return None
    return input_ids[:max_length], labels[:max_length], True


def encode_example(processor: Any, example: Example, image: Any, *, max_length: int | None) -> dict | None:
    """input_ids, labels (lists), pixel_values (a (1, 3, H, W) tensor, or None) and `truncated` for one example;
    None when it cannot fit in `max_length` (image tokens included)."""
    if (image is None) != (example.image is None):
        raise ValueError(f"example {example.id!r}: image given {image is not None}, but the row "
                         f"{'has' if example.image else 'has no'} image")
    text, spans = render_with_spans(processor, example.messages)
    enc = processor(text=[text], images=[image] if image is not None else None, return_offsets_mapping=True,
                    return_text_replacement_offsets=True, return_tensors="pt")
    input_ids = enc["input_ids"][0].tolist()
    offsets = enc["offset_mapping"][0].tolist()
    spans = shift_spans(spans, enc["text_replacement_offsets"][0])
    labels = label_tokens(input_ids, offsets, spans)
    check_answers_end_with_eos(labels, offsets, spans, processor.tokenizer.eos_token_id, example.id)
    fitted = fit_to_length(input_ids, labels, max_length, processor.image_token_id)
    if fitted is None:
        return None
    input_ids, labels, truncated = fitted
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated,
            "pixel_values": enc["pixel_values"] if image is not None else None}


class LlavaCollator:
    """Examples -> a right-padded batch of tensors: input_ids, attention_mask, labels, and pixel_values (one per
    image row, in row order) when any row has an image. Text-only and image rows mix freely."""

    def __init__(self, processor: Any, image_folder: str | os.PathLike | None, max_length: int | None, *,
                 pad_to_multiple_of: int | None = None):
        self.processor = processor
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.dropped = 0

    def __call__(self, examples: list[Example]) -> dict:
        import torch

        rows = []
        for example in examples:
            image = self._image(example)
            encoded = encode_example(self.processor, example, image, max_length=self.max_length)
            if encoded is None:  # ExampleDataset filters these out up front; this guards other callers
                self.dropped += 1
                log.warning("dropped example %r: it does not fit max_length=%s", example.id, self.max_length)
                continue
            rows.append(encoded)
        if not rows:
            raise ValueError(f"no example of this batch fits max_length={self.max_length}")
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixel_values = [r["pixel_values"] for r in rows if r["pixel_values"] is not None]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        return batch


    def _image(self, example: Example) -> Any:
        if example.image is None:
            return None
        if self.image_folder is None:
            raise ValueError(f"example {example.id!r} has an image but the collator has no image folder")
        return load_image(self.image_folder / example.image)


class ExampleDataset:
    """A torch-style map dataset of Examples (the collator encodes them), without the ones that cannot fit.

    `.lengths` are cheap token estimates (image tokens + rendered bytes / 4) for length grouping and
    `.modality_lengths` the same, negative for text-only rows, as LLaVA's LengthGroupedSampler expects;
    `.truncated` / `.dropped` count the examples that will be cut / were left out.
    """

    def __init__(self, examples: list[Example], processor: Any, *, max_length: int | None):
        self.image_tokens = image_token_count(processor)
        sizer = RenderedSize(processor)
        # "<image>" is in the rendered bytes once; the processor turns it into `image_tokens` tokens.
        image_extra = self.image_tokens - len(processor.image_token.encode())
        kept, lengths, truncated = [], [], 0
        for example in examples:
            n_bytes = sizer(example.messages)
            n_images = int(example.image is not None)
            fit = False
            if max_length is not None and n_bytes + n_images * image_extra + SPECIAL_TOKEN_SLACK > max_length:
                fit = _fit_exactly(processor, example, self.image_tokens, max_length)
            if fit is None:
                continue
            truncated += fit
            kept.append(example)
            lengths.append(n_images * self.image_tokens + n_bytes // CHARS_PER_TOKEN)
        self.examples, self.lengths = kept, lengths
        self.modality_lengths = [n if e.image is not None else -n for e, n in zip(kept, lengths, strict=True)]
        self.truncated, self.dropped = truncated, len(examples) - len(kept)
        if max_length is not None:
            log.info("max_length %d (image tokens included): %d of %d examples truncated, %d dropped "
                     "(image or first answer beyond the limit)", max_length, truncated, len(examples), self.dropped)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


class RenderedSize:
    """UTF-8 size of a conversation as the chat template renders it, without rendering each one: the template's
    own text is measured once per conversation shape (roles, image or not) and the message texts are added, as the
    templates insert them verbatim (an upper bound if a template drops or trims text). Rendering every row of a
    600k-row dataset would take minutes; this takes seconds."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.overhead: dict[tuple, int] = {}

    def __call__(self, messages: list[dict]) -> int:
        shape = tuple((m["role"], _content_types(m["content"])) for m in messages)
        if shape not in self.overhead:
            skeleton = [{"role": role, "content": "" if types is None else
                         [{"type": t, "text": ""} if t == "text" else {"type": t} for t in types]}
                        for role, types in shape]
            self.overhead[shape] = len(self.processor.apply_chat_template(skeleton, tokenize=False).encode())
        return self.overhead[shape] + sum(len(text.encode()) for text in _texts(messages))


def _content_types(content: Any) -> tuple[str, ...] | None:
    return None if isinstance(content, str) else tuple(item["type"] for item in content)


def _texts(messages: list[dict]):
    for m in messages:
        if isinstance(m["content"], str):
            yield m["content"]
        else:
            yield from (item["text"] for item in m["content"] if item["type"] == "text")


def _fit_exactly(processor: Any, example: Example, image_tokens: int, max_length: int) -> bool | None:
    """`fit_to_length`'s verdict (False fits, True truncated, None dropped) from the tokenizer alone: no image is
    loaded, the image expansion is spliced into the token lists instead."""
    text, spans = render_with_spans(processor, example.messages)
    enc = processor.tokenizer(text, return_offsets_mapping=True)
    labels = label_tokens(enc["input_ids"], enc["offset_mapping"], spans)
    input_ids, expanded_labels = [], []
    for token, label in zip(enc["input_ids"], labels, strict=True):
        repeat = image_tokens if token == processor.image_token_id else 1
        input_ids += [token] * repeat
        expanded_labels += [label] * repeat
    fitted = fit_to_length(input_ids, expanded_labels, max_length, processor.image_token_id)
    return None if fitted is None else fitted[2]
