"""Attention-transfer losses between a layer's softmax attention (teacher) and its linear attention.

    xent: Hedgehog's cross-entropy between the softmax weights P and the linear weights A,
          -sum_j P_ij log A_ij, averaged over queries and heads (Zhang et al. 2024).
    mse:  LoLCATs' mean squared error between the attention outputs P v and the linear output
          (Zhang et al. 2024, arXiv 2410.10254), before the output projection.

Both use the quadratic form, so they hold one [T, T] matrix per head: fine for the block lengths
of CPU recipes (512); the tiled Triton loss removes that limit on GPU.
"""

from __future__ import annotations

import torch

from linearize.hf.attention_math import hybrid_attention_quadratic, token_positions


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scaling: float):
    """Causal softmax attention of the teacher: weights [B, H, T, T] and output [B, H, T, D] (fp32)."""
    positions = token_positions(valid)
    allowed = (positions[:, None, None, :] <= positions[:, None, :, None]) & valid[:, None, None, :]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return weights, weights @ v.float()


def transfer_losses(core, q, k, v, valid, initial_state=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-layer losses of ``core`` (a LinearAttentionCore) against softmax attention on q, k, v.

    Returns ({"xent": ..., "mse": ...}, the teacher's attention output [B, H, T, D]).
    """
    teacher_weights, teacher_out = softmax_attention(q, k, v, valid, core.scaling)
    options = core.options
    student_out, student_weights = hybrid_attention_quadratic(
        q, k, v, core.feature_map_q(q), core.feature_map_k(k), core.gamma(q.device),
        window=options.window, sinks=options.sink_tokens, scaling=core.scaling, valid=valid,
        initial_state=initial_state, eps=options.eps,
    )
    query_mask = valid[:, None, :].float()  # [B, 1, T]: padding queries do not count
    per_query = -(teacher_weights * torch.log(student_weights.clamp_min(1e-12))).sum(dim=-1)
    xent = (per_query * query_mask).sum() / (query_mask.sum() * q.shape[1])
    squared = ((student_out - teacher_out) ** 2).mean(dim=-1)
    mse = (squared * query_mask).sum() / (query_mask.sum() * q.shape[1])
    return {"xent": xent, "mse": mse}, teacher_out
