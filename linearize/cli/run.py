"""``linearize run RECIPE [key=value ...]``: every stage of a recipe (``linearize.pipeline.run_recipe``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run a recipe: convert, distil, finetune, export, evaluate",
        description="Run every stage of RECIPE. Overrides are dotted keys, e.g. finetune.steps=40 run.output_dir=runs/x",
    )
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of recipe fields")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so `linearize --help` does not load accelerate.
    from linearize.pipeline import run_recipe
    from linearize.recipe import load_recipe

    run_recipe(load_recipe(args.recipe, args.overrides))
    return 0
