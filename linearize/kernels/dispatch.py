"""Pick the implementation of the attention math for a call.

``backend="auto"`` (the default) runs the fused Triton kernels on CUDA tensors when they cover the
call and the exact PyTorch reference otherwise (CPU tensors, padding inside the sequence, a state
whose softmax buffer is not empty for a multi-token call). ``"reference"`` forces the reference;
``"triton"`` forces the kernels (on CPU they run in Triton's interpreter, for tests) and raises
UserError for a call they do not cover.

The Triton package is imported on first use only, so the reference path works where it is missing.
A bad backend choice is a ``UserError`` (a ValueError the CLI reports as one line); shapes that do
not fit raise ValueError naming the tensor, the expected and the actual shape.
"""

from __future__ import annotations

import torch

from linearize.errors import UserError
from linearize.kernels import reference
from linearize.kernels.reference import EPS, RecurrentState

BACKENDS = ("auto", "reference", "triton")
# Up to this length a state-less reference call materialises [T, T] (fewer, larger ops than chunks).
QUADRATIC_MAX_LENGTH = 1024


def _kernels():
    """``linearize.kernels.triton``, imported lazily; a clear error where Triton is not installed."""
    from linearize.kernels import triton as kernels

    if not kernels.KERNELS_AVAILABLE:
        raise UserError("the Triton kernels need the triton package (pip install triton); use backend='reference'")
    if not kernels.INTERPRETER_READY:
        raise UserError(
            "backend='triton' found no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET=1 is not "
            "set); set TRITON_INTERPRET=1 in the environment before Python starts (triton reads it when first "
            "imported), or use backend='reference'"
        )
    return kernels


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> None:
    """ValueError naming the first tensor whose shape does not fit q [B, H, T, d]."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, T, d], got shape {list(q.shape)}")
    batch, heads, length, _ = q.shape
    expected = {
        "k": (q.shape, k),
        "v": ((batch, heads, length, v.shape[-1]), v),
        "fq": ((batch, heads, length, fq.shape[-1]), fq),
        "fk": (fq.shape, fk),
        "gamma": ((heads,), gamma),
    }
    if valid is not None:
        expected["valid"] = ((batch, length), valid)
    for name, (shape, tensor) in expected.items():
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _triton_unsupported(
    q: torch.Tensor, state: RecurrentState | None, valid: torch.Tensor | None, differentiable: bool
) -> str | None:
    """Why the kernels cannot run this call, or None when they can."""
    if q.shape[2] == 0:
        return "an empty sequence (T = 0)"
    if valid is not None and not bool(valid.all()):
        return "a padding mask (valid has False entries)"
    if state is not None and state.keys.shape[2] > 0 and (q.shape[2] != 1 or differentiable):
        return "a state with keys in its softmax buffer (only a no-grad one-token decode step uses it)"
    return None


def _window_buffer(
    k: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, window: int, sinks: int
) -> tuple[torch.Tensor, ...]:
    """The softmax buffer the reference leaves after a call that started with an empty one.

    Positions 0..T-1 (offset by ``seen``): sinks and the last window - 1 keys, ascending, in
    min(T, sinks + window - 1) slots, unused slots zero with position -1.
    """
    batch, heads, length, _ = k.shape
    slots = min(length, sinks + max(window - 1, 0))
    positions = torch.arange(length, device=k.device)
    kept = positions[(positions < sinks) | (positions > length - window)]

    def take(t: torch.Tensor) -> torch.Tensor:
        buffer = t.new_zeros(batch, heads, slots, t.shape[-1], dtype=torch.float32)
        buffer[:, :, : kept.numel()] = t[:, :, kept].float()
        return buffer

    buffer_positions = torch.full((batch, slots), -1, dtype=torch.long, device=k.device)
    buffer_positions[:, : kept.numel()] = kept[None, :] + seen[:, None]
    return take(k), take(fk), take(v), buffer_positions


def _hybrid_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    state: RecurrentState | None, window: int, sinks: int, scaling: float, eps: float,
) -> tuple[torch.Tensor, RecurrentState]:
    """The whole call in one fused kernel; the state is rebuilt exactly as the reference builds it.

    A state with an empty buffer that has already seen tokens only occurs for sinks = 0 and
    window <= 1, where the split into parts does not depend on absolute positions.
    """
    initial = (state.S, state.z) if state is not None else None
    out, (S, z) = _kernels().chunk_hybrid_attention(
        q, k, v, fq, fk, gamma, window=window, sinks=sinks, scaling=scaling, initial_state=initial, eps=eps,
    )
    seen = state.seen if state is not None else torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    keys, features, values, positions = _window_buffer(k, fk, v, seen, window, sinks)
    return out, RecurrentState(S, z, keys, features, values, positions, seen + q.shape[2])


def _decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    state: RecurrentState, window: int, sinks: int, scaling: float, eps: float,
) -> tuple[torch.Tensor, RecurrentState]:
    """One token through the ring-buffer decode kernel, converting the reference state both ways."""
    kernels = _kernels()
    ring = kernels.DecodeState.from_recurrent(state, window, sinks)
    out = kernels.decode_step(q, k, v, fq, fk, gamma, ring, scaling=scaling, eps=eps)
    slots = min(state.keys.shape[2] + 1, sinks + max(window - 1, 0))
    return out, ring.to_recurrent(slots)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    state: RecurrentState | None = None,
    *,
    window: int,
    sinks: int,
    scaling: float,
    valid: torch.Tensor | None = None,
    chunk_size: int = 128,
    eps: float = EPS,
    backend: str = "auto",
    return_state: bool = True,
) -> tuple[torch.Tensor, RecurrentState | None]:
    """Window + linear attention from ``state``; see ``reference.hybrid_attention_chunked``.

    Shapes: q, k [B, H, T, d]; v [B, H, T, D]; fq, fk [B, H, T, F]; gamma [H]; valid [B, T].
    Returns out [B, H, T, D] (fp32) and the state after the last token, the same ``RecurrentState``
    (S, z and softmax buffer) on every backend. ``chunk_size`` only affects the reference. With
    ``return_state=False`` (no cache: training, scoring) the reference may use the quadratic form,
    which is faster on CPU at moderate lengths, and returns None for the state.
    """
    _check_backend(backend)
    _check_inputs(q, k, v, fq, fk, gamma, valid)
    if _use_triton(backend, q):
        differentiable = _needs_grad(q, k, v, fq, fk, gamma)
        reason = _triton_unsupported(q, state, valid, differentiable)
        if reason is None and state is not None and state.keys.shape[2] > 0:
            return _decode_triton(q, k, v, fq, fk, gamma, state, window, sinks, scaling, eps)
        if reason is None:
            return _hybrid_triton(q, k, v, fq, fk, gamma, state, window, sinks, scaling, eps)
        if backend == "triton":
            raise UserError(f"backend='triton' does not support {reason}; use backend='auto' or 'reference'")
    if not return_state and state is None and q.shape[2] <= QUADRATIC_MAX_LENGTH:
        out, _ = reference.hybrid_attention_quadratic(
            q, k, v, fq, fk, gamma, window=window, sinks=sinks, scaling=scaling, valid=valid, eps=eps,
        )
        return out, None
    return reference.hybrid_attention_chunked(
        q, k, v, fq, fk, gamma, state, window=window, sinks=sinks, scaling=scaling, valid=valid,
        chunk_size=chunk_size, eps=eps,
    )


def hybrid_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    state,
    *,
    window: int,
    sinks: int,
    scaling: float,
    eps: float = EPS,
    backend: str = "auto",
):
    """One decoding step: ``reference.hybrid_attention_step`` with T = 1.

    Shapes: q, k [B, H, 1, d]; v [B, H, 1, D]; fq, fk [B, H, 1, F]; gamma [H].
    ``state`` is a ``RecurrentState`` (returned as a new one) or a ``triton.DecodeState`` (ring
    buffer, updated in place on the Triton path: the fast way to decode many tokens).
    Returns out [B, H, 1, D] (fp32) and the state after the token, of the type given.
    """
    _check_backend(backend)
    _check_inputs(q, k, v, fq, fk, gamma)
    if q.shape[2] != 1:
        raise ValueError(f"a decode step takes one token: q must be [B, H, 1, d], got {list(q.shape)}")
    if not isinstance(state, RecurrentState):
        if (state.window, state.sinks) != (window, sinks):
            raise ValueError(
                f"state was built for window={state.window}, sinks={state.sinks}; got window={window}, sinks={sinks}"
            )
        if not _use_triton(backend, q):
            out, new = reference.hybrid_attention_step(
                q, k, v, fq, fk, gamma, state.to_recurrent(), window=window, sinks=sinks, scaling=scaling, eps=eps,
            )
            return out, type(state).from_recurrent(new, window, sinks)
        return _kernels().decode_step(q, k, v, fq, fk, gamma, state, scaling=scaling, eps=eps), state
    if _use_triton(backend, q):
        return _decode_triton(q, k, v, fq, fk, gamma, state, window, sinks, scaling, eps)
    return reference.hybrid_attention_step(q, k, v, fq, fk, gamma, state, window=window, sinks=sinks,
                                           scaling=scaling, eps=eps)


def attention_transfer_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor | None = None,
    *,
    scaling: float,
    window: int = 0,
    sinks: int = 0,
    eps: float = EPS,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy from the teacher's causal softmax weights to the student's attention weights
    (those of ``hybrid_attention_quadratic`` for window, sinks, gamma; gamma defaults to ones).

    Shapes: q, k [B, H, T, d]; fq, fk [B, H, T, F]; gamma [H]. Returns a scalar averaged over
    queries. The Triton kernel is tiled (O(T) memory); the reference materialises [T, T].
    """
    _check_backend(backend)
    options = dict(scaling=scaling, window=window, sinks=sinks, eps=eps)
    if _use_triton(backend, q):
        return _kernels().attention_transfer_loss(q, k, fq, fk, gamma, **options)
    return reference.attention_transfer_loss_naive(q, k, fq, fk, gamma, **options)


def attention_output_mse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    teacher_out: torch.Tensor,
    *,
    scaling: float,
    window: int = 0,
    sinks: int = 0,
    eps: float = EPS,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean squared error between the student's attention output and ``teacher_out`` [B, H, T, D].

    The Triton path runs the chunked kernel (O(T) memory); the reference runs the chunked reference.
    """
    _check_backend(backend)
    options = dict(scaling=scaling, window=window, sinks=sinks, eps=eps)
    if _use_triton(backend, q):
        return _kernels().attention_output_mse(q, k, v, fq, fk, gamma, teacher_out, **options)
    out, _ = reference.hybrid_attention_chunked(q, k, v, fq, fk, gamma, **options)
    return (out - teacher_out.float()).pow(2).mean()
