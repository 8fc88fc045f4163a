"""Command options: one typed dataclass per command, filled from defaults < a YAML file < flags, validated up front.

Each option is a core.settings field, `option(default, help, ...)`; `add_arguments` turns the fields into flags
(`instance_type` -> `--instance-type`; bool -> `--x/--no-x`; dict -> repeatable `--x KEY=VALUE`; list -> repeatable
`--x A[,B]`), and `resolve` merges them over the YAML file. A YAML file holds option names (snake_case) at the top
level and/or in a section per command (`submit:`, `deploy:`, ...); a section wins over the top level, and sections of
other commands are ignored. Unknown keys and wrongly typed values are problems, and every problem found is reported
together in one `ConfigError` before any AWS request is made. The validators here are shared by the commands.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from core import settings
from core.s3 import s3_uri_problem
from core.settings import ConfigError as ConfigError  # re-exported: `llava-sm` catches it from here
from core.settings import Problem

option = settings.setting  # an option is a core.settings field: option(default, help, *, flag=, required=, ...)
COMMAND_SECTIONS = ("submit", "package", "deploy", "predict", "delete", "eval", "data", "adapter")

INSTANCE_TYPE = re.compile(r"^ml\.[a-z0-9][a-z0-9-]*\.[a-z0-9]+$")
ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
# SageMaker resource names (jobs, models, endpoint configs, endpoints): pattern and length from the API model.
RESOURCE_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
ENV_KEY = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
IMAGE_URI = re.compile(r"^\S+/\S+$")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """`--config` and one flag per field (core.settings, `--kebab-case` style)."""
    parser.add_argument("--config", metavar="YAML", help="options file (snake_case keys; flags override it)")
    settings.add_arguments(parser, cls, style="kebab", skip=skip)


def load_yaml(path: str | None, command: str, problems: list[Problem]) -> dict[str, Any]:
    """The YAML options for `command`: the top level, then its section (sections of other commands are ignored)."""
    if not path:
        return {}
    data = settings.read_yaml(path, problems)
    if command == "submit" and isinstance(data.get("train"), dict):  # `train` is submit's data option, not a section
        problems.append(Problem("", "", f"--config {path}: the section of `llava-sm submit` is `submit:`, "
                                        "not `train:`"))
        return {}
    merged = {k: v for k, v in data.items() if k not in COMMAND_SECTIONS}
    section = data.get(command) or {}
    if not isinstance(section, dict):
        problems.append(Problem("", "", f"--config {path}: section {command!r} must be a mapping"))
        return {}
    return {**merged, **section}


def resolve(cls: type, args: argparse.Namespace, command: str) -> tuple[Any, dict[str, str]]:
    """Build `cls` from defaults < YAML < flags; return it with where each non-default value came from.

    Raises ConfigError with every problem: unreadable YAML, unknown keys, wrong types, then `cls.problems()`.
    """
    problems: list[Problem | str] = []
    config = getattr(args, "config", None)
    layers = [(f"config file {config}", load_yaml(config, command, problems)),
              ("command line", settings.given_flags(cls, args))]
    merged = settings.merge(cls, layers)
    problems += merged.problems + settings.missing_required(cls, merged.values)
    opts = cls(**merged.values)  # fields with problems above keep their defaults, so every check below still runs
    problems += opts.problems()
    if problems:
        raise ConfigError(problems, "options")
    return opts, merged.sources


# ---- validators shared by the commands: each returns a list of problems ----


def check_instance_type(name: str, value: str | None) -> list[str]:
    if value and not INSTANCE_TYPE.match(value):
        return [f"{name}: {value!r} is not a SageMaker instance type (like ml.g5.2xlarge)"]
    return []


def check_role(value: str | None) -> list[str]:
    if value and not ROLE_ARN.match(value):
        return [f"role: {value!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)"]
    return []


def check_s3(name: str, value: str | None, *, suffix: str | None = None) -> list[str]:
    if not value:
        return []
    problem = s3_uri_problem(value)
    if problem:
        return [f"{name}: {value!r} is not an S3 URI (s3://bucket/prefix): {problem}"]
    if suffix and not value.endswith(suffix):
        return [f"{name}: {value!r} must end with {suffix}"]
    return []


def check_image_uri(name: str, value: str | None) -> list[str]:
    if value and (not IMAGE_URI.match(value) or len(value) > 255):
        return [f"{name}: {value!r} is not a container image URI (<account>.dkr.ecr.<region>.amazonaws.com/repo:tag)"]
    return []


def check_name(name: str, value: str | None) -> list[str]:
    if value and not RESOURCE_NAME.match(value):
        return [f"{name}: {value!r} must be 1-63 letters, digits and single hyphens, starting with a letter or digit"]
    return []


def check_url(name: str, value: str | None) -> list[str]:
    if value and not value.startswith(("http://", "https://")):
        return [f"{name}: {value!r} must start with http:// or https://"]
    return []


def check_range(name: str, value: int | float | None, low: float, high: float | None = None) -> list[str]:
    if value is None:
        return []
    if value < low or (high is not None and value > high):
        limit = f">= {_num(low)}" if high is None else f"between {_num(low)} and {_num(high)}"
        return [f"{name}: {value} must be {limit}"]
    return []


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_env(name: str, env: dict[str, str], *, max_len: int, max_total: int | None = None) -> list[str]:
    """SageMaker's Environment limits: 100 entries, key pattern, per-key/value length, combined size."""
    problems = []
    if len(env) > 100:
        problems.append(f"{name}: {len(env)} variables; SageMaker allows at most 100")
    for key, value in env.items():
        if not ENV_KEY.match(key):
            problems.append(f"{name}: {key!r} is not a valid variable name ([a-zA-Z_][a-zA-Z0-9_]*)")
        if len(key) > max_len or len(value) > max_len:
            problems.append(f"{name}: {key} is longer than {max_len} characters (key or value)")
    total = sum(len(k) + len(v) for k, v in env.items())
    if max_total is not None and total > max_total:
        problems.append(f"{name}: keys and values total {total} characters; SageMaker allows at most {max_total}")
    return problems


def check_tags(tags: dict[str, str]) -> list[str]:
    problems = [f"tags: {len(tags)} tags; SageMaker allows at most 50"] if len(tags) > 50 else []
    for key, value in tags.items():
        if len(key) > 128 or len(value) > 256 or key.startswith("aws:"):
            problems.append(f"tags: {key!r} (keys <= 128 characters not starting with 'aws:', values <= 256)")
    return problems


def check_vpc(subnets: list[str], security_groups: list[str]) -> list[str]:
    if bool(subnets) != bool(security_groups):
        return ["subnets and security_group_ids go together: give both or neither"]
    problems = []
    if len(subnets) > 16:
        problems.append(f"subnets: {len(subnets)} given; SageMaker allows at most 16")
    if len(security_groups) > 5:
        problems.append(f"security_group_ids: {len(security_groups)} given; SageMaker allows at most 5")
    return problems


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def vpc_config(subnets: list[str], security_groups: list[str]) -> dict[str, Any] | None:
    return {"Subnets": subnets, "SecurityGroupIds": security_groups} if subnets else None


def describe_sources(opts: Any, sources: dict[str, str]) -> str:
    """`name=value (yaml|flag)` for every option that is not the default: the resolved config, logged once."""
    parts = [f"{name}={getattr(opts, name)!r} ({source})" for name, source in sorted(sources.items())]
    return ", ".join(parts) or "all defaults"
