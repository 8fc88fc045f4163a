"""`llava-sm`: train, package, deploy, query and delete LLaVA on SageMaker from one command.

    llava-sm train   --config job.yaml [--dry-run] [--wait]
    llava-sm package --model-dir out/merged --s3-uri s3://bucket/llava/v1/
    llava-sm deploy  --config endpoint.yaml [--dry-run]
    llava-sm predict chart.png "What is the highest value?" [--url URL | --endpoint-name NAME]
    llava-sm delete  --endpoint-name NAME
    llava-sm adapter add|remove|list ...      (LoRA adapters as inference components; docs/adapters.md)
    llava-sm data synth data/charts [-n 1000] [--tables my.csv]      (synthetic chart-QA data)
    llava-sm eval    --data data/charts/validation/dataset.json (--model-dir DIR | --url URL | --endpoint-name NAME)

Adding a subcommand: write a module with `add_parser(subparsers)` that registers the command and sets
`func=run` (`run(args) -> int` exit code), and list it in COMMAND_MODULES. Modules are imported to build the parser,
so they must stay light at import time (torch/transformers only inside `run`): `llava-sm --help` and the AWS
commands never load them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = (
    "client.training",
    "client.packaging",
    "client.deploy",
    "client.predict_command",
    "client.delete",
    "client.data_command",
    "client.evaluate",
    "client.adapter_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-sm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from client.aws import AwsConfigError
    from client.options import OptionsError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `llava-sm train --dry-run | head`: the reader left, nothing is wrong
        # Point stdout at /dev/null so the interpreter's final flush does not fail again (Python docs, "SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OptionsError, AwsConfigError) as e:
        print(f"llava-sm {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # AWS API errors: the service's message is the useful part, not our traceback
        if type(e).__module__.startswith("botocore"):
            print(f"llava-sm {args.command}: AWS error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
