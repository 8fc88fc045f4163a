"""ServeConfig: the server's whole configuration, read once from the environment at start-up.

SageMaker passes a container's settings as environment strings (CreateModel `Environment`), so that is the only
source. `ServeConfig.from_env()` parses and checks every variable, reports every problem at once (each naming its
variable) as a `ConfigError`, and `python -m serve` exits with that message. The table of variables lives in
`ENV_VARS` below and in docs/serving.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# The engine modules import only the stdlib at import time: reading the config pulls in no torch.
from serve.engine.accel import AccelConfig, buckets_up_to
from serve.engine.batching import SCHEDULERS
from serve.engine.model import QUANTIZATIONS
from serve.engine.scheduler import DEFAULT_PREFILL_TOKENS

MiB = 1024 * 1024
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ACCEL_MODES = ("auto", "on", "off")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ACCEL = AccelConfig()


class ConfigError(ValueError):
    """One or more environment variables are invalid; `.problems` names each variable and what is wrong."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid server configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ServeConfig:
    model_dir: Path = Path("/opt/ml/model")
    host: str = "0.0.0.0"
    port: int = 8080
    quantization: str = "auto"  # auto = nf4 on CUDA, none (fp32) on CPU
    device: str = "auto"  # auto = cuda if available, else cpu
    max_payload_bytes: int = 6 * MiB  # InvokeEndpoint's own limit
    max_image_bytes: int = 20 * MiB  # cap on an image fetched from a URL or S3
    max_image_pixels: int = 25_000_000
    max_new_tokens: int = 1024  # the most a request may ask for
    request_timeout_s: float = 55.0  # SageMaker gives an invocation 60 s
    fetch_timeout_s: float = 10.0  # connect and per-read timeout of an image fetch
    fetch_max_redirects: int = 3
    fetch_allow_networks: tuple[Network, ...] = ()  # private/loopback networks images may still be fetched from
    s3_buckets: tuple[str, ...] | None = None  # buckets s3:// images may come from; None: any the role can read
    max_batch_size: int = 8
    max_wait_ms: float = 50.0  # the longest a batch waits for requests still being read or prepared
    max_queue: int = 64
    scheduler: str = "batch"  # batch: one generate per batch; continuous: rows join and leave between decode steps
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS  # prompt tokens prefilled between two decode steps (continuous)
    max_total_tokens: int = 0  # longest request, prompt + answer; 0 = the model's context (or what the KV budget holds)
    max_instances: int = 16  # instances in one {"instances": [...]} request
    graceful_timeout_s: float = 25.0  # SageMaker sends SIGKILL 30 s after SIGTERM
    torch_threads: int = 0  # torch CPU threads; 0 keeps torch's default (1 is best on small shared CPU hosts)
    prepare_threads: int = 0  # threads decoding images + preparing inputs; 0 = CPU cores - 1 (at least 2)
    log_level: str = "INFO"
    # CUDA decode speed-ups (serve/engine/accel.py): parsed here so a bad value stops start-up like any other variable
    # (defaults are AccelConfig's, so the server and library callers of serve.engine.accel start from the same values)
    accel_mode: str = _ACCEL.mode  # auto = on with CUDA, off on CPU
    accel_batch_buckets: tuple[int, ...] = _ACCEL.batch_buckets
    accel_cache_bucket: int = _ACCEL.cache_bucket
    accel_cache_gib: float | None = _ACCEL.cache_gib  # None: 30% of the GPU's memory

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeConfig:
        env = os.environ if env is None else env
        values, problems = parse_env(env, ENV_VARS)
        if "max_payload_bytes" not in values and env.get("SAGEMAKER_MAX_PAYLOAD_IN_MB", "").strip():
            values.update(_sagemaker_payload(env["SAGEMAKER_MAX_PAYLOAD_IN_MB"].strip(), problems))
        if problems:
            raise ConfigError(problems)
        return cls(**values)

    def accel_config(self) -> AccelConfig:
        """The `serve.engine.accel.AccelConfig` these settings describe, with only the batch buckets that a batch
        of at most SERVE_MAX_BATCH_SIZE rows can use (the others would only lengthen the start-up's warm-up)."""
        values = {name: getattr(self, name) for name in ACCEL_FIELDS}
        values["accel_batch_buckets"] = buckets_up_to(self.max_batch_size, self.accel_batch_buckets)
        return accel_config_of(values)

    def summary(self) -> str:
        """One line with every resolved value, for the start-up log."""
        return " ".join(f"{f.name}={_show(getattr(self, f.name))}" for f in fields(self))


