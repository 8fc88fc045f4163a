"""One dataclass, four sources: command-line flags, a YAML file, SageMaker's hyperparameters.json, the environment.

    @dataclass
    class JobConfig:
        max_steps: int = setting(100, "optimizer steps", ge=1)
        mode: str = setting("auto", "auto, on or off", choices=("auto", "on", "off"), env="JOB_MODE")

    add_arguments(parser, JobConfig)             # --max-steps, --mode (style="snake": --max_steps, LLaVA's spelling)
    problems: list[Problem] = []
    merged = merge(JobConfig, [("config file job.yaml", read_yaml("job.yaml", problems)),
                               ("command line", given_flags(JobConfig, parser.parse_args()))])
    if problems + merged.problems:              # every problem, each naming its field and source
        raise ConfigError(problems + merged.problems)
    job = JobConfig(**merged.values)            # merged.sources: where each value came from
    values, env_problems = from_env(JobConfig, os.environ)   # the fields with env="..."

Field metadata (`setting`): help, choices, a range (ge/gt/le/lt), the environment variable, a parser for a special
type (called on the stripped string), a flag name and aliases, required, and whether list text splits on commas.
Values are coerced from strings (flags, environment, hyperparameters.json) or YAML/JSON scalars to the field's
type: bool, int, float, str, Path, list[str], tuple[T, ...], dict[str, str] (KEY=VALUE maps, merged across
sources), dict (a JSON object), X | None ("none"/"null"/"" give None) and Literal[...] (its values are the choices).
Unknown keys are problems that suggest the closest name. Standard library only; PyYAML is imported when a file is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

NONE_WORDS = ("none", "null", "")
TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One invalid setting: which (`field`: a field, flag or variable name; "" for the config as a whole), where
    it came from (`source`: "command line", "config file x.yaml", ...; "" when the name says it) and what is wrong."""

    field: str
    source: str
    message: str

    def __str__(self) -> str:
        where = f"{self.field} (from {self.source})" if self.field and self.source else self.field or self.source
        return f"{where}: {self.message}" if where else self.message


class ConfigError(ValueError):
    """Every problem of a configuration, reported at once. `.problems`: one line each; `.details`: the Problems."""

    def __init__(self, problems: Iterable[Problem | str], what: str = "configuration"):
        self.details = [p if isinstance(p, Problem) else Problem("", "", p) for p in problems]
        self.problems = [str(p) for p in self.details]
        super().__init__(f"invalid {what}:\n" + "\n".join(f"  - {p}" for p in self.problems))


def setting(default: Any = None, help: str = "", *, choices: Sequence[Any] | None = None,  # noqa: A002
            ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
            env: str | None = None, parse: Callable[[str], Any] | None = None, flag: str | None = None,
            aliases: Sequence[str] = (), required: bool = False, split: bool = True) -> Any:
    """A dataclass field with what the parsers need. `parse` turns the raw text of a special type into its value
    (raising ValueError with the reason); `split=False` keeps each list item verbatim (text such as stop strings)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "ge": ge, "gt": gt, "le": le,
            "lt": lt, "env": env, "parse": parse, "flag": flag, "aliases": tuple(aliases), "required": required,
            "split": split}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A field as the parsers see it: its name, type (`kind`, `item` for lists and tuples) and metadata."""

    name: str
    kind: str  # bool, int, float, str, path, list, tuple, map (dict[str, str]), json (any other dict)
    optional: bool
    item: Any
    choices: tuple[Any, ...] | None
    meta: Mapping[str, Any]
    default: Any

    def get(self, key: str, default: Any = None) -> Any:
        value = self.meta.get(key)
        return default if value is None else value


@functools.cache
def specs(cls: type) -> dict[str, Spec]:
    """The fields of dataclass `cls` by name."""
    hints = typing.get_type_hints(cls)
    return {f.name: _spec(f, hints[f.name]) for f in dataclasses.fields(cls)}


def _spec(f: dataclasses.Field, hint: Any) -> Spec:
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007 - built from a tuple
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    choices = f.metadata.get("choices")
    item = None
    if origin is typing.Literal:
        kind, choices = {bool: "bool", int: "int", float: "float"}.get(type(args[0]), "str"), tuple(args)
    elif hint is dict or origin is dict:
        kind = "map" if args == (str, str) else "json"
    elif origin in (list, tuple):
        kind, item = ("list" if origin is list else "tuple"), (args[0] if args else str)
    else:
        kind = {bool: "bool", int: "int", float: "float", Path: "path"}.get(hint, "str")
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    return Spec(f.name, kind, optional, item, choices, f.metadata, default)


# ---- coercion and checks ----


