"""core.settings, the one dataclass -> flags / YAML / hyperparameters / environment helper: coercion of every
supported type, choices and ranges, precedence and unknown keys, both flag styles, the environment, and one error
listing every problem with its field and source. Standard library only: these tests import no torch."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from core import settings
from core.settings import ConfigError, Problem, setting


@dataclass
class Job:
    name: str = setting("job", "job name", env="JOB_NAME")
    steps: int = setting(10, "steps", ge=1, le=100, env="JOB_STEPS")
    lr: float = setting(1e-3, "learning rate", gt=0, env="JOB_LR")
    dropout: float = setting(0.1, "dropout", ge=0, lt=1)
    fast: bool = setting(False, "go fast", env="JOB_FAST")
    mode: Literal["a", "b"] = setting("a", "mode", env="JOB_MODE")
    level: str = setting("INFO", "log level", parse=str.upper, choices=("INFO", "DEBUG"), env="JOB_LEVEL")
    limit: int | None = setting(None, "optional limit", ge=1, aliases=("max_limit",))
    out: Path = setting(Path("/tmp/out"), "output dir", env="JOB_OUT")
    tags: dict[str, str] = setting({}, "KEY=VALUE tags", flag="--tag")
    kwargs: dict | None = setting(None, "a JSON object")
    ids: list[str] = setting([], "ids, comma-separated")
    stops: list[str] = setting([], "text, verbatim", split=False)
    sizes: tuple[int, ...] = setting((1, 2), "sizes", env="JOB_SIZES")
    role: str | None = setting(None, "role", required=True)


def spec(name: str) -> settings.Spec:
    return settings.specs(Job)[name]


@pytest.mark.parametrize("name, raw, value", [
    ("steps", "12", 12), ("steps", 12.0, 12), ("lr", "2e-4", 2e-4), ("lr", 3, 3.0),
    ("fast", "yes", True), ("fast", "Off", False), ("fast", True, True),
    ("limit", "none", None), ("limit", "", None), ("limit", None, None), ("limit", "5", 5),
    ("out", "/x", Path("/x")), ("level", " debug ", "DEBUG"), ("mode", "b", "b"),
    ("tags", ["a=1", "b=x=y"], {"a": "1", "b": "x=y"}), ("tags", {"n": 3, "s": "t"}, {"n": "3", "s": "t"}),
    ("tags", '{"a": "1"}', {"a": "1"}), ("kwargs", '{"p": 2.0}', {"p": 2.0}), ("kwargs", {"p": 1}, {"p": 1}),
    ("ids", ["a, b", "c"], ["a", "b", "c"]), ("ids", "a,b", ["a", "b"]), ("ids", ["x"], ["x"]),
    ("stops", ["\n", "a, b"], ["\n", "a, b"]), ("sizes", "4, 8", (4, 8)), ("sizes", [1, "2"], (1, 2)),
])
def test_coercion(name, raw, value):
    assert settings.coerce(spec(name), raw) == value


@pytest.mark.parametrize("name, raw, message", [
    ("steps", "ten", "expected an integer, got 'ten'"), ("steps", True, "expected an integer, got True"),
    ("steps", "1.5", "expected an integer, got '1.5'"), ("lr", "fast", "expected a number, got 'fast'"),
    ("lr", "inf", "expected a finite number, got 'inf'"), ("fast", "maybe", "expected true or false, got 'maybe'"),
    ("name", {"a": 1}, "expected a string, got dict"), ("name", None, "a value is required"),
    ("tags", ["novalue"], "expected KEY=VALUE, got 'novalue'"), ("tags", 3, "expected a mapping, got int"),
    ("kwargs", "{x: 1}", "not valid JSON"), ("kwargs", "[1]", "expected a JSON object"),
    ("ids", {"a": 1}, "expected a list, got dict"), ("sizes", "1,x", "expected an integer, got 'x'"),
])
def test_coercion_problems(name, raw, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        settings.coerce(spec(name), raw)


@pytest.mark.parametrize("name, value, message", [
    ("steps", 0, "must be between 1 and 100, got 0"), ("steps", 101, "must be between 1 and 100, got 101"),
    ("lr", 0.0, "must be > 0, got 0.0"), ("dropout", 1.0, "must be >= 0 and < 1, got 1.0"),
    ("mode", "c", "must be one of a, b, got 'c'"), ("level", "TRACE", "must be one of INFO, DEBUG, got 'TRACE'"),
    ("limit", 0, "must be >= 1, got 0"),
])
def test_choices_and_ranges(name, value, message):
    assert settings.check(spec(name), value) == message


def test_limit_none_and_values_inside_pass():
    assert all(settings.check(spec(n), v) is None for n, v in (("limit", None), ("steps", 100), ("dropout", 0.0)))


def test_merge_precedence_unknown_keys_and_every_problem():
    merged = settings.merge(Job, [
        ("config file job.yaml", {"steps": 20, "tags": {"a": "1", "b": "2"}, "lrr": 1, "max-limit": 3}),
        ("command line", {"steps": "30", "tags": ["b=3"], "dropout": "1.5", "fast": "perhaps", "mode": "c"}),
    ])
    assert merged.values["steps"] == 30 and merged.sources["steps"] == "command line"
    assert merged.values["tags"] == {"a": "1", "b": "3"}  # KEY=VALUE maps merge key by key, later sources win
    assert merged.values["limit"] == 3 and merged.sources["limit"] == "config file job.yaml"  # alias and dashes
    assert [str(p) for p in merged.problems] == [
        "lrr (from config file job.yaml): unknown setting; did you mean 'lr'?",
        "fast (from command line): expected true or false, got 'perhaps'",
        "dropout (from command line): must be >= 0 and < 1, got 1.5",
        "mode (from command line): must be one of a, b, got 'c'",
    ]
    assert merged.problems[0] == Problem("lrr", "config file job.yaml", "unknown setting; did you mean 'lr'?")


def test_a_value_overridden_by_a_later_source_is_not_a_problem():
    merged = settings.merge(Job, [("config file", {"steps": 0}), ("command line", {"steps": "5"})])
    assert merged.problems == [] and merged.values["steps"] == 5


def test_required_fields():
    assert [str(p) for p in settings.missing_required(Job, {"role": ""})] == [
        "role: required (give --role or `role:` in the --config file)"]
    assert settings.missing_required(Job, {"role": "arn"}) == []


def test_environment():
    values, problems = settings.from_env(Job, {"JOB_STEPS": " 7 ", "JOB_FAST": "1", "JOB_LEVEL": "debug",
                                               "JOB_SIZES": "8,16", "JOB_OUT": "/m", "JOB_NAME": "  ", "OTHER": "x"})
    assert values == {"steps": 7, "fast": True, "level": "DEBUG", "sizes": (8, 16), "out": Path("/m")}
    assert problems == []
    _, problems = settings.from_env(Job, {"JOB_STEPS": "0", "JOB_LR": "nan", "JOB_MODE": "z"})
    assert [str(p) for p in problems] == ["JOB_STEPS: must be between 1 and 100, got 0",
                                          "JOB_LR: expected a finite number, got 'nan'",
                                          "JOB_MODE: must be one of a, b, got 'z'"]
    assert settings.env_names(Job)["steps"] == "JOB_STEPS" and "dropout" not in settings.env_names(Job)


def test_kebab_flags_for_the_cli():
    parser = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(parser, Job, skip=("kwargs",))
    args = parser.parse_args(["--steps", "3", "--no-fast", "--tag", "a=1", "--tag", "b=2", "--ids", "x,y",
                              "--stops", " s", "--max-limit", "4"])
    flags = settings.given_flags(Job, args)
    assert flags == {"steps": "3", "fast": False, "tags": ["a=1", "b=2"], "ids": ["x,y"], "stops": [" s"],
                     "limit": "4"}
    merged = settings.merge(Job, [("command line", flags)])
    assert (merged.values["steps"], merged.values["stops"], merged.values["ids"]) == (3, [" s"], ["x", "y"])
    assert "--kwargs" not in parser.format_help() and "(default: 10)" in parser.format_help()


def test_snake_flags_take_an_optional_boolean_value():
    parser = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(parser, Job, style="snake")
    assert settings.given_flags(Job, parser.parse_args(["--fast"])) == {"fast": "true"}
    assert settings.given_flags(Job, parser.parse_args(["--fast", "False", "--max_limit", "2"])) == {
        "fast": "False", "limit": "2"}
    assert "(one of a, b)" in parser.format_help()


def test_one_error_lists_every_problem():
    error = ConfigError([Problem("steps", "command line", "must be >= 1, got 0"), "choose one of --a and --b",
                         Problem("", "hyperparameters", "--bits 4 needs --lora_enable True")], "options")
    assert str(error) == ("invalid options:\n  - steps (from command line): must be >= 1, got 0\n"
                          "  - choose one of --a and --b\n  - hyperparameters: --bits 4 needs --lora_enable True")
    assert error.problems[1] == "choose one of --a and --b" and error.details[0].field == "steps"
    assert isinstance(error, ValueError)


def test_read_yaml(tmp_path):
    problems: list[Problem] = []
    good = tmp_path / "good.yaml"
    good.write_text("steps: 3\n")
    assert settings.read_yaml(good, problems) == {"steps": 3}
    (tmp_path / "empty.yaml").write_text("")
    assert settings.read_yaml(tmp_path / "empty.yaml", problems) == {}
    (tmp_path / "list.yaml").write_text("- a\n")
    settings.read_yaml(tmp_path / "list.yaml", problems)
    settings.read_yaml(tmp_path / "absent.yaml", problems)
    assert "expected a mapping of names to values, got list" in str(problems[0]) and "cannot read" in str(problems[1])
