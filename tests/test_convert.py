"""Conversion keeps every pretrained weight, adds only the new parameters, and rejects bad input."""

from __future__ import annotations

import pytest
import torch
from model_testing import ALL_ATTENTIONS, TEACHERS, VOCAB, converted, options_for, tiny_qwen2
from transformers import OPTConfig, OPTForCausalLM

import linearize
from linearize.convert import ConversionError, attention_options
from linearize.hf.modeling_linearized import LinearizedGPT2Attention, LinearizedLlamaAttention

NEW_PARAMETER_MARKERS = (".core.", "k_enc_proj", "v_enc_proj", "c_attn_enc")


@pytest.mark.parametrize("attention", ALL_ATTENTIONS)
def test_conversion_reuses_weights_and_adds_only_new_parameters(family, attention):
    teacher = TEACHERS[family]()
    reference = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    student = linearize.convert(teacher, attention=attention, **options_for(attention))
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
    if family == "llama":
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
    attr = "self_attn" if family == "llama" else "attn"
    teacher_layers = teacher.model.layers if family == "llama" else teacher.transformer.h
    original = [type(getattr(layer, attr)) for layer in teacher_layers]
    student = linearize.convert(teacher, attention="window_hedgehog", softmax_layers=[1])
    layers = student.decoder_layers()
    assert type(getattr(layers[1], attr)) is original[1]
    linear_class = LinearizedLlamaAttention if family == "llama" else LinearizedGPT2Attention
    assert isinstance(getattr(layers[0], attr), linear_class)


def test_all_softmax_layers_reproduce_the_teacher(family):
    teacher = TEACHERS[family]()
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        expected = teacher(ids).logits
        layers = len(teacher.model.layers if family == "llama" else teacher.transformer.h)
        student = linearize.convert(teacher, attention="hedgehog", softmax_layers=list(range(layers)))
        assert torch.equal(student(ids).logits, expected)


def test_window_variant_starts_close_to_window_softmax(family):
    """With gamma near 0 the window variants reduce to softmax over window + sinks."""
    student = converted(family, "window_hedgehog", init_gamma=1e-6)
    teacher = TEACHERS[family]()
    short = torch.randint(0, VOCAB, (1, 6))  # shorter than window + sinks: every key is in the softmax part
    with torch.no_grad():
        assert torch.allclose(student(short).logits, teacher(short).logits, atol=1e-4)


def test_qwen2_converts_and_runs():
    student = linearize.convert(tiny_qwen2(), attention="window_based", window=4)
    assert type(student).__name__ == "LinearizedQwen2ForCausalLM"
    with torch.no_grad():
        logits = student(torch.randint(0, VOCAB, (1, 11))).logits
    assert torch.isfinite(logits).all()


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
