"""Hugging Face classes of linearized models.

The files of this folder that ``modeling_linearized.py`` imports are copied into every export, so
they depend only on torch and transformers. ``register_auto_classes`` lets ``AutoConfig`` and
``AutoModelForCausalLM`` load exports without ``trust_remote_code`` once ``linearize`` is imported.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from linearize.hf.configuration_linearized import (
    LinearAttentionOptions,
    LinearizedGPT2Config,
    LinearizedLlamaConfig,
    LinearizedMistralConfig,
    LinearizedQwen2Config,
)
from linearize.hf.linearized_cache import LinearizedCache
from linearize.hf.modeling_linearized import (
    LinearizedGPT2LMHeadModel,
    LinearizedLlamaForCausalLM,
    LinearizedMistralForCausalLM,
    LinearizedQwen2ForCausalLM,
)

MODEL_CLASSES = (
    LinearizedLlamaForCausalLM,
    LinearizedMistralForCausalLM,
    LinearizedQwen2ForCausalLM,
    LinearizedGPT2LMHeadModel,
)


def register_auto_classes() -> None:
    """Register every linearized config and model with the transformers Auto classes (idempotent)."""
    for model_class in MODEL_CLASSES:
        config_class = model_class.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


__all__ = [
    "MODEL_CLASSES",
    "LinearAttentionOptions",
    "LinearizedCache",
    "LinearizedGPT2Config",
    "LinearizedGPT2LMHeadModel",
    "LinearizedLlamaConfig",
    "LinearizedLlamaForCausalLM",
    "LinearizedMistralConfig",
    "LinearizedMistralForCausalLM",
    "LinearizedQwen2Config",
    "LinearizedQwen2ForCausalLM",
    "register_auto_classes",
]
