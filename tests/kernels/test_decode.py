"""``triton.decode`` against ``reference.hybrid_attention_step`` with T = 1, token after token."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, PRECISIONS, assert_close, case_id, features, randn, tolerance

from linearize.kernels import reference
from linearize.kernels.triton import DecodeState, decode_step

# (window, sinks): ring of several slots with sinks, plain linear, own key only, sinks without a
# window, a ring of one slot, sinks that outnumber the window.
SETTINGS = [(5, 2), (0, 0), (1, 0), (0, 2), (2, 0), (4, 6)]


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("setting", SETTINGS, ids=[case_id(w=w, s=s) for w, s in SETTINGS])
def test_decode_step_matches_reference(setting: tuple[int, int], dtype: torch.dtype) -> None:
    window, sinks = setting
    B, T, H, d, D, F, prefill = 2, 12, 3, 10, 12, 9, 3
    torch.manual_seed(0)
    q, k, v = randn(B, H, T, d, dtype=dtype), randn(B, H, T, d, dtype=dtype), randn(B, H, T, D, dtype=dtype)
    fq, fk, gamma = features(B, H, T, F, dtype=dtype), features(B, H, T, F, dtype=dtype), torch.rand(H, device=DEVICE)
    options = dict(window=window, sinks=sinks, scaling=d**-0.5)
    state = reference.RecurrentState.empty(q, v, fq).with_prefix(features(B, H, F, D), features(B, H, F))
    first = slice(0, prefill)
    _, state = reference.hybrid_attention_chunked(q[:, :, first], k[:, :, first], v[:, :, first], fq[:, :, first],
                                                  fk[:, :, first], gamma, state, **options)
    ring = DecodeState.from_recurrent(state, window, sinks)
    ratio = tolerance(dtype)
    for t in range(prefill, T):
        token = slice(t, t + 1)
        args = (q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token], fk[:, :, token], gamma)
        ref_out, state = reference.hybrid_attention_step(*args, state, **options)
        assert_close(f"out[{t}]", ref_out, decode_step(*args, ring, scaling=options["scaling"]), ratio)
    back = ring.to_recurrent()
    for name in ("S", "z", "keys", "features", "values", "positions", "seen"):
        assert_close(name, getattr(state, name).float(), getattr(back, name).float(), ratio)


def test_ring_layout_roundtrip() -> None:
    """from_recurrent then to_recurrent gives back the reference state, also with a partly full buffer."""
    torch.manual_seed(0)
    B, H, T, d, F = 1, 2, 5, 4, 4
    q, fq = randn(B, H, T, d), features(B, H, T, F)
    _, state = reference.hybrid_attention_chunked(q, q, q, fq, fq, torch.rand(H, device=DEVICE), window=8, sinks=2,
                                                  scaling=0.5)
    ring = DecodeState.from_recurrent(state, window=8, sinks=2)
    assert ring.keys.shape[2] == 2 + 7
    back = ring.to_recurrent()
    for name in ("S", "z", "keys", "features", "values", "positions", "seen"):
        assert torch.equal(getattr(state, name), getattr(back, name)), name


def test_decode_step_rejects_wrong_shapes() -> None:
    q, fq = randn(1, 2, 1, 4), features(1, 2, 1, 4)
    ring = DecodeState.from_recurrent(reference.RecurrentState.empty(q, q, fq), window=3, sinks=0)
    with pytest.raises(ValueError, match=r"q must have shape \[1, 2, 1, 4\], got \[1, 2, 2, 4\]"):
        decode_step(randn(1, 2, 2, 4), q, q, fq, fq, torch.rand(2, device=DEVICE), ring, scaling=0.5)
