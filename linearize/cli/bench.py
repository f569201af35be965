"""``linearize bench kernels``: attention kernels against softmax attention (and fla)."""

from __future__ import annotations

import argparse
from pathlib import Path

from linearize.cli.arguments import int_list


def register(bench_kinds) -> None:
    parser = bench_kinds.add_parser("kernels", help="attention kernels vs SDPA (and fla where installed)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_kernels"))
    parser.add_argument("--lengths", type=int_list, default=None, help="sequence lengths, e.g. 1024,2048")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linearize.kernels.benchmark import run_kernel_benchmark

    run_kernel_benchmark(args.out, lengths=args.lengths)
    return 0
