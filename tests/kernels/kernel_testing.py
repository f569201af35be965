"""Shared helpers of the kernel tests: where they run, tolerances, comparison, random inputs."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# fp32 runs everywhere (in the interpreter without CUDA); bf16 needs the real kernels on a GPU.
PRECISIONS = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(
        torch.bfloat16, id="bf16",
        marks=pytest.mark.skipif(not CUDA, reason="bf16 is checked on CUDA only (scripts/gpu_check.sh)"),
    ),
]


def tolerance(dtype: torch.dtype) -> float:
    """Allowed relative RMS error against the fp32 reference.

    The interpreter computes in exact fp32, so 1e-4 (tighter than the 1e-3 target) holds there; on
    a GPU fp32 dots run in tf32 (10-bit mantissa) and bf16 inputs carry 8 bits.
    """
    if dtype == torch.float32:
        return 1e-2 if CUDA else 1e-4
    return 3e-2


def assert_close(
    name: str, ref: torch.Tensor, tri: torch.Tensor, ratio: float, atol: float = 1e-5, rtol: float | None = None
) -> None:
    """``tri`` matches ``ref`` if both bounds hold:

    * RMS: RMS(ref - tri) / RMS(ref) < ``ratio``, or every entry is within ``atol`` (for tensors that
      are ~0 by cancellation, e.g. dgamma without a softmax part);
    * max-abs: max|ref - tri| <= ``atol`` + ``rtol`` * max|ref| (``rtol`` defaults to ``ratio``), so
      one wrong row or chunk cannot hide in the RMS of a large tensor.
    """
    ref, tri = ref.detach().float().cpu(), tri.detach().float().cpu()
    assert ref.shape == tri.shape, f"{name}: shape {list(tri.shape)}, expected {list(ref.shape)}"
    assert torch.isfinite(tri).all(), f"{name}: non-finite values"
    if not ref.numel():
        return
    rtol = ratio if rtol is None else rtol
    diff = (ref - tri).abs().max().item()
    scale = ref.abs().max().item()
    error = ((ref - tri).pow(2).mean().sqrt() / (ref.pow(2).mean().sqrt() + 1e-12)).item()
    assert diff <= atol or error < ratio, f"{name}: relative error {error:.2e} >= {ratio:.0e} (max abs diff {diff:.2e})"
    assert diff <= atol + rtol * scale, (
        f"{name}: max abs diff {diff:.2e} > {atol:.0e} + {rtol:.0e} * max|ref| ({scale:.2e}), "
        f"relative error {error:.2e}"
    )


def features(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Positive feature-mapped queries or keys (like hedgehog's softmaxes), on the test device."""
    return torch.rand(*shape, device=DEVICE).add(0.05).to(dtype)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


def leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Fresh leaf copies that require grad (None stays None)."""
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of ``loss``; an input it does not use gets zeros (the reference's value there)."""
    out = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(out, tensors)]


def case_id(**dims: int) -> str:
    """Parametrize id like 'B2-T63-H2-D60' from keyword sizes."""
    return "-".join(f"{key}{value}" for key, value in dims.items())
