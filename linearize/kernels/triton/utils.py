"""Helpers shared by the Triton kernels: launch configs, row loads and stores, input checks, dtypes."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tokens per chunk: the tile along the sequence in every kernel.
CHUNK = 64
# Stand-in for -inf in running softmax maxima: keeps exp(m_old - m_new) finite (exp(0) = 1 when
# nothing was seen yet, and the accumulators it rescales are zero then).
NEG_BIG = tl.constexpr(-1e30)

# Triton's interpreter (CPU, tests) runs every config it is given, so it gets exactly one; so do
# GPU test runs with LINEARIZE_AUTOTUNE=0, which would otherwise compile every config of every shape.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = not INTERPRETER and os.environ.get("LINEARIZE_AUTOTUNE", "1") != "0"


def launch_configs() -> list[triton.Config]:
    """Autotune candidates: warps and pipeline stages (block sizes are fixed by the math's layout)."""
    if not AUTOTUNE:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]


def block(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= ``minimum``, the smallest size ``tl.dot`` accepts)."""
    return max(triton.next_power_of_2(max(n, 1)), minimum)


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ValueError naming ``tensor`` when its shape is not ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(tensor.shape)}")


def check_rank(name: str, tensor: torch.Tensor, rank: int, layout: str) -> None:
    """Raise ValueError naming ``tensor`` when it does not have ``rank`` dims (``layout`` like '[B, H, T, F]')."""
    if tensor.dim() != rank:
        raise ValueError(f"{name} must be {layout}, got shape {list(tensor.shape)}")


def same_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` contiguous and in their promoted dtype: ``tl.dot`` needs equal operand types."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return tuple(t.to(dtype).contiguous() for t in tensors)


@triton.jit
def part_masks(o_i, o_j, T, window, sinks):
    """Softmax-part and linear-part masks [BTq, BTk] of query positions ``o_i`` and key positions
    ``o_j``: key j <= i is softmax if j < sinks or j > i - window, else linear (``reference.part_masks``)."""
    causal = (o_j[None, :] <= o_i[:, None]) & (o_j[None, :] < T) & (o_i[:, None] < T)
    soft = causal & ((o_j[None, :] < sinks) | (o_j[None, :] > o_i[:, None] - window))
    return soft, causal & (~soft)


@triton.jit
def load_rows(ptr, i_bh, o_t, T, N, BN: tl.constexpr):
    """Rows ``o_t`` [BT] of the [T, N] matrix of program (batch * head) ``i_bh`` as [BT, BN], zero-padded."""
    o_n = tl.arange(0, BN)
    return tl.load(ptr + i_bh * T * N + o_t[:, None] * N + o_n[None, :],
                   mask=(o_t[:, None] < T) & (o_n[None, :] < N), other=0.0)


@triton.jit
def store_rows(ptr, value, i_bh, o_t, T, N, BN: tl.constexpr):
    """Store ``value`` [BT, BN] into rows ``o_t`` of the [T, N] matrix of program ``i_bh`` (in range only)."""
    o_n = tl.arange(0, BN)
    tl.store(ptr + i_bh * T * N + o_t[:, None] * N + o_n[None, :], value.to(ptr.dtype.element_ty),
             mask=(o_t[:, None] < T) & (o_n[None, :] < N))
