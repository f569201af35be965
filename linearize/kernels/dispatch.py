"""Pick the implementation of the attention math for a call.

``backend="auto"`` (the default) runs the fused Triton kernels on CUDA tensors and the exact
PyTorch reference on CPU tensors. ``"reference"`` forces the reference; ``"triton"`` forces the
kernels (on CPU they run in Triton's interpreter, for tests) and raises UserError for a call they do
not cover.

A fresh sequence (``hybrid_attention``) picks the cheapest exact form: on CPU
``reference.hybrid_attention_torch`` (quadratic up to ``QUADRATIC_MAX_LENGTH`` tokens, chunked
beyond); on CUDA the fused chunked kernel, with left padding packed out first (right padding
needs nothing), so lm-eval's right-padded (or any padded) batches use it too. A decode step
(``hybrid_attention_decode``) is ``reference.advance_state`` plus the fused attention. The
attention-transfer losses take padding, JRT's prefix state and the teacher's sliding window on
both paths alike.

The Triton package is imported on first use only, so the reference path works where it is missing.
A bad backend choice is a ``UserError`` (a ValueError the CLI reports as one line); shapes that do
not fit raise ValueError naming the tensor, the expected and the actual shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from linearize.errors import UserError
from linearize.kernels import reference
from linearize.kernels.reference import EPS, AttentionSpec, RecurrentState, StepPlan

BACKENDS = ("auto", "reference", "triton")


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
    valid: torch.Tensor | None = None, kv_heads: int | None = None,
) -> None:
    """ValueError naming the first tensor whose shape does not fit q [B, H, T, d] (k, v: ``kv_heads``)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, T, d], got shape {list(q.shape)}")
    batch, heads, length, head_dim = q.shape
    kv_heads = heads if kv_heads is None else kv_heads
    expected = {
        "k": ((batch, kv_heads, length, head_dim), k),
        "v": ((batch, kv_heads, length, v.shape[-1]), v),
        "fq": ((batch, heads, length, fq.shape[-1]), fq),
        "fk": ((batch, heads, length, fq.shape[-1]), fk),
        "gamma": ((heads,), gamma),
    }
    if valid is not None:
        expected["valid"] = ((batch, length), valid)
    for name, (shape, tensor) in expected.items():
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")


def uses_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether ``backend`` (auto, triton or torch) sends a call on ``x`` to the Triton kernels."""
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def _packed(valid: torch.Tensor | None, *tensors: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """``tensors`` [B, H, T, *] in the order the fused kernels need, which count positions by index:
    each row's real tokens first (``reference.pack_left``), and that order [B, T]. Unpadded and
    right-padded rows are already so (order None): causal attention never lets a real query see
    the padding behind it."""
    if valid is None or bool((valid[:, 1:] <= valid[:, :-1]).all()):
        return None, list(tensors)
    order = reference.pack_left(valid)
    return order, [reference.permute_tokens(t, order) for t in tensors]


def _hybrid_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    spec: AttentionSpec, valid: torch.Tensor | None, initial_state: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The fused kernel on the packed tokens, the outputs put back in place."""
    order, packed = _packed(valid, q, k, v, fq, fk)
    out, _ = _kernels().chunk_hybrid_attention(*packed, gamma, window=spec.window, sinks=spec.sinks,
                                               scaling=spec.scaling, initial_state=initial_state, eps=spec.eps)
    return out if order is None else reference.permute_tokens(out, order.argsort(dim=1))


def _query_mask(
    valid: torch.Tensor | None, scored: torch.Tensor | None, order: torch.Tensor | None
) -> torch.Tensor | None:
    """The queries a loss averages over, real and ``scored``, in the packed ``order``; None: all."""
    mask = valid if scored is None else (scored if valid is None else valid & scored)
    return mask if mask is None or order is None else mask.gather(1, order)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    spec: AttentionSpec,
    *,
    valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """Window + linear attention over a fresh sequence; see ``reference.hybrid_attention_quadratic``.

    Shapes: q, k [B, H, T, d]; v [B, H, T, D] (keys and values repeated to the query heads);
    fq, fk [B, H, T, F]; gamma [H]; valid [B, T]; initial_state (S [B, H, F, D], z [B, H, F]).
    Returns out [B, H, T, D] (fp32). ``reference.build_state`` turns the same keys into the state a
    cache keeps. ``chunk_size`` only affects the chunked reference.
    """
    _check_backend(backend)
    _check_inputs(q, k, v, fq, fk, gamma, valid)
    if uses_triton(backend, q):
        if q.shape[2] > 0:
            return _hybrid_triton(q, k, v, fq, fk, gamma, spec, valid, initial_state)
        if backend == "triton":
            raise UserError("backend='triton' does not support an empty sequence (T = 0); use backend='auto'")
    return reference.hybrid_attention_torch(q, k, v, fq, fk, gamma, spec, valid=valid, initial_state=initial_state,
                                            chunk_size=chunk_size)


