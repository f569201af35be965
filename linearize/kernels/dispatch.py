"""Pick the implementation of the attention math for a call.

``backend="auto"`` (the default) runs the exact PyTorch reference on CPU tensors. ``"reference"``
forces it everywhere.
"""

from __future__ import annotations

import torch

from linearize.kernels import reference

BACKENDS = ("auto", "reference")


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    state: reference.RecurrentState | None = None,
    *,
    window: int,
    sinks: int,
    scaling: float,
    valid: torch.Tensor | None = None,
    chunk_size: int = 128,
    eps: float = reference.EPS,
    backend: str = "auto",
) -> tuple[torch.Tensor, reference.RecurrentState]:
    """Window + linear attention from ``state``; see ``reference.hybrid_attention_chunked``.

    Shapes: q, k [B, H, T, d]; v [B, H, T, D]; fq, fk [B, H, T, F]; gamma [H]; valid [B, T].
    Returns out [B, H, T, D] (fp32) and the state after the last token.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return reference.hybrid_attention_chunked(
        q, k, v, fq, fk, gamma, state, window=window, sinks=sinks, scaling=scaling, valid=valid,
        chunk_size=chunk_size, eps=eps,
    )
