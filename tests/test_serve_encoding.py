"""serve/engine/encoding.py: the fast request encoding gives exactly the saved processor's tensors (tiny artifact and a
LLaVA-1.5-shaped processor: 336 px, 576 image tokens), turns itself off for a processor it cannot mirror, leaves
images it does not cover to the processor, and refuses a question that holds the image placeholder."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from serve.engine.encoding import Encoder
from serve.engine.errors import ApiError

QUESTIONS = ["What type of chart is this?", "  leading spaces, trailing  ", "ünïcödé 日本語 😀\nsecond line\ttab",
             "a" * 300, "<im age> </s> USER: ASSISTANT:"]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def images(side: int) -> list[Image.Image]:
    ramp = np.linspace(0, 255, side * side * 3).astype(np.uint8).reshape(side, side, 3)
    return [noise(side, side, 1), noise(side, side, 2), Image.new("RGB", (side, side), (0, 255, 128)),
            Image.fromarray(ramp)]


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, expected in b.items():
        assert a[key].dtype == expected.dtype and a[key].shape == expected.shape, key
        assert torch.equal(a[key], expected), key


@pytest.fixture(scope="module")
def tiny_processor(tiny_artifact):
    from serve.engine.model import _load_processor

    return _load_processor(tiny_artifact)


@pytest.fixture(scope="module")
def llava15_processor(tmp_path_factory):
    """LLaVA-1.5-7B's processor settings (CLIP 336 px, patch 14, pad to square) with an offline tokenizer, saved and
    reloaded the way the server loads one."""
    from transformers import AutoProcessor

    from bench.preprocess import llava15_processor

    path = tmp_path_factory.mktemp("llava15-processor")
    llava15_processor().save_pretrained(path)
    return AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("which", ["tiny_processor", "llava15_processor"])
def test_fast_path_gives_exactly_the_processor_tensors(which, request, caplog):
    processor = request.getfixturevalue(which)
    with caplog.at_level(logging.INFO, logger="serve.engine.encoding"):
        fast = Encoder(processor)
    assert fast.fast and "fast path" in caplog.text
    reference = Encoder(processor, fast=False)
    side = processor.image_processor.crop_size["height"]
    for question in QUESTIONS:
        for img in images(side):
            assert_same(fast.encode(question, img), reference.encode(question, img))
    if which == "llava15_processor":
        inputs = fast.encode(QUESTIONS[0], images(side)[0])
        assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 576


def test_images_the_fast_path_does_not_cover_go_through_the_processor(tiny_processor):
    fast, reference = Encoder(tiny_processor), Encoder(tiny_processor, fast=False)
    side = tiny_processor.image_processor.crop_size["height"]
    for img in (noise(side + 8, side), noise(side * 3, side * 2), noise(side, side).convert("L"),
                noise(side, side).convert("RGBA"), None):
        assert_same(fast.encode(QUESTIONS[0], img), reference.encode(QUESTIONS[0], img))


def test_a_processor_it_cannot_mirror_keeps_the_processor(tiny_processor, caplog):
    """A crop smaller than the resize: an image of the output size is scaled up before the crop, so pixels move
    and no lookup table can mirror that. The probe check catches it and turns the fast path off; encoding still
    equals the processor's."""
    import copy

    processor = copy.deepcopy(tiny_processor)
    processor.image_processor.crop_size = {"height": 24, "width": 24}
    with caplog.at_level(logging.WARNING, logger="serve.engine.encoding"):
        encoder = Encoder(processor)
    assert not encoder.fast
    assert "fast path off" in caplog.text and "pixel_values differs" in caplog.text
    img = noise(24, 24)
    assert_same(encoder.encode(QUESTIONS[0], img), Encoder(processor, fast=False).encode(QUESTIONS[0], img))


@pytest.mark.parametrize("question", ["what is <image> here?", "<image>", "<image><image>"])
@pytest.mark.parametrize("with_image", [True, False])
def test_a_question_holding_the_image_placeholder_is_refused(tiny_processor, question, with_image):
    img = noise(32, 32) if with_image else None
    for encoder in (Encoder(tiny_processor), Encoder(tiny_processor, fast=False)):
        with pytest.raises(ApiError) as e:
            encoder.encode(question, img)
        assert e.value.code == "invalid_request" and "'<image>'" in e.value.message


def test_concurrent_encoding_on_the_prepare_threads_is_exact(tiny_processor):
    """The server encodes on several prepare threads at once, through both paths and the shared tokenizer."""
    from concurrent.futures import ThreadPoolExecutor

    fast, reference = Encoder(tiny_processor), Encoder(tiny_processor, fast=False)
    side = tiny_processor.image_processor.crop_size["height"]
    cases = [(q, img) for q in QUESTIONS[:3] for img in (noise(side, side, 7), noise(side + 9, side, 8), None)]
    expected = [reference.encode(q, img) for q, img in cases]

    def encode_all(worker: int) -> list[dict]:
        encoder = fast if worker % 2 else reference
        return [encoder.encode(q, img) for _ in range(10) for q, img in cases]

    with ThreadPoolExecutor(4) as pool:
        for results in pool.map(encode_all, range(8)):
            for i, got in enumerate(results):
                assert_same(got, expected[i % len(cases)])


@pytest.mark.parametrize("version", ["llava_llama_2", "plain"])
def test_every_training_chat_template_gets_the_exact_fast_path(tiny_processor, version):
    import copy

    from train.templates import chat_template

    processor = copy.deepcopy(tiny_processor)
    processor.chat_template = processor.tokenizer.chat_template = chat_template(version)
    fast, reference = Encoder(processor), Encoder(processor, fast=False)
    assert fast.fast
    side = processor.image_processor.crop_size["height"]
    for question in QUESTIONS[:3]:
        assert_same(fast.encode(question, images(side)[0]), reference.encode(question, images(side)[0]))