def hybrid_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    gamma: torch.Tensor,
    state: RecurrentState,
    spec: AttentionSpec,
    key_features: Callable[[torch.Tensor], torch.Tensor],
    *,
    valid: torch.Tensor | None = None,
    plan: StepPlan | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decoding step, ``state`` updated in place: ``reference.hybrid_attention_step``.

    Shapes: q [B, H, 1, d]; k [B, Hkv, 1, d], v [B, Hkv, 1, D] (per KV head); fq [B, H, 1, F];
    gamma [H]; valid [B]. ``key_features`` maps keys [B, Hkv, 1, d] to phi [B, H, 1, F]; ``plan``
    (``state.step_plan``) may be computed once per forward for all layers.
    Returns out [B, H, 1, D] (fp32).
    """
    _check_backend(backend)
    batch, kv_heads, slots, _ = state.ring.shape
    heads, feat, value_width = state.kv.shape[1:]
    # Run every step: a few tuple comparisons, not the general check.
    if (q.shape != (batch, heads, 1, state.head_dim) or k.shape != (batch, kv_heads, 1, state.head_dim)
            or v.shape != (batch, kv_heads, 1, value_width - 1) or fq.shape != (batch, heads, 1, feat)
            or gamma.shape != (heads,)):
        if q.dim() == 4 and q.shape[2] != 1:
            raise ValueError(f"a decode step takes one token: q must be [B, H, 1, d], got {list(q.shape)}")
        _check_inputs(q, k, v, fq, fq, gamma, kv_heads=kv_heads)  # names the tensor that does not fit
        raise ValueError(
            f"q, k, v, fq must fit the state: q {[batch, heads, 1, state.head_dim]}, k "
            f"{[batch, kv_heads, 1, state.head_dim]}, v {[batch, kv_heads, 1, value_width - 1]}, fq "
            f"{[batch, heads, 1, feat]}; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}, {list(fq.shape)}"
        )
    if slots != spec.capacity:
        raise ValueError(
            f"the state has {slots} key slots but the spec (window={spec.window}, sinks={spec.sinks}, "
            f"cache block={spec.block}) "
            f"needs {spec.capacity}: it was built for another layer or spec"
        )
    if spec.cache_size and backend == "triton":
        raise UserError("backend='triton' has no decode step with a global cache; use backend='auto' (the "
                        "reference step, whose cache choice runs once per block)")
    if uses_triton(backend, q) and not spec.cache_size:
        return _kernels().decode_step(q, k, v, fq, gamma, state, spec, key_features, valid=valid, plan=plan)
    return reference.hybrid_attention_step(q, k, v, fq, gamma, state, spec, key_features, valid=valid, plan=plan)


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
    valid: torch.Tensor | None = None,
    scored: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy from the teacher's causal softmax weights to the student's attention weights
    (those of ``hybrid_attention_quadratic`` for window, sinks, gamma; gamma defaults to ones): the
    ``xent`` of ``reference.transfer_losses_naive``, with its ``valid``, ``scored``, ``initial_state``
    and ``sliding_window`` (the teacher's).

    Shapes: q, k [B, H, T, d]; fq, fk [B, H, T, F]; gamma [H]; valid, scored [B, T]; initial_state
    (S [B, H, F, D], z [B, H, F]). Returns a scalar averaged over the real, scored queries and the
    heads. The Triton kernel is tiled (O(T) memory; padding is packed out first); the reference
    materialises [T, T].
    """
    _check_backend(backend)
    options = dict(scaling=scaling, window=window, sinks=sinks, eps=eps, initial_state=initial_state)
    if uses_triton(backend, q):
        order, (q, k, fq, fk) = _packed(valid, q, k, fq, fk)
        return _kernels().attention_transfer_loss(q, k, fq, fk, gamma, query_mask=_query_mask(valid, scored, order),
                                                  teacher_window=sliding_window, **options)
    if gamma is None:
        gamma = torch.ones(q.shape[1], device=q.device)
    if initial_state is not None:  # k stands in for the values, so S gets k's width (S only enters outputs)
        options["initial_state"] = (fq.new_zeros(*fq.shape[:2], fq.shape[-1], k.shape[-1]), initial_state[1])
    losses, _ = reference.transfer_losses_naive(q, k, k, fq, fk, gamma, valid=valid, scored=scored,
                                                sliding_window=sliding_window, **options)
    return losses["xent"]


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
    valid: torch.Tensor | None = None,
    scored: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean squared error between the student's attention output and ``teacher_out`` [B, H, T, D],
    averaged over the real, ``scored`` queries and the heads (as ``reference.transfer_losses_naive``).

    Shapes as ``attention_transfer_loss``. The Triton path runs the chunked kernel (O(T) memory),
    the reference the chunked reference.
    """
    _check_backend(backend)
    options = dict(scaling=scaling, window=window, sinks=sinks, eps=eps)
    if uses_triton(backend, q):
        order, packed = _packed(valid, q, k, v, fq, fk, teacher_out)
        return _kernels().attention_output_mse(*packed[:5], gamma, packed[5], initial_state=initial_state,
                                               query_mask=_query_mask(valid, scored, order), **options)
    out = reference.hybrid_attention_chunked(q, k, v, fq, fk, gamma, AttentionSpec(**options), valid=valid,
                                             initial_state=initial_state)
    per_query = (out - teacher_out.float()).pow(2).mean(dim=-1)
    mask = _query_mask(valid, scored, None)
    if mask is None:
        return per_query.mean()
    return (per_query * mask[:, None]).sum() / (mask.sum() * q.shape[1]).clamp_min(1)
