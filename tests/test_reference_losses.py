"""The materialising references of ``linearize.kernels.reference``: the teacher's sliding window."""

from __future__ import annotations

import torch
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

from linearize.kernels.reference import softmax_attention, transfer_losses_naive


def _inputs(B: int, H: int, T: int, d: int = 8, F: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    return [q, k, v, torch.rand(B, H, T, F) + 0.05, torch.rand(B, H, T, F) + 0.05, torch.rand(H)]


def test_sliding_window_equals_transformers_mask() -> None:
    """Same allowed keys and weights as transformers' sliding-window causal mask, with left padding."""
    B, H, T, window, pad = 2, 2, 23, 5, 4
    q, k, v, *_ = _inputs(B, H, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :pad] = False
    mask = sdpa_mask(batch_size=B, q_length=T, kv_length=T, attention_mask=valid, allow_is_causal_skip=False,
                     mask_function=sliding_window_causal_mask_function(window))  # [B, 1, T, T], True = attend
    assert mask.sum(dim=-1).max() == window  # the window counts the query itself
    weights, out = softmax_attention(q, k, v, 0.5, valid, sliding_window=window)
    real = valid[:, None, :, None]
    assert torch.equal((weights > 0) & real, mask.expand(B, H, T, T) & real)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    expected = scores.softmax(dim=-1).nan_to_num(0.0)  # padding queries of row 1 attend to nothing
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(out, expected @ v)


def test_transfer_losses_with_sliding_window() -> None:
    """The teacher of the losses is the windowed one; a window covering the sequence is full attention."""
    B, H, T = 1, 2, 12
    inputs = [t.requires_grad_() for t in _inputs(B, H, T)]
    q, k, v, fq, fk, gamma = inputs
    options = dict(scaling=0.5, window=2, sinks=1)
    losses, teacher = transfer_losses_naive(*inputs, sliding_window=4, **options)
    torch.testing.assert_close(teacher, softmax_attention(q, k, v, 0.5, sliding_window=4)[1])
    full, _ = transfer_losses_naive(*inputs, **options)
    covering, _ = transfer_losses_naive(*inputs, sliding_window=T, **options)
    torch.testing.assert_close(covering, full)
    assert not torch.allclose(losses["xent"], full["xent"])
    for g in torch.autograd.grad(losses["xent"] + losses["mse"], inputs):
        assert torch.isfinite(g).all()
