"""ServeConfig: the server's whole configuration, read once from the environment at start-up.

SageMaker passes a container's settings as environment strings (CreateModel `Environment`), so that is the only
source. `ServeConfig.from_env()` parses and checks every variable (each field names its variable, type, range and
choices; core.settings reads them), reports every problem at once (each naming its variable) as a `ConfigError`,
and `python -m serve` exits with that message. The table of variables is `ENV_VARS` below and docs/serving.md.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from core import settings
from core.s3 import bucket_name_problem
from core.settings import ConfigError as ConfigError  # re-exported: `python -m serve` catches it from here
from core.settings import Problem, setting
from serve.engine.accel import AccelConfig, buckets_up_to
from serve.engine.adapter_files import SourcePolicy
from serve.engine.adapters import AdapterLimits
from serve.engine.model import QUANTIZATIONS

MiB = 1024 * 1024
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ACCEL_MODES = ("auto", "on", "off")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ACCEL = AccelConfig()


# ---- parsers of the variables that are more than a number or a word (each raises ValueError saying why) ----


def _accel_mode(raw: str) -> str:
    value = {"1": "on", "true": "on", "0": "off", "false": "off"}.get(raw.lower(), raw.lower())
    if value not in ACCEL_MODES:
        raise ValueError(f"must be one of {', '.join(ACCEL_MODES)}, got {raw!r}")
    return value


def _buckets(raw: str) -> tuple[int, ...]:
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    bad = [part for part in parts if not part.isdigit() or int(part) < 1]
    if bad or not parts:
        raise ValueError(f"expected batch sizes >= 1, comma-separated, got {raw!r}")
    return tuple(sorted({int(part) for part in parts}))


def _device(raw: str) -> str:
    value = raw.lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {raw!r}")


def _networks(raw: str) -> tuple[Network, ...]:
    nets, bad = [], []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            bad.append(item)
    if bad:
        raise ValueError(f"not IP addresses or CIDR networks: {', '.join(bad)}")
    return tuple(nets)


def _paths(raw: str) -> tuple[Path, ...]:
    paths = tuple(Path(x.strip()) for x in raw.split(",") if x.strip())
    relative = [str(p) for p in paths if not p.is_absolute()]
    if relative:
        raise ValueError(f"not absolute paths: {', '.join(relative)}")
    if not paths:
        raise ValueError("needs absolute folder paths, comma-separated")
    return paths


def _s3_buckets(raw: str) -> tuple[str, ...] | None:
    """`*`: any bucket (None); `none`: no s3:// images (()); else bucket names, comma-separated."""
    if raw == "*":
        return None
    if raw.lower() == "none":
        return ()
    names = [x.strip() for x in raw.split(",") if x.strip()]
    bad = [f"{n} ({bucket_name_problem(n)})" for n in names if bucket_name_problem(n)]
    if bad or not names:
        raise ValueError(f"not S3 bucket names: {'; '.join(bad) or raw} (use bucket names, '*' or 'none')")
    return tuple(names)


