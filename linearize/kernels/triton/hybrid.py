"""Chunked window + linear hybrid attention, forward and backward, in Triton.

The math is ``linearize.kernels.reference.hybrid_attention_quadratic``: for query i, key j <= i is in
the softmax part if j < sinks or j > i - window, else in the linear part, and

    o_i = ((1-g) sum_soft e^(s_ij - m_i) v_j + g sum_lin (fq_i.fk_j) v_j + g fq_i S0)
          / ((1-g) sum_soft e^(s_ij - m_i)   + g sum_lin fq_i.fk_j       + g fq_i z0 + eps).

With window = sinks = 0 there is no softmax part and this is causal linear attention with its
normaliser (``chunk_linear_attention``); the kernels then never read q or k.

Layout of the computation (chunks of BT tokens, all programs of one kind run in parallel):
    * ``_states_fwd_kernel`` walks the chunks once and stores h[c] = S0 + sum fk_j v_j^T over
      sinks <= j < c*BT (and hz[c], the same for z), plus the final state the reference keeps
      (keys sinks <= j <= T - window, the others stay in the softmax buffer). Keys past T - window
      are left out of every h[c] as well: no query reads a state that would contain them.
    * ``_hybrid_fwd_kernel`` gives each query chunk c the state h[max(c - DELTA, 0)] of every key that is
      linear for all its queries (DELTA = ceil((window - 1) / BT) chunks back), then visits the sink
      chunks and the band of chunks [c - DELTA, c] key block by key block with exact masks. Softmax
      keys use an online maximum; linear keys are never rescaled, so numerator and denominator are
      kept in two accumulators and mixed by gamma at the end.
    * The backward mirrors this: ``_hybrid_bwd_dq_kernel`` (queries: dq, dfq, per-query dgamma),
      ``_states_bwd_kernel`` (the state gradients dh[c] in reverse, and dS0, dz0) and
      ``_hybrid_bwd_dkv_kernel`` (keys: dk, dfk, dv).
All accumulation is fp32; the output is fp32 like the reference. On a GPU, fp32 inputs go through
tensor-core dots in tf32 (as in fla); bf16/fp16 inputs are the fast path.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from linearize.kernels.reference import EPS
from linearize.kernels.triton.utils import (
    CHUNK,
    NEG_BIG,
    block,
    check_rank,
    check_shape,
    launch_configs,
    load_rows,
    part_masks,
    same_dtype,
    store_rows,
)



# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_state(h, hz, i_bh, i_c, NT, F, D, BF: tl.constexpr, BD: tl.constexpr):
    """Chunk state number ``i_c`` of program ``i_bh``: h [BF, BD] and hz [BF] (fp32)."""
    o_f, o_d = tl.arange(0, BF), tl.arange(0, BD)
    b_h = tl.load(h + (i_bh * NT + i_c) * F * D + o_f[:, None] * D + o_d[None, :],
                  mask=(o_f[:, None] < F) & (o_d[None, :] < D), other=0.0)
    b_hz = tl.load(hz + (i_bh * NT + i_c) * F + o_f, mask=o_f < F, other=0.0)
    return b_h, b_hz


@triton.jit
def _softmax_step(b_q, b_k, b_v, soft, scaling, b_m, b_num, b_den):
    """Online softmax over one key block: new running max, numerator [BT, BD] and denominator [BT]."""
    b_s = tl.where(soft, tl.dot(b_q, tl.trans(b_k)) * scaling, NEG_BIG)
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_scale = tl.exp(b_m - b_m_new)
    b_p = tl.where(soft, tl.exp(b_s - b_m_new[:, None]), 0.0)
    b_num = b_num * b_scale[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    b_den = b_den * b_scale + tl.sum(b_p, axis=1)
    return b_m_new, b_num, b_den


@triton.jit
def _softmax_weights(b_q, b_k, b_m, soft, scaling):
    """e^(s - m) [BTq, BTk] on the softmax part, 0 elsewhere, with the forward's maximum m [BTq]."""
    return tl.where(soft, tl.exp(tl.dot(b_q, tl.trans(b_k)) * scaling - b_m[:, None]), 0.0)


