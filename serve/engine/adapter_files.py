"""A LoRA adapter's files: where they come from and what they must hold before the server lets them near the model.

    folder, owned = fetch_source(src, policy, name)       # a local folder, an s3:// prefix or .tar.gz
    files = read_adapter(folder, base_facts(model.config), max_rank=64)

`src` is a PEFT folder (or a folder whose `adapter/` subfolder is one, as a training job's model dir), a `.tar.gz`
of one, or the same on S3 (`s3://bucket/prefix/` or `s3://bucket/key.tar.gz`). Local paths must lie under one of the
policy's roots (symlinks resolved) and S3 sources in one of its buckets; archives are unpacked with tarfile's `data`
filter (no absolute paths, `..`, links out or device files) under a byte cap, into a folder of the cache dir that the
caller owns (`owned`) and removes with the adapter.

`read_adapter` refuses, each with its own error code (serve/engine/errors.py): what is not a plain LoRA adapter in
safetensors (DoRA, pickled `.bin` weights, other modules_to_save than the projector, corrupt or non-finite
tensors, weights that are neither LoRA nor projector), a rank over the cap, and an adapter whose `base_model.json`
(written by the training job's adapter export) describes another base than the served one. Whether every weight
lands on a module of the served model is checked when it is injected (serve/engine/lora.py).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from serve.engine.errors import ApiError

log = logging.getLogger(__name__)

# Adapter names become inference component names on SageMaker (<= 63 characters) and cache folder names here.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){0,62}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FACTS_FILE = "base_model.json"  # what the training job's adapter export records about the base it trained on
NESTED_FOLDER = "adapter"  # a training job's model dir keeps its adapter here
PROJECTOR = "multi_modal_projector"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
MAX_S3_OBJECTS = 1000


@dataclass(frozen=True)
class SourcePolicy:
    """Where adapters may be read from."""
    local_roots: tuple[Path, ...] = ()
    s3_buckets: tuple[str, ...] | None = None  # None: any bucket the role can read; (): none
    cache_dir: Path = Path("/tmp/llava-adapters")
    max_download_bytes: int = 8 * 2**30


@dataclass
class AdapterFiles:
    """A validated adapter, read into host memory."""
    folder: Path
    config: dict[str, Any]  # adapter_config.json
    lora: dict[str, Any] = field(repr=False)  # LoRA tensors under PEFT's saved names
    projector: dict[str, Any] = field(repr=False)  # the trained projector's tensors, named as in the projector
    rank: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.lora.values(), *self.projector.values()])


def check_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise ApiError("invalid_adapter_name", f"adapter name {str(name)[:80]!r} is not allowed: 1 to 63 letters, "
                                               "digits, '-', '_' or '.', starting with a letter or digit")
    return name


def base_facts(config: Any) -> dict[str, Any]:
    """What an adapter must have been trained on: the served model's architecture, from its config."""
    text = config.get_text_config(decoder=True)
    vision = getattr(config, "vision_config", None)
    return {"model_type": config.model_type, "text_hidden_size": text.hidden_size,
            "text_layers": text.num_hidden_layers, "vocab_size": text.vocab_size,
            "vision_hidden_size": getattr(vision, "hidden_size", None),
            "image_token_index": getattr(config, "image_token_index", None)}


# ---------------------------------------------------------------------------------------------- sources
def fetch_source(src: str, policy: SourcePolicy, name: str) -> tuple[Path, Path | None]:
    """The PEFT folder `src` stands for, and the cache folder made for it (None for a local folder)."""
    if src.startswith("s3://"):
        owned = _new_cache_dir(policy, name)
        try:
            return find_peft_folder(_from_s3(src, policy, owned)), owned
        except BaseException:
            shutil.rmtree(owned, ignore_errors=True)
            raise
    if "://" in src:
        raise ApiError("adapter_source_not_allowed", f"src {src[:200]!r}: use a local path or an s3:// URI")
    path = _local_path(src, policy)
    if path.is_dir():
        return find_peft_folder(path), None
    if not path.name.endswith(ARCHIVE_SUFFIXES):
        raise ApiError("invalid_adapter", f"src {src!r} is neither a folder nor a .tar.gz")
    owned = _new_cache_dir(policy, name)
    try:
        _unpack(path, owned / "files", policy.max_download_bytes)
        return find_peft_folder(owned / "files"), owned
    except BaseException:
        shutil.rmtree(owned, ignore_errors=True)
        raise


