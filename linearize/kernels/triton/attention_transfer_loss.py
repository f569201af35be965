"""Tiled attention-transfer loss (Hedgehog's ``xent``), forward and backward, in Triton.

For query i with teacher weights P_ij = softmax_j(s_ij), s_ij = scaling q_i.k_j, and student weights
A_ij = a_ij / Dn_i, a_ij = fq_i.fk_j, Dn_i = sum_{j<=i} a_ij + eps (all over j <= i):

    loss_i = -sum_j P_ij log A_ij = log Dn_i - sum_j P_ij log a_ij          (sum_j P_ij = 1)

One pass over the key blocks of a query block gives Dn_i and, with an online maximum m_i,
l_i = sum e^(s_ij - m_i) and x_i = sum e^(s_ij - m_i) log a_ij, so sum_j P_ij log a_ij = x_i / l_i.
No [T, T] matrix is ever stored: memory is O(T). The gradients (c = upstream / number of queries):

    d a_ij = c (1 / Dn_i - P_ij / a_ij)          -> fq, fk
    d s_ij = -c P_ij (log a_ij - x_i / l_i)      -> q, k (the teacher side, usually frozen)

The naive materialising version is ``naive.attention_transfer_loss_naive``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linearize.kernels.reference import EPS
from linearize.kernels.triton.hybrid import chunk_linear_attention
from linearize.kernels.triton.utils import block, check_rank, check_shape, launch_configs

CHUNK = 64
NEG_BIG = tl.constexpr(-1e30)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, scaling, BK: tl.constexpr, BF: tl.constexpr):
    """Causal mask, teacher scores s and student scores a [BTq, BTk] of query rows o_i, key rows o_j,
    and the key blocks k, fk. ``b_q``, ``b_fq`` are loaded query blocks; ``k``, ``fk`` pointers."""
    o_k, o_f = tl.arange(0, BK), tl.arange(0, BF)
    b_k = tl.load(k + i_bh * T * K + o_j[:, None] * K + o_k[None, :],
                  mask=(o_j[:, None] < T) & (o_k[None, :] < K), other=0.0)
    b_fk = tl.load(fk + i_bh * T * F + o_j[:, None] * F + o_f[None, :],
                   mask=(o_j[:, None] < T) & (o_f[None, :] < F), other=0.0)
    causal = (o_j[None, :] <= o_i[:, None]) & (o_i[:, None] < T)
    b_s = tl.where(causal, tl.dot(b_q, tl.trans(b_k)) * scaling, NEG_BIG)
    b_a = tl.dot(b_fq, tl.trans(b_fk))
    return causal, b_s, b_a, b_k, b_fk


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BT"])
@triton.jit
def _xent_fwd_kernel(
    q, k, fq, fk, loss, lse, den, plog, T, K, F, scaling, eps,
    BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    o_i = i_c * BT + tl.arange(0, BT)
    o_k, o_f = tl.arange(0, BK), tl.arange(0, BF)
    m_i = o_i < T
    b_q = tl.load(q + i_bh * T * K + o_i[:, None] * K + o_k[None, :], mask=m_i[:, None] & (o_k[None, :] < K), other=0.0)
    b_fq = tl.load(fq + i_bh * T * F + o_i[:, None] * F + o_f[None, :], mask=m_i[:, None] & (o_f[None, :] < F), other=0.0)
    b_m = tl.full([BT], NEG_BIG, dtype=tl.float32)
    b_l = tl.zeros([BT], dtype=tl.float32)
    b_x = tl.zeros([BT], dtype=tl.float32)
    b_den = tl.zeros([BT], dtype=tl.float32)
    for i_j in range(0, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        causal, b_s, b_a, _, _ = _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, scaling, BK, BF)
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_scale = tl.exp(b_m - b_m_new)
        b_p = tl.where(causal, tl.exp(b_s - b_m_new[:, None]), 0.0)
        b_l = b_l * b_scale + tl.sum(b_p, axis=1)
        b_x = b_x * b_scale + tl.sum(b_p * tl.log(tl.where(causal, b_a, 1.0)), axis=1)
        b_den += tl.sum(tl.where(causal, b_a, 0.0), axis=1)
        b_m = b_m_new
    b_den += eps
    b_plog = b_x / b_l
    tl.store(loss + i_bh * T + o_i, tl.log(b_den) - b_plog, mask=m_i)
    tl.store(lse + i_bh * T + o_i, b_m + tl.log(b_l), mask=m_i)
    tl.store(den + i_bh * T + o_i, b_den, mask=m_i)
    tl.store(plog + i_bh * T + o_i, b_plog, mask=m_i)


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BT"])
@triton.jit
def _xent_bwd_dq_kernel(
    q, k, fq, fk, lse, den, plog, dloss, dq, dfq, T, K, F, scaling,
    BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    o_i = i_c * BT + tl.arange(0, BT)
    o_k, o_f = tl.arange(0, BK), tl.arange(0, BF)
    m_i = o_i < T
    b_q = tl.load(q + i_bh * T * K + o_i[:, None] * K + o_k[None, :], mask=m_i[:, None] & (o_k[None, :] < K), other=0.0)
    b_fq = tl.load(fq + i_bh * T * F + o_i[:, None] * F + o_f[None, :], mask=m_i[:, None] & (o_f[None, :] < F), other=0.0)
    b_lse = tl.load(lse + i_bh * T + o_i, mask=m_i, other=0.0)
    b_den = tl.load(den + i_bh * T + o_i, mask=m_i, other=1.0)
    b_plog = tl.load(plog + i_bh * T + o_i, mask=m_i, other=0.0)
    b_c = tl.load(dloss + i_bh * T + o_i, mask=m_i, other=0.0)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dfq = tl.zeros([BT, BF], dtype=tl.float32)
    for i_j in range(0, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        causal, b_s, b_a, b_k, b_fk = _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, scaling, BK, BF)
        b_p = tl.where(causal, tl.exp(b_s - b_lse[:, None]), 0.0)
        b_a = tl.where(causal, b_a, 1.0)
        b_da = tl.where(causal, b_c[:, None] * (1.0 / b_den[:, None] - b_p / b_a), 0.0)
        b_ds = -b_c[:, None] * b_p * (tl.log(b_a) - b_plog[:, None])
        b_dfq += tl.dot(b_da.to(b_fk.dtype), b_fk)
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    tl.store(dq + i_bh * T * K + o_i[:, None] * K + o_k[None, :], b_dq * scaling, mask=m_i[:, None] & (o_k[None, :] < K))
    tl.store(dfq + i_bh * T * F + o_i[:, None] * F + o_f[None, :], b_dfq, mask=m_i[:, None] & (o_f[None, :] < F))


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BT"])
@triton.jit
def _xent_bwd_dk_kernel(
    q, k, fq, fk, lse, den, plog, dloss, dk, dfk, T, K, F, NT, scaling,
    BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    o_j = i_c * BT + tl.arange(0, BT)
    o_k, o_f = tl.arange(0, BK), tl.arange(0, BF)
    m_j = o_j < T
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dfk = tl.zeros([BT, BF], dtype=tl.float32)
    for i_q in range(i_c, NT):
        o_i = i_q * BT + tl.arange(0, BT)
        m_i = o_i < T
        b_q = tl.load(q + i_bh * T * K + o_i[:, None] * K + o_k[None, :], mask=m_i[:, None] & (o_k[None, :] < K), other=0.0)
        b_fq = tl.load(fq + i_bh * T * F + o_i[:, None] * F + o_f[None, :], mask=m_i[:, None] & (o_f[None, :] < F), other=0.0)
        b_lse = tl.load(lse + i_bh * T + o_i, mask=m_i, other=0.0)
        b_den = tl.load(den + i_bh * T + o_i, mask=m_i, other=1.0)
        b_plog = tl.load(plog + i_bh * T + o_i, mask=m_i, other=0.0)
        b_c = tl.load(dloss + i_bh * T + o_i, mask=m_i, other=0.0)
        causal, b_s, b_a, _, _ = _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, scaling, BK, BF)
        b_p = tl.where(causal, tl.exp(b_s - b_lse[:, None]), 0.0)
        b_a = tl.where(causal, b_a, 1.0)
        b_da = tl.where(causal, b_c[:, None] * (1.0 / b_den[:, None] - b_p / b_a), 0.0)
        b_ds = -b_c[:, None] * b_p * (tl.log(b_a) - b_plog[:, None])
        b_dfk += tl.dot(tl.trans(b_da).to(b_fq.dtype), b_fq)
        b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q)
    tl.store(dk + i_bh * T * K + o_j[:, None] * K + o_k[None, :], b_dk * scaling, mask=m_j[:, None] & (o_k[None, :] < K))
    tl.store(dfk + i_bh * T * F + o_j[:, None] * F + o_f[None, :], b_dfk, mask=m_j[:, None] & (o_f[None, :] < F))


# --------------------------------------------------------------------------------------------------
# Launchers and autograd
# --------------------------------------------------------------------------------------------------


def _blocks(q: torch.Tensor, fq: torch.Tensor) -> dict[str, int]:
    return dict(BT=CHUNK, BK=block(q.shape[-1]), BF=block(fq.shape[-1]))


def _xent_fwd(
    q: torch.Tensor, k: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, scaling: float, eps: float
) -> tuple[torch.Tensor, ...]:
    """Per-query losses [B, H, T] and what the backward needs: lse, Dn, sum_j P log a (all fp32)."""
    batch, heads, length, head_dim = q.shape
    loss, lse, den, plog = (q.new_empty(batch, heads, length, dtype=torch.float32) for _ in range(4))
    _xent_fwd_kernel[(triton.cdiv(length, CHUNK), batch * heads)](
        q, k, fq, fk, loss, lse, den, plog, length, head_dim, fq.shape[-1], scaling, eps, **_blocks(q, fq),
    )
    return loss, lse, den, plog


def _xent_bwd(
    q: torch.Tensor, k: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor,
    lse: torch.Tensor, den: torch.Tensor, plog: torch.Tensor, dloss: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, ...]:
    batch, heads, length, head_dim = q.shape
    feat, num_chunks = fq.shape[-1], triton.cdiv(length, CHUNK)
    dq, dk = (torch.empty_like(q, dtype=torch.float32) for _ in range(2))
    dfq, dfk = (torch.empty_like(fq, dtype=torch.float32) for _ in range(2))
    grid = (num_chunks, batch * heads)
    _xent_bwd_dq_kernel[grid](q, k, fq, fk, lse, den, plog, dloss, dq, dfq, length, head_dim, feat, scaling,
                              **_blocks(q, fq))
    _xent_bwd_dk_kernel[grid](q, k, fq, fk, lse, den, plog, dloss, dk, dfk, length, head_dim, feat, num_chunks,
                              scaling, **_blocks(q, fq))
    return dq, dk, dfq, dfk


class AttentionTransferLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, fq, fk, scaling, eps):
        loss, lse, den, plog = _xent_fwd(q, k, fq, fk, scaling, eps)
        ctx.save_for_backward(q, k, fq, fk, lse, den, plog)
        ctx.scaling = scaling
        return loss.mean()

    @staticmethod
    def backward(ctx, dloss):
        q, k, fq, fk, lse, den, plog = ctx.saved_tensors
        # The mean spreads the upstream gradient evenly over the queries.
        per_query = (dloss / lse.numel()).expand_as(lse).contiguous()
        dq, dk, dfq, dfk = _xent_bwd(q, k, fq, fk, lse, den, plog, per_query, ctx.scaling)
        return dq.to(q.dtype), dk.to(k.dtype), dfq.to(fq.dtype), dfk.to(fk.dtype), None, None


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------


def attention_transfer_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    scaling: float,
    eps: float = EPS,
) -> torch.Tensor:
    """Hedgehog's attention-weight cross-entropy, tiled: O(T) memory instead of [T, T].

    Args:
        q, k: [B, H, T, d] the teacher's queries and keys (after RoPE, keys repeated for GQA).
        fq, fk: [B, H, T, F] the student's feature-mapped queries and keys (positive features).
        scaling: the teacher's softmax temperature.
        eps: added to the student's normaliser, as in ``hybrid_attention_quadratic``.
    Returns:
        scalar fp32 -sum_{j<=i} P_ij log A_ij averaged over the B * H * T queries (see
        ``naive.attention_transfer_loss_naive``). Gradients flow into fq, fk, q and k.

    Example:
        >>> loss = attention_transfer_loss(q, k, phi(q), phi(k), scaling=q.shape[-1] ** -0.5)
        >>> loss.backward()
    """
    check_rank("q", q, 4, "[B, H, T, d]")
    check_shape("k", k, q.shape)
    check_rank("fq", fq, 4, "[B, H, T, F]")
    check_shape("fq", fq, (*q.shape[:3], fq.shape[-1]))
    check_shape("fk", fk, fq.shape)
    return AttentionTransferLoss.apply(q.contiguous(), k.contiguous(), fq.contiguous(), fk.contiguous(), scaling, eps)


def attention_output_mse(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, teacher_out: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """LoLCATs' ``mse``: mean squared error between the student's causal linear attention output and
    the teacher's attention output ``teacher_out`` [B, H, T, D], through ``chunk_linear_attention``
    (fq, fk [B, H, T, F], v [B, H, T, D]); O(T) memory, gradients into fq, fk and v."""
    check_shape("teacher_out", teacher_out, v.shape)
    out, _ = chunk_linear_attention(fq, fk, v, eps=eps)
    return (out - teacher_out.float()).pow(2).mean()
