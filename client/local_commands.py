"""`llava-sm finetune | merge | serve | demo`: the jobs that run locally, each the project's own entry point.

    llava-sm finetune --model_name_or_path BASE --data_path data.json --image_folder images/ --output_dir out/
    llava-sm merge --adapter out/checkpoint-500 --output_dir merged/
    llava-sm serve --model-dir merged/ --port 8080
    llava-sm demo --quick

`finetune`, `merge` and `demo` take exactly the flags of `python -m train`, `python -m train.merge` and
`python -m demo`; their `--help` is those entry points' own. `serve` is `python -m serve`, configured by environment
variables (docs/serving.md); --model-dir, --port and --host set SM_MODEL_DIR, SAGEMAKER_BIND_TO_PORT and SERVE_HOST.
The entry points are imported only when a command runs, so registering these commands loads no torch, and a machine
without the `train` / `serve` extras gets a message naming the extra to install instead of a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

# Modules of each extra that the local commands cannot run without (looked up, not imported).
TRAIN_MODULES = ("torch", "transformers", "peft", "accelerate", "PIL", "matplotlib", "tqdm")
SERVE_MODULES = ("torch", "transformers", "fastapi", "uvicorn", "PIL")
HELP_FLAGS = ("-h", "--help")

# command: (entry point module with `main(argv) -> int`, the extra it needs and that extra's modules, one-line help)
PASS_THROUGH = {
    "finetune": ("train.__main__", "train", TRAIN_MODULES, "fine-tune here (the flags of `python -m train`)"),
    "merge": ("train.merge", "train", TRAIN_MODULES, "merge a LoRA checkpoint into a servable model dir"),
    "demo": ("demo.pipeline", "train,serve", TRAIN_MODULES + SERVE_MODULES, "the offline end-to-end demo"),
}
SERVE_DESCRIPTION = """Serve a model dir locally: the server of the serving image (`python -m serve`), with
SageMaker's GET /ping and POST /invocations.

    llava-sm serve --model-dir runs/model --port 8080 --host 127.0.0.1

Every other setting is an environment variable (SERVE_QUANTIZATION, SERVE_MAX_BATCH_SIZE, ...; docs/serving.md).
Ctrl-C or SIGTERM lets in-flight requests finish, then stops."""


def add_parser(subparsers: Any) -> None:
    for name, (module, extra, modules, help_text) in PASS_THROUGH.items():
        # Every argument, --help included, belongs to the entry point: "\0" as the only prefix makes argparse treat
        # them all as the REMAINDER positional, in order, instead of options of this subparser.
        parser = subparsers.add_parser(name, help=help_text, add_help=False, prefix_chars="\0",
                                       description=help_text)
        parser.add_argument("argv", nargs=argparse.REMAINDER)
        parser.set_defaults(func=functools.partial(run_entry_point, name, module, extra, modules))
    serve = subparsers.add_parser("serve", help="serve a model dir here (`python -m serve`)",
                                  description=SERVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--model-dir", help="the model dir to serve (sets SM_MODEL_DIR; default /opt/ml/model)")
    serve.add_argument("--port", type=int, help="port to listen on (sets SAGEMAKER_BIND_TO_PORT; default 8080)")
    serve.add_argument("--host", help="address to bind (sets SERVE_HOST; default 0.0.0.0, every interface)")
    serve.set_defaults(func=run_serve)


def missing_extra(extra: str, modules: tuple[str, ...]) -> str | None:
    """What to install when one of `modules` (from `extra`) is absent; None when all are there."""
    absent = sorted({m for m in modules if importlib.util.find_spec(m) is None})
    if not absent:
        return None
    extras = "extras" if "," in extra else "extra"
    return f"needs the {extra} {extras} (pip install 'llava-sagemaker[{extra}]'); missing: {', '.join(absent)}"


def run_entry_point(command: str, module: str, extra: str, modules: tuple[str, ...], args: argparse.Namespace) -> int:
    if not any(a in HELP_FLAGS for a in args.argv):  # --help works on the base install
        problem = missing_extra(extra, modules)
        if problem:
            print(f"llava-sm {command}: {problem}", file=sys.stderr)
            return 1
    return importlib.import_module(module).main(args.argv)


def run_serve(args: argparse.Namespace) -> int:
    if args.model_dir is not None and not Path(args.model_dir).is_dir():
        print(f"llava-sm serve: --model-dir {args.model_dir} is not a directory", file=sys.stderr)
        return 2
    problem = missing_extra("serve", SERVE_MODULES)
    if problem:
        print(f"llava-sm serve: {problem}", file=sys.stderr)
        return 1
    flags = {"SM_MODEL_DIR": args.model_dir, "SAGEMAKER_BIND_TO_PORT": args.port, "SERVE_HOST": args.host}
    os.environ.update({name: str(value) for name, value in flags.items() if value is not None})
    from serve.__main__ import main

    return main()