def coerce(spec: Spec, raw: Any) -> Any:
    """`raw` (a flag's or variable's text, a YAML/JSON value) as the field's type; ValueError says why not."""
    if isinstance(raw, str) and spec.get("parse") is not None:
        return spec.meta["parse"](raw.strip())
    if raw is None or (spec.optional and isinstance(raw, str) and raw.strip().lower() in NONE_WORDS):
        if spec.optional:
            return None
        raise ValueError("a value is required")
    return _COERCE[spec.kind](spec, raw)


def _bool(spec: Spec, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
    raise ValueError(f"expected true or false, got {raw!r}")


def _int(spec: Spec, raw: Any) -> int:
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if not isinstance(raw, bool) and isinstance(raw, (int, str)):
        try:
            return int(raw)
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {raw!r}")


def _float(spec: Spec, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError(f"expected a number, got {raw!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return value


def _str(spec: Spec, raw: Any) -> str:
    if isinstance(raw, (dict, list)):
        raise ValueError(f"expected a string, got {type(raw).__name__}")
    return str(raw)


def _path(spec: Spec, raw: Any) -> Path:
    return Path(_str(spec, raw))


def _items(spec: Spec, raw: Any) -> list[str]:
    if isinstance(raw, dict):
        raise ValueError(f"expected a list, got {type(raw).__name__}")
    items = [str(v) for v in (raw if isinstance(raw, (list, tuple)) else [raw])]
    if not spec.get("split", True):
        return items
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _list(spec: Spec, raw: Any) -> list[Any]:
    item = dataclasses.replace(spec, kind=_spec_kind(spec.item), optional=False, choices=None, meta={})
    return [coerce(item, v) for v in _items(spec, raw)]


def _tuple(spec: Spec, raw: Any) -> tuple[Any, ...]:
    return tuple(_list(spec, raw))


def _spec_kind(tp: Any) -> str:
    return {bool: "bool", int: "int", float: "float", Path: "path"}.get(tp, "str")


def _map(spec: Spec, raw: Any) -> dict[str, str]:
    """KEY=VALUE items (repeated flags), a mapping (YAML: non-string values JSON-encoded, as SageMaker passes
    strings and the training side decodes them) or a JSON object's text."""
    if isinstance(raw, str):
        raw = _json_object(raw)
    if isinstance(raw, Mapping):
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"expected a mapping, got {type(raw).__name__}")
    out: dict[str, str] = {}
    for item in raw:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _json(spec: Spec, raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        raw = _json_object(raw)
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ValueError(f"expected a JSON object like {{\"name\": value}}, got {raw!r}")
    return dict(raw)


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at character {e.pos})") from None


_COERCE: dict[str, Callable[[Spec, Any], Any]] = {
    "bool": _bool, "int": _int, "float": _float, "str": _str, "path": _path, "list": _list, "tuple": _tuple,
    "map": _map, "json": _json}


def check(spec: Spec, value: Any) -> str | None:
    """What is wrong with a coerced value against the field's choices and range, or None."""
    if value is None:
        return None
    if spec.choices is not None and value not in spec.choices:
        return f"must be one of {', '.join(str(c) for c in spec.choices)}, got {value!r}"
    bounds = {op: spec.meta.get(op) for op in ("ge", "gt", "le", "lt") if spec.meta.get(op) is not None}
    if bounds and isinstance(value, (int, float)) and not all(_OPS[op][1](value, b) for op, b in bounds.items()):
        return f"must be {range_text(bounds)}, got {value!r}"
    return None


_OPS: dict[str, tuple[str, Callable[[Any, Any], bool]]] = {
    "ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
    "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def range_text(bounds: Mapping[str, float]) -> str:
    """`between 1 and 8` (both inclusive), else the bounds joined: `>= 0 and < 1`."""
    if set(bounds) == {"ge", "le"}:
        return f"between {_num(bounds['ge'])} and {_num(bounds['le'])}"
    return " and ".join(f"{_OPS[op][0]} {_num(b)}" for op, b in bounds.items())


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# ---- sources ----


@dataclasses.dataclass
class Merged:
    values: dict[str, Any]  # field -> value, only the fields some source set
    sources: dict[str, str]  # field -> the source its value came from
    problems: list[Problem]


def merge(cls: type, layers: Iterable[tuple[str, Mapping[str, Any]]]) -> Merged:
    """Apply (source, mapping) layers in order, later ones winning (KEY=VALUE maps merge key by key). Keys may use
    '-' for '_' and a field's aliases. Unknown keys, values of the wrong type and values outside a field's choices
    or range are problems naming the field and the source of the value."""
    fields, alias = specs(cls), aliases(cls)
    merged = Merged({}, {}, [])
    for source, layer in layers:
        for key, raw in layer.items():
            name = alias.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
            if name not in fields:
                merged.problems.append(unknown(str(key), source, fields))
                continue
            try:
                value = coerce(fields[name], raw)
            except ValueError as e:
                merged.problems.append(Problem(name, source, str(e)))
                continue
            if fields[name].kind == "map" and isinstance(merged.values.get(name), dict) and value is not None:
                value = {**merged.values[name], **value}
            merged.values[name], merged.sources[name] = value, source
    for name, value in merged.values.items():
        problem = check(fields[name], value)
        if problem:
            merged.problems.append(Problem(name, merged.sources[name], problem))
    return merged


def unknown(key: str, source: str, known: Iterable[str]) -> Problem:
    """An unknown name, with the closest known one when there is a close one."""
    name, known = key.lstrip("-").replace("-", "_"), list(known)
    close = difflib.get_close_matches(name, known, n=1) or [k for k in known if len(name) > 3 and name in k]
    hint = f"; did you mean {close[0]!r}?" if len(close) == 1 else ""
    return Problem(key, source, f"unknown setting{hint}")


def aliases(cls: type) -> dict[str, str]:
    """alias -> field name, from the fields' `aliases` metadata."""
    return {a: name for name, spec in specs(cls).items() for a in spec.get("aliases", ())}


def missing_required(cls: type, values: Mapping[str, Any]) -> list[Problem]:
    """A problem for every `required` field without a value (None or empty)."""
    return [Problem(name, "", f"required (give {flag_name(spec)} or `{name}:` in the --config file)")
            for name, spec in specs(cls).items()
            if spec.get("required", False) and values.get(name) in (None, "", [], {})]


def from_env(cls: type, env: Mapping[str, str]) -> tuple[dict[str, Any], list[Problem]]:
    """The fields with an `env` variable that is set (and not blank) in `env`: (values, problems). A problem's field
    is the variable's name."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for name, spec in specs(cls).items():
        var = spec.get("env")
        raw = env.get(var) if var else None
        if raw is None or not raw.strip():
            continue
        try:
            value = coerce(spec, raw.strip())
        except ValueError as e:
            problems.append(Problem(var, "", str(e)))
            continue
        problem = check(spec, value)
        if problem:
            problems.append(Problem(var, "", problem))
        else:
            values[name] = value
    return values, problems


def env_names(cls: type) -> dict[str, str]:
    """field -> environment variable, for the fields that have one."""
    return {name: spec.meta["env"] for name, spec in specs(cls).items() if spec.get("env")}


def read_yaml(path: str | Path, problems: list[Problem]) -> dict[str, Any]:
    """A YAML file's top-level mapping ({} for an empty file); a file that cannot be read or is not a mapping adds
    a problem and gives {}."""
    import yaml

    source = f"--config {path}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        problems.append(Problem("", "", f"{source}: cannot read: {e.strerror or e}"))
        return {}
    except yaml.YAMLError as e:
        problems.append(Problem("", "", f"{source}: not valid YAML: {e}"))
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(Problem("", "", f"{source}: expected a mapping of names to values, got "
                                        f"{type(data).__name__}"))
        return {}
    return {str(k): v for k, v in data.items()}


# ---- command-line flags ----


def flag_name(spec: Spec, style: str = "kebab") -> str:
    """`--instance-type` (kebab, the llava-sm CLI) or `--lora_enable` (snake, LLaVA's own flags); or the field's."""
    return spec.get("flag") or "--" + (spec.name.replace("_", "-") if style == "kebab" else spec.name)


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, style: str = "kebab",
                  skip: Iterable[str] = ()) -> None:
    """One flag per field of `cls`; every default is None, so `given_flags` tells which flags were given.

    Values stay text: `merge` coerces and checks them with every other source, so all problems are reported
    together. Booleans: `--x/--no-x` (kebab) or `--x [BOOL]` (snake: `--lora_enable`, `--lora_enable False`).
    KEY=VALUE maps and lists (comma-separated unless `split=False`) take a repeatable flag; a JSON dict one text.
    """
    for name, spec in specs(cls).items():
        if name in skip:
            continue
        flags = [flag_name(spec, style)] + ["--" + (a.replace("_", "-") if style == "kebab" else a)
                                            for a in spec.get("aliases", ())]
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": _help(spec)}
        if spec.kind == "bool" and style == "kebab":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif spec.kind == "map":
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif spec.kind == "list":
            kwargs.update(action="append", metavar="A[,B]" if spec.get("split", True) else "TEXT")
        else:
            kwargs["metavar"] = {"json": "JSON", "tuple": "A[,B]"}.get(spec.kind, spec.kind.upper())
        parser.add_argument(*flags, **kwargs)


def _help(spec: Spec) -> str:
    text = spec.get("help", "")
    if spec.choices and not any(str(c) in text for c in spec.choices):
        text += f" (one of {', '.join(str(c) for c in spec.choices)})"
    if spec.get("required", False):
        text += " (required)"
    if spec.default not in (None, "", [], {}, ()):
        text += f" (default: {spec.default})"
    return text.replace("%", "%%")  # argparse formats help with %


def given_flags(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The flags of `cls` given on the command line: field -> raw value."""
    return {name: getattr(namespace, name) for name in specs(cls) if getattr(namespace, name, None) is not None}
