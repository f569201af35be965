"""Attention-transfer losses between a layer's softmax attention (teacher) and its linear attention.

    xent: Hedgehog's cross-entropy between the softmax weights P and the linear weights A,
          -sum_j P_ij log A_ij, averaged over queries and heads (Zhang et al. 2024, arXiv 2402.04347).
    mse:  LoLCATs' mean squared error between the attention outputs P v and the linear output,
          before the output projection (Zhang et al. 2024, arXiv 2410.10254).

On CUDA, for sequences without padding or JRT prefix, the tiled Triton kernels compute both with
O(T) memory, so long blocks fit; elsewhere the materialising reference does (fine at CPU lengths).
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from linearize.kernels import dispatch
from linearize.kernels.reference import hybrid_attention_quadratic, transfer_losses_naive


def transfer_losses(
    core, q, k, v, valid, initial_state=None, need_xent: bool = True, scored: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Losses of ``core`` (a LinearAttentionCore) against softmax attention on q, k, v [B, H, T, *].

    The teacher's attention is causal, within its own sliding window when it has one
    (``core.teacher_window``). ``scored`` [B, T] limits the losses to some queries (JRT: those after
    the prefix). Returns ({"xent": ..., "mse": ...}, the teacher's attention output [B, H, T, D]).
    Without ``need_xent`` only ``mse`` is computed, which needs neither attention matrix of the teacher.
    """
    options = core.options
    fq, fk, gamma = core.feature_map_q(q), core.feature_map_k(k), core.gamma(q.device)
    common = dict(scaling=core.scaling, window=options.window, sinks=options.sink_tokens, eps=options.eps)
    # A sliding window at least as long as the block is plain causal attention.
    teacher_window = core.teacher_window if core.teacher_window is not None and core.teacher_window < q.shape[2] else None
    plain_block = bool(valid.all()) and scored is None and teacher_window is None
    tiled = q.is_cuda and initial_state is None and plain_block
    if not plain_block or (need_xent and not tiled):
        return transfer_losses_naive(q, k, v, fq, fk, gamma, valid=valid, initial_state=initial_state,
                                     sliding_window=teacher_window, scored=scored, **common)
    teacher_out = scaled_dot_product_attention(q, k, v, is_causal=True, scale=core.scaling).float()
    if tiled:
        losses = {"mse": dispatch.attention_output_mse(q, k, v, fq, fk, gamma, teacher_out, **common)}
        if need_xent:
            losses["xent"] = dispatch.attention_transfer_loss(q, k, fq, fk, gamma, **common)
        return losses, teacher_out
    # mse alone on the CPU: the teacher's output comes from SDPA, only the student's weights materialise.
    student_out, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, core.spec, initial_state=initial_state)
    return {"mse": (student_out - teacher_out).pow(2).mean()}, teacher_out
