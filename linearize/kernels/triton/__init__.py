"""Fused Triton kernels for the attention math of ``linearize.kernels.reference``.

Each module holds one op, layered jit kernels -> launchers -> autograd.Function -> public function:
    hybrid                   chunked window + linear attention and plain causal linear attention
    decode                   one decoding step against a RecurrentState (ring of keys, S, z)
    attention_transfer_loss  tiled attention-weight cross-entropy (and output MSE)
Their materialising PyTorch references are in ``linearize.kernels.reference``.

Importing this package changes no process-wide state. Without a CUDA device the kernels can only
run in Triton's interpreter, which the caller switches on with TRITON_INTERPRET=1 before triton is
first imported (``INTERPRETER_READY`` says whether the kernels can run here). Where Triton is not
installed no kernel is exported (``KERNELS_AVAILABLE`` is False) and the dispatcher's reference path
still works.
"""

import importlib.util
import os

import torch

KERNELS_AVAILABLE = importlib.util.find_spec("triton") is not None

# Triton chooses between compiling and interpreting when a kernel is decorated, i.e. at import, so
# the environment variable has to be set by then; setting it here would be too late whenever
# something (torch._dynamo, transformers) imported triton first, and would leak into the process.
INTERPRETER_READY = KERNELS_AVAILABLE and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")

if KERNELS_AVAILABLE:
    from linearize.kernels.triton.attention_transfer_loss import attention_output_mse, attention_transfer_loss
    from linearize.kernels.triton.decode import attend_state, decode_step
    from linearize.kernels.triton.hybrid import chunk_hybrid_attention, chunk_linear_attention

__all__ = [
    "INTERPRETER_READY",
    "KERNELS_AVAILABLE",
    "attention_output_mse",
    "attend_state",
    "attention_transfer_loss",
    "chunk_hybrid_attention",
    "chunk_linear_attention",
    "decode_step",
]
