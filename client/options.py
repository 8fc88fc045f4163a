"""Command options: one typed dataclass per command, filled from defaults < a YAML file < flags, validated up front.

Each option is a dataclass field with `metadata={"help": ...}`; `add_arguments` turns the fields into flags
(`instance_type` -> `--instance-type`; bool -> `--x/--no-x`; dict -> repeatable `--x KEY=VALUE`; list -> repeatable
`--x A[,B]`), and `resolve` merges them over the YAML file. A YAML file holds option names (snake_case) at the top
level and/or in a section per command (`train:`, `deploy:`, ...); a section wins over the top level, and sections of
other commands are ignored. Unknown keys and wrongly typed values are problems, and every problem found is reported
together in one `OptionsError` before any AWS request is made. The validators here are shared by the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

COMMAND_SECTIONS = ("train", "package", "deploy", "predict", "delete", "eval", "data", "adapter")

INSTANCE_TYPE = re.compile(r"^ml\.[a-z0-9][a-z0-9-]*\.[a-z0-9]+$")
ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(/.*)?$")
# SageMaker resource names (jobs, models, endpoint configs, endpoints): pattern and length from the API model.
RESOURCE_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
ENV_KEY = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
IMAGE_URI = re.compile(r"^\S+/\S+$")


class OptionsError(ValueError):
    """Every problem found in a command's options, reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid options:\n" + "\n".join(f"  - {p}" for p in self.problems))


def option(default: Any = None, help: str = "", *, required: bool = False, flag: str | None = None,
           split: bool = True) -> Any:
    """A dataclass field that is also a CLI flag and a YAML key. `split=False`: a list flag whose values are text
    (stop strings), taken verbatim instead of split on commas and stripped."""
    factory = {dict: dict, list: list}.get(type(default))
    meta = {"help": help, "required": required, "flag": flag, "split": split}
    if factory:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _kind(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is dict:
        return "map"
    if origin is list:
        return "list"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return {bool: "bool", int: "int", float: "float"}.get(base, "str")


def _fields(cls: type) -> list[tuple[dataclasses.Field, str]]:
    hints = typing.get_type_hints(cls)
    return [(f, _kind(hints[f.name])) for f in dataclasses.fields(cls)]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field; defaults stay None so `resolve` knows which flags were given."""
    parser.add_argument("--config", metavar="YAML", help="options file (snake_case keys; flags override it)")
    for f, kind in _fields(cls):
        if f.name in skip:
            continue
        default_text = "" if f.default in (None, dataclasses.MISSING) else f" (default: {f.default})"
        required_text = " (required)" if f.metadata.get("required") else ""
        kwargs: dict[str, Any] = {"dest": f.name, "default": None,
                                  "help": f.metadata.get("help", "") + required_text + default_text}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind == "map":
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif kind == "list":
            kwargs.update(action="append", metavar="A[,B]" if f.metadata.get("split", True) else "TEXT")
        else:
            kwargs["type"] = {"int": int, "float": float}.get(kind, str)
        parser.add_argument(flag_name(f), **kwargs)


def load_yaml(path: str | None, command: str) -> tuple[dict[str, Any], list[str]]:
    """The YAML options for `command` (top level, then its section) and the problems reading them."""
    if not path:
        return {}, []
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        return {}, [f"--config {path}: cannot read: {e.strerror or e}"]
    except yaml.YAMLError as e:
        return {}, [f"--config {path}: not valid YAML: {e}"]
    if not isinstance(data, dict):
        return {}, [f"--config {path}: expected a mapping of option names, got {type(data).__name__}"]
    merged = {k: v for k, v in data.items() if k not in COMMAND_SECTIONS}
    section = data.get(command) or {}
    if not isinstance(section, dict):
        return {}, [f"--config {path}: section {command!r} must be a mapping"]
    merged.update(section)
    return merged, []


def resolve(cls: type, args: argparse.Namespace, command: str) -> tuple[Any, dict[str, str]]:
    """Build `cls` from defaults < YAML < flags; return it with where each non-default value came from.

    Raises OptionsError with every problem: unreadable YAML, unknown keys, wrong types, then `cls.problems()`.
    """
    raw, problems = load_yaml(getattr(args, "config", None), command)
    fields = _fields(cls)
    known = {f.name for f, _ in fields}
    problems += [f"unknown option {key!r} in {args.config}" for key in raw if key not in known]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f, kind in fields:
        if f.name in raw:
            value, problem = _from_yaml(raw[f.name], kind, f.name)
            if problem:
                problems.append(problem)
                continue
            values[f.name], sources[f.name] = value, "yaml"
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            value, problem = _from_flag(flag_value, kind, flag_name(f), split=f.metadata.get("split", True))
            if problem:
                problems.append(problem)
                continue
            if kind == "map":  # flags add to (and override keys of) the YAML mapping
                value = {**values.get(f.name, {}), **value}
            values[f.name], sources[f.name] = value, "flag"
    for f, _ in fields:
        if f.metadata.get("required") and values.get(f.name) in (None, "", [], {}):
            problems.append(f"{flag_name(f)} (or `{f.name}:` in the YAML) is required")
    opts = cls(**values)  # fields with problems above keep their defaults, so every check below still runs
    problems += opts.problems()
    if problems:
        raise OptionsError(problems)
    return opts, sources


def _from_yaml(value: Any, kind: str, name: str) -> tuple[Any, str | None]:
    if value is None:
        return None, None
    if kind == "map":
        if not isinstance(value, dict):
            return None, f"{name}: expected a mapping, got {type(value).__name__}"
        # Non-string values are JSON-encoded: SageMaker passes strings and the training side JSON-decodes them.
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}, None
    if kind == "list":
        items = value if isinstance(value, list) else [value]
        return [str(v) for v in items], None
    if kind == "bool":
        return (value, None) if isinstance(value, bool) else (None, f"{name}: expected true/false, got {value!r}")
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (None, f"{name}: expected an integer, got {value!r}")
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value), None) if ok else (None, f"{name}: expected a number, got {value!r}")
    if isinstance(value, (dict, list)):
        return None, f"{name}: expected a string, got {type(value).__name__}"
    return str(value), None


def _from_flag(value: Any, kind: str, flag: str, *, split: bool = True) -> tuple[Any, str | None]:
    if kind == "map":
        out: dict[str, str] = {}
        for item in value:
            key, sep, val = item.partition("=")
            if not sep or not key:
                return None, f"{flag} {item!r}: expected KEY=VALUE"
            out[key] = val
        return out, None
    if kind == "list" and not split:
        return list(value), None
    if kind == "list":
        return [part.strip() for item in value for part in item.split(",") if part.strip()], None
    return value, None


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
    if not S3_URI.match(value) or len(value) > 1024:
        return [f"{name}: {value!r} is not an S3 URI (s3://bucket/prefix)"]
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
