"""The recall–state-size frontier: recall accuracy against the bytes a model keeps to decode.

BASED (Arora et al. 2024, arXiv 2402.18668) plots recall against recurrent state size to show a
trade-off curve; this is that figure for converted models. Each point is a model configuration
(the teacher, the student as exported, the student with a training-free change such as a global
cache, another window, gamma = 0 or layers given back their softmax attention), with
* x: the decode state at a given context: the teacher's KV cache; the student's fixed-size
  recurrent states plus the KV cache of any softmax layer;
* y: the mean passkey accuracy and the mean MQAR accuracy over the measured lengths.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from linearize.hf.attention_math import RecurrentState

STATE_CONTEXT = 4096  # the context the state is sized at (the and LoLA's 4k)


def _attention_shape(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a Llama-family or GPT-2 config."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", None) or config.n_embd) // heads
    return heads, kv_heads, head_dim


def decode_state_bytes(model: PreTrainedModel, context: int = STATE_CONTEXT, batch: int = 1) -> int:
    """Bytes of everything ``model`` keeps per sequence to continue after ``context`` tokens.

    A softmax layer keeps keys and values per KV head, growing with the context; a linearized
    layer keeps a ``RecurrentState`` whose size its spec fixes. Computed from the shapes, in the
    model's dtype (the state's [S | z] is always fp32), so it equals ``cache.num_bytes()`` after a
    real prefill (tested) without running one.
    """
    heads, kv_heads, head_dim = _attention_shape(model.config)
    dtype = next(model.parameters()).dtype
    per_token = 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    if not hasattr(model, "decoder_layers"):  # a plain transformers model: all softmax
        return batch * context * per_token * model.config.num_hidden_layers
    total = 0
    for layer in model.decoder_layers():
        attention = getattr(layer, model.attention_attr)
        core = getattr(attention, "core", None)
        if core is None:
            total += batch * context * per_token
            continue
        state = RecurrentState.empty(batch, heads, kv_heads, head_dim, head_dim, core.feature_map_q.output_dim,
                                     core.spec, device="meta", dtype=dtype)
        total += state.num_bytes()
    return total


def mean_accuracy(points: list[dict]) -> float:
    return sum(point["accuracy"] for point in points) / len(points)


def frontier_point(label: str, model: PreTrainedModel, curves: dict, config: dict | None = None,
                   context: int = STATE_CONTEXT) -> dict:
    """One point of the frontier from a model's recall curves (``recall.recall_curves``, plain prompts)."""
    return {
        "label": label, "config": config or {}, "state_context": context,
        "state_bytes": decode_state_bytes(model, context),
        "passkey": mean_accuracy(curves["passkey"]["plain"]), "mqar": mean_accuracy(curves["mqar"]["plain"]),
        "curves": curves,
    }
