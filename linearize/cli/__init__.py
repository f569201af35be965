"""The ``linearize`` command line; one module of this package per subcommand.

    linearize convert MODEL --attention NAME --out DIR   convert, export, reload-check, generate
    linearize run RECIPE [key.sub=value ...]            the whole pipeline from a YAML recipe
    linearize eval EXPORT [--teacher REF] --tasks T     lm-eval tasks, perplexity, recall; report.md
    linearize bench kernels --out DIR                   kernel speed vs softmax attention
    linearize bench decode MODEL [--teacher REF]        prefill/decode speed, memory, cache size
    linearize bench sampling MODEL [--teacher REF]      coverage@k vs seconds on verifiable tasks

Modules: ``convert``, ``run``, ``eval`` (``eval``, ``bench decode`` and ``bench sampling``), ``bench`` (``bench kernels``)
and ``arguments`` (argparse types they share). These modules import the library; no library module
imports them.

A user mistake prints one ``error:`` line naming the problem and the fix and exits with status 2;
it never prints a traceback.
"""

from __future__ import annotations

import argparse
import sys

from linearize.cli import bench as bench_command
from linearize.cli import convert as convert_command
from linearize.cli import eval as eval_command
from linearize.cli import run as run_command
from linearize.errors import UserError

USER_ERROR_EXIT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linearize", description="Convert softmax-attention LMs to linear attention.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert_command.register(commands)
    eval_command.register(commands)
    run_command.register(commands)
    bench = commands.add_parser("bench", help="speed and memory benchmarks")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    bench_command.register(bench_kinds)
    eval_command.register_bench(bench_kinds)
    eval_command.register_bench_sampling(bench_kinds)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted: stages checkpoint as they go; run the same command again to resume", file=sys.stderr)
        return 130

