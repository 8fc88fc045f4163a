"""Deterministic chart-like test images (bars, grid lines, labels on a gradient) as PNG or JPEG bytes.

Charts are what this project serves; a gradient background keeps the PNG from compressing to nothing, so decode
cost is realistic. Same seed, same bytes: benchmark runs are comparable.
"""

from __future__ import annotations

import io


def chart_image(width: int = 1600, height: int = 1200, seed: int = 0, mode: str = "RGB"):
    """A PIL bar chart of the given size."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([xx * 255 // max(width, 1), yy * 255 // max(height, 1),
                           (xx + yy) * 255 // max(width + height, 1)], axis=-1).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    margin = max(width, height) // 20
    for y in range(margin, height - margin, max(height // 12, 2)):
        draw.line([margin, y, width - margin, y], fill=(200, 200, 200), width=max(1, height // 600))
    bars = 12
    step = max((width - 2 * margin) // bars, 2)
    for i in range(bars):
        x0 = margin + i * step
        top = int(rng.integers(margin, max(margin + 1, height - 2 * margin)))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle([x0, top, x0 + step * 2 // 3, height - margin], fill=colour)
        draw.text((x0, height - margin + 4), f"cat {i}", fill=(0, 0, 0))
    draw.text((margin, margin // 3), f"Sample chart {seed}", fill=(0, 0, 0))
    return image.convert(mode) if mode != "RGB" else image


def encode(image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG"):
        image.convert("RGB").save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, fmt.upper())
    return buf.getvalue()


def image_set(count: int = 4, width: int = 640, height: int = 480) -> list[bytes]:
    """A fixed set of `count` images, alternating PNG and JPEG, for load tests."""
    return [encode(chart_image(width, height, seed=i), "PNG" if i % 2 == 0 else "JPEG") for i in range(count)]
