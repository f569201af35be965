"""Transfer mode is the teacher (sliding windows included), and JRT prefixes carry no loss."""

from __future__ import annotations

import pytest
import torch
from model_testing import TEACHERS, VOCAB, assert_close, converted, decoder_layers
from transformers import Qwen2Config, Qwen2ForCausalLM

import linearize
from linearize.attention_transfer import transfer_mode
from linearize.attention_transfer.transfer_mode import LayerTransfer, linear_attention_layers


def padded_batch(length: int = 19, pad: int = 3):
    torch.manual_seed(6)
    ids = torch.randint(3, VOCAB, (2, length))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("with_losses", [False, True], ids=["teacher-only", "with-losses"])
def test_transfer_mode_reproduces_the_teacher(family, with_losses):
    """19 tokens outgrow Mistral's sliding window (8): the teacher's window must be applied."""
    ids, mask, positions = padded_batch()
    with torch.no_grad():
        expected = TEACHERS[family]()(ids, attention_mask=mask, position_ids=positions).logits
        student = converted(family, "window_hedgehog")
        with transfer_mode(student, with_losses=with_losses) as recorders:
            actual = student(ids, attention_mask=mask, use_cache=False).logits
    assert_close("logits", expected[mask.bool()], actual[mask.bool()], atol=1e-5, rtol=0)
    if with_losses:
        assert len(recorders) == len(decoder_layers(student))
        assert all(torch.isfinite(r.losses["mse"]) and torch.isfinite(r.losses["xent"]) for r in recorders)


def test_jrt_prefix_queries_carry_no_transfer_loss(family):
    """With a prefix of M tokens, the losses do not depend on the queries of the prefix (their outputs
    read later tokens through the encoder state) and do depend on every query after it."""
    student = converted(family, "jrt")
    _, core = linear_attention_layers(student)[0]
    torch.manual_seed(7)
    heads, head_dim, length, prefix = core.num_heads, core.feature_map_q.weight.shape[1], 15, 6
    q, k, v, k_enc, v_enc = (torch.randn(2, heads, length, head_dim) for _ in range(5))
    q.requires_grad_(True)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :2] = False  # left padding: the prefix counts real tokens
    recorder = LayerTransfer(core, 0, with_losses=True, need_xent=True)
    recorder(q, k, v, valid=valid, cache_layer=None, encoder_kv=(k_enc, v_enc), prefix_length=prefix)
    (recorder.losses["xent"] + recorder.losses["mse"]).backward()
    per_query = q.grad.abs().sum(dim=(1, 3))  # [B, T]
    in_prefix = torch.zeros(2, length, dtype=torch.bool)
    in_prefix[0, :prefix] = True
    in_prefix[1, 2 : 2 + prefix] = True
    assert torch.all(per_query[in_prefix] == 0), "a loss falls on a prefix query"
    assert torch.all(per_query[valid & ~in_prefix] > 0), "a query after the prefix carries no loss"


def test_qwen2_per_layer_sliding_window_is_the_teachers():
    """Qwen2 with use_sliding_window: only layers >= max_window_layers slide; transfer mode follows."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, use_sliding_window=True,
        sliding_window=5, max_window_layers=1,
    )
    teacher = Qwen2ForCausalLM(config).eval()
    ids, mask, positions = padded_batch()
    with torch.no_grad():
        expected = teacher(ids, attention_mask=mask, position_ids=positions).logits
        student = linearize.convert(teacher, attention="window_hedgehog", window=4, sink_tokens=1)
        assert [core.teacher_window for _, core in linear_attention_layers(student)] == [None, 5]
        with transfer_mode(student, with_losses=False):
            actual = student(ids, attention_mask=mask, use_cache=False).logits
    assert_close("logits", expected[mask.bool()], actual[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["left-padded", "right-padded", "jrt-state", "teacher-window"])
def test_tiled_transfer_losses_equal_the_reference(case):
    """The Triton path of the transfer losses (interpreter on CPU) takes padding, a JRT prefix state
    with unscored prefix queries and a teacher sliding window, and gives the reference's losses,
    teacher output and feature-map gradients."""
    from linearize.attention_transfer.losses import transfer_losses

    _, core = linear_attention_layers(converted("llama", "window_hedgehog"))[0]
    torch.manual_seed(3)
    batch, heads, length, dim = 2, 4, 21, 12
    q, k, v = (torch.randn(batch, heads, length, dim) for _ in range(3))
    valid = torch.ones(batch, length, dtype=torch.bool)
    initial, scored = None, None
    if case == "left-padded":
        valid[1, :5] = False
    elif case == "right-padded":
        valid[0, -4:] = False
    elif case == "jrt-state":
        features = core.feature_map_k(k).shape[-1]
        initial = (torch.randn(batch, heads, features, dim), torch.rand(batch, heads, features) + 1)
        scored = torch.ones_like(valid)
        scored[:, :6] = False
    else:
        core.teacher_window = 9
    results = {}
    for backend in ("torch", "triton"):
        core.zero_grad()
        losses, teacher_out = transfer_losses(core, q, k, v, valid, initial, True, scored, backend=backend)
        (losses["xent"] + losses["mse"]).backward()
        grads = {name: p.grad.clone() for name, p in core.named_parameters() if p.grad is not None}
        results[backend] = (losses, teacher_out, grads)
    (ref_losses, ref_out, ref_grads), (losses, out, grads) = results["torch"], results["triton"]
    for name in ("xent", "mse"):
        assert_close(name, ref_losses[name], losses[name], atol=1e-5, rtol=1e-5)
    assert_close("teacher output", ref_out, out, atol=1e-5, rtol=0)
    assert ref_grads and set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert_close(f"d{name}", grad, grads[name], atol=1e-5, rtol=1e-4)
