"""SageMaker's training-container contract, seen from inside the job: the one place `/opt/ml` paths are computed.

Every path hangs off one base dir, `/opt/ml` unless `SM_BASE_DIR` says otherwise (tests point it at a tmp tree):

    <base>/input/config/hyperparameters.json   hyperparameters, every value a string
    <base>/input/config/resourceconfig.json    {"current_host", "hosts", "network_interface_name"}
    <base>/input/data/<channel>/                input channels (File or FastFile mode)
    <base>/checkpoints/                         synced with CheckpointConfig.S3Uri (managed spot resumes from it)
    <base>/model/                               tarred to model.tar.gz when the job ends
    <base>/output/failure                       its first 1024 characters become the job's FailureReason

Pure standard library: importable without torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE_DIR_ENV = "SM_BASE_DIR"
DEFAULT_BASE_DIR = "/opt/ml"
FAILURE_REASON_LIMIT = 1024


class SageMakerConfigError(ValueError):
    """A SageMaker config file is present but unreadable: the job was set up wrongly (a user error)."""


@dataclass(frozen=True)
class ResourceConfig:
    current_host: str
    hosts: list[str]
    network_interface_name: str | None = None

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def master_host(self) -> str:
        return self.hosts[0]


@dataclass(frozen=True)
class SageMakerPaths:
    base: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SageMakerPaths:
        env = os.environ if env is None else env
        return cls(Path(env.get(BASE_DIR_ENV) or DEFAULT_BASE_DIR))

    @property
    def config_dir(self) -> Path:
        return self.base / "input" / "config"

    @property
    def hyperparameters_file(self) -> Path:
        return self.config_dir / "hyperparameters.json"

    @property
    def resource_config_file(self) -> Path:
        return self.config_dir / "resourceconfig.json"

    @property
    def data_dir(self) -> Path:
        return self.base / "input" / "data"

    def channel(self, name: str) -> Path:
        return self.data_dir / name

    @property
    def checkpoints(self) -> Path:
        return self.base / "checkpoints"

    @property
    def model(self) -> Path:
        return self.base / "model"

    @property
    def failure_file(self) -> Path:
        return self.base / "output" / "failure"

    def in_training_job(self) -> bool:
        """True inside a SageMaker training container (it always writes these two files before starting us)."""
        return self.hyperparameters_file.is_file() or self.resource_config_file.is_file()

    def read_hyperparameters(self) -> dict[str, Any]:
        """hyperparameters.json with each string value JSON-decoded ("2e-4" -> 2e-4, "true" -> True); {} if absent.

        A value that is not valid JSON stays the string it was ("cosine", "/opt/ml/input/data/train").
        """
        raw = _read_json(self.hyperparameters_file)
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise SageMakerConfigError(f"{self.hyperparameters_file} must hold a JSON object")
        return decode_hyperparameters(raw)

    def read_resource_config(self) -> ResourceConfig | None:
        raw = _read_json(self.resource_config_file)
        if raw is None:
            return None
        try:
            hosts = sorted(str(h) for h in raw["hosts"])
            current = str(raw["current_host"])
            if current not in hosts:
                raise ValueError(f"current_host {current!r} is not among hosts {hosts}")
        except (KeyError, TypeError, ValueError) as e:
            raise SageMakerConfigError(f"{self.resource_config_file} is malformed: {e}") from e
        return ResourceConfig(current, hosts, raw.get("network_interface_name"))

    def clear_failure(self) -> None:
        """Remove a failure file left by an earlier run in the same tree (a local /opt/ml reused), so this run's
        first reason is the one written."""
        self.failure_file.unlink(missing_ok=True)

    def write_failure(self, reason: str) -> Path:
        """Write the FailureReason SageMaker shows (one paragraph, at most 1024 characters). The first reason
        written stays: when one rank fails, torchrun stops the others, and their "Stopped by SIGTERM" must not
        replace the cause."""
        text = " ".join(reason.split())
        if len(text) > FAILURE_REASON_LIMIT:
            text = text[: FAILURE_REASON_LIMIT - 3] + "..."
        self.failure_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.failure_file, "x") as f:
                f.write(text)
        except FileExistsError:
            pass
        return self.failure_file


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SageMakerConfigError(f"cannot read {path}: {e}") from e


def decode_hyperparameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Each string value JSON-decoded as the job reads hyperparameters.json; text that is not JSON stays text."""
    return {str(k): _decode(v) for k, v in raw.items()}


def _decode(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value
