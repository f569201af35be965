"""Swap a teacher's softmax attention for linear attention, in place.

``convert(model, attention="window_hedgehog", window=32)`` keeps every pretrained weight, adds only
feature maps, mix factors and (JRT) encoder projections, and turns the model into the matching
``Linearized*`` class so it saves and reloads as a Hugging Face model.
"""

from linearize.convert.inference_options import apply_inference_options
from linearize.convert.presets import ATTENTION_PRESETS, attention_options
from linearize.convert.swap import SUPPORTED_ARCHITECTURES, ConversionError, convert, restore_softmax_layers
from linearize.hf.feature_maps import FEATURE_MAPS, BasedFeatureMap, HedgehogFeatureMap

__all__ = [
    "ATTENTION_PRESETS",
    "FEATURE_MAPS",
    "SUPPORTED_ARCHITECTURES",
    "BasedFeatureMap",
    "HedgehogFeatureMap",
    "ConversionError",
    "apply_inference_options",
    "attention_options",
    "convert",
    "restore_softmax_layers",
]
