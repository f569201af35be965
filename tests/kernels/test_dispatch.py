"""``kernels.dispatch``: backend choice, the state the Triton path returns, resuming, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_testing import CUDA, DEVICE, assert_close, case_id, features, grads, leaves, randn, tolerance

from linearize.errors import UserError
from linearize.kernels import dispatch, reference
from linearize.kernels.triton import DecodeState

STATE_FIELDS = ("S", "z", "keys", "features", "values", "positions", "seen")
# (T, window, sinks): long sequence with sinks, plain linear, own key only, T shorter than the
# buffer, sinks without a window.
SETTINGS = [(200, 64, 4), (70, 0, 0), (70, 1, 0), (2, 3, 2), (70, 0, 3)]


def _inputs(B: int, T: int, H: int, d: int = 24, D: int = 20, F: int = 12) -> tuple[torch.Tensor, ...]:
    return (randn(B, H, T, d), randn(B, H, T, d), randn(B, H, T, D), features(B, H, T, F), features(B, H, T, F),
            torch.rand(H, device=DEVICE))


def _assert_same_state(ref: reference.RecurrentState, tri: reference.RecurrentState) -> None:
    for name in STATE_FIELDS:
        assert_close(name, getattr(ref, name).float(), getattr(tri, name).float(), tolerance(torch.float32))


@pytest.mark.parametrize("setting", SETTINGS, ids=[case_id(T=T, w=w, s=s) for T, w, s in SETTINGS])
def test_triton_state_equals_reference_state(setting: tuple[int, int, int]) -> None:
    """Same output and same state (S, z, softmax buffer), and the same gradients through all of it."""
    T, window, sinks = setting
    torch.manual_seed(0)
    inputs = [*_inputs(2, T, 2), features(2, 2, 12, 20), features(2, 2, 12)]
    options = dict(window=window, sinks=sinks, scaling=0.2)
    results = {}
    for backend in ("reference", "triton"):
        q, k, v, fq, fk, gamma, s0, z0 = tensors = leaves(*inputs)
        prefix = reference.RecurrentState.empty(q, v, fq).with_prefix(s0, z0)
        out, state = dispatch.hybrid_attention(q, k, v, fq, fk, gamma, prefix, backend=backend, **options)
        torch.manual_seed(1)
        loss = sum((t * torch.randn_like(t)).sum() for t in (out, state.S, state.z, state.keys, state.features,
                                                             state.values))
        results[backend] = out, state, grads(loss, tensors)
    (ref_out, ref_state, ref_grads), (tri_out, tri_state, tri_grads) = results.values()
    assert_close("out", ref_out, tri_out, tolerance(torch.float32))
    _assert_same_state(ref_state, tri_state)
    for name, r, t in zip(["dq", "dk", "dv", "dfq", "dfk", "dgamma", "dS0", "dz0"], ref_grads, tri_grads):
        assert_close(name, r, t, tolerance(torch.float32))


@pytest.mark.parametrize("window, sinks", [(6, 2), (0, 0)], ids=["w6-s2", "w0-s0"])
def test_prefill_then_decode_equals_one_pass(window: int, sinks: int) -> None:
    """Triton prefill of [0, T1), then one-token Triton steps, equals the reference over [0, T)."""
    torch.manual_seed(0)
    T, split = 20, 13
    q, k, v, fq, fk, gamma = _inputs(1, T, 2)
    options = dict(window=window, sinks=sinks, scaling=0.2)
    ref_out, ref_state = dispatch.hybrid_attention(q, k, v, fq, fk, gamma, backend="reference", **options)
    head = slice(0, split)
    out, state = dispatch.hybrid_attention(q[:, :, head], k[:, :, head], v[:, :, head], fq[:, :, head],
                                           fk[:, :, head], gamma, backend="triton", **options)
    outs = [out]
    for t in range(split, T):
        token = slice(t, t + 1)
        out, state = dispatch.hybrid_attention(q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token],
                                               fk[:, :, token], gamma, state, backend="triton", **options)
        outs.append(out)
    assert_close("out", ref_out, torch.cat(outs, dim=2), tolerance(torch.float32))
    _assert_same_state(ref_state, state)


def test_all_true_mask_takes_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _inputs(1, 9, 2)
    monkeypatch.setattr(dispatch.reference, "hybrid_attention_chunked", None)  # any use would fail
    valid = torch.ones(1, 9, dtype=torch.bool, device=DEVICE)
    out, _ = dispatch.hybrid_attention(*inputs, window=4, sinks=1, scaling=0.2, valid=valid, backend="triton")
    assert out.shape == (1, 2, 9, 20)


def test_auto_on_cpu_is_the_reference() -> None:
    inputs = [t.cpu() for t in _inputs(1, 9, 2)]
    options = dict(window=4, sinks=1, scaling=0.2)
    out, _ = dispatch.hybrid_attention(*inputs, **options)
    expected, _ = reference.hybrid_attention_chunked(*inputs, **options)
    assert torch.equal(out, expected)


@pytest.mark.skipif(not CUDA, reason="backend='auto' picks Triton only for CUDA tensors")
def test_auto_on_cuda_falls_back_for_padding() -> None:
    inputs = _inputs(2, 9, 2)
    valid = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    valid[0, :3] = False
    options = dict(window=4, sinks=1, scaling=0.2, valid=valid)
    out, _ = dispatch.hybrid_attention(*inputs, **options)
    expected, _ = dispatch.hybrid_attention(*inputs, backend="reference", **options)
    assert torch.equal(out, expected)


def test_decode_dispatch_both_state_types() -> None:
    torch.manual_seed(0)
    q, k, v, fq, fk, gamma = _inputs(1, 8, 2)
    options = dict(window=3, sinks=1, scaling=0.2)
    head, token = slice(0, 7), slice(7, 8)
    _, state = reference.hybrid_attention_chunked(q[:, :, head], k[:, :, head], v[:, :, head], fq[:, :, head],
                                                  fk[:, :, head], gamma, **options)
    step = (q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token], fk[:, :, token], gamma)
    ref_out, ref_state = dispatch.hybrid_attention_decode(*step, state, backend="reference", **options)
    tri_out, tri_state = dispatch.hybrid_attention_decode(*step, state, backend="triton", **options)
    assert_close("out", ref_out, tri_out, tolerance(torch.float32))
    _assert_same_state(ref_state, tri_state)
    ring = DecodeState.from_recurrent(state, 3, 1)
    ring_out, same_ring = dispatch.hybrid_attention_decode(*step, ring, backend="triton", **options)
    assert same_ring is ring
    assert_close("out (ring)", ref_out, ring_out, tolerance(torch.float32))
    _assert_same_state(ref_state, ring.to_recurrent())


def test_loss_dispatch() -> None:
    torch.manual_seed(0)
    q, k, fq, fk = randn(1, 2, 30, 8), randn(1, 2, 30, 8), features(1, 2, 30, 12), features(1, 2, 30, 12)
    options = dict(scaling=0.3, window=8, sinks=2)
    gamma = torch.rand(2, device=DEVICE)
    ref = dispatch.attention_transfer_loss(q, k, fq, fk, gamma, backend="reference", **options)
    tri = dispatch.attention_transfer_loss(q, k, fq, fk, gamma, backend="triton", **options)
    assert_close("loss", ref, tri, tolerance(torch.float32))


def test_errors_name_expected_and_actual() -> None:
    q, k, v, fq, fk, gamma = _inputs(1, 5, 2)
    options = dict(window=2, sinks=0, scaling=0.2)
    with pytest.raises(UserError, match=r"backend must be one of \('auto', 'reference', 'triton'\), got 'cuda'"):
        dispatch.hybrid_attention(q, k, v, fq, fk, gamma, backend="cuda", **options)
    with pytest.raises(ValueError, match=r"gamma must have shape \[2\], got \[3\]"):
        dispatch.hybrid_attention(q, k, v, fq, fk, torch.rand(3, device=DEVICE), **options)
    with pytest.raises(ValueError, match=r"v must have shape \[1, 2, 5, 20\], got \[1, 2, 4, 20\]"):
        dispatch.hybrid_attention(q, k, v[:, :, :4], fq, fk, gamma, **options)
    padded = torch.ones(1, 5, dtype=torch.bool, device=DEVICE)
    padded[0, 0] = False
    with pytest.raises(UserError, match="backend='triton' does not support a padding mask"):
        dispatch.hybrid_attention(q, k, v, fq, fk, gamma, valid=padded, backend="triton", **options)
    with pytest.raises(ValueError, match=r"a decode step takes one token"):
        dispatch.hybrid_attention_decode(q, k, v, fq, fk, gamma, None, **options)
    ring = DecodeState.from_recurrent(reference.RecurrentState.empty(q, v, fq), window=2, sinks=0)
    token = slice(0, 1)
    with pytest.raises(ValueError, match=r"state was built for window=2, sinks=0; got window=3, sinks=0"):
        dispatch.hybrid_attention_decode(q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token],
                                         fk[:, :, token], gamma, ring, window=3, sinks=0, scaling=0.2)


def test_importing_the_kernels_leaves_the_environment_alone() -> None:
    """Importing changes no process-wide state: without CUDA and TRITON_INTERPRET the kernels are
    simply not ready, and the environment stays as it was."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = ("import os, linearize.kernels.triton as kernels; "
            "assert 'TRITON_INTERPRET' not in os.environ, 'import set TRITON_INTERPRET'; "
            "assert not kernels.INTERPRETER_READY")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_triton_backend_without_cuda_or_interpreter_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from linearize.kernels import triton as kernels

    monkeypatch.setattr(kernels, "INTERPRETER_READY", False)
    with pytest.raises(UserError, match=r"no CUDA device.*set TRITON_INTERPRET=1 in the environment.*'reference'"):
        dispatch.hybrid_attention(*_inputs(1, 5, 2), window=2, sinks=0, scaling=0.2, backend="triton")