@triton.jit
def _query_grads(do, den, delta, i_bh, o_i, T, D, BD: tl.constexpr):
    """d loss / d numerator [BT, BD] and d loss / d denominator [BT] of queries ``o_i``."""
    m_i = o_i < T
    b_den = tl.load(den + i_bh * T + o_i, mask=m_i, other=1.0)
    b_dn = load_rows(do, i_bh, o_i, T, D, BD).to(tl.float32) / b_den[:, None]
    b_dd = -tl.load(delta + i_bh * T + o_i, mask=m_i, other=0.0) / b_den
    return b_dn, b_dd


@triton.autotune(configs=launch_configs(), key=["BF", "BD", "BT"])
@triton.jit
def _states_fwd_kernel(
    fk, v, s0, z0, h, hz, s_out, z_out,
    T, F, D, NT, sinks, fold_end,
    HAS_INIT: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_d, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_f = tl.arange(0, BF)
    o_d = i_d * BD + tl.arange(0, BD)
    p_fd = o_f[:, None] * D + o_d[None, :]  # one [F, D] state, this program's D tile
    m_fd = (o_f[:, None] < F) & (o_d[None, :] < D)
    b_s = tl.zeros([BF, BD], dtype=tl.float32)
    b_z = tl.zeros([BF], dtype=tl.float32)
    if HAS_INIT:
        b_s += tl.load(s0 + i_bh * F * D + p_fd, mask=m_fd, other=0.0)
        b_z += tl.load(z0 + i_bh * F + o_f, mask=o_f < F, other=0.0)
    for c in range(NT):
        tl.store(h + (i_bh * NT + c) * F * D + p_fd, b_s, mask=m_fd)
        if i_d == 0:
            tl.store(hz + (i_bh * NT + c) * F + o_f, b_z, mask=o_f < F)
        o_t = c * BT + tl.arange(0, BT)
        # Only keys that ever leave the softmax part enter the state.
        fold = (o_t >= sinks) & (o_t < fold_end)
        b_fk = tl.where(fold[:, None], load_rows(fk, i_bh, o_t, T, F, BF), 0.0).to(fk.dtype.element_ty)
        b_v = tl.load(v + i_bh * T * D + o_t[:, None] * D + o_d[None, :],
                      mask=(o_t[:, None] < T) & (o_d[None, :] < D), other=0.0)
        b_s += tl.dot(tl.trans(b_fk), b_v)
        b_z += tl.sum(b_fk.to(tl.float32), axis=0)
    tl.store(s_out + i_bh * F * D + p_fd, b_s, mask=m_fd)
    if i_d == 0:
        tl.store(z_out + i_bh * F + o_f, b_z, mask=o_f < F)


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BD", "BT", "HAS_SOFTMAX"])
@triton.jit
def _hybrid_fwd_kernel(
    q, k, v, fq, fk, gamma, h, hz, o, den, m,
    T, H, K, F, D, NT, window, sinks, DELTA, scaling, eps,
    HAS_SOFTMAX: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_i = i_c * BT + tl.arange(0, BT)
    b_fq = load_rows(fq, i_bh, o_i, T, F, BF)

    # Keys before chunk i_b are linear for every query here: read them from the state.
    i_b = tl.maximum(i_c - DELTA, 0)
    b_h, b_hz = _load_state(h, hz, i_bh, i_b, NT, F, D, BF, BD)
    b_num_lin = tl.dot(b_fq.to(tl.float32), b_h)
    b_den_lin = tl.sum(b_fq.to(tl.float32) * b_hz[None, :], axis=1)

    b_num_soft = tl.zeros([BT, BD], dtype=tl.float32)
    b_den_soft = tl.zeros([BT], dtype=tl.float32)
    b_m = tl.full([BT], NEG_BIG, dtype=tl.float32)
    if HAS_SOFTMAX:
        b_q = load_rows(q, i_bh, o_i, T, K, BK)
        # Sink chunks before the band: only their sink keys are visited here (the rest are in h).
        for i_j in range(0, tl.minimum(tl.cdiv(sinks, BT), i_b)):
            o_j = i_j * BT + tl.arange(0, BT)
            soft = (o_j[None, :] < sinks) & (o_i[:, None] < T)
            b_m, b_num_soft, b_den_soft = _softmax_step(
                b_q, load_rows(k, i_bh, o_j, T, K, BK), load_rows(v, i_bh, o_j, T, D, BD), soft, scaling,
                b_m, b_num_soft, b_den_soft)

    for i_j in range(i_b, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        b_v = load_rows(v, i_bh, o_j, T, D, BD)
        soft, lin = part_masks(o_i, o_j, T, window, sinks)
        if HAS_SOFTMAX:
            b_m, b_num_soft, b_den_soft = _softmax_step(
                b_q, load_rows(k, i_bh, o_j, T, K, BK), b_v, soft, scaling, b_m, b_num_soft, b_den_soft)
        b_a = tl.where(lin, tl.dot(b_fq, tl.trans(load_rows(fk, i_bh, o_j, T, F, BF))), 0.0)
        b_num_lin += tl.dot(b_a.to(b_v.dtype), b_v)
        b_den_lin += tl.sum(b_a, axis=1)

    b_den = (1 - g) * b_den_soft + g * b_den_lin + eps
    store_rows(o, ((1 - g) * b_num_soft + g * b_num_lin) / b_den[:, None], i_bh, o_i, T, D, BD)
    tl.store(den + i_bh * T + o_i, b_den, mask=o_i < T)
    # No softmax key: the maximum is 0 by definition (and unused).
    tl.store(m + i_bh * T + o_i, tl.where(b_m == NEG_BIG, 0.0, b_m), mask=o_i < T)


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BD", "BT", "HAS_SOFTMAX"])
@triton.jit
def _hybrid_bwd_dq_kernel(
    q, k, v, fq, fk, gamma, h, hz, do, den, m, delta, dq, dfq, dg,
    T, H, K, F, D, NT, window, sinks, DELTA, scaling,
    HAS_SOFTMAX: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_i = i_c * BT + tl.arange(0, BT)
    b_fq = load_rows(fq, i_bh, o_i, T, F, BF)
    b_m = tl.load(m + i_bh * T + o_i, mask=o_i < T, other=0.0)
    b_dn, b_dd = _query_grads(do, den, delta, i_bh, o_i, T, D, BD)

    i_b = tl.maximum(i_c - DELTA, 0)
    b_h, b_hz = _load_state(h, hz, i_bh, i_b, NT, F, D, BF, BD)
    b_dfq = tl.dot(b_dn, tl.trans(b_h)) + b_dd[:, None] * b_hz[None, :]
    # dgamma: linear weights enter as +g w, softmax weights as (1-g) w.
    b_dg = tl.sum(b_fq.to(tl.float32) * b_dfq, axis=1)
    b_dfq = g * b_dfq

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    if HAS_SOFTMAX:
        b_q = load_rows(q, i_bh, o_i, T, K, BK)
        for i_j in range(0, tl.minimum(tl.cdiv(sinks, BT), i_b)):
            o_j = i_j * BT + tl.arange(0, BT)
            b_k = load_rows(k, i_bh, o_j, T, K, BK)
            b_dw = tl.dot(b_dn, tl.trans(load_rows(v, i_bh, o_j, T, D, BD).to(tl.float32))) + b_dd[:, None]
            b_p = _softmax_weights(b_q, b_k, b_m, (o_j[None, :] < sinks) & (o_i[:, None] < T), scaling)
            b_dq += tl.dot(((1 - g) * b_p * b_dw).to(b_k.dtype), b_k)
            b_dg -= tl.sum(b_p * b_dw, axis=1)

    for i_j in range(i_b, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        b_fk = load_rows(fk, i_bh, o_j, T, F, BF)
        soft, lin = part_masks(o_i, o_j, T, window, sinks)
        # d loss / d weight of every (query, key) pair: the weight scales v_j in the numerator and 1 in
        # the denominator.
        b_dw = tl.dot(b_dn, tl.trans(load_rows(v, i_bh, o_j, T, D, BD).to(tl.float32))) + b_dd[:, None]
        if HAS_SOFTMAX:
            b_k = load_rows(k, i_bh, o_j, T, K, BK)
            b_p = _softmax_weights(b_q, b_k, b_m, soft, scaling)
            b_dq += tl.dot(((1 - g) * b_p * b_dw).to(b_k.dtype), b_k)
            b_dg -= tl.sum(b_p * b_dw, axis=1)
        b_a = tl.where(lin, tl.dot(b_fq, tl.trans(b_fk)), 0.0)
        b_dfq += tl.dot((g * tl.where(lin, b_dw, 0.0)).to(b_fk.dtype), b_fk)
        b_dg += tl.sum(b_a * b_dw, axis=1)

    store_rows(dq, b_dq * scaling, i_bh, o_i, T, K, BK)
    store_rows(dfq, b_dfq, i_bh, o_i, T, F, BF)
    tl.store(dg + i_bh * T + o_i, b_dg, mask=o_i < T)


@triton.autotune(configs=launch_configs(), key=["BF", "BD", "BT"])
@triton.jit
def _states_bwd_kernel(
    fq, gamma, do, den, delta, ds_final, dz_final, dh, dhz, ds0, dz0,
    T, H, F, D, NT, DELTA,
    HAS_FINAL_GRAD: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_d, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_f = tl.arange(0, BF)
    o_d = i_d * BD + tl.arange(0, BD)
    p_fd = o_f[:, None] * D + o_d[None, :]  # one [F, D] state, this program's D tile
    m_fd = (o_f[:, None] < F) & (o_d[None, :] < D)
    b_dh = tl.zeros([BF, BD], dtype=tl.float32)
    b_dhz = tl.zeros([BF], dtype=tl.float32)
    if HAS_FINAL_GRAD:
        b_dh += tl.load(ds_final + i_bh * F * D + p_fd, mask=m_fd, other=0.0)
        b_dhz += tl.load(dz_final + i_bh * F + o_f, mask=o_f < F, other=0.0)
    for i_r in range(NT):
        c = NT - 1 - i_r
        # Keys of chunk c are in every state h[c'] with c' > c (and in the final state).
        tl.store(dh + (i_bh * NT + c) * F * D + p_fd, b_dh, mask=m_fd)
        if i_d == 0:
            tl.store(dhz + (i_bh * NT + c) * F + o_f, b_dhz, mask=o_f < F)
        # Query chunks that read h[c]: c + DELTA, and for c = 0 also every earlier one.
        for i_q in range(tl.where(c > 0, c + DELTA, 0), tl.minimum(c + DELTA + 1, NT)):
            o_i = i_q * BT + tl.arange(0, BT)
            m_i = o_i < T
            b_fq = load_rows(fq, i_bh, o_i, T, F, BF).to(tl.float32)
            b_den = tl.load(den + i_bh * T + o_i, mask=m_i, other=1.0)
            b_do = tl.load(do + i_bh * T * D + o_i[:, None] * D + o_d[None, :],
                           mask=m_i[:, None] & (o_d[None, :] < D), other=0.0).to(tl.float32)
            b_dd = -tl.load(delta + i_bh * T + o_i, mask=m_i, other=0.0) / b_den
            b_dh += g * tl.dot(tl.trans(b_fq), b_do / b_den[:, None])
            b_dhz += g * tl.sum(b_fq * b_dd[:, None], axis=0)
    tl.store(ds0 + i_bh * F * D + p_fd, b_dh, mask=m_fd)
    if i_d == 0:
        tl.store(dz0 + i_bh * F + o_f, b_dhz, mask=o_f < F)


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BD", "BT", "HAS_SOFTMAX"])
@triton.jit
def _hybrid_bwd_dkv_kernel(
    q, k, v, fq, fk, gamma, dh, dhz, do, den, m, delta, dk, dfk, dv,
    T, H, K, F, D, NT, window, sinks, fold_end, DELTA, scaling,
    HAS_SOFTMAX: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_j = i_c * BT + tl.arange(0, BT)
    b_fk = load_rows(fk, i_bh, o_j, T, F, BF)
    b_v = load_rows(v, i_bh, o_j, T, D, BD)

    # Through the states: the same fold mask as the forward's state kernel.
    fold = (o_j >= sinks) & (o_j < fold_end)
    b_dh, b_dhz = _load_state(dh, dhz, i_bh, i_c, NT, F, D, BF, BD)
    b_dfk = tl.where(fold[:, None], tl.dot(b_v.to(tl.float32), tl.trans(b_dh)) + b_dhz[None, :], 0.0)
    b_dv = tl.where(fold[:, None], tl.dot(b_fk.to(tl.float32), b_dh), 0.0)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    if HAS_SOFTMAX:
        b_k = load_rows(k, i_bh, o_j, T, K, BK)

    # Query chunks whose band contains this key chunk.
    for i_q in range(i_c, tl.minimum(i_c + DELTA + 1, NT)):
        o_i = i_q * BT + tl.arange(0, BT)
        b_fq = load_rows(fq, i_bh, o_i, T, F, BF)
        b_dn, b_dd = _query_grads(do, den, delta, i_bh, o_i, T, D, BD)
        soft, lin = part_masks(o_i, o_j, T, window, sinks)
        b_dw = tl.dot(b_dn, tl.trans(b_v.to(tl.float32))) + b_dd[:, None]
        if HAS_SOFTMAX:
            b_q = load_rows(q, i_bh, o_i, T, K, BK)
            b_mi = tl.load(m + i_bh * T + o_i, mask=o_i < T, other=0.0)
            b_w = (1 - g) * _softmax_weights(b_q, b_k, b_mi, soft, scaling)
            b_dk += tl.dot(tl.trans(b_w * b_dw).to(b_q.dtype), b_q)
            b_dv += tl.dot(tl.trans(b_w), b_dn)
        b_a = tl.where(lin, g * tl.dot(b_fq, tl.trans(b_fk)), 0.0)
        b_dv += tl.dot(tl.trans(b_a), b_dn)
        b_dfk += tl.dot(tl.trans(g * tl.where(lin, b_dw, 0.0)).to(b_fq.dtype), b_fq)

    if HAS_SOFTMAX:
        # Sink keys stay in the softmax part of every later query.
        if i_c * BT < sinks:
            for i_q in range(i_c + DELTA + 1, NT):
                o_i = i_q * BT + tl.arange(0, BT)
                b_q = load_rows(q, i_bh, o_i, T, K, BK)
                b_mi = tl.load(m + i_bh * T + o_i, mask=o_i < T, other=0.0)
                b_dn, b_dd = _query_grads(do, den, delta, i_bh, o_i, T, D, BD)
                b_dw = tl.dot(b_dn, tl.trans(b_v.to(tl.float32))) + b_dd[:, None]
                soft = (o_i[:, None] < T) & (o_j[None, :] < sinks)
                b_w = (1 - g) * _softmax_weights(b_q, b_k, b_mi, soft, scaling)
                b_dk += tl.dot(tl.trans(b_w * b_dw).to(b_q.dtype), b_q)
                b_dv += tl.dot(tl.trans(b_w), b_dn)

    store_rows(dk, b_dk * scaling, i_bh, o_j, T, K, BK)
    store_rows(dfk, b_dfk, i_bh, o_j, T, F, BF)
    store_rows(dv, b_dv, i_bh, o_j, T, D, BD)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _band(window: int) -> int:
    """DELTA: how many chunks back the band of a query chunk starts (keys before it are all linear)."""
    return math.ceil(max(window - 1, 0) / CHUNK)


def _fold_end(length: int, window: int) -> int:
    """Keys at positions < fold_end (and >= sinks) are folded into the final state, as the reference does."""
    return length + 1 - max(window, 1)


def _state_block(value_dim: int) -> int:
    """Value-dim tile of the state kernels (they are sequential in T, so D is split for parallelism)."""
    return min(block(value_dim), 64)


def _states_fwd(
    fk: torch.Tensor, v: torch.Tensor, s0: torch.Tensor | None, z0: torch.Tensor | None,
    sinks: int, fold_end: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, length, feat = fk.shape
    value_dim = v.shape[-1]
    num_chunks = triton.cdiv(length, CHUNK)
    h = fk.new_empty(batch, heads, num_chunks, feat, value_dim, dtype=torch.float32)
    hz = fk.new_empty(batch, heads, num_chunks, feat, dtype=torch.float32)
    s_out = fk.new_empty(batch, heads, feat, value_dim, dtype=torch.float32)
    z_out = fk.new_empty(batch, heads, feat, dtype=torch.float32)
    bd = _state_block(value_dim)
    _states_fwd_kernel[(triton.cdiv(value_dim, bd), batch * heads)](
        fk, v, s0 if s0 is not None else s_out, z0 if z0 is not None else z_out, h, hz, s_out, z_out,
        length, feat, value_dim, num_chunks, sinks, fold_end,
        HAS_INIT=s0 is not None, BT=CHUNK, BF=block(feat), BD=bd,
    )
    return h, hz, s_out, z_out


def _hybrid_fwd(
    q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor,
    gamma: torch.Tensor, s0: torch.Tensor | None, z0: torch.Tensor | None,
    window: int, sinks: int, scaling: float, eps: float,
) -> tuple[torch.Tensor, ...]:
    batch, heads, length, feat = fq.shape
    value_dim = v.shape[-1]
    head_dim = q.shape[-1] if q is not None else 0  # 0: every q/k access is masked off
    num_chunks = triton.cdiv(length, CHUNK)
    h, hz, s_out, z_out = _states_fwd(fk, v, s0, z0, sinks, _fold_end(length, window))
    o = v.new_empty(batch, heads, length, value_dim, dtype=torch.float32)
    den = v.new_empty(batch, heads, length, dtype=torch.float32)
    m = torch.empty_like(den)
    _hybrid_fwd_kernel[(num_chunks, batch * heads)](
        q if q is not None else fq, k if k is not None else fk, v, fq, fk, gamma, h, hz, o, den, m,
        length, heads, head_dim, feat, value_dim, num_chunks, window, sinks, _band(window), scaling, eps,
        HAS_SOFTMAX=q is not None, BT=CHUNK, BK=block(head_dim), BF=block(feat), BD=block(value_dim),
    )
    return o, s_out, z_out, den, m


def _hybrid_bwd(
    q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor,
    gamma: torch.Tensor, s0: torch.Tensor | None, z0: torch.Tensor | None,
    o: torch.Tensor, den: torch.Tensor, m: torch.Tensor, do: torch.Tensor,
    ds_final: torch.Tensor | None, dz_final: torch.Tensor | None,
    window: int, sinks: int, scaling: float,
) -> tuple[torch.Tensor, ...]:
    batch, heads, length, feat = fq.shape
    value_dim = v.shape[-1]
    head_dim = q.shape[-1] if q is not None else 0  # 0: every q/k access is masked off
    num_chunks = triton.cdiv(length, CHUNK)
    fold_end, delta_chunks = _fold_end(length, window), _band(window)
    has_softmax = q is not None
    q_, k_ = (q, k) if has_softmax else (fq, fk)  # placeholders the kernels never read
    # The states are recomputed rather than kept from the forward: O(T/CHUNK * F * D) memory only here.
    h, hz, _, _ = _states_fwd(fk, v, s0, z0, sinks, fold_end)
    delta = (do * o).sum(-1)
    do = do.contiguous()
    blocks = dict(BT=CHUNK, BK=block(head_dim), BF=block(feat), BD=block(value_dim))

    dfq = torch.empty_like(fq, dtype=torch.float32)
    # Without a softmax part every dq/dk store is masked off; dfq/dfk serve as valid placeholders.
    dq = torch.empty_like(q_, dtype=torch.float32) if has_softmax else dfq
    dg = torch.empty_like(den)
    _hybrid_bwd_dq_kernel[(num_chunks, batch * heads)](
        q_, k_, v, fq, fk, gamma, h, hz, do, den, m, delta, dq, dfq, dg,
        length, heads, head_dim, feat, value_dim, num_chunks, window, sinks, delta_chunks, scaling,
        HAS_SOFTMAX=has_softmax, **blocks,
    )

    dh, dhz = torch.empty_like(h), torch.empty_like(hz)
    ds0 = fq.new_empty(batch, heads, feat, value_dim, dtype=torch.float32)
    dz0 = fq.new_empty(batch, heads, feat, dtype=torch.float32)
    bd = _state_block(value_dim)
    _states_bwd_kernel[(triton.cdiv(value_dim, bd), batch * heads)](
        fq, gamma, do, den, delta,
        ds_final.contiguous() if ds_final is not None else ds0,
        dz_final.contiguous() if dz_final is not None else dz0,
        dh, dhz, ds0, dz0, length, heads, feat, value_dim, num_chunks, delta_chunks,
        HAS_FINAL_GRAD=ds_final is not None, BT=CHUNK, BF=block(feat), BD=bd,
    )

    dfk = torch.empty_like(fk, dtype=torch.float32)
    dk = torch.empty_like(k_, dtype=torch.float32) if has_softmax else dfk
    dv = torch.empty_like(v, dtype=torch.float32)
    _hybrid_bwd_dkv_kernel[(num_chunks, batch * heads)](
        q_, k_, v, fq, fk, gamma, dh, dhz, do, den, m, delta, dk, dfk, dv,
        length, heads, head_dim, feat, value_dim, num_chunks, window, sinks, fold_end, delta_chunks, scaling,
        HAS_SOFTMAX=has_softmax, **blocks,
    )
    return dq, dk, dv, dfq, dfk, dg.sum(dim=(0, 2)), ds0, dz0


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class HybridAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fq, fk, gamma, s0, z0, window, sinks, scaling, eps):
        o, s_out, z_out, den, m = _hybrid_fwd(q, k, v, fq, fk, gamma, s0, z0, window, sinks, scaling, eps)
        ctx.save_for_backward(q, k, v, fq, fk, gamma, s0, z0, o, den, m)
        ctx.settings = (window, sinks, scaling)
        # Unused outputs then arrive as None: no zero final-state gradient is built or read.
        ctx.set_materialize_grads(False)
        return o, s_out, z_out

    @staticmethod
    def backward(ctx, do, ds_final, dz_final):
        q, k, v, fq, fk, gamma, s0, z0, o, den, m = ctx.saved_tensors
        do = do if do is not None else torch.zeros_like(o)
        dq, dk, dv, dfq, dfk, dgamma, ds0, dz0 = _hybrid_bwd(
            q, k, v, fq, fk, gamma, s0, z0, o, den, m, do, *_final_state_grads(ds_final, dz_final, fq, v),
            *ctx.settings,
        )
        has_softmax = q is not None
        return (
            dq.to(q.dtype) if has_softmax else None,
            dk.to(k.dtype) if has_softmax else None,
            dv.to(v.dtype), dfq.to(fq.dtype), dfk.to(fk.dtype), dgamma.to(gamma.dtype),
            ds0.to(s0.dtype) if s0 is not None else None,
            dz0.to(z0.dtype) if z0 is not None else None,
            None, None, None, None,
        )


def _final_state_grads(
    ds: torch.Tensor | None, dz: torch.Tensor | None, fq: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the final (S, z) as both-or-neither, fp32 (the kernel reads both or none)."""
    if ds is None and dz is None:
        return None, None
    batch, heads, _, feat = fq.shape
    if ds is None:
        ds = fq.new_zeros(batch, heads, feat, v.shape[-1], dtype=torch.float32)
    if dz is None:
        dz = fq.new_zeros(batch, heads, feat, dtype=torch.float32)
    return ds.float(), dz.float()


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def _check_common(
    v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, initial_state: tuple[torch.Tensor, torch.Tensor] | None
) -> None:
    check_rank("fq", fq, 4, "[B, H, T, F]")
    batch, heads, length, feat = fq.shape
    check_shape("fk", fk, fq.shape)
    check_rank("v", v, 4, "[B, H, T, D]")
    check_shape("v", v, (batch, heads, length, v.shape[-1]))
    if initial_state is not None:
        check_shape("initial S", initial_state[0], (batch, heads, feat, v.shape[-1]))
        check_shape("initial z", initial_state[1], (batch, heads, feat))


def chunk_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    *,
    window: int,
    sinks: int,
    scaling: float,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Window + linear hybrid attention in one fused pass (no padding; positions are 0..T-1).

    Args:
        q, k: [B, H, T, d] queries and keys for the softmax part (d any size).
        v: [B, H, T, D] values.
        fq, fk: [B, H, T, F] feature-mapped queries and keys for the linear part.
        gamma: [H] share of the linear part per head.
        window: softmax over the last ``window`` keys, the query included (0: none).
        sinks: the first ``sinks`` keys always stay in the softmax part.
        scaling: softmax temperature (the teacher's, 1/sqrt(d)).
        initial_state: optional (S [B, H, F, D], z [B, H, F]) added to the linear part; it gets gradients.
        eps: added to the denominator.
    Returns:
        out [B, H, T, D] (fp32) and the final (S [B, H, F, D], z [B, H, F]) (fp32) over the keys
        sinks <= j <= T - window (those that left the softmax part of a next query; the cache's
        ``RecurrentState`` comes from ``reference.build_state``, which keeps one key more in its ring).
        Every input, including the state, gets gradients.

    Example:
        >>> out, (S, z) = chunk_hybrid_attention(q, k, v, fq, fk, gamma, window=64, sinks=4, scaling=0.125)
    """
    _check_common(v, fq, fk, initial_state)
    batch, heads, length, _ = fq.shape
    check_rank("q", q, 4, "[B, H, T, d]")
    check_shape("q", q, (batch, heads, length, q.shape[-1]))
    check_shape("k", k, q.shape)
    check_shape("gamma", gamma, (heads,))
    if window < 0 or sinks < 0:
        raise ValueError(f"window and sinks must be >= 0, got window={window}, sinks={sinks}")
    s0, z0 = initial_state if initial_state is not None else (None, None)
    has_softmax = window > 0 or sinks > 0
    q, k, v, fq, fk = same_dtype(q, k, v, fq, fk)
    o, s_out, z_out = HybridAttentionFunction.apply(
        q if has_softmax else None, k if has_softmax else None, v, fq, fk, gamma.contiguous(),
        s0.float().contiguous() if s0 is not None else None, z0.float().contiguous() if z0 is not None else None,
        window, sinks, scaling, eps,
    )
    return o, (s_out, z_out)


def chunk_linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Causal linear attention with its normaliser: o_i = fq_i S_i / (fq_i z_i + eps).

    Args:
        fq, fk: [B, H, T, F] feature-mapped queries and keys.
        v: [B, H, T, D] values.
        initial_state: optional (S [B, H, F, D], z [B, H, F]) the sums start from (JRT's prefix state).
        eps: added to the denominator.
    Returns:
        out [B, H, T, D] (fp32) and the final state (S [B, H, F, D], z [B, H, F]) (fp32). Gradients
        flow into fq, fk, v and the initial state. bf16/fp16 inputs are accumulated in fp32.

    Example:
        >>> out, (S, z) = chunk_linear_attention(fq, fk, v)
        >>> out2, _ = chunk_linear_attention(fq2, fk2, v2, initial_state=(S, z))  # continue
    """
    _check_common(v, fq, fk, initial_state)
    s0, z0 = initial_state if initial_state is not None else (None, None)
    gamma = fq.new_ones(fq.shape[1], dtype=torch.float32)  # all weight on the linear part
    v, fq, fk = same_dtype(v, fq, fk)
    o, s_out, z_out = HybridAttentionFunction.apply(
        None, None, v, fq, fk, gamma,
        s0.float().contiguous() if s0 is not None else None, z0.float().contiguous() if z0 is not None else None,
        0, 0, 1.0, eps,
    )
    return o, (s_out, z_out)
