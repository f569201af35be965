"""Attention-transfer losses between a layer's softmax attention (teacher) and its linear attention.

    xent: Hedgehog's cross-entropy between the softmax weights P and the linear weights A,
          -sum_j P_ij log A_ij, averaged over queries and heads (Zhang et al. 2024, arXiv 2402.04347).
    mse:  LoLCATs' mean squared error between the attention outputs P v and the linear output,
          before the output projection (Zhang et al. 2024, arXiv 2410.10254).

On CUDA the tiled Triton kernels compute both with O(T) memory, so long blocks fit, for any
padding, JRT prefix state and teacher sliding window; on the CPU the materialising reference does
(fine at CPU lengths), except that ``mse`` alone never materialises the teacher's weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from linearize.kernels import dispatch
from linearize.kernels.reference import hybrid_attention_quadratic, softmax_attention_fused, transfer_losses_naive


def transfer_losses(
    core, q, k, v, valid, initial_state=None, need_xent: bool = True, scored: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Losses of ``core`` (a LinearAttentionCore) against softmax attention on q, k, v [B, H, T, *].

    The teacher's attention is causal, within its own sliding window when it has one
    (``core.teacher_window``). ``scored`` [B, T] limits the losses to some queries (JRT: those after
    the prefix). Returns ({"xent": ..., "mse": ...}, the teacher's attention output [B, H, T, D]).
    Without ``need_xent`` only ``mse`` is computed, which needs neither attention matrix of the teacher.
    ``backend`` is the kernels' (``dispatch``): auto takes Triton on CUDA.
    """
    options = core.options
    fq, fk, gamma = core.feature_map_q(q), core.feature_map_k(k), core.gamma(q.device)
    common = dict(scaling=core.scaling, window=options.window, sinks=options.sink_tokens, eps=options.eps)
    # A sliding window at least as long as the block is plain causal attention.
    teacher_window = core.teacher_window if core.teacher_window is not None and core.teacher_window < q.shape[2] else None
    if dispatch.uses_triton(backend, q):
        teacher_out = softmax_attention_fused(q, k, v, core.scaling, valid, teacher_window)
        masks = dict(valid=valid, scored=scored, initial_state=initial_state, backend=backend)
        losses = {"mse": dispatch.attention_output_mse(q, k, v, fq, fk, gamma, teacher_out, **common, **masks)}
        if need_xent:
            losses["xent"] = dispatch.attention_transfer_loss(q, k, fq, fk, gamma, sliding_window=teacher_window,
                                                              **common, **masks)
        return losses, teacher_out
    plain_block = bool(valid.all()) and scored is None and teacher_window is None
    if need_xent or not plain_block:
        return transfer_losses_naive(q, k, v, fq, fk, gamma, valid=valid, initial_state=initial_state,
                                     sliding_window=teacher_window, scored=scored, **common)
    # mse alone on the CPU: the teacher's output comes from SDPA, only the student's weights materialise.
    teacher_out = softmax_attention_fused(q, k, v, core.scaling, valid)
    # The global cache is chosen at run time and needs no training: the maps are fitted on the window alone.
    spec = replace(core.spec, cache_size=0)
    student_out, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, spec, initial_state=initial_state)
    return {"mse": (student_out - teacher_out).pow(2).mean()}, teacher_out
