"""`llava-sm data synth OUT_DIR`: synthetic chart-QA data (the generator of datagen/synth.py, same options).

    llava-sm data synth data/charts -n 2000                        # 336-672 px charts, every question type
    llava-sm data synth data/mine --tables my_tables.csv --variants 5   # your own tables in 5 styles each
    llava-sm data synth data/demo --preset demo                    # 96 px charts for the CPU demo

Needs matplotlib (the `train` extra). The generator module is pure Python at import, so registering the command
loads nothing heavy.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    from datagen import synth

    data = subparsers.add_parser("data", help="data tools: `data synth` draws synthetic chart-QA data",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    parser = actions.add_parser("synth", help="draw charts with question-answer pairs in the LLaVA format",
                                description=synth.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from client.local_commands import missing_extra
    from datagen import synth

    problem = missing_extra("train", ("matplotlib", "PIL", "tqdm"))  # what drawing needs, not torch
    if problem:
        print(f"llava-sm data synth: {problem}", file=sys.stderr)
        return 1

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return synth.run(args)
