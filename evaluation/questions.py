"""Evaluation questions from a LLaVA data file: one single-turn question per human/gpt pair, with its reference.

    load_questions(path, image_folder=None, question_types=(), limit=None) -> list[dict]

Each question is {"id": "<record id>#<k>", "image": <path or None>, "question", "answer"[, "chart_type",
"question_type"]}. The file is read and checked by the trainer's loader (every problem at once, as DataError), so
evaluation accepts exactly what training accepts. Conversations without an image (LLaVA data mixes them in) are
left out, with a log line saying how many: the evaluation asks about images. Also here: the grey image of the
blank-image control.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BLANK_GREY = 128


def load_questions(data: str | Path, image_folder: str | Path | None = None, *,
                   question_types: list[str] | tuple[str, ...] = (), limit: int | None = None) -> list[dict[str, Any]]:
    """The questions of `data`; DataError lists every problem of the file at once."""
    from train.data import DataError, parse_record, read_records

    data = Path(data)
    folder = Path(image_folder) if image_folder else default_image_folder(data)
    records, problems = read_records(data)
    questions: list[dict[str, Any]] = []
    text_only = 0
    for row, record in records:
        example, row_problems, _ = parse_record(record, row)
        problems += row_problems
        if example is None:
            continue
        if example.image is None:
            text_only += 1
            continue
        if not (folder / example.image).is_file():
            problems.append(f"row {row} (id {example.id!r}): image {example.image!r} not found in {folder}")
            continue
        questions += _pairs(example, record, folder / example.image)
    if problems:
        raise DataError(str(data), problems)
    if text_only:
        log.info("%s: %d conversation(s) without an image left out of the evaluation", data, text_only)
    if question_types:
        questions = _of_types(questions, question_types, data)
    return questions[:limit] if limit else questions


def _pairs(example: Any, record: dict, image: Path) -> list[dict[str, Any]]:
    types = record.get("question_types") or []
    out = []
    for k, (user, assistant) in enumerate(zip(example.messages[0::2], example.messages[1::2], strict=False)):
        item = {"id": f"{example.id}#{k}", "image": str(image), "question": message_text(user),
                "answer": message_text(assistant)}
        if record.get("chart_type"):
            item["chart_type"] = str(record["chart_type"])
        if k < len(types):
            item["question_type"] = str(types[k])
        out.append(item)
    return out


def _of_types(questions: list[dict], wanted: list[str] | tuple[str, ...], data: Path) -> list[dict]:
    known = sorted({q["question_type"] for q in questions if "question_type" in q})
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"{data}: question type(s) {', '.join(unknown)} not in the data; it has: "
                         f"{', '.join(known) or 'no question_types at all'}")
    return [q for q in questions if q.get("question_type") in wanted]


def default_image_folder(data: Path) -> Path:
    """`llava-sm data synth` puts images/ beside the split folders; otherwise images sit beside the data file."""
    beside_split = data.parent.parent / "images"
    return beside_split if beside_split.is_dir() else data.parent


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message (its text parts joined), without surrounding whitespace."""
    content = message["content"]
    if isinstance(content, str):
        return content.strip()
    return "".join(c.get("text", "") for c in content if c.get("type") == "text").strip()


def blank_png(size: int = 336, grey: int = BLANK_GREY) -> bytes:
    """A uniform grey square PNG, written without PIL (the HTTP path stays dependency-free)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    row = b"\x00" + bytes([grey]) * (3 * size)
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * size, 9))
            + chunk(b"IEND", b""))
