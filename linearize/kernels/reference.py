"""Exact PyTorch attention math: the oracle for the Triton kernels and the CPU path.

The math itself lives in ``linearize/hf/attention_math.py`` because every exported model folder
carries that file; this module re-exports it so there is exactly one definition.
"""

from linearize.hf.attention_math import (
    EPS,
    RecurrentState,
    based_features,
    hedgehog_features,
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
    hybrid_attention_step,
    part_masks,
    prefix_state,
    taylor_features,
    token_positions,
)

__all__ = [
    "EPS",
    "RecurrentState",
    "based_features",
    "hedgehog_features",
    "hybrid_attention_chunked",
    "hybrid_attention_quadratic",
    "hybrid_attention_recurrent",
    "hybrid_attention_step",
    "part_masks",
    "prefix_state",
    "taylor_features",
    "token_positions",
]