def find_peft_folder(root: Path) -> Path:
    for folder in (root, root / NESTED_FOLDER):
        if (folder / CONFIG_FILE).is_file():
            return folder
    raise ApiError("invalid_adapter", f"no {CONFIG_FILE} in the adapter's files (nor in their {NESTED_FOLDER}/ "
                                      "folder): not a PEFT adapter")


def _local_path(src: str, policy: SourcePolicy) -> Path:
    path = Path(src)
    if not path.is_absolute():
        raise ApiError("invalid_adapter", f"src {src!r} must be an absolute path or an s3:// URI")
    # Resolved before the check, so a symlink cannot lead out of the allowed roots.
    resolved = path.resolve()
    roots = [root.resolve() for root in policy.local_roots]
    if not any(resolved == root or root in resolved.parents for root in roots):
        allowed = ", ".join(map(str, policy.local_roots)) or "none"
        raise ApiError("adapter_source_not_allowed", f"src {src!r} is outside the folders adapters may be read from "
                                                     f"({allowed})")
    if not resolved.exists():
        raise ApiError("invalid_adapter", f"src {src!r} does not exist")
    return resolved


def _new_cache_dir(policy: SourcePolicy, name: str) -> Path:
    folder = policy.cache_dir / f"{name}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    return folder


def _unpack(archive: Path, dest: Path, max_bytes: int) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            size = sum(m.size for m in members if m.isfile())
            if size > max_bytes:
                raise ApiError("adapter_too_large", f"the archive holds {size:,} bytes; at most {max_bytes:,} are "
                                                    "unpacked")
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ApiError("invalid_adapter", f"the adapter archive cannot be unpacked ({type(e).__name__}: "
                                          f"{str(e)[:200]})") from None


def _from_s3(src: str, policy: SourcePolicy, dest: Path) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    parts = urlsplit(src)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket:
        raise ApiError("invalid_adapter", f"src {src!r} names no bucket")
    if policy.s3_buckets is not None and bucket not in policy.s3_buckets:
        raise ApiError("adapter_source_not_allowed", f"s3://{bucket}/ is not a bucket adapters may be read from")
    client = _s3_client()
    try:
        if key.endswith(ARCHIVE_SUFFIXES):
            archive = dest / "adapter.tar.gz"
            _download(client, bucket, key, archive, policy.max_download_bytes)
            _unpack(archive, dest / "files", policy.max_download_bytes)
            archive.unlink()
            return dest / "files"
        return _download_prefix(client, bucket, key, dest / "files", policy.max_download_bytes)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        raise ApiError("invalid_adapter", f"cannot read {src}: {code}") from None
    except (BotoCoreError, OSError) as e:
        raise ApiError("invalid_adapter", f"cannot read {src} ({type(e).__name__})") from None


def _s3_client() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=10, read_timeout=60,
                                            retries={"max_attempts": 3, "mode": "standard"}))


def _download(client: Any, bucket: str, key: str, path: Path, max_bytes: int) -> int:
    obj = client.get_object(Bucket=bucket, Key=key)
    if obj.get("ContentLength", 0) > max_bytes:
        raise ApiError("adapter_too_large", f"s3://{bucket}/{key} is {obj['ContentLength']:,} bytes; at most "
                                            f"{max_bytes:,} are downloaded")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for chunk in obj["Body"].iter_chunks(1 << 20):
            out.write(chunk)
    return path.stat().st_size


