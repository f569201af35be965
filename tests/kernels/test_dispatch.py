"""``kernels.dispatch``: which implementation runs, backend='triton' against the reference, errors.

* a fresh sequence under backend='triton' gives the reference's output and gradients (inputs,
  gamma, initial state), unpadded and with left, right and two-sided padding in one batch, which
  the kernel runs by packing the padding out (no fallback to the reference); a right-padded batch
  without a state needs no packing at all;
* Triton prefill, ``build_state``, then Triton decode steps (GQA, a real feature map) equal one
  reference pass; decoding dispatches to the same step on every backend;
* backend='auto' is the reference on CPU (quadratic up to ``reference.QUADRATIC_MAX_LENGTH``,
  chunked beyond) and the kernel on CUDA, padding included;
* errors: a bad backend and an empty sequence under 'triton' are UserErrors, bad shapes ValueErrors
  naming the tensor, the expected and the actual shape; importing the kernels sets nothing, and
  without CUDA or the interpreter backend='triton' says what to set.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_testing import CUDA, DEVICE, assert_close, case_id, features, grads, leaves, randn, tolerance

from linearize.errors import UserError
from linearize.hf.feature_maps import HedgehogFeatureMap
from linearize.kernels import dispatch, reference
from linearize.kernels.reference import AttentionSpec, RecurrentState, expand_kv_heads

# (T, window, sinks): long sequence with sinks (chunked reference), plain linear, own key only,
# T shorter than the window, sinks without a window.
SETTINGS = [(200, 64, 4), (70, 0, 0), (70, 1, 0), (2, 3, 2), (70, 0, 3)]
PADDED_SETTINGS = [(40, 16, 2), (40, 0, 0), (40, 1, 0), (40, 0, 3)]
GRAD_NAMES = ["dq", "dk", "dv", "dfq", "dfk", "dgamma", "dS0", "dz0"]


def _inputs(B: int, T: int, H: int, d: int = 24, D: int = 20, F: int = 12) -> tuple[torch.Tensor, ...]:
    return (randn(B, H, T, d), randn(B, H, T, d), randn(B, H, T, D), features(B, H, T, F), features(B, H, T, F),
            torch.rand(H, device=DEVICE))


def _spec(window: int, sinks: int) -> AttentionSpec:
    return AttentionSpec(window=window, sinks=sinks, scaling=0.2)


def _padding(T: int) -> torch.Tensor:
    """valid [4, T]: row 0 unpadded, row 1 left-padded by 5, row 2 right-padded by 7, row 3 both (3, 4)."""
    valid = torch.ones(4, T, dtype=torch.bool, device=DEVICE)
    valid[1, :5] = valid[2, T - 7:] = valid[3, :3] = valid[3, T - 4:] = False
    return valid


def _outputs_and_grads(inputs, spec, valid, backend):
    """Output on real queries and the gradients of a fixed random projection of it."""
    q, k, v, fq, fk, gamma, s0, z0 = tensors = leaves(*inputs)
    out = dispatch.hybrid_attention(q, k, v, fq, fk, gamma, spec, valid=valid, initial_state=(s0, z0),
                                    backend=backend)
    if valid is not None:
        out = out * valid[:, None, :, None]  # padding queries' outputs are unspecified
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    return out, grads((out * upstream).sum(), tensors)


def _assert_matches_reference(inputs, spec, valid):
    ref_out, ref_grads = _outputs_and_grads(inputs, spec, valid, "reference")
    tri_out, tri_grads = _outputs_and_grads(inputs, spec, valid, "triton")
    ratio = tolerance(torch.float32)
    assert_close("out", ref_out, tri_out, ratio)
    for name, r, t in zip(GRAD_NAMES, ref_grads, tri_grads):
        assert_close(name, r, t, ratio)


@pytest.mark.parametrize("setting", SETTINGS, ids=[case_id(T=T, w=w, s=s) for T, w, s in SETTINGS])
def test_triton_matches_reference(setting: tuple[int, int, int]) -> None:
    T, window, sinks = setting
    torch.manual_seed(0)
    _assert_matches_reference([*_inputs(2, T, 2), features(2, 2, 12, 20), features(2, 2, 12)], _spec(window, sinks),
                              None)


@pytest.mark.parametrize("setting", PADDED_SETTINGS, ids=[case_id(T=T, w=w, s=s) for T, w, s in PADDED_SETTINGS])
def test_triton_with_padding_matches_reference(setting: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    T, window, sinks = setting
    torch.manual_seed(0)
    inputs = [*_inputs(4, T, 2), features(4, 2, 12, 20), features(4, 2, 12)]
    ref_out, ref_grads = _outputs_and_grads(inputs, _spec(window, sinks), _padding(T), "reference")
    for form in ("hybrid_attention_torch", "hybrid_attention_quadratic", "hybrid_attention_chunked"):
        monkeypatch.setattr(dispatch.reference, form, None)  # the kernel must not fall back
    tri_out, tri_grads = _outputs_and_grads(inputs, _spec(window, sinks), _padding(T), "triton")
    ratio = tolerance(torch.float32)
    assert_close("out", ref_out, tri_out, ratio)
    for name, r, t in zip(GRAD_NAMES, ref_grads, tri_grads):
        assert_close(name, r, t, ratio)


def test_right_padded_batch_without_state_runs_the_kernel_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's batches: right padding only, no initial state. The kernel takes them unpermuted
    (no packing, no fallback) and matches the reference on the real queries, gradients included."""
    T, window, sinks = 70, 16, 2
    torch.manual_seed(0)
    inputs = _inputs(2, T, 2)
    valid = torch.ones(2, T, dtype=torch.bool, device=DEVICE)
    valid[1, T - 9:] = False
    spec = _spec(window, sinks)

    def run(backend: str):
        tensors = leaves(*inputs)
        out = dispatch.hybrid_attention(*tensors, spec, valid=valid, backend=backend) * valid[:, None, :, None]
        return out, grads((out * torch.linspace(-1, 1, out.shape[-1], device=DEVICE)).sum(), tensors)

    ref_out, ref_grads = run("reference")
    for name in ("hybrid_attention_torch", "hybrid_attention_quadratic", "hybrid_attention_chunked", "pack_left",
                 "permute_tokens"):
        monkeypatch.setattr(dispatch.reference, name, None)  # any use would fail
    tri_out, tri_grads = run("triton")
    ratio = tolerance(torch.float32)
    assert_close("out", ref_out, tri_out, ratio)
    for name, r, t in zip(GRAD_NAMES, ref_grads, tri_grads):
        assert_close(name, r, t, ratio)


