"""Fused Triton kernels for the attention math of ``linearize.kernels.reference``.

Each module holds one op, layered jit kernels -> launchers -> autograd.Function -> public function:
    hybrid                   chunked window + linear attention and plain causal linear attention
    feature_maps             fused hedgehog and based (Taylor) feature maps
    decode                   one decoding step on a ring-buffer state
    attention_transfer_loss  tiled attention-weight cross-entropy (and output MSE)
``naive`` holds the materialising PyTorch reference of the loss.

Without a CUDA device the kernels can only run in Triton's interpreter, which is switched on here
when triton is not imported yet (see ``_interpreter_ready``). Where Triton is not installed only ``naive``
is available (``KERNELS_AVAILABLE`` is False), so the reference path of the dispatcher still works.
"""

import importlib.util
import os
import sys

import torch

from linearize.kernels.triton.naive import attention_transfer_loss_naive, softmax_attention, transfer_losses_naive

KERNELS_AVAILABLE = importlib.util.find_spec("triton") is not None


def _interpreter_ready() -> bool:
    """Whether the kernels can run here: on a CUDA device, or in Triton's interpreter on the CPU.

    Triton chooses between compiling and interpreting when a kernel (and its own standard library)
    is decorated, i.e. when triton is first imported. So the interpreter is switched on here only if
    triton has not been imported yet; otherwise TRITON_INTERPRET=1 must be set before Python starts.
    """
    if torch.cuda.is_available():
        return True
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET") == "1"


INTERPRETER_READY = KERNELS_AVAILABLE and _interpreter_ready()

if KERNELS_AVAILABLE:
    from linearize.kernels.triton.attention_transfer_loss import attention_output_mse, attention_transfer_loss
    from linearize.kernels.triton.decode import DecodeState, decode_step
    from linearize.kernels.triton.feature_maps import based_feature_map, hedgehog_feature_map, taylor_dim
    from linearize.kernels.triton.hybrid import chunk_hybrid_attention, chunk_linear_attention

__all__ = [
    "INTERPRETER_READY",
    "KERNELS_AVAILABLE",
    "DecodeState",
    "attention_output_mse",
    "attention_transfer_loss",
    "attention_transfer_loss_naive",
    "softmax_attention",
    "transfer_losses_naive",
    "based_feature_map",
    "chunk_hybrid_attention",
    "chunk_linear_attention",
    "decode_step",
    "hedgehog_feature_map",
    "taylor_dim",
]
