"""Helpers shared by the Triton kernels: launch configs, input checks, dtype handling."""

from __future__ import annotations

import os

import torch
import triton

# Triton's interpreter (CPU, tests) runs every config it is given, so it gets exactly one.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_configs() -> list[triton.Config]:
    """Autotune candidates: warps and pipeline stages (block sizes are fixed by the math's layout)."""
    if INTERPRETER:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2, 3)]


def block(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= ``minimum``, the smallest size ``tl.dot`` accepts)."""
    return max(triton.next_power_of_2(n), minimum)


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ValueError naming ``tensor`` when its shape is not ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(tensor.shape)}")


def check_rank(name: str, tensor: torch.Tensor, rank: int, layout: str) -> None:
    """Raise ValueError naming ``tensor`` when it does not have ``rank`` dims (``layout`` like '[B, H, T, F]')."""
    if tensor.dim() != rank:
        raise ValueError(f"{name} must be {layout}, got shape {list(tensor.shape)}")
