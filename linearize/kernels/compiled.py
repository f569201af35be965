"""A linearized layer's CPU decode step, compiled with ``torch.compile``.

On CPU an eager decode step of one layer is about 50 ATen calls on tensors of a few kB. Each call
costs microseconds of Python and dispatch, so together they cost about as much as the teacher's
whole attention. The step has static shapes: the state has a fixed size and there is one token per
row. So ``torch.compile`` captures it once, for every layer of a model (the layers are arguments,
not constants), and runs it as a few fused C++ loops. A softmax teacher cannot do this with its
default cache, which grows by one key every step.

``CompiledOnCPU(fn)`` wraps such a step:

* CPU tensors: it compiles ``fn`` on the first call, and again when a shape changes (torch's
  recompilation rules: a new batch size, a ring that has just filled up).
* CUDA tensors (the Triton decode kernel), or the environment variable
  ``LINEARIZE_COMPILE_DECODE=0``: it calls ``fn`` as it is.
* Where torch cannot compile, for example without a C++ compiler, it warns once and calls ``fn``
  eagerly from then on. Compilation fails before anything runs, so the state is never half-updated.

The compiled and the eager step compute the same math. They differ only in the order of float
operations (about 1e-6 relative in fp32).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

ENVIRONMENT_SWITCH = "LINEARIZE_COMPILE_DECODE"


class CompiledOnCPU:
    """``fn`` compiled by ``torch.compile`` for calls on CPU tensors, eager otherwise (module docstring)."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.compiled: Callable[..., torch.Tensor] | None = None  # built on the first CPU call
        self.failure: str | None = None  # why compiling failed, once it has

    def uses_compiled(self, *args) -> bool:
        """Whether a call with ``args`` runs the compiled step."""
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        return (device is not None and device.type == "cpu" and self.failure is None
                and os.environ.get(ENVIRONMENT_SWITCH, "1") != "0" and not torch.compiler.is_compiling())

    def __call__(self, *args) -> torch.Tensor:
        if not self.uses_compiled(*args):
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn)
        try:
            return self.compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            self.failure = str(error).strip().splitlines()[0]
            warnings.warn(
                f"linearize: torch.compile could not compile the decode step ({self.failure}); decoding "
                f"continues eagerly, with the same results but slower on CPU. Fix: install a C++ compiler "
                f"(torch's inductor needs one), or set {ENVIRONMENT_SWITCH}=0 to skip the attempt",
                stacklevel=2,
            )
            return self.fn(*args)

