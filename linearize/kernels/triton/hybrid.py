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
    * The backward mirrors this, one kernel per gradient: ``_softmax_query_bwd_kernel`` (dq and the
      softmax part's dgamma), ``_linear_query_bwd_kernel`` (dfq / g, from which the host forms dfq
      and the linear part's dgamma), ``_states_bwd_kernel`` (the state gradients dh[c] in reverse,
      and dS0, dz0), then ``_dk_kernel``, ``_dfk_kernel`` and ``_dv_kernel``. Only the gradients
      autograd asks for are computed: with q, k, v frozen (attention transfer) no dq, dk or dv work runs.

Tiling (as in flash-linear-attention): tiles along the head dim d (BK), the feature dim F (BF) and
the value dim D (BD) are at most 64 wide (autotuned, ``utils.launch_configs``). Outputs are split
over the grid by tiles of their last dim (o, dv and the states by D, states also by F, dfq and dfk
by F, dq and dk by d); sums over a dim (q.k over d, fq.fk and fq.h over F, do.v over D) run tile by
tile in a loop. Each program recomputes the scores it needs, as fla's chunk kernels do, instead of
holding [BT, F] or [F, D] blocks. All accumulation is fp32; the output is fp32 like the reference.
On a GPU, fp32 inputs go through tensor-core dots in tf32 (as in fla); bf16/fp16 inputs are the fast path.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from linearize.kernels.reference import EPS
from linearize.kernels.triton.utils import (
    CHUNK,
    FIT_TILES,
    NEG_BIG,
    check_rank,
    check_shape,
    launch_configs,
    load_tile,
    load_vector,
    part_masks,
    same_dtype,
    store_tile,
    tile_dot,
)

# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _band_chunk(i_n, n_sink, i_b):
    """Key chunk number ``i_n`` a query chunk visits: first the ``n_sink`` sink chunks before its
    band, then the band [i_b, c] (see ``_hybrid_fwd_kernel``)."""
    return tl.where(i_n < n_sink, i_n, i_n - n_sink + i_b)


@triton.jit
def _query_stats(den, delta, i_bh, o_i, T):
    """The forward's normaliser [BT] of queries ``o_i`` and d loss / d normaliser (-o.do / den)."""
    b_den = load_vector(den, i_bh, o_i, T, 1.0)
    return b_den, -load_vector(delta, i_bh, o_i, T, 0.0) / b_den


@triton.jit
def _weight_grads(do, v, b_den, b_dd, i_bh, o_i, o_j, T, D, BT: tl.constexpr, BD: tl.constexpr):
    """d loss / d weight [BTq, BTk] of every (query, key) pair: the weight scales v_j in the
    numerator and 1 in the denominator."""
    return tile_dot(do, v, i_bh, o_i, o_j, T, D, BT, BD) / b_den[:, None] + b_dd[:, None]


@triton.jit
def _softmax_weights(q, k, b_m, soft, i_bh, o_i, o_j, T, K, scaling, BT: tl.constexpr, BK: tl.constexpr):
    """e^(s - m) [BTq, BTk] on the softmax part, 0 elsewhere, with the forward's maximum m [BTq]
    (the exponent is masked: off the part it could overflow)."""
    b_s = tile_dot(q, k, i_bh, o_i, o_j, T, K, BT, BK) * scaling
    return tl.exp(tl.where(soft, b_s - b_m[:, None], NEG_BIG))


@triton.jit
def _store_state(h, hz, i_mat, b_h, b_hz, o_f, o_d, F, D, with_z):
    """Store state tile b_h [BF, BD] into matrix ``i_mat`` of h, and b_hz [BF] into hz if ``with_z``."""
    store_tile(h, b_h, i_mat, o_f, o_d, F, D)
    if with_z:
        tl.store(hz + i_mat * F + o_f, b_hz, mask=o_f < F)


