"""`llava-sm package`: a merged model dir -> model.tar.gz (files at the archive root), uploaded to S3.

    llava-sm package --model-dir out/merged --s3-uri s3://my-bucket/llava/v1/      # -> .../v1/model.tar.gz
    llava-sm package --model-dir out/merged --output model.tar.gz                   # local archive only

SageMaker extracts ModelDataUrl into /opt/ml/model before the container starts, so the archive holds the artifact's
files at its root (config.json, not merged/config.json). The dir is checked first: it must look like an artifact
that `serve` can load (config, safetensors weights, processor and tokenizer files, a chat template); a LoRA adapter
dir is refused (merge it with `python -m train.merge`). Symlinks (a Hugging Face cache snapshot) are followed.
Upload uses boto3's managed transfer, multipart above 64 MiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Any

from client import options as o
from client.options import option

ARCHIVE_NAME = "model.tar.gz"
MULTIPART_BYTES = 64 * 1024 * 1024
SKIPPED_PREFIXES = (".", "checkpoint-")  # hidden files (.git, .cache) and trainer checkpoints stay out


@dataclasses.dataclass
class PackageOptions:
    model_dir: str | None = option(help="merged model dir (the training job's artifact, extracted)", required=True)
    s3_uri: str | None = option(help=f"where to upload: s3://bucket/prefix/ (+ {ARCHIVE_NAME}) or s3://.../x.tar.gz")
    output: str | None = option(help="also keep the archive at this local path")
    compress_level: int = option(1, "gzip level 1-9 (safetensors barely compress; 1 is fastest)")
    region: str | None = option(help="AWS region (default: profile / AWS_DEFAULT_REGION)")
    profile: str | None = option(help="AWS named profile")
    endpoint_url: str | None = option(help="S3 endpoint URL override (default: AWS_ENDPOINT_URL)")

    def problems(self) -> list[str]:
        p = o.check_range("compress_level", self.compress_level, 1, 9)
        if self.s3_uri and not self.s3_uri.endswith("/") and not self.s3_uri.endswith(".tar.gz"):
            p.append(f"s3_uri: {self.s3_uri!r} must end with / (a prefix) or .tar.gz")
        p += o.check_s3("s3_uri", self.s3_uri)
        if not self.s3_uri and not self.output:
            p.append("give --s3-uri (upload) and/or --output (local archive)")
        return p + (artifact_problems(Path(self.model_dir)) if self.model_dir else [])

    @property
    def destination(self) -> str | None:
        if not self.s3_uri:
            return None
        return self.s3_uri + ARCHIVE_NAME if self.s3_uri.endswith("/") else self.s3_uri


def artifact_problems(model_dir: Path) -> list[str]:
    """Why `model_dir` is not a servable artifact (empty when it is)."""
    if not model_dir.is_dir():
        return [f"model_dir: {model_dir} is not a directory"]
    names = {p.name for p in model_dir.iterdir()}
    if "adapter_config.json" in names and "config.json" not in names:
        return [f"model_dir: {model_dir} is a LoRA adapter, not a merged model; merge it first "
                "(python -m train.merge) and package the merged dir"]
    where = f"model_dir {model_dir}"
    problems = _weights_problems(model_dir, names, where)
    if "config.json" not in names:
        problems.append(f"{where}: no config.json")
    if not names & {"processor_config.json", "preprocessor_config.json"}:
        problems.append(f"{where}: no processor_config.json / preprocessor_config.json (image processing)")
    if not names & {"tokenizer.json", "tokenizer.model"}:
        problems.append(f"{where}: no tokenizer.json / tokenizer.model")
    if not _has_chat_template(model_dir, names):
        problems.append(f"{where}: no chat template (chat_template.jinja, chat_template.json, or a chat_template "
                        "key in tokenizer_config.json / processor_config.json)")
    return problems


def _weights_problems(model_dir: Path, names: set[str], where: str) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return [f"{where}: model.safetensors.index.json has no readable weight_map"]
        missing = sorted(s for s in shards if s not in names)
        return [f"{where}: shards listed in the index are missing: {', '.join(missing)}"] if missing else []
    if "model.safetensors" in names:
        return []
    if any(n.endswith(".bin") for n in names):
        return [f"{where}: weights are .bin (pickle); the server loads safetensors only: save with "
                "safe_serialization=True"]
    return [f"{where}: no model.safetensors (or model.safetensors.index.json + shards)"]


def _has_chat_template(model_dir: Path, names: set[str]) -> bool:
    if names & {"chat_template.jinja", "chat_template.json"}:
        return True
    for name in ("tokenizer_config.json", "processor_config.json"):
        try:
            if json.loads((model_dir / name).read_text()).get("chat_template"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def archive_members(model_dir: Path) -> list[Path]:
    """Files to pack, relative to model_dir, sorted; hidden files and trainer checkpoints are left out."""
    members = []
    for root, dirs, files in os.walk(model_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(SKIPPED_PREFIXES))
        members += [Path(root, f).relative_to(model_dir) for f in files if not f.startswith(".")]
    return sorted(members)


def make_archive(model_dir: Path, out_path: Path, *, compress_level: int = 1) -> list[str]:
    """Write model.tar.gz with the files at the archive root; return the member names."""
    names = []
    with tarfile.open(out_path, "w:gz", compresslevel=compress_level, dereference=True) as tar:
        for rel in archive_members(model_dir):
            info = tar.gettarinfo(model_dir / rel, arcname=rel.as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(model_dir / rel, "rb") as fh:
                tar.addfile(info, fh)
            names.append(rel.as_posix())
    return names


def upload(s3: Any, path: Path, uri: str, *, multipart_bytes: int = MULTIPART_BYTES) -> None:
    """boto3's managed upload: multipart (parallel parts) above `multipart_bytes`, progress on stderr."""
    from boto3.s3.transfer import TransferConfig

    bucket, _, key = uri[len("s3://"):].partition("/")
    config = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes)
    s3.upload_file(str(path), bucket, key, Config=config, Callback=_Progress(path.stat().st_size, uri))


