"""LoRA adapters (peft) on the attention projections of a linearized model, and merging them back."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from linearize.recipe import LoraSection

# Attention projections by family, as regular expressions so GPT-2's MLP c_proj is not matched.
DEFAULT_TARGETS = {
    "self_attn": r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "attn": r".*\.attn\.(c_attn|c_proj)",
}


def add_lora(model: torch.nn.Module, section: LoraSection) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; only the adapters train (feature maps stay frozen)."""
    targets = section.target_modules or DEFAULT_TARGETS[model.attention_attr]
    config = LoraConfig(
        r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout, target_modules=targets,
        bias="none", fan_in_fan_out=model.attention_attr == "attn",  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(model, config)


def merge_lora(model: PeftModel) -> torch.nn.Module:
    """Fold the adapters into the base weights and return the plain linearized model."""
    merged = model.merge_and_unload()
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    return merged
