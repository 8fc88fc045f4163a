"""LLaVA conversation data: read, validate (every problem at once, with row numbers) and convert to HF chat messages.

Input is LLaVA's format, as a JSON array or JSON Lines (one object per line):

    {"id": "chart-1", "image": "charts/1.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat type of chart is this?"},
                       {"from": "gpt", "value": "A pie chart."}]}

`image` is relative to the image folder; rows without it are text-only. Problems are collected for the whole file
and raised together as one `DataError` before any model is loaded. An image row whose first human turn lacks
`<image>` gets one (a single warning with the count): without it LLaVA silently trains text-only, which is what
happens to the blog's sample data, whose human turns carry no `<image>` at all.

Each row becomes an `Example` whose `messages` are in the HF multimodal chat shape that train/templates.py renders;
the image always goes first in the first user turn, as LLaVA moves it there.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}
MAX_PROBLEMS_SHOWN = 50  # in the exception message; `.problems` keeps them all
PROGRESS_MIN_IMAGES = 500  # below this, checking images is instant and a progress bar is noise
_ROW = re.compile(r"row (\d+)\b")


@dataclass(frozen=True)
class Example:
    """One conversation: `image` relative to the image folder (None for text-only), `row` as reported in errors."""

    id: str
    image: str | None
    messages: list[dict[str, Any]]
    row: int


class DataError(ValueError):
    """The data file has problems; `.problems` lists every one of them ("row 3 (id 'x'): ...")."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n  {shown}{tail}")


def load_examples(data_path: str | os.PathLike, image_folder: str | os.PathLike | None, *,
                  check_images: bool = True) -> list[Example]:
    """Read and validate a LLaVA JSON / JSONL file; raise DataError listing every problem, else return Examples.

    With `check_images`, every referenced image must exist under `image_folder` and decode (header check only).
    """
    path = Path(data_path)
    if not path.is_file():
        raise DataError(str(path), [f"data file not found: {path}"])
    records, problems = read_records(path)
    if not records and not problems:
        problems.append("the file holds no examples")
    examples: list[Example] = []
    inserted = 0
    for row, record in records:
        example, row_problems, added = parse_record(record, row)
        problems += row_problems
        inserted += added
        if example is not None:
            examples.append(example)
    if check_images:
        problems += check_image_files(examples, image_folder)
    if problems:
        problems.sort(key=_row_of)
        raise DataError(str(path), problems)
    _warn_duplicate_ids(examples)
    if inserted:
        log.warning("%d image row(s) had no %s in their first human turn; inserted it so the model sees the image",
                    inserted, IMAGE_TOKEN)
    n_images = sum(e.image is not None for e in examples)
    log.info("loaded %d examples from %s (%d with an image, %d text-only)", len(examples), path, n_images,
             len(examples) - n_images)
    return examples


