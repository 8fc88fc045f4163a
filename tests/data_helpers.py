"""Tiny LLaVA-format datasets for tests: small real PNGs in several modes and a JSON / JSONL conversation file.

    data_path, image_folder = write_tiny_dataset(tmp_path, n=8)

Shared by the data, training and eval tests; every image row has `<image>` in its first human turn unless
`image_token=False` (the blog's sample data style, which the loader repairs with a warning).
"""

from __future__ import annotations

import json
from pathlib import Path

# (mode, size, colour): wide, tall, palette, grey and transparent images exercise pad-to-square and RGB conversion.
IMAGE_SPECS = [
    ("RGB", (48, 24), (200, 30, 30)),
    ("RGBA", (20, 40), (30, 200, 30, 128)),
    ("L", (32, 32), 90),
    ("P", (40, 30), 3),
    ("RGB", (16, 16), (30, 30, 200)),
]
QUESTIONS = ["What type of chart is this?", "What is the title?", "Which category is the largest?"]
ANSWERS = ["A pie chart.", "Sales 2024", "Teachers"]


def write_images(image_folder: Path, count: int) -> list[str]:
    """`count` small PNGs named img_<i>.png; returns their names."""
    from PIL import Image

    image_folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        mode, size, colour = IMAGE_SPECS[i % len(IMAGE_SPECS)]
        name = f"img_{i}.png"
        Image.new(mode, size, colour).save(image_folder / name)
        names.append(name)
    return names


def tiny_rows(n: int = 8, *, with_text_only: bool = True, image_token: bool = True) -> list[dict]:
    """LLaVA rows: every third row text-only (when asked), every other row two rounds of questions."""
    rows = []
    for i in range(n):
        text_only = with_text_only and i % 3 == 2
        q, a = QUESTIONS[i % len(QUESTIONS)], ANSWERS[i % len(ANSWERS)]
        first = q if text_only or not image_token else f"<image>\n{q}"
        turns = [{"from": "human", "value": first}, {"from": "gpt", "value": a}]
        if i % 2:
            turns += [{"from": "human", "value": "How many categories are there?"}, {"from": "gpt", "value": "4"}]
        row = {"id": f"ex-{i}", "conversations": turns}
        if not text_only:
            row["image"] = f"img_{i}.png"
        rows.append(row)
    return rows


def write_rows(path: Path, rows: list, fmt: str = "json") -> Path:
    """Write rows as a JSON array (`json`) or JSON Lines (`jsonl`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=1))
    return path


def write_tiny_dataset(directory: str | Path, n: int = 8, *, with_text_only: bool = True, fmt: str = "json",
                       image_token: bool = True) -> tuple[Path, Path]:
    """A dataset of `n` rows in `directory`: (data file, image folder)."""
    directory = Path(directory)
    rows = tiny_rows(n, with_text_only=with_text_only, image_token=image_token)
    image_folder = directory / "images"
    write_images(image_folder, n)
    data_path = write_rows(directory / f"data.{fmt}", rows, fmt)
    return data_path, image_folder
