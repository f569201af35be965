"""Training-free changes to a converted model's attention: the window, the sinks, a global cache, the
linear share, or layers given back their softmax attention.

These need no new weights, so they apply to any trained student: to trace the recall–state-size
frontier (``linearize eval --recall --configs``), to run the gamma = 0 ablation (the softmax part
alone, no linear memory), or to add a LoLA-style global cache to an export. The config is updated
with the model, so ``save_pretrained`` writes a folder that computes the same.
"""

from __future__ import annotations

import torch

from linearize.convert.swap import restore_softmax_layers
from linearize.errors import UserError
from linearize.hf.configuration_linearized import LinearAttentionOptions
from linearize.hf.modeling_linearized import LinearAttentionCore

# Fields of LinearAttentionOptions that change the math but no weight.
ATTENTION_FIELDS = ("window", "sink_tokens", "global_cache", "global_cache_block", "fixed_gamma")
CONFIG_KEYS = (*ATTENTION_FIELDS, "gamma", "softmax_layers")


def parse_config(text: str) -> dict:
    """``"window=128,global_cache=64"`` -> {"window": 128, "global_cache": 64}; ``softmax_layers``
    takes layer indices joined by ``+`` (``softmax_layers=3+17``), ``gamma`` a number in [0, 1]."""
    config: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in CONFIG_KEYS:
            raise UserError(f"bad configuration item {item!r}. Fix: write key=value with key one of {', '.join(CONFIG_KEYS)}")
        try:
            if key in ("gamma", "fixed_gamma"):
                config[key] = float(value)
            elif key == "softmax_layers":
                config[key] = [int(i) for i in value.split("+") if i.strip()]
            else:
                config[key] = int(value)
        except ValueError:
            raise UserError(f"configuration item {item!r}: {value!r} is not a number. Fix: e.g. {key}=64") from None
    return config


def config_label(config: dict) -> str:
    """A short name of a configuration for tables and plots (``"as exported"`` when empty)."""
    if not config:
        return "as exported"
    return ", ".join(f"{key}={'+'.join(map(str, value)) if isinstance(value, list) else value}"
                     for key, value in config.items())


def apply_inference_options(model: torch.nn.Module, config: dict) -> torch.nn.Module:
    """Apply ``config`` (keys of ``CONFIG_KEYS``) to a linearized ``model`` in place and return it.

    ``gamma`` (or ``fixed_gamma``) fixes every linear layer's share of the linear part (0: the
    softmax part only, 1: the linear part only; it needs a window or sinks). ``softmax_layers`` gives those layers back the
    teacher's softmax attention with the student's own projections.
    """
    options = getattr(model.config, "linear_attention", None)
    if options is None:
        raise UserError(f"{type(model).__name__} is not a linearized model: its attention options cannot be changed")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(f"unknown configuration key(s) {unknown}. Fix: use {', '.join(CONFIG_KEYS)}")
    config = dict(config)
    if "gamma" in config:  # the short name of fixed_gamma
        config["fixed_gamma"] = config.pop("gamma")
    updated = {**options, **{key: config[key] for key in ATTENTION_FIELDS if key in config}}
    try:
        resolved = LinearAttentionOptions.from_dict(updated)
    except ValueError as error:
        raise UserError(f"configuration {config_label(config)!r}: {error}") from None
    if "softmax_layers" in config:
        layers = config["softmax_layers"]
        count = len(model.decoder_layers())
        if any(not 0 <= i < count for i in layers):
            raise UserError(f"softmax_layers {layers}: the model has layers 0..{count - 1}")
        restore_softmax_layers(model, layers)
        updated["softmax_layers"] = model.config.linear_attention["softmax_layers"]
        resolved = LinearAttentionOptions.from_dict(updated)
    cores = [module for module in model.modules() if isinstance(module, LinearAttentionCore)]
    if resolved.has_softmax_part and not all(hasattr(core, "mix_logit") for core in cores):
        raise UserError(f"configuration {config_label(config)!r}: this model was converted without a softmax part "
                        "(window 0, no sinks), so it has no mix factor for one. Fix: convert with a window")
    model.config.linear_attention = resolved.to_dict()
    for core in cores:
        core.set_options(resolved)
    return model
