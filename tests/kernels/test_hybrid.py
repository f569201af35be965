"""``triton.hybrid`` against ``reference.hybrid_attention_chunked``: outputs, the kernels' final
(S, z) (in their own convention, see ``_reference``), every gradient, at small odd sizes and at
Llama-3-8B head sizes with Hedgehog's 256 features; gradients of frozen inputs are not computed."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, PRECISIONS, assert_close, case_id, features, grads, leaves, randn, tolerance

from linearize.kernels import reference
from linearize.kernels.triton import chunk_hybrid_attention, chunk_linear_attention, hybrid

# (B, T, H, d, D, F, window, sinks): odd lengths, non-power-of-two dims, bands of 1..3 chunks (64),
# sinks inside one chunk and over two, window 1 (own key only) and sinks without a window.
HYBRID_CASES = [
    (1, 1, 2, 16, 16, 16, 64, 4),
    (2, 63, 2, 48, 60, 48, 16, 2),
    (1, 200, 2, 60, 48, 60, 64, 4),
    (1, 200, 1, 32, 32, 32, 150, 70),
    (1, 130, 1, 32, 48, 32, 1, 0),
    (1, 130, 1, 32, 32, 48, 0, 3),
]
LINEAR_CASES = [(1, 1, 2, 16, 16), (2, 63, 2, 60, 48), (1, 200, 1, 48, 60)]
# Llama-3-8B heads (d = D = 128) with Hedgehog's 256 features: every tile loop and split runs more
# than once (d and D in 2 tiles of 64, F in 4). T = 71 crosses a chunk; window 1 makes chunk 1 read
# the state h[1] and visit the sink chunk before its band.
WIDE_CASE = (1, 71, 1, 128, 128, 256, 1, 2)


def _hybrid_ids(case: tuple[int, ...]) -> str:
    B, T, H, d, D, F, window, sinks = case
    return case_id(B=B, T=T, H=H, d=d, D=D, F=F, w=window, s=sinks)


def _reference(q, k, v, fq, fk, gamma, s0, z0, window, sinks, scaling):
    """The chunked reference's output, and the final (S, z) in the kernel's own convention: S0, z0
    plus the keys sinks <= j <= T - window (j >= sinks without a window). That is one key more than
    ``reference.build_state`` folds: the kernel predates the ring of ``sinks + window`` keys."""
    spec = reference.AttentionSpec(window=window, sinks=sinks, scaling=scaling)
    out = reference.hybrid_attention_chunked(q, k, v, fq, fk, gamma, spec, initial_state=(s0, z0), chunk_size=64)
    batch, _, length, _ = fk.shape
    position = torch.arange(length, device=fk.device)
    folded = (position >= sinks) & (position <= length - max(window, 1))
    S, z = reference.prefix_state(fk, v, folded.expand(batch, length))
    return out, S + s0, z + z0


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("case", [*HYBRID_CASES, WIDE_CASE], ids=_hybrid_ids)
def test_chunk_hybrid_attention(case: tuple[int, ...], dtype: torch.dtype) -> None:
    B, T, H, d, D, F, window, sinks = case
    torch.manual_seed(0)
    inputs = [randn(B, H, T, d, dtype=dtype), randn(B, H, T, d, dtype=dtype), randn(B, H, T, D, dtype=dtype),
              features(B, H, T, F, dtype=dtype), features(B, H, T, F, dtype=dtype),
              torch.rand(H, device=DEVICE), features(B, H, F, D), features(B, H, F)]
    names = ["dq", "dk", "dv", "dfq", "dfk", "dgamma", "dS0", "dz0"]
    ref_in, tri_in = leaves(*inputs), leaves(*inputs)
    scaling = d**-0.5

    ref = _reference(*ref_in, window, sinks, scaling)
    q, k, v, fq, fk, gamma, s0, z0 = tri_in
    out, (S, z) = chunk_hybrid_attention(q, k, v, fq, fk, gamma, window=window, sinks=sinks, scaling=scaling,
                                         initial_state=(s0, z0))
    tri = (out, S, z)
    ratio = tolerance(dtype)
    for name, r, t in zip(["out", "S", "z"], ref, tri):
        assert_close(name, r, t, ratio)

    upstream = [torch.randn_like(r) for r in ref]
    ref_grads = grads(sum((r * u).sum() for r, u in zip(ref, upstream)), ref_in)
    tri_grads = grads(sum((t * u).sum() for t, u in zip(tri, upstream)), tri_in)
    for name, r, t in zip(names, ref_grads, tri_grads):
        assert_close(name, r, t, ratio)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: case_id(B=c[0], T=c[1], H=c[2], D=c[3], F=c[4]))
def test_chunk_linear_attention(case: tuple[int, ...], dtype: torch.dtype) -> None:
    B, T, H, D, F = case
    torch.manual_seed(0)
    inputs = [features(B, H, T, F, dtype=dtype), features(B, H, T, F, dtype=dtype), randn(B, H, T, D, dtype=dtype),
              features(B, H, F, D), features(B, H, F)]
    ref_in, tri_in = leaves(*inputs), leaves(*inputs)
    fq, fk, v, s0, z0 = ref_in
    ones = torch.ones(H, device=fq.device)
    ref = _reference(fq, fk, v, fq, fk, ones, s0, z0, 0, 0, 1.0)
    fq, fk, v, s0, z0 = tri_in
    out, (S, z) = chunk_linear_attention(fq, fk, v, initial_state=(s0, z0))
    tri = (out, S, z)
    ratio = tolerance(dtype)
    for name, r, t in zip(["out", "S", "z"], ref, tri):
        assert_close(name, r, t, ratio)
    upstream = [torch.randn_like(r) for r in ref]
    ref_grads = grads(sum((r * u).sum() for r, u in zip(ref, upstream)), ref_in)
    tri_grads = grads(sum((t * u).sum() for t, u in zip(tri, upstream)), tri_in)
    for name, r, t in zip(["dfq", "dfk", "dv", "dS0", "dz0"], ref_grads, tri_grads):
        assert_close(name, r, t, ratio)


@pytest.mark.parametrize("split", [1, 37, 128], ids=lambda s: f"T1-{s}")
def test_chunk_linear_attention_split_and_resume(split: int) -> None:
    """[0, T1) then [T1, T) from the returned state equals one pass, values and gradients."""
    B, T, H, D, F = 1, 150, 2, 60, 48
    torch.manual_seed(0)
    inputs = [features(B, H, T, F), features(B, H, T, F), randn(B, H, T, D)]
    whole_in, split_in = leaves(*inputs), leaves(*inputs)
    out, (S, z) = chunk_linear_attention(*whole_in)
    fq, fk, v = split_in
    out1, state = chunk_linear_attention(fq[:, :, :split], fk[:, :, :split], v[:, :, :split])
    out2, (S2, z2) = chunk_linear_attention(fq[:, :, split:], fk[:, :, split:], v[:, :, split:], initial_state=state)
    resumed = torch.cat([out1, out2], dim=2)
    ratio = tolerance(torch.float32)
    assert_close("out", out, resumed, ratio)
    assert_close("S", S, S2, ratio)
    assert_close("z", z, z2, ratio)
    upstream = torch.randn_like(out)
    for name, r, t in zip(["dfq", "dfk", "dv"], grads((out * upstream).sum() + S.sum(), whole_in),
                          grads((resumed * upstream).sum() + S2.sum(), split_in)):
        assert_close(name, r, t, ratio)


def test_bad_shapes_raise() -> None:
    fq = features(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"fk must have shape \[1, 2, 8, 16\], got \[1, 2, 8, 12\]"):
        chunk_linear_attention(fq, features(1, 2, 8, 12), randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match=r"gamma must have shape \[2\]"):
        chunk_hybrid_attention(randn(1, 2, 8, 16), randn(1, 2, 8, 16), randn(1, 2, 8, 16), fq, fq,
                               torch.rand(3, device=fq.device), window=4, sinks=0, scaling=0.25)


class _Forbidden:
    """Stands in for a kernel that must not be launched."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} was launched for a gradient nobody needs")