def _hedgehog_key_features(heads: int, kv_heads: int, head_dim: int):
    """A perturbed Hedgehog map and the layer's key_features (keys per KV head -> [B, H, T, F])."""
    fmap = HedgehogFeatureMap(heads, head_dim, 6).to(DEVICE).requires_grad_(False)
    fmap.weight.add_(0.5 * torch.randn_like(fmap.weight))
    fmap.bias.add_(0.5 * torch.randn_like(fmap.bias))
    return fmap, lambda keys: fmap(expand_kv_heads(keys, heads // kv_heads))


@pytest.mark.parametrize("window, sinks", [(6, 2), (0, 0), (1, 0)], ids=["w6-s2", "w0-s0", "w1-s0"])
def test_prefill_then_decode_equals_one_pass(window: int, sinks: int) -> None:
    """Triton prefill of a left-padded prompt [0, 13) with ``build_state``, then one-token Triton
    steps (H = 4 query heads on 2 KV heads), equals the reference over [0, 20)."""
    torch.manual_seed(0)
    B, T, split, H, kv_heads, d, D = 2, 20, 13, 4, 2, 16, 8
    fmap, key_features = _hedgehog_key_features(H, kv_heads, d)
    q, k, v = randn(B, H, T, d), randn(B, kv_heads, T, d), randn(B, kv_heads, T, D)
    fq, fk, gamma = fmap(q), key_features(k), torch.rand(H, device=DEVICE)
    initial = (features(B, H, 12, D), features(B, H, 12))
    valid = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    valid[1, :4] = False
    spec = _spec(window, sinks)
    groups = H // kv_heads
    expected = dispatch.hybrid_attention(q, expand_kv_heads(k, groups), expand_kv_heads(v, groups), fq, fk, gamma,
                                         spec, valid=valid, initial_state=initial, backend="reference")
    head = slice(0, split)
    outs = [dispatch.hybrid_attention(q[:, :, head], expand_kv_heads(k[:, :, head], groups),
                                      expand_kv_heads(v[:, :, head], groups), fq[:, :, head], fk[:, :, head], gamma,
                                      spec, valid=valid[:, head], initial_state=initial, backend="triton")]
    state = reference.build_state(k[:, :, head], v[:, :, head], fk[:, :, head], spec, valid=valid[:, head],
                                  initial_state=initial)
    for t in range(split, T):
        token = slice(t, t + 1)
        outs.append(dispatch.hybrid_attention_decode(q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token],
                                                     gamma, state, spec, key_features, backend="triton"))
    real = valid[:, None, :, None]
    assert_close("out", expected * real, torch.cat(outs, dim=2) * real, tolerance(torch.float32))
    assert torch.equal(state.seen, valid.sum(dim=1))


def test_decode_dispatch() -> None:
    """Every backend runs the same step from the same state; 'auto' on CPU is the reference exactly."""
    torch.manual_seed(0)
    B, T, H, kv_heads, d, D = 2, 8, 4, 2, 16, 8
    fmap, key_features = _hedgehog_key_features(H, kv_heads, d)
    q, k, v = randn(B, H, T, d), randn(B, kv_heads, T, d), randn(B, kv_heads, T, D)
    spec = _spec(3, 1)
    head, token = slice(0, 7), slice(7, 8)
    built = reference.build_state(k[:, :, head], v[:, :, head], key_features(k[:, :, head]), spec)
    step = (q[:, :, token], k[:, :, token], v[:, :, token], fmap(q[:, :, token]), torch.rand(H, device=DEVICE))
    valid = torch.tensor([True, False], device=DEVICE)
    results = {}
    for backend in ("reference", "triton", "auto"):
        state = RecurrentState(*(t.clone() for t in built.tensors()))
        out = dispatch.hybrid_attention_decode(*step, state, spec, key_features, valid=valid, backend=backend)
        results[backend] = out[:1], state  # row 1's output is unspecified
    (ref_out, ref_state), (tri_out, tri_state), (auto_out, auto_state) = results.values()
    ratio = tolerance(torch.float32)
    assert_close("out", ref_out, tri_out, ratio)
    for name, r, t in zip(("kv", "keys", "values", "positions", "seen"), ref_state.tensors(), tri_state.tensors()):
        assert_close(name, r.float(), t.float(), ratio)
    if not CUDA:
        assert torch.equal(auto_out, ref_out)
        assert all(torch.equal(r, a) for r, a in zip(ref_state.tensors(), auto_state.tensors()))


def test_all_true_mask_takes_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _inputs(1, 9, 2)
    for name in ("hybrid_attention_torch", "hybrid_attention_quadratic", "hybrid_attention_chunked", "pack_left"):
        monkeypatch.setattr(dispatch.reference, name, None)  # any use would fail
    valid = torch.ones(1, 9, dtype=torch.bool, device=DEVICE)
    out = dispatch.hybrid_attention(*inputs, _spec(4, 1), valid=valid, backend="triton")
    assert out.shape == (1, 2, 9, 20)


@pytest.mark.parametrize("length, form", [(9, "quadratic"), (reference.QUADRATIC_MAX_LENGTH + 1, "chunked")],
                         ids=["short-quadratic", "long-chunked"])
def test_auto_on_cpu_is_the_reference(length: int, form: str) -> None:
    inputs = [t.cpu() for t in _inputs(2, length, 2)]
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :3] = False
    spec = _spec(4, 1)
    out = dispatch.hybrid_attention(*inputs, spec, valid=valid, chunk_size=16)
    if form == "quadratic":
        expected, _ = reference.hybrid_attention_quadratic(*inputs, spec, valid=valid)
    else:
        expected = reference.hybrid_attention_chunked(*inputs, spec, valid=valid, chunk_size=16)
    assert torch.equal(out, expected)


