"""linearize: convert pretrained softmax-attention LMs into linear-attention models.

    import linearize
    model, tokenizer = linearize.load("smollm2-135m")
    model = linearize.convert(model, attention="window_hedgehog")
    linearize.export(model, tokenizer, "out/smollm2-window-hedgehog")

Importing the package registers the linearized classes with the transformers Auto classes.
"""

from linearize.convert import ATTENTION_PRESETS, FEATURE_MAPS, SUPPORTED_ARCHITECTURES, convert
from linearize.export import export
from linearize.hf import LinearizedCache, register_auto_classes
from linearize.models import load, resolve

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "ATTENTION_PRESETS",
    "FEATURE_MAPS",
    "SUPPORTED_ARCHITECTURES",
    "LinearizedCache",
    "convert",
    "export",
    "load",
    "resolve",
    "__version__",
]
