"""Materialising PyTorch references for the Triton-only ops (the attention math itself is in
``linearize.kernels.reference``). Plain fp32, [T, T] matrices: the readable spec, and the CPU path."""

from __future__ import annotations

import torch

from linearize.kernels.reference import EPS, hybrid_attention_quadratic, token_positions


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's causal softmax attention: weights [B, H, T, T] and output [B, H, T, D] (fp32)."""
    if valid is None:
        valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    positions = token_positions(valid)
    allowed = (positions[:, None, None, :] <= positions[:, None, :, None]) & valid[:, None, None, :]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return weights, weights @ v.float()


def transfer_losses_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    *,
    scaling: float,
    window: int = 0,
    sinks: int = 0,
    valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = EPS,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Both attention-transfer losses against the teacher's softmax attention, and its output.

    ``xent``: -sum_{j<=i} P_ij log A_ij with P the softmax weights and A the weights of
    ``hybrid_attention_quadratic``; ``mse``: mean squared error of the outputs. Both are averaged
    over real (non-padding) queries and heads. Returns ({"xent", "mse"}, teacher output [B, H, T, D]).
    """
    if valid is None:
        valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    teacher_weights, teacher_out = softmax_attention(q, k, v, scaling, valid)
    student_out, student_weights = hybrid_attention_quadratic(
        q, k, v, fq, fk, gamma, window=window, sinks=sinks, scaling=scaling, valid=valid,
        initial_state=initial_state, eps=eps,
    )
    # Where P is 0 (future or padding keys) log(1) keeps 0 * log 0 out of the graph (its gradient is NaN).
    log_student = torch.where(teacher_weights > 0, student_weights, torch.ones_like(student_weights)).log()
    query_mask = valid[:, None, :].float()  # [B, 1, T]
    count = query_mask.sum() * q.shape[1]
    xent = (-(teacher_weights * log_student).sum(dim=-1) * query_mask).sum() / count
    mse = (((student_out - teacher_out) ** 2).mean(dim=-1) * query_mask).sum() / count
    return {"xent": xent, "mse": mse}, teacher_out


def attention_transfer_loss_naive(
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
    """The ``xent`` of ``transfer_losses_naive`` alone, with the signature of the tiled kernel
    (gamma defaults to ones). Shapes: q, k [B, H, T, d]; fq, fk [B, H, T, F]; gamma [H]."""
    if gamma is None:
        gamma = torch.ones(q.shape[1], device=q.device)
    losses, _ = transfer_losses_naive(q, k, k, fq, fk, gamma, scaling=scaling, window=window, sinks=sinks, eps=eps)
    return losses["xent"]
