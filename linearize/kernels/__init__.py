"""Attention kernels: exact PyTorch reference (CPU) and fused Triton kernels (CUDA), one dispatcher.

Model code calls only :func:`hybrid_attention`; it picks the backend from the tensors' device.
"""

from linearize.kernels.dispatch import hybrid_attention

__all__ = ["hybrid_attention"]