class _Progress:
    """Prints upload progress every 10% (the callback runs on several transfer threads)."""

    def __init__(self, total: int, uri: str):
        self.total, self.uri, self.sent, self.shown = max(total, 1), uri, 0, -1
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.sent += n
            tenth = self.sent * 10 // self.total
            if tenth != self.shown:
                self.shown = tenth
                print(f"uploading {self.uri}: {min(tenth * 10, 100)}%", file=sys.stderr, flush=True)


def package(opts: PackageOptions, *, s3: Any = None, multipart_bytes: int = MULTIPART_BYTES) -> str | None:
    """Archive (and upload) `opts.model_dir`; return the S3 URI of the uploaded archive, if any."""
    model_dir = Path(opts.model_dir)
    with tempfile.TemporaryDirectory(prefix="llava-sm-package-") as tmp:
        out_path = Path(opts.output) if opts.output else Path(tmp, ARCHIVE_NAME)
        names = make_archive(model_dir, out_path, compress_level=opts.compress_level)
        size = out_path.stat().st_size
        print(f"packed {len(names)} files from {model_dir} into {out_path} ({size / 2**20:.1f} MiB)", file=sys.stderr)
        if opts.destination:
            upload(s3, out_path, opts.destination, multipart_bytes=multipart_bytes)
    return opts.destination


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("package", help="pack a merged model dir into model.tar.gz and upload it",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_arguments(parser, PackageOptions)
    parser.add_argument("--dry-run", action="store_true",
                        help="check the model dir and print what would be packed and where; write and send nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from client.aws import Clients

    opts, _ = o.resolve(PackageOptions, args, "package")
    if args.dry_run:
        print(json.dumps({"model_dir": opts.model_dir, "files": [m.as_posix() for m in
                          archive_members(Path(opts.model_dir))], "output": opts.output,
                          "upload_to": opts.destination}, indent=2))
        return 0
    s3 = Clients(opts.region, opts.profile, opts.endpoint_url).s3 if opts.destination else None
    uri = package(opts, s3=s3)
    print(uri or opts.output)
    return 0