# Inputs that require grad, and the kernels that then must not run: attention transfer (q, k, v
# frozen), values only, queries only.
FROZEN_CASES = {
    "train-fq-fk-gamma": (("fq", "fk", "gamma"), ("_dk_kernel", "_dv_kernel")),
    "train-v": (("v",), ("_dk_kernel", "_dfk_kernel", "_softmax_query_bwd_kernel", "_linear_query_bwd_kernel")),
    "train-q": (("q",), ("_dk_kernel", "_dfk_kernel", "_dv_kernel", "_states_bwd_kernel", "_linear_query_bwd_kernel")),
}


@pytest.mark.parametrize("case", FROZEN_CASES.values(), ids=FROZEN_CASES.keys())
def test_only_needed_gradients_are_computed(case, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen inputs get no gradient and their kernels do not run; the others match the reference."""
    trained, forbidden = case
    B, T, H, d, D, F, window, sinks = 1, 70, 2, 16, 24, 20, 8, 2
    torch.manual_seed(0)
    names = ["q", "k", "v", "fq", "fk", "gamma"]
    inputs = [randn(B, H, T, d), randn(B, H, T, d), randn(B, H, T, D), features(B, H, T, F), features(B, H, T, F),
              torch.rand(H, device=DEVICE)]
    ref_in = leaves(*inputs)
    tri_in = [t.detach().clone().requires_grad_(name in trained) for name, t in zip(names, inputs)]
    spec = reference.AttentionSpec(window=window, sinks=sinks, scaling=d**-0.5)
    upstream = torch.randn(B, H, T, D, device=DEVICE)
    ref = (reference.hybrid_attention_chunked(*ref_in, spec) * upstream).sum()
    for name in forbidden:
        monkeypatch.setattr(hybrid, name, _Forbidden(name))
    out, _ = chunk_hybrid_attention(*tri_in, window=window, sinks=sinks, scaling=spec.scaling)
    (out * upstream).sum().backward()
    ref_grads = dict(zip(names, grads(ref, ref_in)))
    for name, t in zip(names, tri_in):
        if name in trained:
            assert_close(f"d{name}", ref_grads[name], t.grad, tolerance(torch.float32))
        else:
            assert t.grad is None, f"frozen {name} got a gradient"
