"""Named attention variants: each is a preset of ``LinearAttentionOptions`` fields."""

from __future__ import annotations

from linearize.errors import UserError
from linearize.hf.configuration_linearized import LinearAttentionOptions

# The window variants start with a small linear share so that the untrained model is close to
# "softmax over the window plus sinks", the best model available without training (DESIGN.md §9).
# Based's Taylor scores (1 + s + s^2/2 per key, unnormalised) dwarf the max-shifted softmax part,
# so its share must start far lower than Hedgehog's (scores ~2/d per key). Measured on SmolLM2-135M,
# WikiText-2, 16 x 512 tokens (window + sinks alone: 50.1): window_hedgehog at 0.1 gives 53.0;
# window_based at 0.1 gives 2887, at 3e-4 233 (scripts/conversion_report.py).
WINDOW = {"window": 64, "sink_tokens": 4}

ATTENTION_PRESETS: dict[str, dict] = {
    "hedgehog": {"feature_map": "hedgehog"},
    "based": {"feature_map": "based", "feature_dim": 16},
    "window_hedgehog": {"feature_map": "hedgehog", "init_gamma": 0.1, **WINDOW},
    "window_based": {"feature_map": "based", "feature_dim": 16, "init_gamma": 1e-4, **WINDOW},
    "jrt": {"feature_map": "hedgehog", "jrt": True},
}


def attention_options(attention: str, **overrides) -> LinearAttentionOptions:
    """The preset ``attention`` with ``overrides`` (None values ignored) applied.

    Raises ``UserError`` naming the bad field or the unknown variant.
    """
    if attention not in ATTENTION_PRESETS:
        raise UserError(f"unknown attention {attention!r}; choose one of {sorted(ATTENTION_PRESETS)}")
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return LinearAttentionOptions.from_dict({**ATTENTION_PRESETS[attention], **given, "attention": attention})
    except (TypeError, ValueError) as error:
        raise UserError(str(error)) from None