def read_records(path: Path) -> tuple[list[tuple[int, Any]], list[str]]:
    """(row, parsed JSON value) pairs and parse problems. JSON array: row = 1-based index; JSONL: row = line number."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        return [], [f"not UTF-8 text (bad byte at offset {e.start}): save the data as UTF-8 JSON or JSON Lines"]
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            return [], [f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"]
        return list(enumerate(data, start=1)), []
    records, problems = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"row {lineno}: invalid JSON at line {lineno} column {e.colno}: {e.msg}")
    if problems and _is_one_object(text):
        return [], ["the file holds one JSON object spread over several lines; expected a JSON array of rows "
                    "or JSON Lines (one row per line)"]
    return records, problems


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def parse_record(record: Any, row: int) -> tuple[Example | None, list[str], int]:
    """Validate one row and convert it: (Example or None, problems, 1 if an <image> was inserted else 0)."""
    if not isinstance(record, dict):
        return None, [f"row {row}: expected an object, got {type(record).__name__}"], 0
    example_id = str(record["id"] if record.get("id") is not None else row)
    where = f"row {row} (id {example_id!r})"
    image = record.get("image")
    problems = []
    if image is not None and (not isinstance(image, str) or not image.strip()):
        problems.append(f"{where}: 'image' must be a non-empty string (a path relative to the image folder)")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        problems.append(f"{where}: 'conversations' must be a non-empty list")
        return None, problems, 0
    problems += _turn_problems(turns, where, has_image=bool(image))
    if problems:
        return None, problems, 0
    needs_insert = bool(image) and IMAGE_TOKEN not in turns[0]["value"]
    return Example(id=example_id, image=image or None, messages=to_messages(turns, bool(image)), row=row), [], int(
        needs_insert)


def _turn_problems(turns: list, where: str, *, has_image: bool) -> list[str]:
    """Every problem of a conversation: shape, roles, alternation, empty values, misplaced or repeated <image>."""
    problems = []
    image_tokens = 0
    for i, turn in enumerate(turns):
        at = f"{where}, turn {i + 1}"
        if not isinstance(turn, dict):
            problems.append(f"{at}: expected an object with 'from' and 'value'")
            continue
        speaker, value = turn.get("from"), turn.get("value")
        expected = "human" if i % 2 == 0 else "gpt"
        if speaker not in ROLES:
            problems.append(f"{at}: unknown 'from' {speaker!r} (expected 'human' or 'gpt')")
        elif speaker != expected:
            problems.append(f"{at}: expected a {expected} turn (turns must alternate, starting with human)")
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{at}: empty or missing 'value'")
            continue
        count = value.count(IMAGE_TOKEN)
        image_tokens += count
        if count and not has_image:
            problems.append(f"{at}: {IMAGE_TOKEN} in a row without an 'image'")
        elif count and i != 0:
            problems.append(f"{at}: {IMAGE_TOKEN} is only allowed in the first human turn")
    if image_tokens > 1:
        problems.append(f"{where}: {image_tokens} {IMAGE_TOKEN} tokens; one image per row is supported")
    if len(turns) % 2 == 1 and not problems:
        problems.append(f"{where}: the last turn is a question with no gpt answer to train on")
    return problems


def to_messages(turns: list[dict], has_image: bool) -> list[dict[str, Any]]:
    """LLaVA turns -> HF chat messages; the image (if any) leads the first user turn, `<image>` leaves the text."""
    messages = []
    for i, turn in enumerate(turns):
        text = turn["value"]
        content: list[dict[str, Any]] = []
        if i == 0 and has_image:
            # LLaVA's preprocess_multimodal: drop the token, strip, put the image first.
            text = text.replace(IMAGE_TOKEN, "").strip()
            content.append({"type": "image"})
        content.append({"type": "text", "text": text})
        messages.append({"role": ROLES[turn["from"]], "content": content})
    return messages


def check_image_files(examples: list[Example], image_folder: str | os.PathLike | None) -> list[str]:
    """Problems for images that are missing or do not decode; each distinct file is checked once, in parallel."""
    rows_by_image: dict[str, list[Example]] = {}
    for e in examples:
        if e.image is not None:
            rows_by_image.setdefault(e.image, []).append(e)
    if not rows_by_image:
        return []
    if image_folder is None or not Path(image_folder).is_dir():
        return [f"image folder {image_folder!s} not found, but {len(rows_by_image)} image(s) are referenced"]
    folder = Path(image_folder).absolute()  # "not found at gone.png" would not say where we looked
    names = list(rows_by_image)
    # Threads: on SageMaker FastFile each open is an S3 read; verify() parses headers only, it decodes no pixels.
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = pool.map(lambda name: _image_problem(folder / name), names)
        results = list(_progress(results, len(names)))
    problems = []
    for name, problem in zip(names, results, strict=True):
        if problem:
            problems += [f"row {e.row} (id {e.id!r}): image {name!r} {problem}" for e in rows_by_image[name]]
    return problems


def _image_problem(path: Path) -> str | None:
    from PIL import Image

    if not path.is_file():
        return f"not found at {path}"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
        return f"does not decode ({type(e).__name__}: {e})"
    return None


def _progress(iterable, total: int):
    if total < PROGRESS_MIN_IMAGES:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="checking images", unit="img", mininterval=5)


def load_image(path: str | os.PathLike):
    """Open an image as RGB; transparency is composited onto white exactly as the image processor does."""
    import numpy as np
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    with Image.open(path) as im:
        im.load()
        return Image.fromarray(np.asarray(convert_to_rgb(im, return_numpy=True)))


def _warn_duplicate_ids(examples: list[Example]) -> None:
    dupes = {i: n for i, n in Counter(e.id for e in examples).items() if n > 1}
    if dupes:
        shown = ", ".join(f"{i!r} x{n}" for i, n in list(dupes.items())[:10])
        log.warning("%d duplicate id(s) (kept all rows): %s%s", len(dupes), shown, " ..." if len(dupes) > 10 else "")


def _row_of(problem: str) -> int:
    """Sort key: the row number a problem starts with; file-level problems (no row) first."""
    match = _ROW.match(problem)
    return int(match.group(1)) if match else 0