@dataclass(frozen=True)
class ServeConfig:
    model_dir: Path = setting(Path("/opt/ml/model"), env="SM_MODEL_DIR")
    model_name: str | None = setting(None, "the name /v1/models lists and chat requests' `model` names; unset: the "
                                           "model dir's name", env="SERVE_MODEL_NAME")
    host: str = setting("0.0.0.0", env="SERVE_HOST")
    port: int = setting(8080, env="SAGEMAKER_BIND_TO_PORT", ge=1, le=65535)
    quantization: str = setting("auto", "auto = nf4 on CUDA, none (fp32) on CPU", env="SERVE_QUANTIZATION",
                                parse=str.lower, choices=QUANTIZATIONS)
    device: str = setting("auto", "auto = cuda if available, else cpu", env="SERVE_DEVICE", parse=_device)
    max_payload_bytes: int = setting(6 * MiB, "InvokeEndpoint's own limit", env="SERVE_MAX_PAYLOAD_BYTES", ge=1024)
    max_image_bytes: int = setting(20 * MiB, "cap on an image fetched from a URL or S3", env="SERVE_MAX_IMAGE_BYTES",
                                   ge=1024)
    max_image_pixels: int = setting(25_000_000, env="SERVE_MAX_IMAGE_PIXELS", ge=1)
    max_new_tokens: int = setting(1024, "the most a request may ask for", env="SERVE_MAX_NEW_TOKENS", ge=1)
    request_timeout_s: float = setting(55.0, "SageMaker gives an invocation 60 s", env="SERVE_REQUEST_TIMEOUT_S",
                                       gt=0)
    fetch_timeout_s: float = setting(10.0, "connect and per-read timeout of an image fetch",
                                     env="SERVE_FETCH_TIMEOUT_S", gt=0)
    fetch_max_redirects: int = setting(3, env="SERVE_FETCH_MAX_REDIRECTS", ge=0, le=10)
    fetch_allow_networks: tuple[Network, ...] = setting((), "private/loopback networks images may still be fetched "
                                                            "from", env="SERVE_FETCH_ALLOW_NETWORKS", parse=_networks)
    s3_buckets: tuple[str, ...] | None = setting(None, "buckets s3:// images may come from; None: any the role can "
                                                       "read", env="SERVE_S3_BUCKETS", parse=_s3_buckets)
    max_batch_size: int = setting(8, env="SERVE_MAX_BATCH_SIZE", ge=1, le=256)
    max_wait_ms: float = setting(50.0, "the longest a batch waits for requests still being read or prepared",
                                 env="SERVE_MAX_WAIT_MS", ge=0)
    max_queue: int = setting(64, env="SERVE_MAX_QUEUE", ge=1)
    max_instances: int = setting(16, "instances in one {\"instances\": [...]} request", env="SERVE_MAX_INSTANCES",
                                 ge=1, le=256)
    graceful_timeout_s: float = setting(25.0, "SageMaker sends SIGKILL 30 s after SIGTERM",
                                        env="SERVE_GRACEFUL_TIMEOUT_S", ge=0)
    torch_threads: int = setting(0, "torch CPU threads; 0 keeps torch's default (1 is best on small shared CPU "
                                    "hosts)", env="SERVE_TORCH_THREADS", ge=0, le=1024)
    prepare_threads: int = setting(0, "threads decoding images + preparing inputs; 0 = CPU cores - 1 (at least 2)",
                                   env="SERVE_PREPARE_THREADS", ge=0, le=256)
    log_level: str = setting("INFO", env="SERVE_LOG_LEVEL", parse=str.upper, choices=LOG_LEVELS)
    # CUDA decode speed-ups (serve/engine/accel.py): parsed here so a bad value stops start-up like any other variable
    # (defaults are AccelConfig's, so the server and library callers of serve.engine.accel start from the same values)
    accel_mode: str = setting(_ACCEL.mode, "auto = on with CUDA, off on CPU", env="SERVE_ACCEL", parse=_accel_mode)
    accel_batch_buckets: tuple[int, ...] = setting(_ACCEL.batch_buckets, env="SERVE_ACCEL_BATCH_BUCKETS",
                                                   parse=_buckets)
    accel_cache_bucket: int = setting(_ACCEL.cache_bucket, env="SERVE_ACCEL_CACHE_BUCKET", ge=1)
    accel_cache_gib: float | None = setting(_ACCEL.cache_gib, "None: 30% of the GPU's memory",
                                            env="SERVE_ACCEL_CACHE_GIB", gt=0)
    # LoRA adapters on the served model (serve/engine/adapters.py, docs/adapters.md)
    max_adapters: int = setting(8, "resident at once (least recently used unpinned ones are evicted); 0: no adapters",
                                env="SERVE_MAX_ADAPTERS", ge=0, le=1024)
    max_adapter_rank: int = setting(64, "the largest LoRA rank accepted", env="SERVE_MAX_ADAPTER_RANK", ge=1, le=4096)
    adapter_memory_mb: int = setting(4096, "weights of all resident adapters together", env="SERVE_ADAPTER_MEMORY_MB",
                                     ge=1)
    adapter_roots: tuple[Path, ...] = setting((), "local folders adapters may come from; unset: the model dir and "
                                                  "/opt/ml", env="SERVE_ADAPTER_ROOTS", parse=_paths)
    adapter_s3_buckets: tuple[str, ...] | None = setting(None, "buckets s3:// adapters may come from; None: any",
                                                         env="SERVE_ADAPTER_S3_BUCKETS", parse=_s3_buckets)
    adapter_cache_dir: Path = setting(Path("/tmp/llava-adapters"), "where downloaded and unpacked adapters are kept",
                                      env="SERVE_ADAPTER_CACHE_DIR")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeConfig:
        env = os.environ if env is None else env
        values, problems = settings.from_env(cls, env)
        if "max_payload_bytes" not in values and env.get("SAGEMAKER_MAX_PAYLOAD_IN_MB", "").strip():
            values.update(_sagemaker_payload(env["SAGEMAKER_MAX_PAYLOAD_IN_MB"].strip(), problems))
        if problems:
            raise ConfigError(problems, "server configuration")
        return cls(**values)

    def accel_config(self) -> AccelConfig:
        """The `serve.engine.accel.AccelConfig` these settings describe, with only the batch buckets that a batch of
        at most SERVE_MAX_BATCH_SIZE rows can use (the others would only lengthen the start-up's warm-up)."""
        return AccelConfig(mode=self.accel_mode, cache_bucket=self.accel_cache_bucket, cache_gib=self.accel_cache_gib,
                           batch_buckets=buckets_up_to(self.max_batch_size, self.accel_batch_buckets))

    def adapter_limits(self) -> AdapterLimits | None:
        """The `serve.engine.adapters.AdapterLimits` these settings describe; None when adapters are off."""
        if self.max_adapters == 0:
            return None
        roots = self.adapter_roots or (Path(self.model_dir), Path("/opt/ml"))
        return AdapterLimits(max_resident=self.max_adapters, max_rank=self.max_adapter_rank,
                             memory_bytes=self.adapter_memory_mb * MiB,
                             sources=SourcePolicy(local_roots=tuple(roots), s3_buckets=self.adapter_s3_buckets,
                                                  cache_dir=self.adapter_cache_dir))

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model_dir).name or "model"

    def summary(self) -> str:
        """One line with every resolved value, for the start-up log."""
        return " ".join(f"{f.name}={_show(getattr(self, f.name))}" for f in fields(self))


ENV_VARS = settings.env_names(ServeConfig)  # field -> environment variable; unset or empty keeps the default


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _sagemaker_payload(raw: str, problems: list[Problem]) -> dict[str, int]:
    # Batch transform sets this; 0 means "unlimited" there, which we do not offer, so the default stays.
    try:
        mb = float(raw)
    except ValueError:
        problems.append(Problem("SAGEMAKER_MAX_PAYLOAD_IN_MB", "", f"expected a number, got {raw!r}"))
        return {}
    if mb < 0:
        problems.append(Problem("SAGEMAKER_MAX_PAYLOAD_IN_MB", "", f"must be >= 0, got {raw!r}"))
        return {}
    return {"max_payload_bytes": int(mb * MiB)} if mb > 0 else {}
