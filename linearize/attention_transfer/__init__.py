"""Attention transfer: distil each layer's linear attention from its own softmax attention."""

from linearize.attention_transfer.losses import transfer_losses
from linearize.attention_transfer.train import layer_losses, mark_transfer_parameters, run_attention_transfer
from linearize.attention_transfer.transfer_mode import transfer_mode

__all__ = [
    "layer_losses",
    "mark_transfer_parameters",
    "run_attention_transfer",
    "transfer_losses",
    "transfer_mode",
]
