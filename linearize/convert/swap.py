"""Turn a loaded teacher into its linearized class in place (module surgery, in one place)."""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, PreTrainedModel, Qwen2ForCausalLM

from linearize.convert.presets import attention_options
from linearize.errors import UserError
from linearize.hf.modeling_linearized import (
    LinearizedCausalLMMixin,
    LinearizedGPT2LMHeadModel,
    LinearizedLlamaForCausalLM,
    LinearizedMistralForCausalLM,
    LinearizedQwen2ForCausalLM,
    teacher_sliding_window,
)

# Exact classes only: a subclass may change attention in ways the swap does not know about.
SUPPORTED_ARCHITECTURES: dict[type[PreTrainedModel], type[LinearizedCausalLMMixin]] = {
    LlamaForCausalLM: LinearizedLlamaForCausalLM,
    MistralForCausalLM: LinearizedMistralForCausalLM,
    Qwen2ForCausalLM: LinearizedQwen2ForCausalLM,
    GPT2LMHeadModel: LinearizedGPT2LMHeadModel,
}

# Attention submodules the swap knows how to reproduce; anything else (q/k norms, cross-attention
# projections) means the math would silently change.
KNOWN_ATTENTION_CHILDREN = {
    "self_attn": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "attn": {"c_attn", "c_proj", "attn_dropout", "resid_dropout"},
}


class ConversionError(UserError):
    """The model cannot be converted as asked; the message says why and what is supported."""


def _check_supported(model: PreTrainedModel) -> type[LinearizedCausalLMMixin]:
    target = SUPPORTED_ARCHITECTURES.get(type(model))
    if target is None:
        names = ", ".join(sorted(cls.__name__ for cls in SUPPORTED_ARCHITECTURES))
        raise ConversionError(f"cannot linearize {type(model).__name__}; supported architectures: {names}")
    config = model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise ConversionError(
            "GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported"
        )
    for layer in target.decoder_layers(model):
        attention = getattr(layer, target.attention_attr)
        children = {name for name, _ in attention.named_children()}
        extra = children - KNOWN_ATTENTION_CHILDREN[target.attention_attr]
        if extra:
            raise ConversionError(
                f"{type(model).__name__} attention has extra modules {sorted(extra)} that linear attention would "
                "ignore; this variant of the architecture is not supported"
            )
    return target


def _check_teacher_window(model: PreTrainedModel, target: type[LinearizedCausalLMMixin], window: int) -> None:
    """Refuse a softmax window wider than the teacher's own sliding window (Mistral, Qwen2): the
    student would give exact softmax weight to keys its teacher never attends to."""
    for index in range(len(target.decoder_layers(model))):
        teacher_window = teacher_sliding_window(model.config, index)
        if teacher_window is not None and window > teacher_window:
            raise ConversionError(
                f"window {window} is wider than the teacher's sliding_window {teacher_window} (layer {index}); "
                f"fix: use window <= {teacher_window}"
            )


def convert(model: PreTrainedModel, attention: str = "window_hedgehog", seed: int = 0, **options) -> PreTrainedModel:
    """Swap the attention of ``model`` for linear attention, in place, and return it.

    Args:
        model: a loaded ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``GPT2LMHeadModel``.
        attention: a name from ``ATTENTION_PRESETS``.
        seed: seeds the random initialisation of new parameters (Based projections).
        **options: ``LinearAttentionOptions`` fields overriding the preset, e.g. ``window=32``,
            ``softmax_layers=[0, 5]``.
    """
    target = _check_supported(model)
    resolved = attention_options(attention, **options)
    layers = len(target.decoder_layers(model))
    out_of_range = [i for i in resolved.softmax_layers if not 0 <= i < layers]
    if out_of_range:
        raise ConversionError(f"softmax_layers {out_of_range} are out of range: the model has layers 0..{layers - 1}")
    _check_teacher_window(model, target, resolved.window)
    parameter = next(model.parameters())
    config = model.config
    config.__class__ = target.config_class  # same fields, own model_type
    config.linear_attention = resolved.to_dict()
    model.__class__ = target
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.swap_attention()
    # New parameters are created in fp32 and stay so (masters): in bf16 an AdamW update below ~1e-3
    # of a weight near 1.0 rounds to nothing. The modules cast them to the activations' dtype.
    return model.to(device=parameter.device)


def restore_softmax_layers(model: LinearizedCausalLMMixin, layers: list[int]) -> None:
    """Give ``layers`` back their teacher's softmax attention (same projections), in place.

    Their linear-attention parameters are dropped and ``softmax_layers`` in the config is updated,
    so an export rebuilds the same hybrid.
    """
    decoder_layers = model.decoder_layers()
    for index in layers:
        linear = getattr(decoder_layers[index], model.attention_attr)
        if not hasattr(linear, "teacher_class"):
            continue  # already softmax
        teacher = linear.teacher_class(model.config, layer_idx=index)
        for name in linear.shared_modules:
            setattr(teacher, name, getattr(linear, name))
        setattr(decoder_layers[index], model.attention_attr, teacher)
    options = dict(model.config.linear_attention)
    options["softmax_layers"] = sorted(set(options.get("softmax_layers", [])) | set(layers))
    model.config.linear_attention = options
