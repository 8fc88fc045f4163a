"""serve.engine.preshrink: the fast image path gives the saved processor's pixel values within a few levels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bench.preprocess import llava15_image_processor
from bench.samples import chart_image, encode
from serve.engine.preshrink import pad_colour, preshrink, target_size

# Bounds in 0-255 pixel levels. Measured on charts (sharp edges, text): max ~5-16 (PNG) / ~9-29 (JPEG draft decode),
# mean ~0.1-0.3. A wrong pad colour, offset or filter shows up as tens of levels on average.
MAX_LEVELS = 40
MEAN_LEVELS = 0.5


def _open(data: bytes):
    return Image.open(io.BytesIO(data))


def _pixels(processor, image):
    return processor(image, return_tensors="np")["pixel_values"][0].astype(np.float64)


def _levels(processor, a, b):
    std = np.asarray(processor.image_std, dtype=np.float64).reshape(-1, 1, 1) * 255
    return np.abs(a - b) * std


def _compare(processor, data: bytes):
    reference = _open(data)
    reference.load()
    ref = _pixels(processor, reference)
    fast = _pixels(processor, preshrink(_open(data), processor))
    assert fast.shape == ref.shape
    return _levels(processor, ref, fast)


@pytest.fixture(scope="module")
def llava15():
    return llava15_image_processor()


@pytest.mark.parametrize("size,fmt", [((1600, 1200), "PNG"), ((1600, 1200), "JPEG"), ((900, 1401), "JPEG"),
                                      ((1601, 999), "PNG"), ((4000, 3000), "JPEG")])
def test_big_images_match_reference_within_tolerance(llava15, size, fmt):
    diff = _compare(llava15, encode(chart_image(*size, seed=3), fmt))
    assert diff.max() <= MAX_LEVELS, diff.max()
    assert diff.mean() <= MEAN_LEVELS, diff.mean()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P"])
def test_other_modes_convert_like_the_processor(llava15, mode):
    image = chart_image(1400, 900, seed=1)
    if mode in ("RGBA", "LA"):
        image = image.convert("RGBA")
        alpha = Image.linear_gradient("L").resize(image.size)  # half-transparent areas: composited onto white
        image.putalpha(alpha)
        image = image.convert(mode)
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 0
    else:
        image = image.convert(mode)
    data = encode(image, "PNG")
    diff = _compare(llava15, data)
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (diff.max(), diff.mean())


@pytest.mark.parametrize("size", [(500, 300), (1000, 700)])
def test_image_under_twice_the_target_is_bit_identical(llava15, size):
    # Under 2 x 336 on the long side: no reduce, the pad and the processor's own PIL bicubic, done here.
    for fmt in ("PNG", "JPEG"):
        assert _compare(llava15, encode(chart_image(*size), fmt)).max() == 0.0


def test_big_image_is_actually_shrunk_and_padded(llava15):
    out = preshrink(_open(encode(chart_image(1600, 1200), "PNG")), llava15)
    assert out.size == (336, 336) and out.mode == "RGB"
    assert out.getpixel((0, 0)) == pad_colour(llava15) == (122, 116, 104)  # top band is the mean colour


def test_jpeg_draft_decodes_at_reduced_scale(llava15):
    image = _open(encode(chart_image(4000, 3000), "JPEG"))
    preshrink(image, llava15)
    assert image.size == (1000, 750)  # 1/4 scale DCT decode, still >= 2 x 336 on the long side


def test_tiny_artifact_processor(tiny_artifact):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_artifact).image_processor
    assert target_size(processor) == (32, 32)
    for fmt in ("PNG", "JPEG"):
        diff = _compare(processor, encode(chart_image(1600, 1200, seed=5), fmt))
        # At 32 px an output pixel spans ~50x50 source pixels, so the filter shapes differ more: ~1 level mean.
        assert diff.max() <= MAX_LEVELS and diff.mean() <= 4 * MEAN_LEVELS, (fmt, diff.max(), diff.mean())


def test_crop_mode_processor_only_reduces(llava15):
    from transformers import LlavaImageProcessorPil

    crop = LlavaImageProcessorPil(**{**llava15.to_dict(), "do_pad": False})
    data = encode(chart_image(2000, 1500, seed=2), "PNG")
    out = preshrink(_open(data), crop)
    assert out.size == (1000, 750)  # reduced by 2, not padded: the processor resizes and centre-crops
    diff = _compare(crop, data)
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS


def test_unmirrored_size_rule_leaves_geometry_to_the_processor(llava15):
    from transformers import LlavaImageProcessorPil

    other = LlavaImageProcessorPil(**{**llava15.to_dict(), "size": {"shortest_edge": 336, "longest_edge": 500}})
    assert target_size(other) is None
    data = encode(chart_image(1600, 1200), "PNG")
    assert preshrink(_open(data), other).size == (1600, 1200)
    assert _compare(other, data).max() == 0.0


def test_server_decode_path_returns_shrunk_images(tiny_artifact):
    from transformers import AutoProcessor

    from serve.engine.images import decode_image

    processor = AutoProcessor.from_pretrained(tiny_artifact).image_processor
    for fmt in ("PNG", "JPEG"):
        data = encode(chart_image(1600, 1200, seed=7), fmt)
        shrunk = decode_image(data, 25_000_000, shrink_for=processor)
        assert shrunk.size == (32, 32) and shrunk.mode == "RGB"
        ref = _pixels(processor, decode_image(data, 25_000_000))
        diff = _levels(processor, ref, _pixels(processor, shrunk))
        assert diff.max() <= MAX_LEVELS and diff.mean() <= 4 * MEAN_LEVELS, (fmt, diff.max(), diff.mean())


@pytest.mark.parametrize("size", [(800, 600), (600, 800), (801, 333), (337, 900), (500, 500)])
@pytest.mark.parametrize("resample", [0, 1, 2, 3, 4, 5])
def test_band_resize_equals_resizing_the_whole_padded_square(size, resample):
    from serve.engine.preshrink import _pad_resize, _pad_square

    image, colour = chart_image(*size), (122, 116, 104)
    for out in ((336, 336), (224, 200)):
        whole = np.asarray(_pad_square(image, colour).resize(out, resample=resample), dtype=np.int16)
        band = np.asarray(_pad_resize(image, colour, out, resample), dtype=np.int16)
        assert band.shape == whole.shape
        assert np.abs(whole - band).max() <= 1  # the band's box is a float: rounding moves a few pixels one level
        assert (whole != band).any(axis=2).mean() < 0.01
