"""Fast image preprocessing: shrink a big decoded image in PIL before the processor sees it, same pixels.

The saved processor (LlavaImageProcessorPil with do_pad) pads the *full-resolution* numpy array to a square with
the mean colour and then resizes it with bicubic: ~40-60 ms for a 1600x1200 image on one CPU core, most of it
moving 1600x1600x3 arrays around. `preshrink` produces (nearly) the same pixel_values in a fraction of the time:

1. a JPEG that is not yet decoded is decoded at a DCT-scaled size (`Image.draft`, 1/2, 1/4 or 1/8) that still
   leaves at least twice the target resolution, when that scale divides the sides and the pad offset;
2. RGB conversion exactly as the processor does it (transparency composited onto white);
3. pad to a square with the processor's mean colour (the same integer colour it computes) and a box-filter
   `Image.reduce` by an integer factor that keeps at least twice the target resolution (PIL's `reducing_gap`
   idea: a box pre-reduction at >= 2x is visually indistinguishable from the direct bicubic). When the factor
   divides the sides and the pad offset, the reduce runs first on the smaller unpadded image (same pixels);
4. the final bicubic resize to the processor's output size with the processor's filter, so that the processor's
   own pad and resize become no-ops (PIL returns a copy for a same-size resize) and only its crop, rescale and
   normalize run. After a reduce, only the band of output rows (or columns) that sees the image is resampled;
   the rest is the pad colour (`_pad_resize`: ~0.7 ms less on a 4:3 image, a few pixels one level apart).

The processor still runs on the result, so a change in the saved processor (mean, std, crop) is honoured; only
the geometry is done here. Images under twice the target size skip steps 1 and the reduce: their pixel values
are bit-identical to the processor's. On big images, differences to the unshrunk path: mean ~0.1-0.3 levels of
255, max ~5-16 at sharp edges (~10-30 with the JPEG draft decode). `python -m bench.preprocess` measures time and
difference; tests/test_preshrink.py bounds them.
"""

from __future__ import annotations

from typing import Any

# Keep at least this many source pixels per output pixel before the final bicubic (PIL's reducing_gap).
REDUCING_GAP = 2
CONTINUOUS_FILTERS = (1, 2, 3, 5)  # PIL's LANCZOS, BILINEAR, BICUBIC, HAMMING


def target_size(image_processor: Any) -> tuple[int, int] | None:
    """(height, width) the processor resizes a *square* image to, or None when its size rule is not one we mirror."""
    size = image_processor.size
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if get("shortest_edge") and not get("longest_edge"):
        side = int(get("shortest_edge"))
        return side, side
    if get("height") and get("width") and not get("shortest_edge"):
        return int(get("height")), int(get("width"))
    return None


def pad_colour(image_processor: Any) -> tuple[int, int, int]:
    """The processor's pad colour: int(mean * 255) per channel (truncation, exactly as LlavaImageProcessorPil)."""
    mean = image_processor.image_mean
    if not mean:
        return (0, 0, 0)
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]


def draft(image: Any, image_processor: Any) -> None:
    """Before `image.load()`: let a JPEG decode at 1/2, 1/4 or 1/8 scale when the processor would discard the
    detail anyway (no-op for other formats, loaded images, or processors whose size rule is not mirrored)."""
    target = target_size(image_processor)
    if target is not None and getattr(image_processor, "do_resize", True):
        _draft(image, REDUCING_GAP * max(target), bool(getattr(image_processor, "do_pad", False)))


