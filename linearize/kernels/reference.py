"""Exact PyTorch attention math: the oracle for the Triton kernels and the CPU path.

The math itself lives in ``linearize/hf/attention_math.py`` because every exported model folder
carries that file; this module re-exports it so there is exactly one definition. Below it are the
materialising references of the teacher's softmax attention and of the attention-transfer losses
(plain fp32, [T, T] matrices): the readable spec of the tiled loss kernel, and its CPU path.
"""

from __future__ import annotations

import torch

from linearize.hf.attention_math import (
    EPS,
    QUADRATIC_MAX_LENGTH,
    AttentionSpec,
    RecurrentState,
    StepPlan,
    advance_state,
    attend_state,
    based_features,
    build_state,
    choose_cache,
    expand_kv_heads,
    hedgehog_features,
    hybrid_attention_cached,
    hybrid_attention_chunked,
    hybrid_attention_continue,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
    hybrid_attention_step,
    hybrid_attention_torch,
    pack_left,
    part_masks,
    permute_tokens,
    prefix_state,
    taylor_features,
    token_positions,
)

__all__ = [
    "EPS",
    "QUADRATIC_MAX_LENGTH",
    "AttentionSpec",
    "RecurrentState",
    "StepPlan",
    "advance_state",
    "attend_state",
    "WEIGHT_FLOOR",
    "attention_transfer_loss_naive",
    "based_features",
    "build_state",
    "choose_cache",
    "expand_kv_heads",
    "hedgehog_features",
    "hybrid_attention_cached",
    "hybrid_attention_chunked",
    "hybrid_attention_continue",
    "hybrid_attention_quadratic",
    "hybrid_attention_recurrent",
    "hybrid_attention_step",
    "hybrid_attention_torch",
    "pack_left",
    "part_masks",
    "permute_tokens",
    "prefix_state",
    "softmax_attention",
    "taylor_features",
    "token_positions",
    "transfer_losses_naive",
]

# Floor of the student's weights inside the log of ``xent``: a peaky feature map whose products
# underflow to 0 (easy in bf16) would otherwise give log 0 = -inf. The tiled kernel uses the same.
WEIGHT_FLOOR = torch.finfo(torch.float32).tiny


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    *,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's causal softmax attention, materialised.

    Args:
        q, k: [B, H, T, d]; v: [B, H, T, D].
        scaling: softmax temperature.
        valid: [B, T] bool, False for padding; default all True.
        sliding_window: the teacher's own sliding window (Mistral / Qwen2 ``config.sliding_window``);
            None: full causal attention. Key j is allowed for query i iff j <= i and
            i - j < sliding_window (positions among the real tokens), i.e. the window counts the
            query itself. This is transformers' convention (``masking_utils.sliding_window_overlay``:
            kv_idx > q_idx - sliding_window; flash attention gets window_size sliding_window - 1),
            and equals its mask for left padding, where real positions are indices shifted.
    Returns:
        weights [B, H, T, T] and output [B, H, T, D], fp32; rows of queries without any allowed key
        are zero.
    """
    if valid is None:
        valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    allowed = softmax_mask(valid, sliding_window)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return weights, weights @ v.float()


def softmax_mask(valid: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """[B, 1, T, T] bool: key j allowed for query i in the teacher's attention (``softmax_attention``'s rule)."""
    positions = token_positions(valid)
    query_pos, key_pos = positions[:, None, :, None], positions[:, None, None, :]
    allowed = (key_pos <= query_pos) & valid[:, None, None, :]
    if sliding_window is not None:
        allowed = allowed & (query_pos - key_pos < sliding_window)
    return allowed


def softmax_attention_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, valid: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The output of ``softmax_attention`` through SDPA (fused; no [T, T] weights kept), fp32."""
    if bool(valid.all()) and sliding_window is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).float()
    allowed = softmax_mask(valid, sliding_window)
    # A query with no allowed key (left padding) gets zeros, as in softmax_attention, not NaN.
    has_key = allowed.any(dim=-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, scale=scaling)
    return out.float().masked_fill(~has_key, 0.0)


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
    sliding_window: int | None = None,
    scored: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Both attention-transfer losses against the teacher's softmax attention, and its output.

    ``xent``: -sum_{j<=i} P_ij log max(A_ij, tiny) with P the softmax weights, A the weights of
    ``hybrid_attention_quadratic`` and tiny the smallest normal fp32 (``WEIGHT_FLOOR``);
    ``mse``: mean squared error of the outputs. Both are averaged over real (non-padding) queries
    and heads, or over the queries ``scored`` [B, T] when given (JRT: not the prefix, whose outputs
    saw later tokens). Shapes: q, k [B, H, T, d]; v [B, H, T, D]; fq, fk [B, H, T, F]; gamma [H];
    valid [B, T]. ``window``, ``sinks`` are the student's softmax part, ``sliding_window`` the
    teacher's (see ``softmax_attention``). Returns ({"xent", "mse"}, teacher output [B, H, T, D]).
    """
    if valid is None:
        valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    teacher_weights, teacher_out = softmax_attention(q, k, v, scaling, valid, sliding_window=sliding_window)
    student_out, student_weights = hybrid_attention_quadratic(
        q, k, v, fq, fk, gamma, AttentionSpec(window=window, sinks=sinks, scaling=scaling, eps=eps), valid=valid,
        initial_state=initial_state,
    )
    # Where P is 0 (future, padding or out-of-window keys) log(1) keeps 0 * log 0 out of the graph
    # (its gradient is NaN); elsewhere the floor keeps log finite and, like any clamp, passes no
    # gradient below it.
    floored = student_weights.clamp_min(WEIGHT_FLOOR)
    log_student = torch.where(teacher_weights > 0, floored, torch.ones_like(floored)).log()
    query_mask = (valid if scored is None else scored & valid)[:, None, :].float()  # [B, 1, T]
    count = (query_mask.sum() * q.shape[1]).clamp_min(1)
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
