"""Run a converted model as its own teacher while measuring every layer's transfer loss.

Inside ``transfer_mode(model)`` each linear attention layer computes the teacher's softmax attention
from its (frozen, shared) q, k, v, passes that output on, and records its loss against its own
linear attention. One forward pass therefore equals the teacher's forward pass, and each layer's
loss depends only on its own feature maps, mix factor and encoder. Parameter names do not change,
so checkpoints written inside the context load outside it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from linearize.attention_transfer.losses import transfer_losses
from linearize.kernels.reference import expand_kv_heads, softmax_attention
from linearize.hf.modeling_linearized import LinearAttentionCore, jrt_prefix_positions


class LayerTransfer:
    """Takes the place of one ``LinearAttentionCore.forward``: returns softmax attention and
    records the layer's losses in ``losses``."""

    def __init__(self, core: LinearAttentionCore, layer: int, with_losses: bool, need_xent: bool):
        self.core = core
        self.layer = layer
        self.with_losses = with_losses
        self.need_xent = need_xent
        self.losses: dict[str, torch.Tensor] = {}

    def __call__(self, q, k, v, *, valid, cache_layer, encoder_kv=None, prefix_length=0, plan=None):
        if cache_layer is not None:
            raise ValueError("transfer mode runs without a cache: call the model with use_cache=False")
        core = self.core
        groups = q.shape[1] // k.shape[1]  # the core gets keys and values per KV head
        k, v = expand_kv_heads(k, groups), expand_kv_heads(v, groups)
        if valid is None:  # the model found no padding in this call
            valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
        if not self.with_losses:
            return softmax_attention(q, k, v, core.scaling, valid, sliding_window=core.teacher_window)[1].to(q.dtype)
        initial = core.encoder_prefix_state(valid, encoder_kv, prefix_length)
        # The prefix's outputs read later tokens through the encoder state: no loss falls on them.
        scored = None if initial is None else valid & ~jrt_prefix_positions(valid, prefix_length)
        self.losses, teacher_out = transfer_losses(core, q, k, v, valid, initial, self.need_xent, scored)
        return teacher_out.detach().to(q.dtype)


def linear_attention_layers(model: nn.Module) -> list[tuple[int, LinearAttentionCore]]:
    """(layer index, core) of every linear attention layer of ``model``, in layer order."""
    return [(module.layer_idx, module.core) for module in model.modules()
            if isinstance(getattr(module, "core", None), LinearAttentionCore)]


@contextmanager
def transfer_mode(model: nn.Module, with_losses: bool = True, need_xent: bool = True):
    """Make every linear layer compute its teacher's attention; yields the ``LayerTransfer`` list.

    With ``with_losses=False`` the model is exactly the teacher (used for distillation targets);
    ``need_xent=False`` skips the attention-weight loss (cheaper: only ``mse`` is recorded).
    """
    layers = linear_attention_layers(model)
    recorders = [LayerTransfer(core, index, with_losses, need_xent) for index, core in layers]
    for (_, core), recorder in zip(layers, recorders):
        core.forward = recorder  # an instance attribute shadows the class's forward
    try:
        yield recorders
    finally:
        for _, core in layers:
            del core.forward