def _download_prefix(client: Any, bucket: str, prefix: str, dest: Path, max_bytes: int) -> Path:
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    keys: list[tuple[str, int]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [(o["Key"], o["Size"]) for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if len(keys) > MAX_S3_OBJECTS:
            raise ApiError("invalid_adapter", f"s3://{bucket}/{prefix} holds more than {MAX_S3_OBJECTS} objects")
    if not keys:
        raise ApiError("invalid_adapter", f"s3://{bucket}/{prefix} holds no objects")
    if sum(size for _, size in keys) > max_bytes:
        raise ApiError("adapter_too_large", f"s3://{bucket}/{prefix} holds more than {max_bytes:,} bytes")
    for key, _ in keys:
        relative = Path(key[len(prefix):])
        if relative.is_absolute() or ".." in relative.parts:
            raise ApiError("invalid_adapter", f"s3://{bucket}/{key}: an object name that leaves its prefix")
        _download(client, bucket, key, dest / relative, max_bytes)
    return dest


# ---------------------------------------------------------------------------------------------- contents
def read_adapter(folder: Path, facts: dict[str, Any], *, max_rank: int) -> AdapterFiles:
    """Read and check an adapter folder (see the module docstring); ApiError for anything the server refuses."""
    config = _read_config(folder)
    rank = _check_config(config, max_rank)
    _check_base(folder, facts)
    tensors = _read_weights(folder)
    lora, projector = _split(tensors)
    if projector and PROJECTOR not in (config.get("modules_to_save") or []):
        raise ApiError("invalid_adapter", f"the weights hold a {PROJECTOR} but adapter_config.json's "
                                          "modules_to_save does not name it")
    if not projector and PROJECTOR in (config.get("modules_to_save") or []):
        raise ApiError("invalid_adapter", f"modules_to_save names the {PROJECTOR} but the weights hold none")
    if not lora:
        raise ApiError("invalid_adapter", "the weights hold no LoRA matrices")
    return AdapterFiles(folder=folder, config=config, lora=lora, projector=projector, rank=rank)


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError("invalid_adapter", f"{CONFIG_FILE} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise ApiError("invalid_adapter", f"{CONFIG_FILE} is not a JSON object")
    return config


def _check_config(config: dict[str, Any], max_rank: int) -> int:
    if config.get("peft_type") != "LORA":
        raise ApiError("invalid_adapter", f"peft_type {config.get('peft_type')!r}: only LoRA adapters are served")
    unsupported = [k for k in ("use_dora", "target_parameters", "trainable_token_indices", "layer_replication")
                   if config.get(k)]
    if unsupported:
        raise ApiError("invalid_adapter", f"{', '.join(unsupported)} in {CONFIG_FILE}: not served (mixed-adapter "
                                          "batches need plain LoRA)")
    others = [m for m in (config.get("modules_to_save") or []) if m != PROJECTOR]
    if others:
        raise ApiError("invalid_adapter", f"modules_to_save {others}: only the {PROJECTOR} may be trained in full")
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ApiError("invalid_adapter", f"{CONFIG_FILE}: the LoRA rank r must be a positive integer")
    if max(ranks) > max_rank:
        raise ApiError("adapter_rank_too_large", f"LoRA rank {max(ranks)} is over this server's cap of {max_rank} "
                                                 "(SERVE_MAX_ADAPTER_RANK)")
    return max(ranks)


def _check_base(folder: Path, facts: dict[str, Any]) -> None:
    path = folder / BASE_FACTS_FILE
    if not path.is_file():
        return  # an adapter from elsewhere: its shapes are still checked against the model when it is injected
    try:
        trained_on = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError("invalid_adapter", f"{BASE_FACTS_FILE} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(trained_on, dict):
        raise ApiError("invalid_adapter", f"{BASE_FACTS_FILE} is not a JSON object")
    differ = [f"{k} {trained_on[k]!r} (served: {facts.get(k)!r})" for k in sorted(trained_on)
              if k in facts and trained_on[k] != facts[k]]
    if differ:
        raise ApiError("adapter_mismatch", "the adapter was trained on another base model: " + "; ".join(differ))


def _read_weights(folder: Path) -> dict[str, Any]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise ApiError("invalid_adapter", f"no {WEIGHTS_FILE}" + (" (adapter_model.bin holds pickled weights, "
                                                                  "which the server does not load: save with "
                                                                  "safetensors)" if pickled else ""))
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every kind of corruption
        raise ApiError("invalid_adapter", f"{WEIGHTS_FILE} is corrupt ({type(e).__name__})") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ApiError("invalid_adapter", f"{WEIGHTS_FILE} holds NaN or infinite values (in {bad[0]})")
    return tensors


def _split(tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LoRA tensors, projector tensors named as inside the projector); anything else is refused."""
    lora, projector, other = {}, {}, []
    marker = f"{PROJECTOR}."
    for key, tensor in tensors.items():
        if ".lora_" in key:
            lora[key] = tensor
        elif marker in key:
            projector[key.split(marker, 1)[1]] = tensor
        else:
            other.append(key)
    if other:
        raise ApiError("invalid_adapter", f"{len(other)} weight(s) are neither LoRA nor projector weights "
                                          f"(e.g. {other[0]})")
    return lora, projector
