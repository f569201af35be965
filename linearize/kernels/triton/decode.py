"""One decoding step of window + linear attention against a ``RecurrentState``, in Triton.

The state update is ``reference.advance_state``: a handful of fixed-shape torch ops on [B] index
vectors (fold the leaving key into S, z, write the new key into its ring slot) with no host
synchronisation. The kernel then does the attention of ``reference.attend_state`` for one
(batch row, query head, value tile) per program: the query against every filled slot of its KV head
(softmax part, which now holds its own key; blocks of slots with an online maximum) and against
S, z (linear part, [F, D] tiles of at most 64 x 64), in one pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from linearize.kernels.reference import AttentionSpec, RecurrentState, StepPlan, advance_state
from linearize.kernels.triton.utils import NEG_BIG, check_shape, tile


@triton.jit
def _attend_state_kernel(
    q, fq, gamma, kv, ring, positions, o,
    H, G, C, K, F, D, scaling, eps,
    BC: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_d, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_bkv = i_b * (H // G) + i_h // G  # the KV head this query head reads (GQA)
    g = tl.load(gamma + i_h).to(tl.float32)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D

    # Linear part: fq S and fq z, from kv = [S | z] [F, D + 1], an [F, D] tile at a time.
    p_kv = kv + i_bh * F * (D + 1)
    num_lin = tl.zeros([BD], dtype=tl.float32)
    den_lin = tl.zeros([BF], dtype=tl.float32)
    for f0 in range(0, F, BF):
        o_f = f0 + tl.arange(0, BF)
        m_f = o_f < F
        b_fq = tl.load(fq + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
        b_S = tl.load(p_kv + o_f[:, None] * (D + 1) + o_d[None, :], mask=m_f[:, None] & m_d[None, :], other=0.0)
        num_lin += tl.sum(b_fq[:, None] * b_S, axis=0)
        den_lin += b_fq * tl.load(p_kv + o_f * (D + 1) + D, mask=m_f, other=0.0)

    # Softmax part: the filled slots of the KV head, a block of slots at a time with an online maximum.
    p_ring = ring + i_bkv * C * (K + D + 1)  # rows [k | v | 1]
    num_soft = tl.zeros([BD], dtype=tl.float32)
    den_soft = tl.zeros([1], dtype=tl.float32)
    b_m = tl.full([1], NEG_BIG, dtype=tl.float32)
    for c0 in range(0, C, BC):
        o_c = c0 + tl.arange(0, BC)
        filled = (o_c < C) & (tl.load(positions + i_b * C + o_c, mask=o_c < C, other=-1) >= 0)
        b_s = tl.zeros([BC], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            b_q = tl.load(q + i_bh * K + o_k, mask=o_k < K, other=0.0).to(tl.float32)
            b_keys = tl.load(p_ring + o_c[:, None] * (K + D + 1) + o_k[None, :],
                             mask=filled[:, None] & (o_k < K)[None, :], other=0.0).to(tl.float32)
            b_s += tl.sum(b_keys * b_q[None, :], axis=1)
        b_s = tl.where(filled, b_s * scaling, NEG_BIG)
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=0))
        b_scale = tl.exp(b_m - b_m_new)
        b_p = tl.where(filled, tl.exp(b_s - b_m_new), 0.0)
        b_values = tl.load(p_ring + o_c[:, None] * (K + D + 1) + K + o_d[None, :],
                           mask=filled[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        num_soft = num_soft * b_scale + tl.sum(b_p[:, None] * b_values, axis=0)
        den_soft = den_soft * b_scale + tl.sum(b_p, axis=0)
        b_m = b_m_new
    den = g * tl.sum(den_lin, axis=0) + (1 - g) * den_soft + eps
    tl.store(o + i_bh * D + o_d, (g * num_lin + (1 - g) * num_soft) / den, mask=m_d)


def attend_state(
    q: torch.Tensor, fq: torch.Tensor, gamma: torch.Tensor, state: RecurrentState, spec: AttentionSpec
) -> torch.Tensor:
    """``reference.attend_state`` in one kernel: q [B, H, 1, d], fq [B, H, 1, F], gamma [H] -> [B, H, 1, D]."""
    batch, kv_heads, slots, width = state.ring.shape
    heads, feat, value_dim = state.kv.shape[1], state.kv.shape[2], state.kv.shape[3] - 1
    head_dim = width - value_dim - 1
    check_shape("q", q, (batch, heads, 1, head_dim))
    check_shape("fq", fq, (batch, heads, 1, feat))
    check_shape("gamma", gamma, (heads,))
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of the state's KV heads ({kv_heads})")
    out = q.new_empty(batch, heads, 1, value_dim, dtype=torch.float32)
    # With no slots (sinks = window = 0) every slot access is masked off, but the pointers must
    # still be valid device memory.
    ring = state.ring.contiguous() if state.ring.numel() else out
    positions = state.positions.contiguous() if state.positions.numel() else state.seen
    # Fixed tiles, no autotuning: one small launch per token and layer, bound by reading the state.
    bd = tile(value_dim)
    _attend_state_kernel[(triton.cdiv(value_dim, bd), batch * heads)](
        q.contiguous(), fq.contiguous(), gamma.contiguous(), state.kv.contiguous(), ring, positions, out,
        heads, heads // kv_heads, slots, head_dim, feat, value_dim, spec.scaling, spec.eps,
        BC=tile(slots), BK=tile(head_dim), BF=tile(feat), BD=bd, num_warps=4,
    )
    return out


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    gamma: torch.Tensor,
    state: RecurrentState,
    spec: AttentionSpec,
    key_features: Callable[[torch.Tensor], torch.Tensor],
    *,
    valid: torch.Tensor | None = None,
    plan: StepPlan | None = None,
) -> torch.Tensor:
    """``reference.hybrid_attention_step`` with the attention fused: ``state`` is updated in place.

    q [B, H, 1, d], k [B, Hkv, 1, d], v [B, Hkv, 1, D], fq [B, H, 1, F], gamma [H]; ``key_features``
    maps keys [B, Hkv, 1, d] to phi [B, H, 1, F]. Returns out [B, H, 1, D] (fp32).
    """
    batch, kv_heads = state.ring.shape[:2]
    check_shape("k", k, (batch, kv_heads, 1, state.head_dim))
    check_shape("v", v, (batch, kv_heads, 1, state.kv.shape[-1] - 1))
    advance_state(k, v, state, spec, key_features, valid=valid, plan=plan)
    return attend_state(q, fq, gamma, state, spec)
