"""``triton.attention_transfer_loss`` against the materialising ``reference`` version, and the output MSE;
through ``dispatch`` with padding, JRT's prefix state and the teacher's sliding window (also at
Llama-3-8B head sizes with 256 features); a frozen teacher's q, k get no gradient kernel."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_testing import DEVICE, PRECISIONS, assert_close, case_id, features, grads, leaves, randn, tolerance

from linearize.kernels import dispatch, reference
from linearize.kernels.reference import attention_transfer_loss_naive
from linearize.kernels.triton import attention_output_mse, attention_transfer_loss

# The module, which the package's function of the same name hides.
loss_module = importlib.import_module("linearize.kernels.triton.attention_transfer_loss")

# (B, T, H, d, F, window, sinks): plain linear attention (gamma = 1) and window + linear hybrids.
CASES = [
    (1, 1, 2, 16, 16, 0, 0),
    (2, 63, 2, 60, 48, 0, 0),
    (1, 200, 1, 48, 60, 0, 0),
    (1, 63, 2, 48, 60, 16, 2),
    (1, 200, 2, 60, 48, 64, 4),
]


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(**dict(zip("B T H d F w s".split(), c))) for c in CASES])
def test_attention_transfer_loss(case: tuple[int, ...], dtype: torch.dtype) -> None:
    B, T, H, d, F, window, sinks = case
    torch.manual_seed(0)
    # gamma = 1 is plain linear attention (no softmax part may exist then: log(1 - gamma) = -inf).
    gamma = torch.rand(H, device=DEVICE) if window or sinks else torch.ones(H, device=DEVICE)
    inputs = [randn(B, H, T, d, dtype=dtype), randn(B, H, T, d, dtype=dtype),
              features(B, H, T, F, dtype=dtype), features(B, H, T, F, dtype=dtype), gamma]
    options = dict(scaling=d**-0.5, window=window, sinks=sinks)
    ref_in, tri_in = leaves(*inputs), leaves(*inputs)
    ref = attention_transfer_loss_naive(*ref_in, **options)
    tri = attention_transfer_loss(*tri_in, **options)
    ratio = tolerance(dtype)
    assert_close("loss", ref, tri, ratio)
    # A single key has P = A = 1 up to eps: its gradients are ~eps and only match absolutely.
    for name, r, t in zip(["dq", "dk", "dfq", "dfk", "dgamma"], grads(ref, ref_in), grads(tri, tri_in)):
        assert_close(name, r, t, ratio)


def test_naive_loss_is_cross_entropy_of_teacher_and_quadratic_weights() -> None:
    """For plain linear attention the naive loss is -sum P log(a / (sum a + eps)), written out."""
    torch.manual_seed(0)
    B, T, H, d, F = 1, 9, 2, 8, 8
    q, k = randn(B, H, T, d), randn(B, H, T, d)
    fq, fk = features(B, H, T, F), features(B, H, T, F)
    causal = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()
    teacher = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
    linear = (fq @ fk.transpose(-1, -2)).masked_fill(~causal, 0.0)
    student = linear / (linear.sum(-1, keepdim=True) + reference.EPS)
    expected = -(teacher * student.masked_fill(~causal, 1.0).log()).sum(-1).mean()
    assert_close("loss", expected, attention_transfer_loss_naive(q, k, fq, fk, scaling=0.5), 1e-6)


# (T, window, sinks): plain linear attention and a hybrid, both over two query blocks (64).
FLOOR_CASES = [(70, 0, 0), (70, 8, 2)]


@pytest.mark.parametrize("case", FLOOR_CASES, ids=[case_id(T=T, w=w, s=s) for T, w, s in FLOOR_CASES])
def test_underflowed_features_give_finite_loss_and_grads(case: tuple[int, int, int]) -> None:
    """Key features that underflowed to exact zeros (peaky hedgehog maps in bf16) put A_ij = 0 under
    the log: the floor keeps loss and gradients finite, and the kernel agrees with the reference."""
    T, window, sinks = case
    B, H, d, F = 1, 2, 16, 16
    torch.manual_seed(0)
    fk = features(B, H, T, F)
    fk[:, 0, :3] = 0.0  # the first queries of head 0 see only zero features: every A_ij floored
    fk[:, 1, 60:68] = 0.0  # a run across the block boundary
    fk[:, :, 40] = 0.0
    gamma = torch.rand(H, device=DEVICE) if window or sinks else torch.ones(H, device=DEVICE)
    inputs = [randn(B, H, T, d), randn(B, H, T, d), features(B, H, T, F), fk, gamma]
    options = dict(scaling=d**-0.5, window=window, sinks=sinks)
    ref_in, tri_in = leaves(*inputs), leaves(*inputs)
    ref = attention_transfer_loss_naive(*ref_in, **options)
    tri = dispatch.attention_transfer_loss(*tri_in, backend="triton", **options)
    assert torch.isfinite(ref) and torch.isfinite(tri)
    ratio = tolerance(torch.float32)
    assert_close("loss", ref, tri, ratio)
    for name, r, t in zip(["dq", "dk", "dfq", "dfk", "dgamma"], grads(ref, ref_in), grads(tri, tri_in)):
        assert torch.isfinite(r).all(), f"reference {name}: non-finite values"
        assert_close(name, r, t, ratio)


def test_attention_output_mse() -> None:
    torch.manual_seed(0)
    B, T, H, d, D, F = 1, 70, 2, 16, 48, 60
    inputs = [randn(B, H, T, d), randn(B, H, T, d), randn(B, H, T, D), features(B, H, T, F), features(B, H, T, F),
              torch.rand(H, device=DEVICE)]
    teacher = randn(B, H, T, D)
    options = dict(window=8, sinks=2, scaling=d**-0.5)
    ref_in, tri_in = leaves(*inputs), leaves(*inputs)
    out, _ = reference.hybrid_attention_quadratic(*ref_in, reference.AttentionSpec(**options))
    ref = (out - teacher).pow(2).mean()
    tri = attention_output_mse(*tri_in, teacher, **options)
    ratio = tolerance(torch.float32)
    assert_close("mse", ref, tri, ratio)
    for name, r, t in zip(["dq", "dk", "dv", "dfq", "dfk", "dgamma"], grads(ref, ref_in), grads(tri, tri_in)):
        assert_close(name, r, t, ratio)


# (d, D, F), rows, with mse: small odd sizes with a left- and a right-padded row; and Llama-3-8B
# heads with Hedgehog's 256 features (d in 2 tiles of 64, F in 4), xent only (mse is the hybrid
# kernel, checked at these sizes in test_hybrid), one left-padded row, to keep the interpreter quick.
PADDED_CASES = {"d24-D20-F12": ((24, 20, 12), 2, True), "d128-F256-xent": ((128, 16, 256), 1, False)}


@pytest.mark.parametrize("case", PADDED_CASES.values(), ids=PADDED_CASES.keys())
def test_losses_with_padding_prefix_state_and_teacher_window(case, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through ``dispatch``, backend='triton' against the reference, with what attention transfer
    meets: padded rows (T = 70, two query blocks), a JRT prefix state whose 5 prefix queries are not
    scored, and a teacher with its own sliding window of 20. The losses and every gradient (the
    state's too); the kernels must not fall back to the reference."""
    (d, D, F), B, with_mse = case
    T, H, window, sinks = 70, 1, 8, 2
    torch.manual_seed(0)
    inputs = [randn(B, H, T, d), randn(B, H, T, d), randn(B, H, T, D), features(B, H, T, F), features(B, H, T, F),
              torch.rand(H, device=DEVICE), features(B, H, F, D), features(B, H, F)]
    teacher_out = randn(B, H, T, D)
    valid = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    valid[0, :9] = valid[1:, T - 6:] = False  # row 0 left-padded, row 1 right-padded
    scored = reference.token_positions(valid) >= 5
    options = dict(scaling=d**-0.5, window=window, sinks=sinks, valid=valid, scored=scored)

    def losses(backend: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        q, k, v, fq, fk, gamma, s0, z0 = tensors = leaves(*inputs)
        values = [dispatch.attention_transfer_loss(q, k, fq, fk, gamma, initial_state=(s0, z0), sliding_window=20,
                                                   backend=backend, **options)]
        if with_mse:
            values.append(dispatch.attention_output_mse(q, k, v, fq, fk, gamma, teacher_out, initial_state=(s0, z0),
                                                        backend=backend, **options))
        return values, grads(sum(values), tensors)

    ref_losses, ref_grads = losses("reference")
    for form in ("transfer_losses_naive", "hybrid_attention_quadratic", "hybrid_attention_chunked"):
        monkeypatch.setattr(dispatch.reference, form, None)
    tri_losses, tri_grads = losses("triton")
    ratio = tolerance(torch.float32)
    for name, r, t in zip(["xent", "mse"], ref_losses, tri_losses):
        assert_close(name, r, t, ratio)
    for name, r, t in zip(["dq", "dk", "dv", "dfq", "dfk", "dgamma", "dS0", "dz0"], ref_grads, tri_grads):
        assert_close(name, r, t, ratio)


class _Launches:
    """Wraps a kernel and records the WRT_FEATURES of every launch."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs["WRT_FEATURES"])
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_frozen_teacher_gets_no_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention transfer: q, k frozen (the teacher's), the features and gamma train. dq and dk
    are not computed (only the feature-gradient launches run); the rest match the reference."""
    B, T, H, d, F = 1, 70, 2, 16, 20
    torch.manual_seed(0)
    inputs = [randn(B, H, T, d), randn(B, H, T, d), features(B, H, T, F), features(B, H, T, F),
              torch.rand(H, device=DEVICE)]
    options = dict(scaling=d**-0.5, window=8, sinks=2)
    ref_in = leaves(*inputs)
    q, k = inputs[:2]
    fq, fk, gamma = leaves(*inputs[2:])
    launches = {}
    for name in ("_xent_bwd_query_kernel", "_xent_bwd_key_kernel"):
        launches[name] = _Launches(getattr(loss_module, name))
        monkeypatch.setattr(loss_module, name, launches[name])
    attention_transfer_loss(q, k, fq, fk, gamma, **options).backward()
    assert [w.seen for w in launches.values()] == [[True], [True]]
    ref_grads = grads(attention_transfer_loss_naive(*ref_in, **options), ref_in)
    ratio = tolerance(torch.float32)
    for name, r, t in zip(["dfq", "dfk", "dgamma"], ref_grads[2:], (fq.grad, fk.grad, gamma.grad)):
        assert_close(name, r, t, ratio)
