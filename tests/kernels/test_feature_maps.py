"""``triton.feature_maps`` against ``reference.hedgehog_features`` / ``reference.based_features``."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, PRECISIONS, assert_close, case_id, grads, leaves, randn, tolerance

from linearize.kernels import reference
from linearize.kernels.triton import based_feature_map, hedgehog_feature_map, taylor_dim

# (B, T, H, d, e): T = 1, odd, and over one program's 1024 rows; non-power-of-two d and e.
CASES = [(1, 1, 2, 16, 16), (2, 63, 2, 60, 48), (1, 200, 2, 48, 60), (1, 1100, 1, 48, 30)]
IDS = [case_id(B=B, T=T, H=H, d=d, e=e) for B, T, H, d, e in CASES]
# (B, T, H, d, f): BASED's f = 16 (160 padded features) and a smaller f = 8 (45 -> 48).
BASED_CASES = [(1, 1, 2, 16, 16), (2, 63, 2, 60, 16), (1, 200, 2, 48, 16), (1, 1100, 1, 48, 8)]
BASED_IDS = [case_id(B=B, T=T, H=H, d=d, f=f) for B, T, H, d, f in BASED_CASES]


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hedgehog_feature_map(case: tuple[int, ...], dtype: torch.dtype) -> None:
    B, T, H, d, e = case
    torch.manual_seed(0)
    inputs = [randn(B, H, T, d, dtype=dtype), (0.3 * randn(H, d, e)).to(dtype), (0.3 * randn(H, e)).to(dtype)]
    ref_in, tri_in = leaves(*inputs), leaves(*inputs)
    ref = reference.hedgehog_features(*(t.float() for t in ref_in))
    tri = hedgehog_feature_map(*tri_in)
    ratio = tolerance(dtype)
    assert_close("phi", ref, tri, ratio)
    upstream = torch.randn_like(ref)
    for name, r, t in zip(["dx", "dweight", "dbias"], grads((ref * upstream).sum(), ref_in),
                          grads((tri.float() * upstream).sum(), tri_in)):
        assert_close(name, r, t, ratio)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("case", BASED_CASES, ids=BASED_IDS)
def test_based_feature_map(case: tuple[int, ...], dtype: torch.dtype) -> None:
    B, T, H, d, f = case
    torch.manual_seed(0)
    inputs = [randn(B, H, T, d, dtype=dtype), (0.3 * randn(H, d, f)).to(dtype)]
    ref_in, tri_in = leaves(*inputs), leaves(*inputs)
    ref = reference.based_features(*(t.float() for t in ref_in))
    tri = based_feature_map(*tri_in)
    n = ref.shape[-1]
    assert tri.shape[-1] == taylor_dim(f) and tri.shape[-1] % 16 == 0
    assert_close("phi", ref, tri[..., :n], tolerance(dtype))
    assert torch.all(tri[..., n:] == 0), "padding features must be exactly zero"
    upstream = torch.randn_like(ref)
    for name, r, t in zip(["dx", "dprojection"], grads((ref * upstream).sum(), ref_in),
                          grads((tri[..., :n].float() * upstream).sum(), tri_in)):
        assert_close(name, r, t, tolerance(dtype))


def test_taylor_dim() -> None:
    assert [taylor_dim(f) for f in (4, 8, 16)] == [16, 48, 160]


def test_bad_weight_shape_raises() -> None:
    x = randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \[2, 8, 4\], got \[3, 8, 4\]"):
        hedgehog_feature_map(x, randn(3, 8, 4), randn(3, 4))
    with pytest.raises(ValueError, match=r"projection must be \[H, d, f\]"):
        based_feature_map(x, torch.zeros(8, 16, device=DEVICE))
