"""Tiled attention-transfer losses (Hedgehog's ``xent``, LoLCATs' ``mse``), forward and backward, in Triton.

Teacher weights P_ij = softmax_j(s_ij) over j <= i with i - j < teacher_window (its own sliding
window, Mistral / Qwen2; the whole prefix without one), s_ij = scaling q_i.k_j. Student weights are
those of ``reference.hybrid_attention_quadratic``: A_ij = w_ij / Dn_i with w_ij = (1-g) e^(s_ij - mu_i)
on the softmax part (mu_i its maximum, a constant), w_ij = g a_ij, a_ij = fq_i.fk_j, on the linear
part, and Dn_i = sum_j w_ij + n0_i + eps, where n0_i = g fq_i.z0 is the share of an initial state
(JRT's prefix; 0 without one). With window = sinks = 0 and g = 1 this is plain linear attention. Then

    loss_i = -sum_j P_ij L_ij,   L_ij = log max(A_ij, tiny)         (tiny = reference.WEIGHT_FLOOR)

The floor keeps the loss finite where feature products underflow to 0. As it needs the final Dn_i
for every entry, the forward makes two passes over the key blocks of a query block: the first gives
Dn_i (an online maximum for mu_i) and the teacher's log-sum-exp, the second sums P_ij L_ij. No [T, T]
matrix is ever stored: memory is O(T). Like torch's clamp_min, an entry below the floor passes no
gradient to A_ij; with M_ij = [A_ij >= tiny], Pm_i = sum_j P_ij M_ij (1 without floored entries) and
c_i = upstream times the weight of query i in the mean, the gradients are

    d s_ij = c_i (Pm_i A_ij - P_ij M_ij) [softmax part]  - c_i P_ij (L_ij + loss_i)          -> q, k
    d a_ij = c_i (Pm_i g / Dn_i - P_ij M_ij / a_ij) [linear part]                          -> fq, fk
    d g    = c_i (Pm_i (sum_lin a - sum_soft e^(s - mu)) / Dn - sum_lin P M / g + sum_soft P M / (1-g))
    d n0_i = c_i Pm_i / Dn_i

per query, d g summed into gamma, d n0 passed on by autograd (to fq, z0, gamma). Padding is the
caller's: rows hold their real tokens first (``dispatch`` packs them so), and a query mask gives
padding queries (and JRT's prefix) weight 0 in the mean. Tiles along d (BK) and F (BF) are at most 64
wide: scores are summed tile by tile, and each gradient kernel produces one column tile of dq, dfq,
dk or dfk, recomputing the scores of its pairs. The materialising version is
``reference.transfer_losses_naive``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linearize.kernels.reference import EPS, WEIGHT_FLOOR
from linearize.kernels.triton.hybrid import chunk_hybrid_attention
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
    query_weights,
    same_dtype,
    store_tile,
    tile_dot,
)

FLOOR = tl.constexpr(WEIGHT_FLOOR)

# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _block_scores(q, k, fq, fk, i_bh, o_i, o_j, T, K, F, window, sinks, teacher_window, scaling,
                  BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr):
    """For query rows o_i and key rows o_j: the teacher's mask, the student's softmax-part and
    linear-part masks, the scores s and a (1 outside the linear part) [BTq, BTk]."""
    soft, lin = part_masks(o_i, o_j, T, window, sinks)
    teacher = (soft | lin) & (o_i[:, None] - o_j[None, :] < teacher_window)
    b_s = tile_dot(q, k, i_bh, o_i, o_j, T, K, BT, BK) * scaling
    b_a = tl.where(lin, tile_dot(fq, fk, i_bh, o_i, o_j, T, F, BT, BF), 1.0)
    return teacher, soft, lin, b_s, b_a


@triton.jit
def _floored_weights(soft, lin, b_s, b_a, g, b_mu, b_den):
    """Student weights A [BTq, BTk] (0 off its parts), the mask M of those at or above the floor
    (where the log passes a gradient) and L = log max(A, floor), as the reference computes them."""
    b_e = tl.exp(tl.where(soft, b_s - b_mu[:, None], NEG_BIG))  # the exponent masked: no overflow off the part
    b_w = tl.where(soft, (1 - g) * b_e, tl.where(lin, g * b_a, 0.0))
    b_A = b_w / b_den[:, None]
    return b_A, (soft | lin) & (b_A >= FLOOR), tl.log(tl.maximum(b_A, FLOOR))


@triton.jit
def _part_shares(g):
    """1 - g and g as they enter divisions, kept >= 1e-30: a part whose share is 0 has all its
    weights floored, so its terms are 0 / 1e-30 = 0, not 0 / 0."""
    return tl.maximum(1 - g, 1e-30), tl.maximum(g, 1e-30)


@triton.autotune(configs=launch_configs("BK", "BF"), key=["K", "F"], prune_configs_by=FIT_TILES)
@triton.jit
def _xent_fwd_kernel(
    q, k, fq, fk, gamma, den0, loss, lse, mu, den, pm, dg,
    T, H, K, F, window, sinks, teacher_window, scaling, eps,
    BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_i = i_c * BT + tl.arange(0, BT)
    m_i = o_i < T
    # Pass 1. Teacher: running max and mass. Student: running max of its softmax part, e^(s - mu)
    # mass there, and the linear-part sum of a.
    b_m = tl.full([BT], NEG_BIG, dtype=tl.float32)
    b_l = tl.zeros([BT], dtype=tl.float32)
    b_mu = tl.full([BT], NEG_BIG, dtype=tl.float32)
    b_es = tl.zeros([BT], dtype=tl.float32)
    b_al = tl.zeros([BT], dtype=tl.float32)
    for i_j in range(0, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        teacher, soft, lin, b_s, b_a = _block_scores(q, k, fq, fk, i_bh, o_i, o_j, T, K, F, window, sinks,
                                                     teacher_window, scaling, BT, BK, BF)
        b_st = tl.where(teacher, b_s, NEG_BIG)
        b_m_new = tl.maximum(b_m, tl.max(b_st, axis=1))
        b_p = tl.where(teacher, tl.exp(b_st - b_m_new[:, None]), 0.0)
        b_l = b_l * tl.exp(b_m - b_m_new) + tl.sum(b_p, axis=1)
        b_m = b_m_new
        b_ss = tl.where(soft, b_s, NEG_BIG)
        b_mu_new = tl.maximum(b_mu, tl.max(b_ss, axis=1))
        b_e = tl.where(soft, tl.exp(b_ss - b_mu_new[:, None]), 0.0)
        b_es = b_es * tl.exp(b_mu - b_mu_new) + tl.sum(b_e, axis=1)
        b_al += tl.sum(tl.where(lin, b_a, 0.0), axis=1)
        b_mu = b_mu_new

    b_mu = tl.where(b_mu == NEG_BIG, 0.0, b_mu)
    b_l = tl.where(m_i, b_l, 1.0)  # rows past T saw no key; keep their (unstored) values finite
    b_lse = b_m + tl.log(b_l)
    b_den = (1 - g) * b_es + g * b_al + load_vector(den0, i_bh, o_i, T, 0.0) + eps
    # Pass 2, now that Dn is known: sum_j P L, and the teacher's mass on the softmax-part and on the
    # linear-part weights that are not floored.
    b_pl = tl.zeros([BT], dtype=tl.float32)
    b_pms = tl.zeros([BT], dtype=tl.float32)
    b_pml = tl.zeros([BT], dtype=tl.float32)
    for i_j in range(0, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        teacher, soft, lin, b_s, b_a = _block_scores(q, k, fq, fk, i_bh, o_i, o_j, T, K, F, window, sinks,
                                                     teacher_window, scaling, BT, BK, BF)
        b_p = tl.exp(tl.where(teacher, b_s - b_lse[:, None], NEG_BIG))
        _, keep, b_log = _floored_weights(soft, lin, b_s, b_a, g, b_mu, b_den)
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
def _pair_grads(q, k, fq, fk, gamma, lse, mu, den, pm, loss, dloss, i_bh, o_i, o_j, T, H, K, F, window, sinks,
                teacher_window, scaling, BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr):
    """d total / d s and d total / d a [BTq, BTk] of query rows o_i and key rows o_j (module docstring)."""
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    b_lse = load_vector(lse, i_bh, o_i, T, 0.0)
    b_mu = load_vector(mu, i_bh, o_i, T, 0.0)
    b_den = load_vector(den, i_bh, o_i, T, 1.0)
    b_pm = load_vector(pm, i_bh, o_i, T, 0.0)
    b_loss = load_vector(loss, i_bh, o_i, T, 0.0)
    b_c = load_vector(dloss, i_bh, o_i, T, 0.0)
    teacher, soft, lin, b_s, b_a = _block_scores(q, k, fq, fk, i_bh, o_i, o_j, T, K, F, window, sinks,
                                                 teacher_window, scaling, BT, BK, BF)
    b_p = tl.exp(tl.where(teacher, b_s - b_lse[:, None], NEG_BIG))
    b_A, keep, b_log = _floored_weights(soft, lin, b_s, b_a, g, b_mu, b_den)
    b_pk = tl.where(keep, b_p, 0.0)
    # Teacher part: -P (L - sum_j P L) with sum_j P L = -loss; student part only through kept weights.
    b_ds = b_c[:, None] * (tl.where(soft, b_pm[:, None] * b_A - b_pk, 0.0) - b_p * (b_log + b_loss[:, None]))
    # a is 0 exactly where a linear weight underflowed; those are not kept, so divide by 1 there.
    b_da = tl.where(lin, b_c[:, None] * (b_pm[:, None] * g / b_den[:, None] - b_pk / tl.where(keep, b_a, 1.0)), 0.0)
    return b_ds, b_da


@triton.autotune(configs=launch_configs("BK", "BF", "BN"), key=["K", "F", "N", "WRT_FEATURES"],
                 prune_configs_by=FIT_TILES)
@triton.jit
def _xent_bwd_query_kernel(
    q, k, fq, fk, gamma, lse, mu, den, pm, loss, dloss, x, dx,
    T, H, K, F, N, window, sinks, teacher_window, scaling, out_scale,
    WRT_FEATURES: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BN: tl.constexpr,
):
    """One column tile of dq = scaling sum_j ds_ij k_j (x = k) or of dfq = sum_j da_ij fk_j (x = fk,
    WRT_FEATURES) for a query block; ``out_scale`` is that factor."""
    i_n, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_i = i_c * BT + tl.arange(0, BT)
    o_n = i_n * BN + tl.arange(0, BN)
    b_dx = tl.zeros([BT, BN], dtype=tl.float32)
    for i_j in range(0, i_c + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        b_ds, b_da = _pair_grads(q, k, fq, fk, gamma, lse, mu, den, pm, loss, dloss, i_bh, o_i, o_j, T, H, K, F,
                                 window, sinks, teacher_window, scaling, BT, BK, BF)
        b_d = b_da if WRT_FEATURES else b_ds
        b_dx += tl.dot(b_d.to(x.dtype.element_ty), load_tile(x, i_bh, o_j, o_n, T, N))
    store_tile(dx, b_dx * out_scale, i_bh, o_i, o_n, T, N)


@triton.autotune(configs=launch_configs("BK", "BF", "BN"), key=["K", "F", "N", "WRT_FEATURES"],
                 prune_configs_by=FIT_TILES)
@triton.jit
def _xent_bwd_key_kernel(
    q, k, fq, fk, gamma, lse, mu, den, pm, loss, dloss, y, dx,
    T, H, K, F, N, NT, window, sinks, teacher_window, scaling, out_scale,
    WRT_FEATURES: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BN: tl.constexpr,
):
    """One column tile of dk = scaling sum_i ds_ij q_i (y = q) or of dfk = sum_i da_ij fq_i (y = fq,
    WRT_FEATURES) for a key block."""
    i_n, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_j = i_c * BT + tl.arange(0, BT)
    o_n = i_n * BN + tl.arange(0, BN)
    b_dx = tl.zeros([BT, BN], dtype=tl.float32)
    for i_q in range(i_c, NT):
        o_i = i_q * BT + tl.arange(0, BT)
        b_ds, b_da = _pair_grads(q, k, fq, fk, gamma, lse, mu, den, pm, loss, dloss, i_bh, o_i, o_j, T, H, K, F,
                                 window, sinks, teacher_window, scaling, BT, BK, BF)
        b_d = b_da if WRT_FEATURES else b_ds
        b_dx += tl.dot(tl.trans(b_d).to(y.dtype.element_ty), load_tile(y, i_bh, o_i, o_n, T, N))
    store_tile(dx, b_dx * out_scale, i_bh, o_j, o_n, T, N)


# --------------------------------------------------------------------------------------------------
# Launchers and autograd
# --------------------------------------------------------------------------------------------------


def _xent_fwd(
    q: torch.Tensor, k: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor, den0: torch.Tensor,
    window: int, sinks: int, teacher_window: int, scaling: float, eps: float,
) -> tuple[torch.Tensor, ...]:
    """Per-query losses [B, H, T], what the backward needs (lse, mu, Dn, Pm and the losses) and the
    per-query d loss_i / d gamma (all fp32, [B, H, T])."""
    batch, heads, length, head_dim = q.shape
    loss, lse, mu, den, pm, dg = (q.new_empty(batch, heads, length, dtype=torch.float32) for _ in range(6))
    _xent_fwd_kernel[(triton.cdiv(length, CHUNK), batch * heads)](
        q, k, fq, fk, gamma, den0, loss, lse, mu, den, pm, dg, length, heads, head_dim, fq.shape[-1], window, sinks,
        teacher_window, scaling, eps, BT=CHUNK,
    )
    return loss, (lse, mu, den, pm, loss), dg


def _xent_bwd(
    q: torch.Tensor, k: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    stats: tuple[torch.Tensor, ...], dloss: torch.Tensor, window: int, sinks: int, teacher_window: int,
    scaling: float, needed: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dfq, dfk) in fp32, each None (its kernel not run) where ``needed`` says so."""
    batch, heads, length, head_dim = q.shape
    feat, num_chunks = fq.shape[-1], triton.cdiv(length, CHUNK)

    def run(kernel, operand: torch.Tensor, wrt_features: bool, *chunks: int) -> torch.Tensor:
        # The gradient has the shape of the rows it sums (k for dq, q for dk, ...): one BN tile each.
        width = operand.shape[-1]
        out = torch.empty_like(operand, dtype=torch.float32)
        kernel[lambda meta: (triton.cdiv(width, meta["BN"]), num_chunks, batch * heads)](
            q, k, fq, fk, gamma, *stats, dloss, operand, out, length, heads, head_dim, feat, width, *chunks,
            window, sinks, teacher_window, scaling, 1.0 if wrt_features else scaling,
            WRT_FEATURES=wrt_features, BT=CHUNK,
        )
        return out

    need_q, need_k, need_fq, need_fk = needed
    return (
        run(_xent_bwd_query_kernel, k, False) if need_q else None,
        run(_xent_bwd_key_kernel, q, False, num_chunks) if need_k else None,
        run(_xent_bwd_query_kernel, fk, True) if need_fq else None,
        run(_xent_bwd_key_kernel, fq, True, num_chunks) if need_fk else None,
    )


class AttentionTransferLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, fq, fk, gamma, den0, weights, window, sinks, teacher_window, scaling, eps):
        loss, stats, dg = _xent_fwd(q, k, fq, fk, gamma, den0, window, sinks, teacher_window, scaling, eps)
        ctx.save_for_backward(q, k, fq, fk, gamma, den0, weights, dg, *stats)
        ctx.settings = (window, sinks, teacher_window, scaling)
        return (loss * weights).sum()

    @staticmethod
    def backward(ctx, dloss):
        q, k, fq, fk, gamma, den0, weights, dg, *stats = ctx.saved_tensors
        needed = ctx.needs_input_grad
        per_query = (dloss * weights).expand_as(dg).contiguous()  # c_i: the weight of loss_i in the total
        grads = _xent_bwd(q, k, fq, fk, gamma, stats, per_query, *ctx.settings, needed[:4])
        dgamma = (per_query * dg).sum(dim=(0, 2)) if needed[4] else None
        _, _, den, pm, _ = stats
        dden0 = per_query * pm / den if needed[5] else None
        grads = (*grads, dgamma, dden0)
        inputs = (q, k, fq, fk, gamma, den0)
        return (*(g.to(x.dtype) if g is not None else None for g, x in zip(grads, inputs)),
                None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def _check_options(
    q: torch.Tensor, fq: torch.Tensor, window: int, sinks: int,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None, query_mask: torch.Tensor | None,
) -> None:
    if window < 0 or sinks < 0:
        raise ValueError(f"window and sinks must be >= 0, got window={window}, sinks={sinks}")
    batch, heads, length = q.shape[:3]
    if initial_state is not None:
        check_shape("initial z", initial_state[1], (batch, heads, fq.shape[-1]))
    if query_mask is not None:
        check_shape("query_mask", query_mask, (batch, length))


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
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    query_mask: torch.Tensor | None = None,
    teacher_window: int | None = None,
) -> torch.Tensor:
    """Hedgehog's attention-weight cross-entropy, tiled: O(T) memory instead of [T, T].

    Args:
        q, k: [B, H, T, d] the teacher's queries and keys (after RoPE, keys repeated for GQA).
        fq, fk: [B, H, T, F] the student's feature-mapped queries and keys (positive features).
        gamma: [H] share of the linear part (default all ones: plain linear attention).
        scaling: the teacher's softmax temperature.
        window, sinks: the student's softmax part, as in ``hybrid_attention_quadratic`` (0: none).
        eps: added to the student's normaliser.
        initial_state: optional (S [B, H, F, D], z [B, H, F]) the student's linear part starts from
            (JRT's prefix state); only z enters the weights' normaliser, and it gets gradients.
        query_mask: [B, T] bool, the queries the loss averages over (default all): False for right
            padding and for JRT's prefix. Positions are indices, so there must be no left padding
            (``dispatch.attention_transfer_loss`` packs a padded batch first).
        teacher_window: the teacher's own sliding window (key j counts for query i iff
            i - j < teacher_window, as ``reference.softmax_attention``); None: full causal.
    Returns:
        scalar fp32 -sum_{j<=i} P_ij log A_ij averaged over the masked queries and the heads, A the
        weights of ``hybrid_attention_quadratic`` floored at ``reference.WEIGHT_FLOOR`` (the ``xent`` of
        ``reference.transfer_losses_naive``). Gradients flow into q, k, fq, fk, gamma and z; those of
        inputs that do not require grad are not computed (frozen q, k cost no kernel).

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
    _check_options(q, fq, window, sinks, initial_state, query_mask)
    if teacher_window is not None and teacher_window < 1:
        raise ValueError(f"teacher_window must be >= 1 or None, got {teacher_window}")
    q, k = same_dtype(q, k)
    fq, fk = same_dtype(fq, fk)
    if initial_state is None:
        den0 = q.new_zeros(q.shape[:3], dtype=torch.float32)
    else:  # g fq.z0 per query, through autograd into fq, z0 and gamma
        den0 = gamma.float()[:, None] * (fq.float() @ initial_state[1].float()[..., None]).squeeze(-1)
    return AttentionTransferLoss.apply(
        q, k, fq, fk, gamma.contiguous(), den0.contiguous(), query_weights(query_mask, q), window, sinks,
        q.shape[2] if teacher_window is None else teacher_window, scaling, eps,
    )


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
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoLCATs' ``mse``: mean squared error between the student's output (``chunk_hybrid_attention``,
    O(T) memory) and the teacher's attention output ``teacher_out`` [B, H, T, D], averaged over the
    queries of ``query_mask`` [B, T] (default all; no left padding) and the heads.

    Shapes as in ``chunk_hybrid_attention`` (``initial_state`` too); gradients flow into every input
    but ``teacher_out``.
    """
    check_shape("teacher_out", teacher_out, v.shape)
    _check_options(q, fq, window, sinks, initial_state, query_mask)
    out, _ = chunk_hybrid_attention(q, k, v, fq, fk, gamma, window=window, sinks=sinks, scaling=scaling,
                                    initial_state=initial_state, eps=eps)
    per_query = (out - teacher_out.float()).pow(2).mean(dim=-1)
    return (per_query * query_weights(query_mask, q)).sum()
