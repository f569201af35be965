"""Attention kernels: exact PyTorch reference (CPU) and fused Triton kernels (CUDA), one dispatcher.

Model code calls only these functions; each picks the backend from the tensors' device.
"""

from linearize.kernels.compiled import CompiledOnCPU
from linearize.kernels.dispatch import (
    attention_output_mse,
    attention_transfer_loss,
    hybrid_attention,
    hybrid_attention_decode,
)

__all__ = [
    "CompiledOnCPU",
    "attention_output_mse", "attention_transfer_loss", "hybrid_attention", "hybrid_attention_decode",
]
