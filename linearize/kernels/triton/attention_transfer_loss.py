"""Tiled attention-transfer losses (Hedgehog's ``xent``, LoLCATs' ``mse``), forward and backward, in Triton.

Teacher weights P_ij = softmax_j(s_ij) over j <= i, s_ij = scaling q_i.k_j. Student weights are those
of ``reference.hybrid_attention_quadratic``: A_ij = w_ij / Dn_i with w_ij = (1-g) e^(s_ij - mu_i) on
the softmax part (mu_i its maximum, a constant), w_ij = g a_ij, a_ij = fq_i.fk_j, on the linear part,
and Dn_i = sum_j w_ij + eps. With window = sinks = 0 and g = 1 this is plain linear attention. Then

    loss_i = -sum_j P_ij log A_ij = log Dn_i - sum_j P_ij log w_ij                 (sum_j P_ij = 1)
    log w_ij = log(1-g) + s_ij - mu_i  (softmax part),   log g + log a_ij  (linear part)

One pass over the key blocks of a query block gives Dn_i (an online maximum for mu_i) and, with the
teacher's online maximum m_i, the sums of e^(s_ij - m_i) times 1, s_ij (softmax part) and log a_ij
(linear part), from which sum_j P_ij log w_ij follows once mu_i is known. No [T, T] matrix is ever
stored: memory is O(T). With c = upstream / number of queries, the gradients are

    d s_ij = c (A_ij - P_ij) [softmax part]  - c P_ij (log w_ij - sum_j' P_ij' log w_ij')   -> q, k
    d a_ij = c (g / Dn_i - P_ij / a_ij) [linear part]                                       -> fq, fk
    d g    = c (sum_lin (A - P) / g - sum_soft (A - P) / (1-g)), per query                  -> gamma

The naive materialising version is ``naive.attention_transfer_loss_naive``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linearize.kernels.reference import EPS
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



# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, window, sinks, scaling,
                  BK: tl.constexpr, BF: tl.constexpr):
    """For query rows o_i (loaded blocks ``b_q``, ``b_fq``) and key rows o_j (pointers ``k``, ``fk``):
    the causal, softmax-part and linear-part masks, the scores s (NEG_BIG outside the causal mask) and
    a (1 outside the linear part, so its log is 0) [BTq, BTk], and the key blocks."""
    b_k = load_rows(k, i_bh, o_j, T, K, BK)
    b_fk = load_rows(fk, i_bh, o_j, T, F, BF)
    soft, lin = part_masks(o_i, o_j, T, window, sinks)
    causal = soft | lin
    b_s = tl.where(causal, tl.dot(b_q, tl.trans(b_k)) * scaling, NEG_BIG)
    b_a = tl.where(lin, tl.dot(b_fq, tl.trans(b_fk)), 1.0)
    return causal, soft, lin, b_s, b_a, b_k, b_fk


@triton.jit
def _part_shares(g):
    """1 - g and g as they enter logs and divisions, kept >= 1e-30: with g = 1 (plain linear
    attention) the softmax part is empty and its terms must be 0, not 0 * log 0."""
    return tl.maximum(1 - g, 1e-30), tl.maximum(g, 1e-30)


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BT"])
@triton.jit
def _xent_fwd_kernel(
    q, k, fq, fk, gamma, loss, lse, mu, den, plogw, dg, T, H, K, F, window, sinks, scaling, eps,
    BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_i = i_c * BT + tl.arange(0, BT)
    m_i = o_i < T
    b_q = load_rows(q, i_bh, o_i, T, K, BK)
    b_fq = load_rows(fq, i_bh, o_i, T, F, BF)
    # Teacher: running max, total mass, softmax-part mass, linear-part mass, sum e^(s-m) s (softmax
    # part) and sum e^(s-m) log a (linear part).
    b_m = tl.full([BT], NEG_BIG, dtype=tl.float32)
    b_l = tl.zeros([BT], dtype=tl.float32)
    b_ls = tl.zeros([BT], dtype=tl.float32)
    b_ll = tl.zeros([BT], dtype=tl.float32)
    b_xs = tl.zeros([BT], dtype=tl.float32)
    b_xl = tl.zeros([BT], dtype=tl.float32)
    # Student: running max of its softmax part, e^(s - mu) mass there, and the linear-part sum of a.
    b_mu = tl.full([BT], NEG_BIG, dtype=tl.float32)
    b_ds = tl.zeros([BT], dtype=tl.float32)
    b_dl = tl.zeros([BT], dtype=tl.float32)
    for i_j in range(0, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        causal, soft, lin, b_s, b_a, _, _ = _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, window,
                                                          sinks, scaling, BK, BF)
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_scale = tl.exp(b_m - b_m_new)
        b_p = tl.where(causal, tl.exp(b_s - b_m_new[:, None]), 0.0)
        b_l = b_l * b_scale + tl.sum(b_p, axis=1)
        b_ls = b_ls * b_scale + tl.sum(tl.where(soft, b_p, 0.0), axis=1)
        b_ll = b_ll * b_scale + tl.sum(tl.where(lin, b_p, 0.0), axis=1)
        b_xs = b_xs * b_scale + tl.sum(tl.where(soft, b_p * b_s, 0.0), axis=1)
        b_xl = b_xl * b_scale + tl.sum(tl.where(lin, b_p * tl.log(b_a), 0.0), axis=1)
        b_m = b_m_new
        b_s_soft = tl.where(soft, b_s, NEG_BIG)
        b_mu_new = tl.maximum(b_mu, tl.max(b_s_soft, axis=1))
        b_e = tl.where(soft, tl.exp(b_s_soft - b_mu_new[:, None]), 0.0)
        b_ds = b_ds * tl.exp(b_mu - b_mu_new) + tl.sum(b_e, axis=1)
        b_dl += tl.sum(tl.where(lin, b_a, 0.0), axis=1)
        b_mu = b_mu_new

    b_mu = tl.where(b_mu == NEG_BIG, 0.0, b_mu)
    b_l = tl.where(m_i, b_l, 1.0)  # rows past T saw no key; keep their (unstored) values finite
    b_den = (1 - g) * b_ds + g * b_dl + eps
    b_ps, b_pl = b_ls / b_l, b_ll / b_l  # teacher mass on the softmax and on the linear part
    g_soft, g_lin = _part_shares(g)
    b_plogw = (b_xs / b_l) + b_ps * (tl.log(g_soft) - b_mu) + (b_xl / b_l) + b_pl * tl.log(g_lin)
    b_dg = (b_dl / b_den - b_pl / g_lin) - (b_ds / b_den - b_ps / g_soft)
    tl.store(loss + i_bh * T + o_i, tl.log(b_den) - b_plogw, mask=m_i)
    tl.store(lse + i_bh * T + o_i, b_m + tl.log(b_l), mask=m_i)
    tl.store(mu + i_bh * T + o_i, b_mu, mask=m_i)
    tl.store(den + i_bh * T + o_i, b_den, mask=m_i)
    tl.store(plogw + i_bh * T + o_i, b_plogw, mask=m_i)
    tl.store(dg + i_bh * T + o_i, b_dg, mask=m_i)


@triton.jit
def _pair_grads(b_q, b_fq, k, fk, gamma, lse, mu, den, plogw, dloss, i_bh, o_i, o_j, T, H, K, F, window, sinks,
                scaling, BK: tl.constexpr, BF: tl.constexpr):
    """d loss / d s and d loss / d a [BTq, BTk] of query rows o_i and key rows o_j (module docstring),
    and the key blocks k [BTk, BK], fk [BTk, BF]."""
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    m_i = o_i < T
    b_lse = tl.load(lse + i_bh * T + o_i, mask=m_i, other=0.0)
    b_mu = tl.load(mu + i_bh * T + o_i, mask=m_i, other=0.0)
    b_den = tl.load(den + i_bh * T + o_i, mask=m_i, other=1.0)
    b_plogw = tl.load(plogw + i_bh * T + o_i, mask=m_i, other=0.0)
    b_c = tl.load(dloss + i_bh * T + o_i, mask=m_i, other=0.0)
    causal, soft, lin, b_s, b_a, b_k, b_fk = _block_scores(b_q, b_fq, k, fk, i_bh, o_i, o_j, T, K, F, window,
                                                           sinks, scaling, BK, BF)
    b_p = tl.where(causal, tl.exp(b_s - b_lse[:, None]), 0.0)
    b_w = tl.where(soft, (1 - g) * tl.exp(b_s - b_mu[:, None]), 0.0)
    g_soft, g_lin = _part_shares(g)
    b_logw = tl.where(soft, tl.log(g_soft) + b_s - b_mu[:, None], tl.where(lin, tl.log(g_lin) + tl.log(b_a), 0.0))
    b_ds = b_c[:, None] * (tl.where(soft, b_w / b_den[:, None] - b_p, 0.0)
                           - tl.where(causal, b_p * (b_logw - b_plogw[:, None]), 0.0))
    b_da = tl.where(lin, b_c[:, None] * (g / b_den[:, None] - b_p / b_a), 0.0)
    return b_ds, b_da, b_k, b_fk


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BT"])
@triton.jit
def _xent_bwd_dq_kernel(
    q, k, fq, fk, gamma, lse, mu, den, plogw, dloss, dq, dfq, T, H, K, F, window, sinks, scaling,
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
        b_ds, b_da, b_k, b_fk = _pair_grads(b_q, b_fq, k, fk, gamma, lse, mu, den, plogw, dloss, i_bh, o_i, o_j,
                                            T, H, K, F, window, sinks, scaling, BK, BF)
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
        b_dfq += tl.dot(b_da.to(b_fk.dtype), b_fk)
    store_rows(dq, b_dq * scaling, i_bh, o_i, T, K, BK)
    store_rows(dfq, b_dfq, i_bh, o_i, T, F, BF)


@triton.autotune(configs=launch_configs(), key=["BK", "BF", "BT"])
@triton.jit
def _xent_bwd_dk_kernel(
    q, k, fq, fk, gamma, lse, mu, den, plogw, dloss, dk, dfk, T, H, K, F, NT, window, sinks, scaling,
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
        b_ds, b_da, _, _ = _pair_grads(b_q, b_fq, k, fk, gamma, lse, mu, den, plogw, dloss, i_bh, o_i, o_j,
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
    """Per-query losses [B, H, T], what the backward needs (lse, mu, Dn, sum_j P log w) and the
    per-query d loss_i / d gamma (all fp32, [B, H, T])."""
    batch, heads, length, head_dim = q.shape
    loss, lse, mu, den, plogw, dg = (q.new_empty(batch, heads, length, dtype=torch.float32) for _ in range(6))
    _xent_fwd_kernel[(triton.cdiv(length, CHUNK), batch * heads)](
        q, k, fq, fk, gamma, loss, lse, mu, den, plogw, dg, length, heads, head_dim, fq.shape[-1], window, sinks,
        scaling, eps, **_blocks(q, fq),
    )
    return loss, (lse, mu, den, plogw), dg


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
        ``hybrid_attention_quadratic`` (see ``naive.attention_transfer_loss_naive``). Gradients flow
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
