"""`llava-sm`: the project's one command line. The commands that run here and those that call SageMaker, side by side.

OVERVIEW is what `llava-sm --help` shows. Each module of COMMAND_MODULES registers its command(s) with
`add_parser(subparsers)` and `set_defaults(func=run)` (`run(args) -> int`, the exit status); the modules are imported
to build the parser, so they import torch and transformers only inside `run` (tests/test_client_imports.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

OVERVIEW = """\
Fine-tune LLaVA-1.5 on your image+question data and serve it, locally or on Amazon SageMaker.

Here (the `train` and `serve` extras):
  data synth   draw a synthetic chart-QA data set in the LLaVA format
  finetune     fine-tune locally: QLoRA, LoRA or full (the flags of `python -m train`)
  merge        merge a LoRA checkpoint into a servable model dir
  serve        serve a model dir with SageMaker's /ping and /invocations (`python -m serve`)
  eval         score a model dir, a server or an endpoint on a validation set
  demo         the offline demo: synthetic charts, a tiny LLaVA, fine-tune, serve, evaluate

On SageMaker (AWS credentials; boto3 only):
  submit       submit a training job that runs the training image
  package      pack a merged model dir into model.tar.gz and upload it to S3
  deploy       create an endpoint for a packaged model
  predict      ask a question about an image (an endpoint, or a server with --url)
  delete       delete an endpoint, its config and its model
  adapter      add, remove or list LoRA adapters as inference components of an endpoint

Example, all locally:
  llava-sm data synth data/charts -n 200
  llava-sm finetune --model_name_or_path BASE_MODEL_DIR --data_path data/charts/train/dataset.json \\
      --image_folder data/charts/images --lora_enable True --output_dir runs/charts
  llava-sm serve --model-dir runs/charts --port 8080
  llava-sm predict data/charts/images/chart000000.png "What type of chart is this?" --url http://127.0.0.1:8080

`llava-sm COMMAND --help` lists a command's options (docs/client.md has them all).
"""

COMMAND_MODULES = (
    "client.data_command",
    "client.local_commands",
    "client.evaluate",
    "client.training",
    "client.packaging",
    "client.deploy",
    "client.predict_command",
    "client.delete",
    "client.adapter_command",
)
# Words a user may reach for that would mean two things: unlisted, and refused with both meanings named.
NOT_A_COMMAND = {
    "train": "ambiguous: fine-tune locally with `llava-sm finetune` (the flags of `python -m train`), or "
             "submit a SageMaker training job with `llava-sm submit`",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-sm", usage="llava-sm COMMAND [options]", description=OVERVIEW,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # OVERVIEW lists the commands, grouped; argparse's own flat list is left out.
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help=argparse.SUPPRESS,
                                       prog="llava-sm")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    for name, message in NOT_A_COMMAND.items():  # unlisted; any arguments (--help too) get the message
        refused = subparsers.add_parser(name, add_help=False, prefix_chars="\0")
        refused.add_argument("argv", nargs=argparse.REMAINDER)
        refused.set_defaults(func=lambda args, name=name, message=message: refuse(name, message))
    return parser


def refuse(name: str, message: str) -> int:
    print(f"llava-sm {name}: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from client.aws import AwsConfigError
    from client.options import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `llava-sm submit --dry-run | head`: the reader left, nothing is wrong
        # Point stdout at /dev/null so the interpreter's final flush does not fail again (Python docs, "SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ConfigError, AwsConfigError) as e:
        print(f"llava-sm {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # AWS API errors: the service's message is the useful part, not our traceback
        if type(e).__module__.startswith("botocore"):
            print(f"llava-sm {args.command}: AWS error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