def parse_env(env: Mapping[str, str], table: Mapping[str, tuple[str, Callable[[str], Any]]]
              ) -> tuple[dict[str, Any], list[str]]:
    """Parse the variables of `table` (field -> (variable, parser)) that are set in `env`: (values, problems)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, (var, parse) in table.items():
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[name] = parse(raw.strip())
        except ValueError as e:
            problems.append(f"{var}={raw!r}: {e}")
    return values, problems


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}")
        return value
    return parse


def _float(lo: float, *, strict: bool = True) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("not a number") from None
        if value != value or value in (float("inf"), float("-inf")) or value < lo or (strict and value == lo):
            raise ValueError(f"must be a finite number {'>' if strict else '>='} {lo:g}")
        return value
    return parse


def _choice(options: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.upper() if upper else raw.lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value
    return parse


def _accel_mode(raw: str) -> str:
    value = {"1": "on", "true": "on", "0": "off", "false": "off"}.get(raw.lower(), raw.lower())
    if value not in ACCEL_MODES:
        raise ValueError(f"must be one of {', '.join(ACCEL_MODES)}")
    return value


def _buckets(raw: str) -> tuple[int, ...]:
    parse = _int(1)
    sizes = sorted({parse(part.strip()) for part in raw.split(",") if part.strip()})
    if not sizes:
        raise ValueError("needs at least one batch size")
    return tuple(sizes)


def _device(raw: str) -> str:
    value = raw.lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError("must be auto, cpu, cuda or cuda:N")


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


S3_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _s3_buckets(raw: str) -> tuple[str, ...] | None:
    """`*`: any bucket (None); `none`: no s3:// images (()); else bucket names, comma-separated."""
    if raw == "*":
        return None
    if raw.lower() == "none":
        return ()
    names = [x.strip() for x in raw.split(",") if x.strip()]
    bad = [n for n in names if not S3_BUCKET_NAME.match(n)]
    if bad or not names:
        raise ValueError(f"not S3 bucket names: {', '.join(bad) or raw} (use bucket names, '*' or 'none')")
    return tuple(names)


def _sagemaker_payload(raw: str, problems: list[str]) -> dict[str, int]:
    # Batch transform sets this; 0 means "unlimited" there, which we do not offer, so the default stays.
    try:
        mb = float(raw)
    except ValueError:
        problems.append(f"SAGEMAKER_MAX_PAYLOAD_IN_MB={raw!r}: not a number")
        return {}
    if mb < 0:
        problems.append(f"SAGEMAKER_MAX_PAYLOAD_IN_MB={raw!r}: must be >= 0")
        return {}
    return {"max_payload_bytes": int(mb * MiB)} if mb > 0 else {}


# field -> (environment variable, parser). Unset or empty variables keep the dataclass default.
ENV_VARS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "model_dir": ("SM_MODEL_DIR", Path),
    "host": ("SERVE_HOST", str),
    "port": ("SAGEMAKER_BIND_TO_PORT", _int(1, 65535)),
    "quantization": ("SERVE_QUANTIZATION", _choice(QUANTIZATIONS)),
    "device": ("SERVE_DEVICE", _device),
    "max_payload_bytes": ("SERVE_MAX_PAYLOAD_BYTES", _int(1024)),
    "max_image_bytes": ("SERVE_MAX_IMAGE_BYTES", _int(1024)),
    "max_image_pixels": ("SERVE_MAX_IMAGE_PIXELS", _int(1)),
    "max_new_tokens": ("SERVE_MAX_NEW_TOKENS", _int(1)),
    "request_timeout_s": ("SERVE_REQUEST_TIMEOUT_S", _float(0)),
    "fetch_timeout_s": ("SERVE_FETCH_TIMEOUT_S", _float(0)),
    "fetch_max_redirects": ("SERVE_FETCH_MAX_REDIRECTS", _int(0, 10)),
    "fetch_allow_networks": ("SERVE_FETCH_ALLOW_NETWORKS", _networks),
    "s3_buckets": ("SERVE_S3_BUCKETS", _s3_buckets),
    "max_batch_size": ("SERVE_MAX_BATCH_SIZE", _int(1, 256)),
    "max_wait_ms": ("SERVE_MAX_WAIT_MS", _float(0, strict=False)),
    "max_queue": ("SERVE_MAX_QUEUE", _int(1)),
    "scheduler": ("SERVE_SCHEDULER", _choice(SCHEDULERS)),
    "prefill_tokens": ("SERVE_PREFILL_TOKENS", _int(1)),
    "max_total_tokens": ("SERVE_MAX_TOTAL_TOKENS", _int(0)),
    "max_instances": ("SERVE_MAX_INSTANCES", _int(1, 256)),
    "graceful_timeout_s": ("SERVE_GRACEFUL_TIMEOUT_S", _float(0, strict=False)),
    "torch_threads": ("SERVE_TORCH_THREADS", _int(0, 1024)),
    "prepare_threads": ("SERVE_PREPARE_THREADS", _int(0, 256)),
    "log_level": ("SERVE_LOG_LEVEL", _choice(LOG_LEVELS, upper=True)),
    "accel_mode": ("SERVE_ACCEL", _accel_mode),
    "accel_batch_buckets": ("SERVE_ACCEL_BATCH_BUCKETS", _buckets),
    "accel_cache_bucket": ("SERVE_ACCEL_CACHE_BUCKET", _int(1)),
    "accel_cache_gib": ("SERVE_ACCEL_CACHE_GIB", _float(0)),
}
ACCEL_FIELDS = tuple(name for name in ENV_VARS if name.startswith("accel_"))


def accel_config_of(values: Mapping[str, Any]) -> AccelConfig:
    """An AccelConfig from `accel_*` settings (ServeConfig field names); the ones missing keep their defaults."""
    return AccelConfig(**{name[len("accel_"):]: value for name, value in values.items()})
