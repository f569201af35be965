"""Fused feature maps: per-head projection and map in one kernel, forward and backward, in Triton.

    hedgehog:  phi(x) = [softmax(x W + b), softmax(-(x W + b))]      (``reference.hedgehog_features``)
    based:     phi(x) = taylor(x P), padded with zeros to a multiple of 16 (``reference.based_features``)

Fusing saves writing and re-reading the projection x W (and, for based, the 16-dim projection before the
153-dim expansion). Each program maps ``ROWS`` tokens of one (batch, head); in the backward it also sums
its share of dW (and db) so that the weight gradient is one deterministic torch sum over programs, no atomics.

The Taylor map's output feature n is c_n + (u L)_n + (u R)_n (u C)_n for u = x P, with constant [f, N]
matrices: L picks x_a / f^(1/4), R and C pick the two factors of each upper-triangle product (R carries
its scale). Picking through ``tl.dot`` keeps everything in registers; it runs at full fp32 precision.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from linearize.kernels.triton.utils import (
    CHUNK,
    block,
    check_rank,
    check_shape,
    launch_configs,
    load_rows,
    same_dtype,
    store_rows,
)

ROWS = 1024  # tokens per program: bounds the number of partial weight gradients to sum


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _project(x, w, i_bh, i_h, o_t, T, K, E, BK: tl.constexpr, BE: tl.constexpr):
    """x [BT, BK] of rows ``o_t`` and u = x W[i_h] [BT, BE] in fp32."""
    o_k, o_e = tl.arange(0, BK), tl.arange(0, BE)
    b_x = load_rows(x, i_bh, o_t, T, K, BK)
    b_w = tl.load(w + i_h * K * E + o_k[:, None] * E + o_e[None, :],
                  mask=(o_k[:, None] < K) & (o_e[None, :] < E), other=0.0)
    return b_x, tl.dot(b_x.to(tl.float32), b_w.to(tl.float32), input_precision="ieee")


@triton.jit
def _hedgehog_softmaxes(u, m_e):
    """softmax(u) and softmax(-u) over the valid columns ``m_e`` (u [BT, BE] fp32)."""
    pos = tl.where(m_e[None, :], u, float("-inf"))
    neg = tl.where(m_e[None, :], -u, float("-inf"))
    p = tl.exp(pos - tl.max(pos, axis=1)[:, None])
    n = tl.exp(neg - tl.max(neg, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None], n / tl.sum(n, axis=1)[:, None]


@triton.autotune(configs=launch_configs(), key=["BK", "BE"])
@triton.jit
def _hedgehog_fwd_kernel(
    x, w, b, out, T, H, K, E,
    ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_b = tl.load(b + i_h * E + o_e, mask=m_e, other=0.0).to(tl.float32)
    for i_r in range(0, tl.minimum(tl.cdiv(ROWS, BT), tl.cdiv(T - i_t * ROWS, BT))):
        o_t = i_t * ROWS + i_r * BT + tl.arange(0, BT)
        _, b_u = _project(x, w, i_bh, i_h, o_t, T, K, E, BK, BE)
        b_p, b_n = _hedgehog_softmaxes(b_u + b_b[None, :], m_e)
        base = out + i_bh * T * 2 * E + o_t[:, None] * 2 * E + o_e[None, :]
        mask = (o_t[:, None] < T) & m_e[None, :]
        tl.store(base, b_p.to(out.dtype.element_ty), mask=mask)
        tl.store(base + E, b_n.to(out.dtype.element_ty), mask=mask)


@triton.autotune(configs=launch_configs(), key=["BK", "BE"])
@triton.jit
def _hedgehog_bwd_kernel(
    x, w, b, dout, dx, dw_part, db_part, T, H, K, E,
    ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    o_k, o_e = tl.arange(0, BK), tl.arange(0, BE)
    m_e = o_e < E
    b_b = tl.load(b + i_h * E + o_e, mask=m_e, other=0.0).to(tl.float32)
    b_w = tl.load(w + i_h * K * E + o_k[:, None] * E + o_e[None, :],
                  mask=(o_k[:, None] < K) & m_e[None, :], other=0.0).to(tl.float32)
    b_dw = tl.zeros([BK, BE], dtype=tl.float32)
    b_db = tl.zeros([BE], dtype=tl.float32)
    for i_r in range(0, tl.minimum(tl.cdiv(ROWS, BT), tl.cdiv(T - i_t * ROWS, BT))):
        o_t = i_t * ROWS + i_r * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_x, b_u = _project(x, w, i_bh, i_h, o_t, T, K, E, BK, BE)
        b_p, b_n = _hedgehog_softmaxes(b_u + b_b[None, :], m_e)
        base = dout + i_bh * T * 2 * E + o_t[:, None] * 2 * E + o_e[None, :]
        mask = m_t[:, None] & m_e[None, :]
        b_dp = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        b_dn = tl.load(base + E, mask=mask, other=0.0).to(tl.float32)
        # Softmax backward for both halves; the second one sees -u.
        b_du = b_p * (b_dp - tl.sum(b_p * b_dp, axis=1)[:, None]) - b_n * (b_dn - tl.sum(b_n * b_dn, axis=1)[:, None])
        store_rows(dx, tl.dot(b_du, tl.trans(b_w), input_precision="ieee"), i_bh, o_t, T, K, BK)
        b_dw += tl.dot(tl.trans(b_x.to(tl.float32)), b_du, input_precision="ieee")
        b_db += tl.sum(b_du, axis=0)
    i_p = i_bh * tl.num_programs(0) + i_t
    tl.store(dw_part + i_p * K * E + o_k[:, None] * E + o_e[None, :], b_dw, mask=(o_k[:, None] < K) & m_e[None, :])
    tl.store(db_part + i_p * E + o_e, b_db, mask=m_e)


@triton.jit
def _taylor_tables(c0, lt, rt, ct, E, N, BE: tl.constexpr, BN: tl.constexpr):
    """The constant map tables: c0 [BN], L, R, C [BE, BN] (see the module docstring)."""
    o_e, o_n = tl.arange(0, BE), tl.arange(0, BN)
    mask = (o_e[:, None] < E) & (o_n[None, :] < N)
    offs = o_e[:, None] * N + o_n[None, :]
    return (tl.load(c0 + o_n, mask=o_n < N, other=0.0), tl.load(lt + offs, mask=mask, other=0.0),
            tl.load(rt + offs, mask=mask, other=0.0), tl.load(ct + offs, mask=mask, other=0.0))


@triton.autotune(configs=launch_configs(), key=["BK", "BE", "BN"])
@triton.jit
def _based_fwd_kernel(
    x, w, c0, lt, rt, ct, out, T, H, K, E, N,
    ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    b_c0, b_l, b_r, b_c = _taylor_tables(c0, lt, rt, ct, E, N, BE, BN)
    for i_r in range(0, tl.minimum(tl.cdiv(ROWS, BT), tl.cdiv(T - i_t * ROWS, BT))):
        o_t = i_t * ROWS + i_r * BT + tl.arange(0, BT)
        _, b_u = _project(x, w, i_bh, i_h, o_t, T, K, E, BK, BE)
        b_phi = (b_c0[None, :] + tl.dot(b_u, b_l, input_precision="ieee")
                 + tl.dot(b_u, b_r, input_precision="ieee") * tl.dot(b_u, b_c, input_precision="ieee"))
        store_rows(out, b_phi, i_bh, o_t, T, N, BN)


@triton.autotune(configs=launch_configs(), key=["BK", "BE", "BN"])
@triton.jit
def _based_bwd_kernel(
    x, w, c0, lt, rt, ct, dout, dx, dw_part, T, H, K, E, N,
    ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    o_k, o_e = tl.arange(0, BK), tl.arange(0, BE)
    _, b_l, b_r, b_c = _taylor_tables(c0, lt, rt, ct, E, N, BE, BN)
    b_w = tl.load(w + i_h * K * E + o_k[:, None] * E + o_e[None, :],
                  mask=(o_k[:, None] < K) & (o_e[None, :] < E), other=0.0).to(tl.float32)
    b_dw = tl.zeros([BK, BE], dtype=tl.float32)
    for i_r in range(0, tl.minimum(tl.cdiv(ROWS, BT), tl.cdiv(T - i_t * ROWS, BT))):
        o_t = i_t * ROWS + i_r * BT + tl.arange(0, BT)
        b_x, b_u = _project(x, w, i_bh, i_h, o_t, T, K, E, BK, BE)
        b_do = load_rows(dout, i_bh, o_t, T, N, BN).to(tl.float32)
        b_ur = tl.dot(b_u, b_r, input_precision="ieee")
        b_uc = tl.dot(b_u, b_c, input_precision="ieee")
        b_du = (tl.dot(b_do, tl.trans(b_l), input_precision="ieee")
                + tl.dot(b_do * b_uc, tl.trans(b_r), input_precision="ieee")
                + tl.dot(b_do * b_ur, tl.trans(b_c), input_precision="ieee"))
        store_rows(dx, tl.dot(b_du, tl.trans(b_w), input_precision="ieee"), i_bh, o_t, T, K, BK)
        b_dw += tl.dot(tl.trans(b_x.to(tl.float32)), b_du, input_precision="ieee")
    i_p = i_bh * tl.num_programs(0) + i_t
    tl.store(dw_part + i_p * K * E + o_k[:, None] * E + o_e[None, :], b_dw,
             mask=(o_k[:, None] < K) & (o_e[None, :] < E))


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def taylor_dim(f: int, multiple: int = 16) -> int:
    """Size of the padded Taylor map of an f-dim input: 1 + f + f(f+1)/2 rounded up to ``multiple``."""
    return math.ceil((1 + f + f * (f + 1) // 2) / multiple) * multiple


@functools.lru_cache(maxsize=16)
def _taylor_tables_for(f: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """c0 [N], L, R, C [f, N] for ``taylor_features`` (upper triangle in ``torch.triu_indices`` order)."""
    n = taylor_dim(f)
    c0 = torch.zeros(n)
    lt, rt, ct = torch.zeros(f, n), torch.zeros(f, n), torch.zeros(f, n)
    c0[0] = 1.0
    lt[torch.arange(f), 1 + torch.arange(f)] = f**-0.25
    rows, cols = torch.triu_indices(f, f)
    quad = 1 + f + torch.arange(rows.numel())
    rt[rows, quad] = torch.where(rows == cols, 1.0 / math.sqrt(2 * f), 1.0 / math.sqrt(f))
    ct[cols, quad] = 1.0
    return tuple(t.to(device).contiguous() for t in (c0, lt, rt, ct))


def _grid(x: torch.Tensor) -> tuple[int, int]:
    batch, heads, length, _ = x.shape
    return triton.cdiv(length, ROWS), batch * heads


def _hedgehog_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    e = w.shape[-1]
    out = x.new_empty(batch, heads, length, 2 * e)
    _hedgehog_fwd_kernel[_grid(x)](x, w, b, out, length, heads, dim, e, ROWS=ROWS, BT=CHUNK, BK=block(dim), BE=block(e))
    return out


def _hedgehog_bwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    batch, heads, length, dim = x.shape
    e = w.shape[-1]
    grid = _grid(x)
    dx = torch.empty_like(x, dtype=torch.float32)
    dw_part = x.new_empty(batch, heads, grid[0], dim, e, dtype=torch.float32)
    db_part = x.new_empty(batch, heads, grid[0], e, dtype=torch.float32)
    _hedgehog_bwd_kernel[grid](x, w, b, dout, dx, dw_part, db_part, length, heads, dim, e,
                               ROWS=ROWS, BT=CHUNK, BK=block(dim), BE=block(e))
    return dx, dw_part.sum(dim=(0, 2)), db_part.sum(dim=(0, 2))


def _based_fwd(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    f = w.shape[-1]
    n = taylor_dim(f)
    out = x.new_empty(batch, heads, length, n)
    _based_fwd_kernel[_grid(x)](x, w, *_taylor_tables_for(f, x.device), out, length, heads, dim, f, n,
                                ROWS=ROWS, BT=CHUNK, BK=block(dim), BE=block(f), BN=block(n))
    return out


def _based_bwd(x: torch.Tensor, w: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, length, dim = x.shape
    f = w.shape[-1]
    n = taylor_dim(f)
    grid = _grid(x)
    dx = torch.empty_like(x, dtype=torch.float32)
    dw_part = x.new_empty(batch, heads, grid[0], dim, f, dtype=torch.float32)
    _based_bwd_kernel[grid](x, w, *_taylor_tables_for(f, x.device), dout, dx, dw_part, length, heads, dim, f, n,
                            ROWS=ROWS, BT=CHUNK, BK=block(dim), BE=block(f), BN=block(n))
    return dx, dw_part.sum(dim=(0, 2))


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class HedgehogFeatureMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w, b)
        return _hedgehog_fwd(x, w, b)

    @staticmethod
    def backward(ctx, dout):
        x, w, b = ctx.saved_tensors
        dx, dw, db = _hedgehog_bwd(x, w, b, dout.contiguous())
        return dx.to(x.dtype), dw.to(w.dtype), db.to(b.dtype)


class BasedFeatureMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _based_fwd(x, w)

    @staticmethod
    def backward(ctx, dout):
        x, w = ctx.saved_tensors
        dx, dw = _based_bwd(x, w, dout.contiguous())
        return dx.to(x.dtype), dw.to(w.dtype)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def hedgehog_feature_map(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Hedgehog map [softmax(x W + b), softmax(-(x W + b))], fused.

    Args:
        x: [B, H, T, d] queries or keys.
        weight: [H, d, e] per-head projection; bias: [H, e].
    Returns:
        [B, H, T, 2e] in the promoted dtype of x and weight (computed in fp32); gradients flow into x, weight and bias.
    """
    check_rank("x", x, 4, "[B, H, T, d]")
    heads, dim = x.shape[1], x.shape[-1]
    check_rank("weight", weight, 3, "[H, d, e]")
    check_shape("weight", weight, (heads, dim, weight.shape[-1]))
    check_shape("bias", bias, (heads, weight.shape[-1]))
    return HedgehogFeatureMap.apply(*same_dtype(x, weight, bias))


def based_feature_map(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """BASED map: per-head projection to f dims, then the 2nd-order Taylor map, zero-padded, fused.

    Args:
        x: [B, H, T, d] queries or keys.
        projection: [H, d, f] (f = 16 in BASED).
    Returns:
        [B, H, T, N] with N = ``taylor_dim(f)`` (160 for f = 16): the 1 + f + f(f+1)/2 features of
        ``reference.based_features`` followed by zeros, which change no dot product. Gradients flow
        into x and the projection.
    """
    check_rank("x", x, 4, "[B, H, T, d]")
    heads, dim = x.shape[1], x.shape[-1]
    check_rank("projection", projection, 3, "[H, d, f]")
    check_shape("projection", projection, (heads, dim, projection.shape[-1]))
    return BasedFeatureMap.apply(*same_dtype(x, projection))
