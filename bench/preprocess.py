"""Image preprocessing cost on its own: decode + pad + resize (+ normalize) of a big PNG and JPEG, on CPU.

    python -m bench.preprocess [--size 1600x1200] [--repeats 30] [--model-dir DIR] [--out DIR]

Compares the reference path (serve.engine.images.decode_image, then the saved processor: LlavaImageProcessorPil pads
the full-size array to a square and resizes it) with the server's fast path (decode_image(shrink_for=processor):
serve.engine.preshrink's JPEG draft decode, pad, box reduce and resize in PIL, then the same processor), and reports the
pixel difference between the two. Target: <= 15 ms per image.
Then the whole request preparation, prompt and tokens included: the saved processor's call on the shrunk image
vs serve.engine.encoding's (identical tensors), and the server's total from image bytes to model inputs.
Without --model-dir the processor has LLaVA-1.5's settings (336 px, CLIP mean/std, bicubic, pad to square, 576
image tokens) with an offline tokenizer.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from bench.load import QUESTION
from bench.report import machine, markdown_table, percentile, write_report

TARGET_MS = 15.0
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def llava15_image_processor():
    from transformers import LlavaImageProcessorPil

    return LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                  image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, do_convert_rgb=True)


def llava15_processor(tokenizer: Any = None) -> Any:
    """LLaVA-1.5's processor (CLIP 336 px, patch 14: 576 image tokens; pad to square; the v1 chat template) around
    `tokenizer`, by default a small offline one (no hub)."""
    from transformers import LlavaProcessor

    from demo.tiny import DEFAULT_CORPUS, train_tokenizer
    from train.artifact import configure_processor

    processor = LlavaProcessor(image_processor=llava15_image_processor(),
                               tokenizer=tokenizer or train_tokenizer(DEFAULT_CORPUS, vocab_size=600), patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    return configure_processor(processor, version="v1", image_aspect_ratio="pad")


MAX_PIXELS = 25_000_000


def decode(data: bytes) -> Any:
    """The server's decode (serve.engine.images: pixel cap, first frame, EXIF orientation, RGB)."""
    from serve.engine.images import decode_image

    return decode_image(data, MAX_PIXELS)


def reference(data: bytes, processor) -> Any:
    return processor(decode(data), return_tensors="np")["pixel_values"][0]


def fast_geometry(data: bytes, processor) -> Any:
    """Decode + pad + resize only (what the target names): the server's decode with serve.engine.preshrink."""
    from serve.engine.images import decode_image

    return decode_image(data, MAX_PIXELS, shrink_for=processor)


def fast(data: bytes, processor) -> Any:
    return processor(fast_geometry(data, processor), return_tensors="np")["pixel_values"][0]


def time_ms(fn: Callable[[], Any], repeats: int) -> list[float]:
    fn()  # warm caches and lazy imports
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def pixel_diff(processor, a, b) -> dict[str, float]:
    """Differences in 0-255 pixel levels (normalized values times std*255)."""
    import numpy as np

    std = np.asarray(processor.image_std, dtype=np.float64).reshape(-1, 1, 1) * 255
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)) * std
    return {"max_abs_diff_levels": float(d.max()), "mean_abs_diff_levels": float(d.mean()),
            "p99_abs_diff_levels": float(np.percentile(d, 99)),
            "max_abs_diff_normalized": float(np.abs(a - b).max())}


def run(width: int, height: int, repeats: int, full_processor) -> list[dict[str, Any]]:
    from bench.samples import chart_image, encode
    from serve.engine.encoding import Encoder

    image = chart_image(width, height)
    encoders = Encoder(full_processor), Encoder(full_processor, fast=False)  # built (and checked) once
    return [format_row(fmt, encode(image, fmt), f"{width}x{height}", repeats, full_processor.image_processor,
                       encoders) for fmt in ("PNG", "JPEG")]


def format_row(fmt: str, data: bytes, size: str, repeats: int, processor, encoders: tuple[Any, Any]
               ) -> dict[str, Any]:
    """One image format's timings; `encoders`: serve.engine.encoding's (fast path) and the processor-only reference."""
    encoder, reference_encoder = encoders
    small = fast_geometry(data, processor)
    row: dict[str, Any] = {"format": fmt, "size": size, "bytes": len(data), "encode_fast_path": encoder.fast}
    for name, fn in (("decode_only", lambda: decode(data)),
                     ("reference", lambda: reference(data, processor)),
                     ("fast_geometry", lambda: fast_geometry(data, processor)),
                     ("fast", lambda: fast(data, processor)),
                     ("processor_encode", lambda: reference_encoder.encode(QUESTION, small)),
                     ("serve_encode", lambda: encoder.encode(QUESTION, small)),
                     ("server_total", lambda: encoder.encode(QUESTION, fast_geometry(data, processor)))):
        ms = time_ms(fn, repeats)
        row[f"{name}_p50_ms"] = percentile(ms, 50)
        row[f"{name}_p90_ms"] = percentile(ms, 90)
    row.update(pixel_diff(processor, reference(data, processor), fast(data, processor)))
    row["speedup"] = row["reference_p50_ms"] / row["fast_p50_ms"]
    row["meets_target"] = row["fast_p50_ms"] <= TARGET_MS
    return row


ENCODE_COLUMNS = [("format", "format"), ("size", "size"), ("processor_encode_p50_ms", "processor call ms (p50)"),
                  ("serve_encode_p50_ms", "serve.engine.encoding ms (p50)"), ("encode_fast_path", "fast path"),
                  ("server_total_p50_ms", "bytes to model inputs ms (p50)"), ("server_total_p90_ms", "p90 ms")]
COLUMNS = [("format", "format"), ("size", "size"), ("decode_only_p50_ms", "decode only ms"),
           ("reference_p50_ms", "reference ms (p50)"), ("fast_geometry_p50_ms", "fast decode+pad+resize ms"),
           ("fast_p50_ms", "fast to pixel_values ms (p50)"), ("fast_p90_ms", "fast p90 ms"), ("speedup", "speed-up"),
           ("max_abs_diff_levels", "max abs diff (levels of 255)"), ("mean_abs_diff_levels", "mean abs diff")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1600x1200", help="WIDTHxHEIGHT of the test image")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--model-dir", help="take the image processor from this artifact instead")
    parser.add_argument("--out", help="write preprocess.json and preprocess.md here")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must look like 1600x1200, got {args.size!r}")
    if args.repeats < 1 or width < 1 or height < 1:
        parser.error("--repeats and the size must be positive")
    if args.model_dir:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model_dir)
    else:
        processor = llava15_processor()
    rows = run(width, height, args.repeats, processor)
    md = (f"Image preprocessing, {args.repeats} repeats, one process (target: <= {TARGET_MS:g} ms)\n\n"
          + markdown_table(rows, COLUMNS, digits=2)
          + "\n\nRequest encoding (prompt, tokens, pixel_values) of the shrunk image, and the server's whole "
            "preparation from image bytes\n\n" + markdown_table(rows, ENCODE_COLUMNS, digits=2))
    write_report(args.out, "preprocess", {"machine": machine(), "target_ms": TARGET_MS, "results": rows}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
