"""Tiled attention-transfer losses (Hedgehog's ``xent``, LoLCATs' ``mse``), forward and backward, in Triton.

Teacher weights P_ij = softmax_j(s_ij) over j <= i, s_ij = scaling q_i.k_j. Student weights are those
of ``reference.hybrid_attention_quadratic``: A_ij = w_ij / Dn_i with w_ij = (1-g) e^(s_ij - mu_i) on
the softmax part (mu_i its maximum, a constant), w_ij = g a_ij, a_ij = fq_i.fk_j, on the linear part,
and Dn_i = sum_j w_ij + eps. With window = sinks = 0 and g = 1 this is plain linear attention. Then

    loss_i = -sum_j P_ij L_ij,   L_ij = log max(A_ij, tiny)         (tiny = reference.WEIGHT_FLOOR)

The floor keeps the loss finite where feature products underflow to 0. As it needs the final Dn_i
for every entry, the forward makes two passes over the key blocks of a query block: the first gives
Dn_i (an online maximum for mu_i) and the teacher's log-sum-exp, the second sums P_ij L_ij. No [T, T]
matrix is ever stored: memory is O(T). Like torch's clamp_min, an entry below the floor passes no
gradient to A_ij; with M_ij = [A_ij >= tiny], Pm_i = sum_j P_ij M_ij (1 without floored entries) and
c = upstream / number of queries, the gradients are

    d s_ij = c (Pm_i A_ij - P_ij M_ij) [softmax part]  - c P_ij (L_ij + loss_i)              -> q, k
    d a_ij = c (Pm_i g / Dn_i - P_ij M_ij / a_ij) [linear part]                            -> fq, fk
    d g    = c (Pm_i (sum_lin a - sum_soft e^(s - mu)) / Dn - sum_lin P M / g + sum_soft P M / (1-g))

per query, the last into gamma. The materialising version is ``reference.attention_transfer_loss_naive``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linearize.kernels.reference import EPS, WEIGHT_FLOOR
from linearize.kernels.triton.hybrid import chunk_hybrid_attention
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

FLOOR = tl.constexpr(WEIGHT_FLOOR)

# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, window, sinks, scaling,
                  BK: tl.constexpr, BF: tl.constexpr):
    """For query rows o_i (loaded blocks ``b_q``, ``b_fq``) and key rows o_j (pointers ``k``, ``fk``):
    the causal, softmax-part and linear-part masks, the scores s (NEG_BIG outside the causal mask) and
    a (1 outside the linear part) [BTq, BTk], and the key blocks."""
    b_k = load_rows(k, i_bh, o_j, T, K, BK)
    b_fk = load_rows(fk, i_bh, o_j, T, F, BF)
    soft, lin = part_masks(o_i, o_j, T, window, sinks)
    causal = soft | lin
    b_s = tl.where(causal, tl.dot(b_q, tl.trans(b_k)) * scaling, NEG_BIG)
    b_a = tl.where(lin, tl.dot(b_fq, tl.trans(b_fk)), 1.0)
    return causal, soft, lin, b_s, b_a, b_k, b_fk


@triton.jit
def _floored_weights(causal, soft, lin, b_s, b_a, g, b_mu, b_den):
    """Student weights A [BTq, BTk] (0 outside the causal mask), the mask M of those at or above the
    floor (where the log passes a gradient) and L = log max(A, floor), as the reference computes them."""
    b_w = tl.where(soft, (1 - g) * tl.exp(b_s - b_mu[:, None]), tl.where(lin, g * b_a, 0.0))
    b_A = b_w / b_den[:, None]
    return b_A, causal & (b_A >= FLOOR), tl.log(tl.maximum(b_A, FLOOR))


@triton.jit
def _part_shares(g):
    """1 - g and g as they enter divisions, kept >= 1e-30: a part whose share is 0 has all its
    weights floored, so its terms are 0 / 1e-30 = 0, not 0 / 0."""
    return tl.maximum(1 - g, 1e-30), tl.maximum(g, 1e-30)


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BT"])
@triton.jit
def _xent_fwd_kernel(
    q, k, fq, fk, gamma, loss, lse, mu, den, pm, dg, T, H, K, F, window, sinks, scaling, eps,
    BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_i = i_c * BT + tl.arange(0, BT)
    m_i = o_i < T
    b_q = load_rows(q, i_bh, o_i, T, K, BK)
    b_fq = load_rows(fq, i_bh, o_i, T, F, BF)
    # Pass 1. Teacher: running max and mass. Student: running max of its softmax part, e^(s - mu)
    # mass there, and the linear-part sum of a.
    b_m = tl.full([BT], NEG_BIG, dtype=tl.float32)
    b_l = tl.zeros([BT], dtype=tl.float32)
    b_mu = tl.full([BT], NEG_BIG, dtype=tl.float32)
    b_es = tl.zeros([BT], dtype=tl.float32)
    b_al = tl.zeros([BT], dtype=tl.float32)
    for i_j in range(0, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        causal, soft, lin, b_s, b_a, _, _ = _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, window,
                                                          sinks, scaling, BK, BF)
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_p = tl.where(causal, tl.exp(b_s - b_m_new[:, None]), 0.0)
        b_l = b_l * tl.exp(b_m - b_m_new) + tl.sum(b_p, axis=1)
        b_m = b_m_new
        b_s_soft = tl.where(soft, b_s, NEG_BIG)
        b_mu_new = tl.maximum(b_mu, tl.max(b_s_soft, axis=1))
        b_e = tl.where(soft, tl.exp(b_s_soft - b_mu_new[:, None]), 0.0)
        b_es = b_es * tl.exp(b_mu - b_mu_new) + tl.sum(b_e, axis=1)
        b_al += tl.sum(tl.where(lin, b_a, 0.0), axis=1)
        b_mu = b_mu_new

    b_mu = tl.where(b_mu == NEG_BIG, 0.0, b_mu)
    b_l = tl.where(m_i, b_l, 1.0)  # rows past T saw no key; keep their (unstored) values finite
    b_lse = b_m + tl.log(b_l)
    b_den = (1 - g) * b_es + g * b_al + eps
    # Pass 2, now that Dn is known: sum_j P L, and the teacher's mass on the softmax-part and on the
    # linear-part weights that are not floored.
    b_pl = tl.zeros([BT], dtype=tl.float32)
    b_pms = tl.zeros([BT], dtype=tl.float32)
    b_pml = tl.zeros([BT], dtype=tl.float32)
    for i_j in range(0, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        causal, soft, lin, b_s, b_a, _, _ = _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, window,
                                                          sinks, scaling, BK, BF)
        b_p = tl.where(causal, tl.exp(b_s - b_lse[:, None]), 0.0)
        _, keep, b_log = _floored_weights(causal, soft, lin, b_s, b_a, g, b_mu, b_den)
        b_pl += tl.sum(b_p * b_log, axis=1)
        b_pk = tl.where(keep, b_p, 0.0)
        b_pms += tl.sum(tl.where(soft, b_pk, 0.0), axis=1)
        b_pml += tl.sum(tl.where(lin, b_pk, 0.0), axis=1)

    b_pm = b_pms + b_pml
    g_soft, g_lin = _part_shares(g)
    b_dg = b_pm * (b_al - b_es) / b_den - b_pml / g_lin + b_pms / g_soft
    tl.store(loss + i_bh * T + o_i, -b_pl, mask=m_i)
    tl.store(lse + i_bh * T + o_i, b_lse, mask=m_i)
    tl.store(mu + i_bh * T + o_i, b_mu, mask=m_i)
    tl.store(den + i_bh * T + o_i, b_den, mask=m_i)
    tl.store(pm + i_bh * T + o_i, b_pm, mask=m_i)
    tl.store(dg + i_bh * T + o_i, b_dg, mask=m_i)


@triton.jit
def _pair_grads(b_q, b_fq, k, fk, gamma, lse, mu, den, pm, loss, dloss, i_bh, o_i, o_j, T, H, K, F, window, sinks,
                scaling, BK: tl.constexpr, BF: tl.constexpr):
    """d loss / d s and d loss / d a [BTq, BTk] of query rows o_i and key rows o_j (module docstring),
    and the key blocks k [BTk, BK], fk [BTk, BF]."""
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    m_i = o_i < T
    b_lse = tl.load(lse + i_bh * T + o_i, mask=m_i, other=0.0)
    b_mu = tl.load(mu + i_bh * T + o_i, mask=m_i, other=0.0)
    b_den = tl.load(den + i_bh * T + o_i, mask=m_i, other=1.0)
    b_pm = tl.load(pm + i_bh * T + o_i, mask=m_i, other=0.0)
    b_loss = tl.load(loss + i_bh * T + o_i, mask=m_i, other=0.0)
    b_c = tl.load(dloss + i_bh * T + o_i, mask=m_i, other=0.0)
    causal, soft, lin, b_s, b_a, b_k, b_fk = _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, window,
                                                           sinks, scaling, BK, BF)
    b_p = tl.where(causal, tl.exp(b_s - b_lse[:, None]), 0.0)
    b_A, keep, b_log = _floored_weights(causal, soft, lin, b_s, b_a, g, b_mu, b_den)
    b_pk = tl.where(keep, b_p, 0.0)
    # Teacher part: -P (L - sum_j P L) with sum_j P L = -loss; student part only through kept weights.
    b_ds = b_c[:, None] * (tl.where(soft, b_pm[:, None] * b_A - b_pk, 0.0) - b_p * (b_log + b_loss[:, None]))
    # a is 0 exactly where a linear weight underflowed; those are not kept, so divide by 1 there.
    b_da = tl.where(lin, b_c[:, None] * (b_pm[:, None] * g / b_den[:, None] - b_pk / tl.where(keep, b_a, 1.0)), 0.0)
    return b_ds, b_da, b_k, b_fk


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BT"])
@triton.jit
def _xent_bwd_dq_kernel(
    q, k, fq, fk, gamma, lse, mu, den, pm, loss, dloss, dq, dfq, T, H, K, F, window, sinks, scaling,
    BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_i = i_c * BT + tl.arange(0, BT)
    b_q = load_rows(q, i_bh, o_i, T, K, BK)
    b_fq = load_rows(fq, i_bh, o_i, T, F, BF)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dfq = tl.zeros([BT, BF], dtype=tl.float32)
    for i_j in range(0, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        b_ds, b_da, b_k, b_fk = _pair_grads(b_q, b_fq, k, fk, gamma, lse, mu, den, pm, loss, dloss, i_bh, o_i, o_j,
                                            T, H, K, F, window, sinks, scaling, BK, BF)
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
        b_dfq += tl.dot(b_da.to(b_fk.dtype), b_fk)
    store_rows(dq, b_dq * scaling, i_bh, o_i, T, K, BK)
    store_rows(dfq, b_dfq, i_bh, o_i, T, F, BF)


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BT"])
@triton.jit
def _xent_bwd_dk_kernel(
    q, k, fq, fk, gamma, lse, mu, den, pm, loss, dloss, dk, dfk, T, H, K, F, NT, window, sinks, scaling,
    BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_j = i_c * BT + tl.arange(0, BT)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dfk = tl.zeros([BT, BF], dtype=tl.float32)
    for i_q in range(i_c, NT):
        o_i = i_q * BT + tl.arange(0, BT)
        b_q = load_rows(q, i_bh, o_i, T, K, BK)
        b_fq = load_rows(fq, i_bh, o_i, T, F, BF)
        b_ds, b_da, _, _ = _pair_grads(b_q, b_fq, k, fk, gamma, lse, mu, den, pm, loss, dloss, i_bh, o_i, o_j,
                                       T, H, K, F, window, sinks, scaling, BK, BF)
        b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q)
        b_dfk += tl.dot(tl.trans(b_da).to(b_fq.dtype), b_fq)
    store_rows(dk, b_dk * scaling, i_bh, o_j, T, K, BK)
    store_rows(dfk, b_dfk, i_bh, o_j, T, F, BF)


# --------------------------------------------------------------------------------------------------
# Launchers and autograd
# --------------------------------------------------------------------------------------------------


def _blocks(q: torch.Tensor, fq: torch.Tensor) -> dict[str, int]:
    return dict(BT=CHUNK, BK=block(q.shape[-1]), BF=block(fq.shape[-1]))


def _xent_fwd(
    q: torch.Tensor, k: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    window: int, sinks: int, scaling: float, eps: float,
) -> tuple[torch.Tensor, ...]:
    """Per-query losses [B, H, T], what the backward needs (lse, mu, Dn, Pm and the losses) and the
    per-query d loss_i / d gamma (all fp32, [B, H, T])."""
    batch, heads, length, head_dim = q.shape
    loss, lse, mu, den, pm, dg = (q.new_empty(batch, heads, length, dtype=torch.float32) for _ in range(6))
    _xent_fwd_kernel[(triton.cdiv(length, CHUNK), batch * heads)](
        q, k, fq, fk, gamma, loss, lse, mu, den, pm, dg, length, heads, head_dim, fq.shape[-1], window, sinks,
        scaling, eps, **_blocks(q, fq),
    )
    return loss, (lse, mu, den, pm, loss), dg


def _xent_bwd(
    q: torch.Tensor, k: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    stats: tuple[torch.Tensor, ...], dloss: torch.Tensor, window: int, sinks: int, scaling: float,
) -> tuple[torch.Tensor, ...]:
    batch, heads, length, head_dim = q.shape
    feat, num_chunks = fq.shape[-1], triton.cdiv(length, CHUNK)
    dq, dk = (torch.empty_like(q, dtype=torch.float32) for _ in range(2))
    dfq, dfk = (torch.empty_like(fq, dtype=torch.float32) for _ in range(2))
    grid = (num_chunks, batch * heads)
    _xent_bwd_dq_kernel[grid](q, k, fq, fk, gamma, *stats, dloss, dq, dfq, length, heads, head_dim, feat, window,
                              sinks, scaling, **_blocks(q, fq))
    _xent_bwd_dk_kernel[grid](q, k, fq, fk, gamma, *stats, dloss, dk, dfk, length, heads, head_dim, feat,
                              num_chunks, window, sinks, scaling, **_blocks(q, fq))
    return dq, dk, dfq, dfk


class AttentionTransferLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, fq, fk, gamma, window, sinks, scaling, eps):
        loss, stats, dg = _xent_fwd(q, k, fq, fk, gamma, window, sinks, scaling, eps)
        ctx.save_for_backward(q, k, fq, fk, gamma, dg, *stats)
        ctx.settings = (window, sinks, scaling)
        return loss.mean()

    @staticmethod
    def backward(ctx, dloss):
        q, k, fq, fk, gamma, dg, *stats = ctx.saved_tensors
        # The mean spreads the upstream gradient evenly over the queries.
        per_query = (dloss / dg.numel()).expand_as(dg).contiguous()
        dq, dk, dfq, dfk = _xent_bwd(q, k, fq, fk, gamma, stats, per_query, *ctx.settings)
        dgamma = (per_query * dg).sum(dim=(0, 2))
        return (dq.to(q.dtype), dk.to(k.dtype), dfq.to(fq.dtype), dfk.to(fk.dtype), dgamma.to(gamma.dtype),
                None, None, None, None)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def attention_transfer_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor | None = None,
    *,
    scaling: float,
    window: int = 0,
    sinks: int = 0,
    eps: float = EPS,
) -> torch.Tensor:
    """Hedgehog's attention-weight cross-entropy, tiled: O(T) memory instead of [T, T].

    Args:
        q, k: [B, H, T, d] the teacher's queries and keys (after RoPE, keys repeated for GQA).
        fq, fk: [B, H, T, F] the student's feature-mapped queries and keys (positive features).
        gamma: [H] share of the linear part (default all ones: plain linear attention).
        scaling: the teacher's softmax temperature.
        window, sinks: the student's softmax part, as in ``hybrid_attention_quadratic`` (0: none).
        eps: added to the student's normaliser.
    Returns:
        scalar fp32 -sum_{j<=i} P_ij log A_ij averaged over the B * H * T queries, A the weights of
        ``hybrid_attention_quadratic`` floored at ``reference.WEIGHT_FLOOR`` (see
        ``reference.attention_transfer_loss_naive``). Gradients flow
        into q, k, fq, fk and gamma. No padding: every token is a real one.

    Example:
        >>> loss = attention_transfer_loss(q, k, phi(q), phi(k), scaling=q.shape[-1] ** -0.5)
        >>> loss.backward()
    """
    check_rank("q", q, 4, "[B, H, T, d]")
    check_shape("k", k, q.shape)
    check_rank("fq", fq, 4, "[B, H, T, F]")
    check_shape("fq", fq, (*q.shape[:3], fq.shape[-1]))
    check_shape("fk", fk, fq.shape)
    if gamma is None:
        gamma = q.new_ones(q.shape[1], dtype=torch.float32)
    check_shape("gamma", gamma, (q.shape[1],))
    if window < 0 or sinks < 0:
        raise ValueError(f"window and sinks must be >= 0, got window={window}, sinks={sinks}")
    q, k = same_dtype(q, k)
    fq, fk = same_dtype(fq, fk)
    return AttentionTransferLoss.apply(q, k, fq, fk, gamma.contiguous(), window, sinks, scaling, eps)


def attention_output_mse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    teacher_out: torch.Tensor,
    *,
    scaling: float,
    window: int = 0,
    sinks: int = 0,
    eps: float = EPS,
) -> torch.Tensor:
    """LoLCATs' ``mse``: mean squared error between the student's output (``chunk_hybrid_attention``,
    O(T) memory) and the teacher's attention output ``teacher_out`` [B, H, T, D].

    Shapes as in ``chunk_hybrid_attention``; gradients flow into every input but ``teacher_out``.
    """
    check_shape("teacher_out", teacher_out, v.shape)
    out, _ = chunk_hybrid_attention(q, k, v, fq, fk, gamma, window=window, sinks=sinks, scaling=scaling, eps=eps)
    return (out - teacher_out.float()).pow(2).mean()