@triton.autotune(configs=launch_configs("BF", "BD"), key=["F", "D"], prune_configs_by=FIT_TILES)
@triton.jit
def _states_fwd_kernel(
    fk, v, s0, z0, h, hz, s_out, z_out,
    T, F, D, NT, sinks, fold_end,
    HAS_INIT: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_f, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_f = i_f * BF + tl.arange(0, BF)
    o_d = i_d * BD + tl.arange(0, BD)
    b_s = tl.zeros([BF, BD], dtype=tl.float32)
    b_z = tl.zeros([BF], dtype=tl.float32)
    if HAS_INIT:
        b_s += load_tile(s0, i_bh, o_f, o_d, F, D)
        b_z += load_vector(z0, i_bh, o_f, F, 0.0)
    for c in range(NT):
        _store_state(h, hz, i_bh * NT + c, b_s, b_z, o_f, o_d, F, D, i_d == 0)
        o_t = c * BT + tl.arange(0, BT)
        # Only keys that ever leave the softmax part enter the state.
        fold = (o_t >= sinks) & (o_t < fold_end)
        b_fk = tl.where(fold[:, None], load_tile(fk, i_bh, o_t, o_f, T, F), 0.0).to(fk.dtype.element_ty)
        b_s += tl.dot(tl.trans(b_fk), load_tile(v, i_bh, o_t, o_d, T, D))
        b_z += tl.sum(b_fk.to(tl.float32), axis=0)
    _store_state(s_out, z_out, i_bh, b_s, b_z, o_f, o_d, F, D, i_d == 0)


@triton.jit
def _softmax_step(b_s, b_v, soft, b_m, b_num, b_den):
    """Online softmax over one key block of scores b_s: new running max, numerator [BT, BD] and denominator [BT]."""
    b_s = tl.where(soft, b_s, NEG_BIG)
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_scale = tl.exp(b_m - b_m_new)
    b_p = tl.where(soft, tl.exp(b_s - b_m_new[:, None]), 0.0)
    b_num = b_num * b_scale[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    b_den = b_den * b_scale + tl.sum(b_p, axis=1)
    return b_m_new, b_num, b_den


@triton.autotune(configs=launch_configs("BK", "BF", "BD"), key=["K", "F", "D", "HAS_SOFTMAX"],
                 prune_configs_by=FIT_TILES)
@triton.jit
def _hybrid_fwd_kernel(
    q, k, v, fq, fk, gamma, h, hz, o, den, m,
    T, H, K, F, D, NT, window, sinks, DELTA, scaling, eps,
    HAS_SOFTMAX: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_d, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_i = i_c * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)

    # Keys before chunk i_b are linear for every query here: read them from the state.
    i_b = tl.maximum(i_c - DELTA, 0)
    b_num_lin = tl.zeros([BT, BD], dtype=tl.float32)
    b_den_lin = tl.zeros([BT], dtype=tl.float32)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        b_fq = load_tile(fq, i_bh, o_i, o_f, T, F).to(tl.float32)
        b_num_lin += tl.dot(b_fq, load_tile(h, i_bh * NT + i_b, o_f, o_d, F, D))
        b_den_lin += tl.sum(b_fq * load_vector(hz, i_bh * NT + i_b, o_f, F, 0.0)[None, :], axis=1)

    b_num_soft = tl.zeros([BT, BD], dtype=tl.float32)
    b_den_soft = tl.zeros([BT], dtype=tl.float32)
    b_m = tl.full([BT], NEG_BIG, dtype=tl.float32)
    # Sink chunks before the band give only their sink keys here (the rest are in h), then the band.
    n_sink = tl.minimum(tl.cdiv(sinks, BT), i_b)
    for i_n in range(0, n_sink + i_c + 1 - i_b):
        i_j = _band_chunk(i_n, n_sink, i_b)
        o_j = i_j * BT + tl.arange(0, BT)
        b_v = load_tile(v, i_bh, o_j, o_d, T, D)
        soft, lin = part_masks(o_i, o_j, T, window, sinks)
        if HAS_SOFTMAX:
            b_s = tile_dot(q, k, i_bh, o_i, o_j, T, K, BT, BK) * scaling
            b_m, b_num_soft, b_den_soft = _softmax_step(b_s, b_v, soft, b_m, b_num_soft, b_den_soft)
        b_a = tl.where(lin & (i_j >= i_b), tile_dot(fq, fk, i_bh, o_i, o_j, T, F, BT, BF), 0.0)
        b_num_lin += tl.dot(b_a.to(b_v.dtype), b_v)
        b_den_lin += tl.sum(b_a, axis=1)

    b_den = (1 - g) * b_den_soft + g * b_den_lin + eps
    store_tile(o, ((1 - g) * b_num_soft + g * b_num_lin) / b_den[:, None], i_bh, o_i, o_d, T, D)
    # Every D tile has the same normaliser and maximum; the first stores them. No softmax key: the
    # maximum is 0 by definition (and unused).
    if i_d == 0:
        tl.store(den + i_bh * T + o_i, b_den, mask=o_i < T)
        tl.store(m + i_bh * T + o_i, tl.where(b_m == NEG_BIG, 0.0, b_m), mask=o_i < T)


@triton.autotune(configs=launch_configs("BK", "BD"), key=["K", "D", "NEED_DQ"], prune_configs_by=FIT_TILES)
@triton.jit
def _softmax_query_bwd_kernel(
    q, k, v, gamma, do, den, m, delta, dq, dg,
    T, H, K, D, NT, window, sinks, DELTA, scaling,
    NEED_DQ: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    """dq (a d tile per program, when NEED_DQ) and the softmax part's d loss / d gamma per query,
    -sum_soft e^(s - m) dw (the first tile stores it)."""
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_i = i_c * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    b_m = load_vector(m, i_bh, o_i, T, 0.0)
    b_den, b_dd = _query_stats(den, delta, i_bh, o_i, T)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dg = tl.zeros([BT], dtype=tl.float32)
    i_b = tl.maximum(i_c - DELTA, 0)
    n_sink = tl.minimum(tl.cdiv(sinks, BT), i_b)
    for i_n in range(0, n_sink + i_c + 1 - i_b):
        o_j = _band_chunk(i_n, n_sink, i_b) * BT + tl.arange(0, BT)
        soft, _ = part_masks(o_i, o_j, T, window, sinks)
        b_p = _softmax_weights(q, k, b_m, soft, i_bh, o_i, o_j, T, K, scaling, BT, BK)
        b_dw = _weight_grads(do, v, b_den, b_dd, i_bh, o_i, o_j, T, D, BT, BD)
        b_dg -= tl.sum(b_p * b_dw, axis=1)
        if NEED_DQ:
            b_dq += tl.dot(((1 - g) * b_p * b_dw).to(k.dtype.element_ty), load_tile(k, i_bh, o_j, o_k, T, K))
    if NEED_DQ:
        store_tile(dq, b_dq * scaling, i_bh, o_i, o_k, T, K)
    if i_k == 0:
        tl.store(dg + i_bh * T + o_i, b_dg, mask=o_i < T)


@triton.autotune(configs=launch_configs("BF", "BD"), key=["F", "D"], prune_configs_by=FIT_TILES)
@triton.jit
def _linear_query_bwd_kernel(
    v, fk, h, hz, do, den, delta, du,
    T, F, D, NT, window, sinks, DELTA,
    BT: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    """u = d loss / d (g fq), an F tile per program: through the state h[i_b] and the band's linear keys."""
    i_f, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_i = i_c * BT + tl.arange(0, BT)
    o_f = i_f * BF + tl.arange(0, BF)
    b_den, b_dd = _query_stats(den, delta, i_bh, o_i, T)
    i_b = tl.maximum(i_c - DELTA, 0)
    b_u = b_dd[:, None] * load_vector(hz, i_bh * NT + i_b, o_f, F, 0.0)[None, :]
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_dn = load_tile(do, i_bh, o_i, o_d, T, D) / b_den[:, None]
        b_u += tl.dot(b_dn, tl.trans(load_tile(h, i_bh * NT + i_b, o_f, o_d, F, D)))
    for i_j in range(i_b, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        _, lin = part_masks(o_i, o_j, T, window, sinks)
        b_dw = _weight_grads(do, v, b_den, b_dd, i_bh, o_i, o_j, T, D, BT, BD)
        b_u += tl.dot(tl.where(lin, b_dw, 0.0).to(fk.dtype.element_ty), load_tile(fk, i_bh, o_j, o_f, T, F))
    store_tile(du, b_u, i_bh, o_i, o_f, T, F)


@triton.autotune(configs=launch_configs("BF", "BD"), key=["F", "D"], prune_configs_by=FIT_TILES)
@triton.jit
def _states_bwd_kernel(
    fq, gamma, do, den, delta, ds_final, dz_final, dh, dhz, ds0, dz0,
    T, H, F, D, NT, DELTA,
    HAS_FINAL_GRAD: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_f, i_d, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_f = i_f * BF + tl.arange(0, BF)
    o_d = i_d * BD + tl.arange(0, BD)
    b_dh = tl.zeros([BF, BD], dtype=tl.float32)
    b_dhz = tl.zeros([BF], dtype=tl.float32)
    if HAS_FINAL_GRAD:
        b_dh += load_tile(ds_final, i_bh, o_f, o_d, F, D)
        b_dhz += load_vector(dz_final, i_bh, o_f, F, 0.0)
    for i_r in range(NT):
        c = NT - 1 - i_r
        # Keys of chunk c are in every state h[c'] with c' > c (and in the final state).
        _store_state(dh, dhz, i_bh * NT + c, b_dh, b_dhz, o_f, o_d, F, D, i_d == 0)
        # Query chunks that read h[c]: c + DELTA, and for c = 0 also every earlier one.
        for i_q in range(tl.where(c > 0, c + DELTA, 0), tl.minimum(c + DELTA + 1, NT)):
            o_i = i_q * BT + tl.arange(0, BT)
            b_den, b_dd = _query_stats(den, delta, i_bh, o_i, T)
            b_fq = load_tile(fq, i_bh, o_i, o_f, T, F).to(tl.float32)
            b_dh += g * tl.dot(tl.trans(b_fq), load_tile(do, i_bh, o_i, o_d, T, D) / b_den[:, None])
            b_dhz += g * tl.sum(b_fq * b_dd[:, None], axis=0)
    _store_state(ds0, dz0, i_bh, b_dh, b_dhz, o_f, o_d, F, D, i_d == 0)


@triton.jit
def _query_chunk_end(i_c, NT, sinks, DELTA, BT: tl.constexpr):
    """One past the last query chunk that reads key chunk i_c: the band's end, or the sequence's end
    for a chunk holding sink keys (those stay in the softmax part of every later query)."""
    return tl.where(i_c * BT < sinks, NT, tl.minimum(i_c + DELTA + 1, NT))


@triton.autotune(configs=launch_configs("BK", "BD"), key=["K", "D"], prune_configs_by=FIT_TILES)
@triton.jit
def _dk_kernel(
    q, k, v, gamma, do, den, m, delta, dk,
    T, H, K, D, NT, window, sinks, DELTA, scaling,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_j = i_c * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_q in range(i_c, _query_chunk_end(i_c, NT, sinks, DELTA, BT)):
        o_i = i_q * BT + tl.arange(0, BT)
        soft, _ = part_masks(o_i, o_j, T, window, sinks)
        b_den, b_dd = _query_stats(den, delta, i_bh, o_i, T)
        b_p = _softmax_weights(q, k, load_vector(m, i_bh, o_i, T, 0.0), soft, i_bh, o_i, o_j, T, K, scaling, BT, BK)
        b_dw = _weight_grads(do, v, b_den, b_dd, i_bh, o_i, o_j, T, D, BT, BD)
        b_dk += tl.dot(tl.trans((1 - g) * b_p * b_dw).to(q.dtype.element_ty), load_tile(q, i_bh, o_i, o_k, T, K))
    store_tile(dk, b_dk * scaling, i_bh, o_j, o_k, T, K)


@triton.autotune(configs=launch_configs("BF", "BD"), key=["F", "D"], prune_configs_by=FIT_TILES)
@triton.jit
def _dfk_kernel(
    v, fq, gamma, dh, dhz, do, den, delta, dfk,
    T, H, F, D, NT, window, sinks, fold_end, DELTA,
    BT: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_f, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_j = i_c * BT + tl.arange(0, BT)
    o_f = i_f * BF + tl.arange(0, BF)
    # Through the states: v_j dh[c]^T + dhz[c], for the keys the forward's state kernel folded.
    b_dfk = tl.zeros([BT, BF], dtype=tl.float32) + load_vector(dhz, i_bh * NT + i_c, o_f, F, 0.0)[None, :]
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_v = load_tile(v, i_bh, o_j, o_d, T, D).to(tl.float32)
        b_dfk += tl.dot(b_v, tl.trans(load_tile(dh, i_bh * NT + i_c, o_f, o_d, F, D)))
    b_dfk = tl.where(((o_j >= sinks) & (o_j < fold_end))[:, None], b_dfk, 0.0)
    # Linear keys of the band of the query chunks [i_c, i_c + DELTA].
    for i_q in range(i_c, tl.minimum(i_c + DELTA + 1, NT)):
        o_i = i_q * BT + tl.arange(0, BT)
        _, lin = part_masks(o_i, o_j, T, window, sinks)
        b_den, b_dd = _query_stats(den, delta, i_bh, o_i, T)
        b_dw = tl.where(lin, g * _weight_grads(do, v, b_den, b_dd, i_bh, o_i, o_j, T, D, BT, BD), 0.0)
        b_dfk += tl.dot(tl.trans(b_dw).to(fq.dtype.element_ty), load_tile(fq, i_bh, o_i, o_f, T, F))
    store_tile(dfk, b_dfk, i_bh, o_j, o_f, T, F)


@triton.autotune(configs=launch_configs("BK", "BF", "BD"), key=["K", "F", "D", "HAS_SOFTMAX"],
                 prune_configs_by=FIT_TILES)
@triton.jit
def _dv_kernel(
    q, k, fq, fk, gamma, dh, do, den, m, dv,
    T, H, K, F, D, NT, window, sinks, fold_end, DELTA, scaling,
    HAS_SOFTMAX: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_d, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_j = i_c * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    # Through the states: fk_j dh[c], for the keys the forward's state kernel folded.
    fold = (o_j >= sinks) & (o_j < fold_end)
    b_dv = tl.zeros([BT, BD], dtype=tl.float32)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        b_fk = tl.where(fold[:, None], load_tile(fk, i_bh, o_j, o_f, T, F), 0.0).to(tl.float32)
        b_dv += tl.dot(b_fk, load_tile(dh, i_bh * NT + i_c, o_f, o_d, F, D))
    for i_q in range(i_c, _query_chunk_end(i_c, NT, sinks, DELTA, BT)):
        o_i = i_q * BT + tl.arange(0, BT)
        soft, lin = part_masks(o_i, o_j, T, window, sinks)
        # Beyond the band a key is linear only through the states.
        b_w = tl.where(lin & (i_q <= i_c + DELTA), g * tile_dot(fq, fk, i_bh, o_i, o_j, T, F, BT, BF), 0.0)
        if HAS_SOFTMAX:
            b_mi = load_vector(m, i_bh, o_i, T, 0.0)
            b_w += (1 - g) * _softmax_weights(q, k, b_mi, soft, i_bh, o_i, o_j, T, K, scaling, BT, BK)
        b_dn = load_tile(do, i_bh, o_i, o_d, T, D) / load_vector(den, i_bh, o_i, T, 1.0)[:, None]
        b_dv += tl.dot(tl.trans(b_w), b_dn)
    store_tile(dv, b_dv, i_bh, o_j, o_d, T, D)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _band(window: int) -> int:
    """DELTA: how many chunks back the band of a query chunk starts (keys before it are all linear)."""
    return math.ceil(max(window - 1, 0) / CHUNK)


def _fold_end(length: int, window: int) -> int:
    """Keys at positions < fold_end (and >= sinks) are folded into the final state, as the reference does."""
    return length + 1 - max(window, 1)


def _chunk_grid(size: int, tile: str, num_chunks: int, programs: int):
    """Grid of a chunk kernel: tiles of a dim of ``size`` (autotuned ``tile``), chunks, batch * heads."""
    return lambda meta: (triton.cdiv(size, meta[tile]), num_chunks, programs)


def _states_grid(feat: int, value_dim: int, programs: int):
    """Grid of a state kernel: sequential in T, so F and D are split over the grid for parallelism."""
    return lambda meta: (triton.cdiv(feat, meta["BF"]), triton.cdiv(value_dim, meta["BD"]), programs)


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
    _states_fwd_kernel[_states_grid(feat, value_dim, batch * heads)](
        fk, v, s0 if s0 is not None else s_out, z0 if z0 is not None else z_out, h, hz, s_out, z_out,
        length, feat, value_dim, num_chunks, sinks, fold_end,
        HAS_INIT=s0 is not None, BT=CHUNK,
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
    _hybrid_fwd_kernel[_chunk_grid(value_dim, "BD", num_chunks, batch * heads)](
        q if q is not None else fq, k if k is not None else fk, v, fq, fk, gamma, h, hz, o, den, m,
        length, heads, head_dim, feat, value_dim, num_chunks, window, sinks, _band(window), scaling, eps,
        HAS_SOFTMAX=q is not None, BT=CHUNK,
    )
    return o, s_out, z_out, den, m


def _hybrid_bwd(
    q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor,
    gamma: torch.Tensor, s0: torch.Tensor | None, z0: torch.Tensor | None,
    o: torch.Tensor, den: torch.Tensor, m: torch.Tensor, do: torch.Tensor,
    ds_final: torch.Tensor | None, dz_final: torch.Tensor | None,
    window: int, sinks: int, scaling: float, needed: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dv, dfq, dfk, dgamma, dS0, dz0) in fp32, None where ``needed`` (autograd's
    ``needs_input_grad`` of those inputs) says no: the kernels only they need do not run."""
    need_q, need_k, need_v, need_fq, need_fk, need_gamma, need_s0, need_z0 = needed
    batch, heads, length, feat = fq.shape
    value_dim = v.shape[-1]
    head_dim = q.shape[-1] if q is not None else 0
    num_chunks, programs = triton.cdiv(length, CHUNK), batch * heads
    fold_end, delta_chunks = _fold_end(length, window), _band(window)
    has_softmax = q is not None
    q_, k_ = (q, k) if has_softmax else (fq, fk)  # placeholders the kernels never read
    delta = (do * o).sum(-1)
    do = do.contiguous()
    dq = dk = dv = dfq = dfk = dgamma = ds0 = dz0 = None

    # Query side. dgamma = sum over queries of fq.u (linear part) - sum_soft e^(s - m) dw.
    dg = torch.zeros_like(den)
    if has_softmax and (need_q or need_gamma):
        dq = torch.empty_like(q, dtype=torch.float32) if need_q else dg  # dg: a placeholder never written
        grid = _chunk_grid(head_dim, "BK", num_chunks, programs) if need_q else (1, num_chunks, programs)
        _softmax_query_bwd_kernel[grid](
            q, k, v, gamma, do, den, m, delta, dq, dg,
            length, heads, head_dim, value_dim, num_chunks, window, sinks, delta_chunks, scaling,
            NEED_DQ=need_q, BT=CHUNK,
        )
        dq = dq if need_q else None
    if need_fq or need_gamma:
        # The states are recomputed rather than kept from the forward: O(T/CHUNK * F * D) memory only here.
        h, hz, _, _ = _states_fwd(fk, v, s0, z0, sinks, fold_end)
        u = torch.empty_like(fq, dtype=torch.float32)
        _linear_query_bwd_kernel[_chunk_grid(feat, "BF", num_chunks, programs)](
            v, fk, h, hz, do, den, delta, u, length, feat, value_dim, num_chunks, window, sinks, delta_chunks,
            BT=CHUNK,
        )
        dfq = gamma[:, None, None] * u if need_fq else None
        dg = dg + (fq.float() * u).sum(-1)
    if need_gamma:
        dgamma = dg.sum(dim=(0, 2))

    # Key side, through the state gradients dh[c] (and those of the initial state).
    if need_v or need_fk or need_s0 or need_z0:
        dh = fq.new_empty(batch, heads, num_chunks, feat, value_dim, dtype=torch.float32)
        dhz = fq.new_empty(batch, heads, num_chunks, feat, dtype=torch.float32)
        ds0 = fq.new_empty(batch, heads, feat, value_dim, dtype=torch.float32)
        dz0 = fq.new_empty(batch, heads, feat, dtype=torch.float32)
        _states_bwd_kernel[_states_grid(feat, value_dim, programs)](
            fq, gamma, do, den, delta,
            ds_final.contiguous() if ds_final is not None else ds0,
            dz_final.contiguous() if dz_final is not None else dz0,
            dh, dhz, ds0, dz0, length, heads, feat, value_dim, num_chunks, delta_chunks,
            HAS_FINAL_GRAD=ds_final is not None, BT=CHUNK,
        )
        ds0, dz0 = (ds0 if need_s0 else None), (dz0 if need_z0 else None)
    if need_k:  # k gets a gradient only with a softmax part (it is None otherwise)
        dk = torch.empty_like(k, dtype=torch.float32)
        _dk_kernel[_chunk_grid(head_dim, "BK", num_chunks, programs)](
            q, k, v, gamma, do, den, m, delta, dk,
            length, heads, head_dim, value_dim, num_chunks, window, sinks, delta_chunks, scaling, BT=CHUNK,
        )
    if need_fk:
        dfk = torch.empty_like(fk, dtype=torch.float32)
        _dfk_kernel[_chunk_grid(feat, "BF", num_chunks, programs)](
            v, fq, gamma, dh, dhz, do, den, delta, dfk,
            length, heads, feat, value_dim, num_chunks, window, sinks, fold_end, delta_chunks, BT=CHUNK,
        )
    if need_v:
        dv = torch.empty_like(v, dtype=torch.float32)
        _dv_kernel[_chunk_grid(value_dim, "BD", num_chunks, programs)](
            q_, k_, fq, fk, gamma, dh, do, den, m, dv,
            length, heads, head_dim, feat, value_dim, num_chunks, window, sinks, fold_end, delta_chunks, scaling,
            HAS_SOFTMAX=has_softmax, BT=CHUNK,
        )
    return dq, dk, dv, dfq, dfk, dgamma, ds0, dz0


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
        inputs = ctx.saved_tensors[:8]
        o, den, m = ctx.saved_tensors[8:]
        do = do if do is not None else torch.zeros_like(o)
        grads = _hybrid_bwd(
            *inputs, o, den, m, do, *_final_state_grads(ds_final, dz_final, inputs[3], inputs[2]),
            *ctx.settings, ctx.needs_input_grad[:8],
        )
        return (*(g.to(x.dtype) if g is not None else None for g, x in zip(grads, inputs)), None, None, None, None)


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
    """Window + linear hybrid attention in one fused pass (positions are 0..T-1: no left padding; right
    padding is harmless, no real query sees a later key).

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
        Every input, including the state, gets gradients; those of inputs that do not require
        grad are not computed (frozen q, k, v during attention transfer cost no kernel).

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
