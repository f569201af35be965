"""Conversion keeps every pretrained weight, adds only the new parameters, and rejects bad input."""

from __future__ import annotations

import pytest
import torch
from model_testing import (
    ALL_ATTENTIONS,
    TEACHERS,
    MISTRAL_SLIDING_WINDOW,
    VOCAB,
    assert_close,
    attention_attr,
    converted,
    decoder_layers,
    options_for,
    preset_of,
    tiny_mistral,
    tiny_qwen2,
)
from transformers import OPTConfig, OPTForCausalLM

import linearize
from linearize.convert import ConversionError, attention_options
from linearize.hf.modeling_linearized import LinearizedGPT2Attention, LinearizedLlamaAttention

NEW_PARAMETER_MARKERS = (".core.", "k_enc_proj", "v_enc_proj", "c_attn_enc")


@pytest.mark.parametrize("attention", ALL_ATTENTIONS)
def test_conversion_reuses_weights_and_adds_only_new_parameters(family, attention):
    teacher = TEACHERS[family]()
    reference = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    student = linearize.convert(teacher, attention=preset_of(attention), **options_for(attention))
    state = student.state_dict()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), f"pretrained weight {name} changed"
    added = set(state) - set(reference)
    assert added, "conversion added no parameters"
    assert all(any(marker in name for marker in NEW_PARAMETER_MARKERS) for name in added), sorted(added)
    if attention == "jrt":
        assert any("enc" in name for name in added)
    if attention.startswith("window"):
        assert any(name.endswith("mix_logit") for name in added)
    else:
        assert not any(name.endswith("mix_logit") for name in added), "pure linear attention has no mix factor"
    assert type(student).__name__.startswith("Linearized")
    assert student.config.model_type.startswith("linearized_")


def test_jrt_encoder_starts_as_a_copy_of_key_value_projections(family):
    student = linearize.convert(TEACHERS[family](), attention="jrt")
    layer = student.decoder_layers()[0]
    if family != "gpt2":
        attention = layer.self_attn
        assert torch.equal(attention.k_enc_proj.weight, attention.k_proj.weight)
        assert attention.k_enc_proj.weight.data_ptr() != attention.k_proj.weight.data_ptr(), "must be a copy"
        assert torch.equal(attention.v_enc_proj.weight, attention.v_proj.weight)
    else:
        split = layer.attn.split_size
        assert torch.equal(layer.attn.c_attn_enc.weight, layer.attn.c_attn.weight[:, split:])
        assert layer.attn.c_attn_enc.weight.shape[1] == 2 * split


def test_softmax_layers_stay_the_teachers_modules(family):
    teacher = TEACHERS[family]()
    attr = attention_attr(family)
    teacher_layers = decoder_layers(teacher)
    original = [type(getattr(layer, attr)) for layer in teacher_layers]
    student = linearize.convert(teacher, attention="window_hedgehog", softmax_layers=[1], **options_for("window_hedgehog"))
    layers = student.decoder_layers()
    assert type(getattr(layers[1], attr)) is original[1]
    linear_class = LinearizedGPT2Attention if family == "gpt2" else LinearizedLlamaAttention
    assert isinstance(getattr(layers[0], attr), linear_class)


def test_all_softmax_layers_reproduce_the_teacher(family):
    teacher = TEACHERS[family]()
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        expected = teacher(ids).logits
        layers = len(decoder_layers(teacher))
        student = linearize.convert(teacher, attention="hedgehog", softmax_layers=list(range(layers)))
        assert torch.equal(student(ids).logits, expected)


@pytest.mark.parametrize("attention", ["window_hedgehog", "window_based"])
def test_window_covering_the_sequence_is_the_teacher(family, attention):
    """Teacher identity: when the softmax window holds every key, the hybrid is the teacher's softmax
    attention whatever gamma is, at the logits level, with a left-padded row too."""
    teacher = TEACHERS[family]()
    length = MISTRAL_SLIDING_WINDOW if family == "mistral" else 19  # a sliding teacher bounds the window
    torch.manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, length))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = teacher(ids, attention_mask=mask, position_ids=positions).logits
    student = converted(family, attention, window=length, sink_tokens=1, init_gamma=0.7)
    with torch.no_grad():
        actual = student(ids, attention_mask=mask).logits
    assert_close("logits", expected[mask.bool()], actual[mask.bool()], atol=1e-5, rtol=0)


def test_window_wider_than_a_sliding_teacher_is_refused():
    with pytest.raises(ConversionError, match=f"window 64 is wider than the teacher's sliding_window {MISTRAL_SLIDING_WINDOW}"):
        linearize.convert(tiny_mistral(), attention="window_hedgehog", window=64)


def test_unsupported_architecture_names_class_and_supported_list():
    config = OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                       word_embed_proj_dim=16)
    with pytest.raises(ConversionError, match=r"OPTForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM"):
        linearize.convert(OPTForCausalLM(config))


def test_converting_twice_is_rejected():
    student = linearize.convert(TEACHERS["llama"](), attention="hedgehog")
    with pytest.raises(ConversionError, match="LinearizedLlamaForCausalLM"):
        linearize.convert(student, attention="hedgehog")


@pytest.mark.parametrize(
    "attention,options,message",
    [
        ("softmax", {}, "unknown attention 'softmax'"),
        ("window_hedgehog", {"window": -1}, "'window' must be an integer >= 0"),
        ("window_hedgehog", {"init_gamma": 1.5}, "'init_gamma' must be a number strictly between 0 and 1"),
        ("hedgehog", {"sink_tokens": -2}, "'sink_tokens' must be an integer >= 0"),
        ("hedgehog", {"chunk_size": 0}, "'chunk_size' must be an integer >= 1"),
        ("hedgehog", {"feature_map": "relu"}, "feature_map must be one of"),
        ("hedgehog", {"windw": 3}, r"unknown linear attention option\(s\) \['windw'\]"),
    ],
)
def test_bad_options_name_the_field(attention, options, message):
    with pytest.raises(ValueError, match=message):
        attention_options(attention, **options)


def test_softmax_layer_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"softmax_layers \[7\] are out of range: the model has layers 0..2"):
        linearize.convert(TEACHERS["llama"](), attention="hedgehog", softmax_layers=[7])


def test_a_stored_jrt_prefix_is_dropped_loudly():
    """Older exports stored a default JRT prefix that made plain scoring non-causal."""
    from linearize.hf.configuration_linearized import LinearAttentionOptions

    with pytest.warns(UserWarning, match="plain forward calls score causally"):
        options = LinearAttentionOptions.from_dict({"feature_map": "hedgehog", "jrt": True, "jrt_prefix_length": 128})
    assert options.jrt and "jrt_prefix_length" not in options.to_dict()