@pytest.mark.skipif(not CUDA, reason="backend='auto' picks Triton only for CUDA tensors")
def test_auto_on_cuda_takes_the_kernel_with_padding() -> None:
    inputs = _inputs(2, 9, 2)
    valid = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    valid[0, :3] = False
    spec = _spec(4, 1)
    out = dispatch.hybrid_attention(*inputs, spec, valid=valid)
    assert torch.equal(out, dispatch.hybrid_attention(*inputs, spec, valid=valid, backend="triton"))


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
    spec = _spec(2, 0)
    with pytest.raises(UserError, match=r"backend must be one of \('auto', 'reference', 'triton'\), got 'cuda'"):
        dispatch.hybrid_attention(q, k, v, fq, fk, gamma, spec, backend="cuda")
    with pytest.raises(ValueError, match=r"q must be \[B, H, T, d\], got shape \[2, 5, 24\]"):
        dispatch.hybrid_attention(q[0], k, v, fq, fk, gamma, spec)
    with pytest.raises(ValueError, match=r"gamma must have shape \[2\], got \[3\]"):
        dispatch.hybrid_attention(q, k, v, fq, fk, torch.rand(3, device=DEVICE), spec)
    with pytest.raises(ValueError, match=r"v must have shape \[1, 2, 5, 20\], got \[1, 2, 4, 20\]"):
        dispatch.hybrid_attention(q, k, v[:, :, :4], fq, fk, gamma, spec)
    with pytest.raises(ValueError, match=r"fk must have shape \[1, 2, 5, 12\], got \[1, 2, 5, 10\]"):
        dispatch.hybrid_attention(q, k, v, fq, fk[..., :10], gamma, spec)
    with pytest.raises(ValueError, match=r"valid must have shape \[1, 5\], got \[1, 4\]"):
        dispatch.hybrid_attention(q, k, v, fq, fk, gamma, spec, valid=torch.ones(1, 4, dtype=torch.bool))
    empty = [t[:, :, :0] for t in (q, k, v, fq, fk)]
    with pytest.raises(UserError, match=r"backend='triton' does not support an empty sequence \(T = 0\)"):
        dispatch.hybrid_attention(*empty, gamma, spec, backend="triton")

    state = RecurrentState.empty(1, 2, 1, 24, 20, 12, spec, device=DEVICE)  # GQA: one KV head
    token = slice(0, 1)
    step = (q[:, :, token], k[:, :1, token], v[:, :1, token], fq[:, :, token], gamma, state, spec, lambda keys: fk)
    with pytest.raises(ValueError, match=r"a decode step takes one token: q must be \[B, H, 1, d\], got \[1, 2, 2, 24\]"):
        dispatch.hybrid_attention_decode(q[:, :, :2], k[:, :1, :2], v[:, :1, :2], fq[:, :, :2], *step[4:])
    with pytest.raises(ValueError, match=r"k must have shape \[1, 1, 1, 24\], got \[1, 2, 1, 24\]"):
        dispatch.hybrid_attention_decode(step[0], k[:, :, token], *step[2:])
    with pytest.raises(UserError, match=r"backend must be one of"):
        dispatch.hybrid_attention_decode(*step, backend="cuda")


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
    message = r"no CUDA device.*set TRITON_INTERPRET=1 in the environment.*'reference'"
    q, k, v, fq, fk, gamma = _inputs(1, 5, 2)
    spec = _spec(2, 0)
    with pytest.raises(UserError, match=message):
        dispatch.hybrid_attention(q, k, v, fq, fk, gamma, spec, backend="triton")
    state = RecurrentState.empty(1, 2, 2, 24, 20, 12, spec, device=DEVICE)
    token = slice(0, 1)
    with pytest.raises(UserError, match=message):
        dispatch.hybrid_attention_decode(q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token], gamma, state,
                                         spec, lambda keys: fk[:, :, token], backend="triton")
