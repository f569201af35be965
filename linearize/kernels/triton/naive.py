"""Materialising PyTorch references for the Triton-only ops (the attention math itself is in
``linearize.kernels.reference``). Plain fp32, [T, T] matrices: the readable spec, for tests."""

from __future__ import annotations

import torch

from linearize.kernels.reference import EPS


def attention_transfer_loss_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    scaling: float,
    eps: float = EPS,
) -> torch.Tensor:
    """Cross-entropy from the teacher's causal softmax weights to the linear-attention weights.

    P = softmax(scaling q k^T) and A_ij = fq_i.fk_j / (sum_{j'<=i} fq_i.fk_j' + eps), both causal
    (A is ``hybrid_attention_quadratic``'s weights for window = sinks = 0, gamma = 1). Returns the
    scalar -sum_{j<=i} P_ij log A_ij averaged over all B * H * T queries.
    Shapes: q, k [B, H, T, d]; fq, fk [B, H, T, F] (positive features).
    """
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = (q.float() @ k.float().transpose(-1, -2) * scaling).masked_fill(~causal, float("-inf"))
    teacher = scores.softmax(dim=-1)
    linear = fq.float() @ fk.float().transpose(-1, -2)
    denominator = linear.masked_fill(~causal, 0.0).sum(dim=-1, keepdim=True) + eps
    # Above the diagonal P is 0; log(1) there keeps 0 * log 0 out of the graph (its gradient is NaN).
    log_student = linear.masked_fill(~causal, 1.0).log() - denominator.log()
    return -(teacher * log_student).masked_fill(~causal, 0.0).sum(dim=-1).mean()