def preshrink(image: Any, image_processor: Any) -> Any:
    """A PIL image to hand to `image_processor` instead of `image`; pixel_values stay within a few levels.

    `image` may be a freshly opened, not yet loaded PIL image (then JPEGs decode at a reduced scale) or a loaded
    one (call `draft` before loading it to keep that speed-up). Returns `image` itself (converted to RGB) when the
    processor's settings are not ones this mirrors.
    """
    target = target_size(image_processor)
    do_pad = bool(getattr(image_processor, "do_pad", False))
    if target is None or not getattr(image_processor, "do_resize", True):
        return _to_rgb(image)
    need = REDUCING_GAP * max(target)  # source pixels wanted along the side that maps onto the target
    _draft(image, need, do_pad)
    image = _to_rgb(image)
    if not do_pad:
        # Crop mode: the processor's shortest-edge resize and centre crop do the rest; reduce only by a factor
        # that divides both sides, so its output-size arithmetic sees exactly the same aspect ratio.
        factor = _exact_factor(image.size, min(image.size) // need, offset=0)
        return image.reduce(factor) if factor >= 2 else image
    colour, resample = pad_colour(image_processor), int(image_processor.resample)
    height, width = target
    w, h = image.size
    side = max(w, h)
    factor = side // need
    if factor >= 2 and w % factor == 0 and h % factor == 0 and _pad_offset((w, h)) % factor == 0:
        # No reduce box straddles the image/background edge, so reducing then padding gives exactly the pixels
        # of padding then reducing, on fewer pixels.
        return _pad_resize(image.reduce(factor), colour, (width, height), resample)
    # Otherwise pad at full resolution, so the edge lands exactly where the processor's would: reducing first
    # would shift it by a fraction of a pixel, tens of levels on a high-contrast border.
    if factor < 2:
        # The processor's own resize is this same PIL call on the same pixels (bit-identical), minus its numpy
        # round trips of the full-size array.
        return _pad_square(image, colour).resize((width, height), resample=resample)
    # reduce() rounds the size up (the last box is partial): map exactly side/factor source pixels.
    return _pad_resize(_pad_square(image, colour).reduce(factor), colour, (width, height), resample,
                       box=(0, 0, side / factor, side / factor), content=(w / factor, h / factor))


def _exact_factor(size: tuple[int, int], limit: int, offset: int) -> int:
    """The largest power of two <= min(limit, 8) dividing both sides and the pad offset (1 if none)."""
    for factor in (8, 4, 2):
        if factor <= limit and size[0] % factor == 0 and size[1] % factor == 0 and offset % factor == 0:
            return factor
    return 1


def _draft(image: Any, need: int, do_pad: bool) -> None:
    """Ask the JPEG decoder for a 1/2, 1/4 or 1/8 scale decode that still leaves `need` pixels on the side.

    Only scales that divide both sides and the pad offset are used: then the scaled image covers exactly
    1/scale of the original and the padding lands where it would at full size.
    """
    if getattr(image, "format", None) != "JPEG" or not hasattr(image, "draft"):
        return
    w, h = image.size
    side = max(w, h) if do_pad else min(w, h)
    scale = _exact_factor((w, h), side // need, offset=_pad_offset((w, h)) if do_pad else 0)
    if scale >= 2:
        # draft picks the largest power-of-two scale s with w // s >= requested w and h // s >= requested h.
        image.draft(None, (w // scale, h // scale))


def _to_rgb(image: Any) -> Any:
    """RGB exactly as transformers' convert_to_rgb: any transparency is composited onto white."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _pad_resize(image: Any, colour: tuple[int, int, int], size: tuple[int, int], resample: int,
                box: tuple[float, float, float, float] | None = None,
                content: tuple[float, float] | None = None) -> Any:
    """`_pad_square(image, colour).resize(size, resample, box=box)`, ~20% faster on non-square images: output rows
    (or columns) whose filter window lies wholly in the padding are that constant colour, so only the band that
    sees the image is resampled (a box resize reads the same source pixels with the same weights; float rounding
    of the band's box moves a few pixels by one level). `content`: the image's (w, h) when `image` is already
    padded."""
    import math

    from PIL import Image

    canvas = image if content is not None else _pad_square(image, colour)
    w, h = content if content is not None else image.size
    side = canvas.size[0]
    x0, y0, x1, y1 = box if box is not None else (0, 0, side, side)
    if w == h or resample not in CONTINUOUS_FILTERS:
        # Nothing padded; or NEAREST/BOX, whose kernels jump: a float-rounded band edge can swap a whole pixel.
        return canvas.resize(size, resample=resample, box=box)
    wide = w > h
    lo, hi = (y0, y1) if wide else (x0, x1)
    out_len = size[1] if wide else size[0]
    scale = (hi - lo) / out_len
    radius = 3 * max(scale, 1.0) + 1  # >= every PIL filter's support (lanczos: 3), plus rounding
    offset = (max(w, h) - min(w, h)) / 2
    first = max(0, math.floor((offset - radius - lo) / scale) - 1)
    last = min(out_len, math.ceil((offset + min(w, h) + radius - lo) / scale) + 1)
    out = Image.new("RGB", size, colour)
    if wide:
        band = canvas.resize((size[0], last - first), resample=resample,
                             box=(x0, lo + first * scale, x1, lo + last * scale))
        out.paste(band, (0, first))
    else:
        band = canvas.resize((last - first, size[1]), resample=resample,
                             box=(lo + first * scale, y0, lo + last * scale, y1))
        out.paste(band, (first, 0))
    return out


def _pad_offset(size: tuple[int, int]) -> int:
    w, h = size
    return (max(w, h) - min(w, h)) // 2


def _pad_square(image: Any, colour: tuple[int, int, int]) -> Any:
    """Centre `image` on a square of its long side filled with `colour` (LlavaImageProcessorPil.pad_to_square)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    offset = _pad_offset((w, h))
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(image, (0, offset) if w > h else (offset, 0))
    return canvas
