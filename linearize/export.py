"""Write a linearized model as a self-contained Hugging Face folder, atomically.

``model.save_pretrained`` alone already writes config.json (own ``model_type`` and ``auto_map``),
safetensors weights and the modeling code that ``trust_remote_code`` loads. ``export`` adds the
tokenizer, a model card and metrics, and writes to a temporary sibling folder renamed into place,
so an interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from linearize.errors import UserError
from linearize.hf.modeling_linearized import LinearizedCausalLMMixin


class ExportError(UserError):
    """The export cannot be written; the message says why and what to do."""


def model_card(model: PreTrainedModel, metrics: dict | None = None) -> str:
    options = model.linear_attention_options
    lines = [
        "---",
        "library_name: transformers",
        "tags: [linearize, linear-attention]",
        "---",
        f"# {options.attention} linearization of a {type(model).__name__.removeprefix('Linearized')}",
        "",
        "Converted with `linearize`. Load it with",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
        "```",
        "",
        "## Linear attention",
        "",
        "| option | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in options.to_dict().items()),
    ]
    if metrics:
        lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2), "```"]
    return "\n".join(lines) + "\n"


def export(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    metrics: dict | None = None,
) -> Path:
    """Save ``model`` (and ``tokenizer``) to ``out_dir``; returns the folder.

    ``extra_files`` maps file names to text written next to the weights (e.g. the resolved
    recipe); ``metrics`` goes to metrics.json and the model card.
    """
    if not isinstance(model, LinearizedCausalLMMixin):
        raise ExportError(f"{type(model).__name__} is not a linearized model; run linearize.convert(model) first")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists. Fix: choose another --out, or pass overwrite=True / --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)  # the linearized classes write auto_map and their modeling files
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = {"README.md": model_card(model, metrics), **(extra_files or {})}
        if metrics is not None:
            files["metrics.json"] = json.dumps(metrics, indent=2) + "\n"
        for name, text in files.items():
            (staging / name).write_text(text)
        if out_dir.exists():
            previous = out_dir.with_name(f".{out_dir.name}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            out_dir.rename(previous)
            staging.rename(out_dir)
            shutil.rmtree(previous)
        else:
            staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
