"""Helpers shared by the Triton kernels: launch configs and tiles, tile loads and stores, input checks, dtypes."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tokens per chunk: the tile along the sequence in every kernel.
CHUNK = 64
# Widest tile along the head dim d (BK), the feature dim F (BF) and the value dim D (BD), as in
# flash-linear-attention: a program holds at most a [64, 64] state tile or a [CHUNK, 64] row block,
# and sums over wider dims tile by tile. Whole [256, 128] blocks (Hedgehog at Llama-3-8B sizes)
# spilled up to 4.5 KB of registers a thread on sm_90 in every launch config.
MAX_TILE = 64
# Stand-in for -inf in running softmax maxima: keeps exp(m_old - m_new) finite (exp(0) = 1 when
# nothing was seen yet, and the accumulators it rescales are zero then).
NEG_BIG = tl.constexpr(-1e30)

# Triton's interpreter (CPU, tests) runs every config it is given, so it gets exactly one; so do
# GPU test runs with LINEARIZE_AUTOTUNE=0, which would otherwise compile every config of every shape.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = not INTERPRETER and os.environ.get("LINEARIZE_AUTOTUNE", "1") != "0"

# The kernel argument whose size each tile divides; ``fit_tiles`` reads it.
TILED_DIMS = {"BK": "K", "BF": "F", "BD": "D", "BN": "N"}

# Autotune candidates (tile, warps), from compiling every kernel with ptxas at d = D = 128,
# F = 256 (no GPU needed): on sm_90, 64-wide tiles spill registers with 4 warps (up to 1.3 KB a
# thread) but not with 8; on sm_80 they spill up to 0.5 KB even with 8. 32-wide tiles with 8 warps
# spill nowhere on sm_90 and at most 40 bytes on sm_80: the one config of a GPU without autotuning.
TILE_WARPS = ((32, 4), (32, 8), (MAX_TILE, 8))
FIXED_TILE_WARPS = (32, 8)


def launch_configs(*tiles: str) -> list[triton.Config]:
    """Autotune candidates: ``TILE_WARPS`` times pipeline stages, one tile size for the tiles named
    in ``tiles`` (keys of ``TILED_DIMS``), which ``fit_tiles`` then trims per dim. Without
    autotuning one config: ``FIXED_TILE_WARPS`` on a GPU; in the interpreter tiles of ``MAX_TILE``,
    the fewest interpreted operations (tiles wider than a dim are masked)."""
    if INTERPRETER:
        return [triton.Config(dict.fromkeys(tiles, MAX_TILE), num_warps=4, num_stages=1)]
    if not AUTOTUNE:
        size, warps = FIXED_TILE_WARPS
        return [triton.Config(dict.fromkeys(tiles, size), num_warps=warps, num_stages=1)]
    return [triton.Config(dict.fromkeys(tiles, size), num_warps=warps, num_stages=stages)
            for size, warps in TILE_WARPS for stages in (1, 2)]


def fit_tiles(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """``early_config_prune`` of the autotuner: each tile cut to its dim's power of two (a 64-wide
    tile of a 16-wide dim is 48 columns of masked loads), duplicates dropped."""
    args = {**named_args, **kwargs}
    fitted: dict[tuple, triton.Config] = {}
    for config in configs:
        tiles = {name: min(size, block(args[TILED_DIMS[name]])) for name, size in config.kwargs.items()}
        key = (tuple(tiles.items()), config.num_warps, config.num_stages)
        fitted.setdefault(key, triton.Config(tiles, num_warps=config.num_warps, num_stages=config.num_stages))
    return list(fitted.values())


FIT_TILES = {"early_config_prune": fit_tiles}


def block(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= ``minimum``, the smallest size ``tl.dot`` accepts)."""
    return max(triton.next_power_of_2(max(n, 1)), minimum)


def tile(n: int) -> int:
    """A tile for a dim of size ``n`` where no autotuner picks one (no ``tl.dot``, so any power of two)."""
    return min(block(n, 1), MAX_TILE)


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


def query_weights(query_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Weight of each query's loss in a mean over the queries of ``query_mask`` [B, T] (default all)
    and the heads of ``like`` [B, H, T, *]: [B, 1, T] fp32, counted as ``reference.transfer_losses_naive`` does."""
    batch, heads, length = like.shape[:3]
    if query_mask is None:
        return like.new_full((batch, 1, length), 1 / max(batch * heads * length, 1), dtype=torch.float32)
    mask = query_mask[:, None, :].float()
    return mask / (mask.sum() * heads).clamp_min(1)


@triton.jit
def part_masks(o_i, o_j, T, window, sinks):
    """Softmax-part and linear-part masks [BTq, BTk] of query positions ``o_i`` and key positions
    ``o_j``: key j <= i is softmax if j < sinks or j > i - window, else linear (``reference.part_masks``)."""
    causal = (o_j[None, :] <= o_i[:, None]) & (o_j[None, :] < T) & (o_i[:, None] < T)
    soft = causal & ((o_j[None, :] < sinks) | (o_j[None, :] > o_i[:, None] - window))
    return soft, causal & (~soft)


@triton.jit
def load_tile(ptr, i_mat, o_r, o_c, R, C):
    """Rows ``o_r`` [BR] and columns ``o_c`` [BC] of matrix number ``i_mat`` of a contiguous stack of
    [R, C] matrices (a program's [T, N] rows, or chunk state number i_mat), zero outside."""
    return tl.load(ptr + i_mat * R * C + o_r[:, None] * C + o_c[None, :],
                   mask=(o_r[:, None] < R) & (o_c[None, :] < C), other=0.0)


@triton.jit
def store_tile(ptr, value, i_mat, o_r, o_c, R, C):
    """Store ``value`` [BR, BC] into rows ``o_r``, columns ``o_c`` of matrix ``i_mat`` (in range only)."""
    tl.store(ptr + i_mat * R * C + o_r[:, None] * C + o_c[None, :], value.to(ptr.dtype.element_ty),
             mask=(o_r[:, None] < R) & (o_c[None, :] < C))


@triton.jit
def load_vector(ptr, i_mat, o_n, N, other: tl.constexpr):
    """Entries ``o_n`` of row ``i_mat`` of a contiguous [*, N] matrix, ``other`` outside."""
    return tl.load(ptr + i_mat * N + o_n, mask=o_n < N, other=other)


@triton.jit
def tile_dot(a, b, i_mat, o_i, o_j, T, N, BT: tl.constexpr, BN: tl.constexpr):
    """[BT, BT] fp32 sums over n of a[o_i, n] b[o_j, n], rows of two [T, N] matrices of program
    ``i_mat``, ``BN`` columns at a time (q.k scores, fq.fk feature products, do.v weight gradients).
    b is cast to a's dtype, so fp32 upstream gradients meet bf16 values in fp32."""
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for n0 in range(0, N, BN):
        o_n = n0 + tl.arange(0, BN)
        b_a = load_tile(a, i_mat, o_i, o_n, T, N)
        acc += tl.dot(b_a, tl.trans(load_tile(b, i_mat, o_j, o_n, T, N).to(b_a.dtype)))
    return acc
