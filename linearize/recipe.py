"""Recipes: one YAML file describes a whole run; pydantic validates it before any work starts.

    recipe = load_recipe("recipes/quickstart.yaml", ["attention_transfer.steps=100"])

Overrides are ``dotted.key=value`` with the value parsed as YAML (``lr=1e-3``, ``layers=[0,5]``,
``dir=null``). Every mistake — unknown key, wrong type, bad value, missing file, impossible
combination — raises one :class:`RecipeError` naming the field, the value and the fix.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from linearize.convert.presets import ATTENTION_PRESETS, attention_options
from linearize.corpora import CORPORA
from linearize.errors import UserError
from linearize.eval.sampling_tasks import TASKS as SAMPLING_TASKS

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class RecipeError(UserError):
    """A recipe that cannot run; the message names the field, the value and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """The teacher: ``ref`` is a shorthand (smollm2-135m), a .gguf file, a folder or a hub id.

    Its weights are loaded in the dtype of ``run.precision`` (the one precision knob)."""

    ref: str

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dtype" in data:
            raise ValueError("'model.dtype' is now set by run.precision (fp32, bf16 or fp16); fix: remove model.dtype")
        return data


class AttentionSection(Section):
    """The attention variant (a preset name) and overrides of its options; every field of
    ``LinearAttentionOptions`` can be set (null keeps the preset's value)."""

    name: str
    feature_map: Literal["hedgehog", "based"] | None = None
    feature_dim: PositiveInt | None = None
    window: NonNegativeInt | None = None
    sink_tokens: NonNegativeInt | None = None
    init_gamma: float | None = None
    jrt: bool | None = None
    chunk_size: PositiveInt | None = None
    eps: PositiveFloat | None = None
    # A LoLA-style global cache (training-free; attention transfer fits the maps on the window alone).
    global_cache: NonNegativeInt | None = None
    global_cache_block: PositiveInt | None = None
    fixed_gamma: float | None = None  # a fixed linear share instead of the learned mix factor
    softmax_layers: list[NonNegativeInt] = []
    # After attention transfer, also keep as softmax the k layers with the highest transfer loss.
    auto_softmax_layers: NonNegativeInt = 0

    def options(self) -> dict:
        """Keyword options for ``linearize.convert`` (without the variant name)."""
        return self.model_dump(exclude={"name", "auto_softmax_layers"}, exclude_none=True)

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "jrt_prefix_length" in data:
            raise ValueError(
                "'attention.jrt_prefix_length' would make every scoring call read tokens non-causally; a JRT "
                "training prefix is set per stage; fix: use attention_transfer.jrt_prefix_length and "
                "finetune.jrt_prefix_length"
            )
        return data

    @property
    def uses_jrt(self) -> bool:
        return attention_options(self.name, **self.options()).jrt

    @model_validator(mode="after")
    def _check(self) -> AttentionSection:
        if self.name not in ATTENTION_PRESETS:
            raise ValueError(f"unknown attention {self.name!r}; choose one of {sorted(ATTENTION_PRESETS)}")
        attention_options(self.name, **self.options())  # raises with the field's name
        return self


class DataSource(Section):
    """One training text source.

    ``type``: ``corpus`` (a shipped corpus by ``name``), ``text`` (a plain-text file at ``path``),
    ``jsonl`` (one JSON object per line at ``path``), or a table of rows read with ``datasets``:
    ``hf`` (a Hugging Face dataset ``name``/``config``/``split``, streamed from the hub), ``disk`` (a
    folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, then ``split`` picks
    one) or ``parquet`` (a .parquet file, a folder of them, or a glob, at ``path``). In records and
    rows ``text_field`` holds the text, or ``instruction_field``/``response_field`` hold a chat turn
    rendered with the chat template. ``max_documents`` keeps the first N documents; streamed
    sources read no further.
    """

    type: Literal["corpus", "text", "jsonl", "hf", "disk", "parquet"]
    name: str | None = None
    config: str | None = None  # hf: the dataset's configuration, e.g. "sample-10BT"
    path: str | None = None
    split: str = "train"
    text_field: str = "text"
    instruction_field: str | None = None
    response_field: str | None = None
    max_documents: PositiveInt | None = None

    def parquet_files(self) -> list[str]:
        """parquet: the files ``path`` names (one file, every .parquet file under a folder, or a glob)."""
        path = Path(self.path).expanduser()
        if path.is_dir():
            return sorted(str(file) for file in path.rglob("*.parquet"))
        return sorted(glob.glob(str(path), recursive=True))

    @model_validator(mode="after")
    def _check(self) -> DataSource:
        if self.type in ("text", "jsonl", "disk", "parquet") and not self.path:
            raise ValueError(f"a {self.type} source needs 'path'")
        if self.type in ("text", "jsonl") and not Path(self.path).expanduser().is_file():
            raise ValueError(f"file {self.path!r} does not exist; fix: check the path")
        if self.type == "disk" and not any((Path(self.path).expanduser() / marker).is_file()
                                           for marker in ("state.json", "dataset_dict.json")):
            raise ValueError(
                f"{self.path!r} is not a folder written by save_to_disk (no state.json or dataset_dict.json); "
                "fix: check the path, or use type parquet or jsonl for other files"
            )
        if self.type == "parquet" and not self.parquet_files():
            raise ValueError(f"no .parquet files at {self.path!r}; fix: name a .parquet file, a folder of them or a glob")
        if self.type == "corpus" and self.name not in CORPORA:
            raise ValueError(f"unknown corpus {self.name!r}; shipped corpora: {sorted(CORPORA)}")
        if self.type == "hf" and not self.name:
            raise ValueError("an hf source needs 'name' (a dataset id)")
        if self.type == "hf" and "[" in self.split:
            raise ValueError(
                f"an hf source is streamed, and a stream takes no split slice like {self.split!r}; "
                "fix: give the plain split name and set max_documents"
            )
        if (self.instruction_field is None) != (self.response_field is None):
            raise ValueError("instruction_field and response_field go together: set both or neither")
        return self


class DataSection(Section):
    """Texts are tokenized with the teacher's tokenizer and packed into blocks of ``block_length``."""

    sources: list[DataSource] = Field(min_length=1)
    block_length: Annotated[int, Field(ge=8)] = 512
    validation_blocks: PositiveInt = 8


class LossWeights(Section):
    """Attention-transfer loss: ``xent`` (Hedgehog: cross-entropy of attention weights) and ``mse``
    (LoLCATs: MSE of attention outputs)."""

    xent: NonNegativeFloat = 0.0
    mse: NonNegativeFloat = 1.0

    @model_validator(mode="after")
    def _check(self) -> LossWeights:
        if self.xent == 0 and self.mse == 0:
            raise ValueError("at least one of xent and mse must be > 0")
        return self


class TrainingSection(Section):
    """One training stage. ``jrt_prefix_length`` (JRT models only): the first M tokens of every block
    are the encoder's non-causal prefix; no loss falls on them or on the tokens they predict."""

    enabled: bool = True
    steps: NonNegativeInt = 100
    batch_size: PositiveInt = 1
    gradient_accumulation: PositiveInt = 1
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 0
    validate_every: PositiveInt = 50
    checkpoint_every: PositiveInt = 50
    jrt_prefix_length: NonNegativeInt = 0

    @model_validator(mode="after")
    def _check_warmup(self) -> TrainingSection:
        if self.enabled and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) cannot exceed steps ({self.steps})")
        return self


class AttentionTransferSection(TrainingSection):
    lr: PositiveFloat = 1e-2
    loss: LossWeights = LossWeights()


class LoraSection(Section):
    rank: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # None: the attention projections of the family (q, k, v, o).
    target_modules: list[str] | None = None


class DistillationSection(Section):
    """Optional KL divergence to the teacher's next-token distribution, added to the CE loss."""

    weight: NonNegativeFloat = 0.0
    temperature: PositiveFloat = 1.0


class FinetuneSection(TrainingSection):
    lr: PositiveFloat = 1e-3
    lora: LoraSection = LoraSection()
    distill: DistillationSection = DistillationSection()


class SamplingEvalSection(Section):
    """Repeated sampling of the exported student against the teacher (``linearize bench sampling``'s
    settings; results in ``<output_dir>/eval``). Off while ``tasks`` is empty."""

    tasks: list[str] = []
    samples: PositiveInt = 16
    limit: PositiveInt | None = 20
    temperature: PositiveFloat = 0.8
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_new_tokens: PositiveInt | None = None  # null: each task's own
    batch_size: PositiveInt = 16

    @model_validator(mode="after")
    def _check(self) -> SamplingEvalSection:
        unknown = sorted(set(self.tasks) - set(SAMPLING_TASKS))
        if unknown:
            raise ValueError(f"unknown sampling task(s) {unknown}; choose from {sorted(SAMPLING_TASKS)}")
        return self


class EvalSection(Section):
    perplexity_chunks: NonNegativeInt = 16
    prompt: str = "What is the capital of France?"
    max_new_tokens: PositiveInt = 24
    sampling: SamplingEvalSection = SamplingEvalSection()


class ExportSection(Section):
    enabled: bool = True
    dir: str | None = None  # default: <run.output_dir>/export


class RunSection(Section):
    output_dir: str
    seed: NonNegativeInt = 0
    # The one precision knob: frozen weights load in this dtype, new parameters (feature maps, mix
    # factors, JRT encoders, LoRA) keep fp32 masters, and the forward runs under autocast.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_every: PositiveInt = 10


class Recipe(Section):
    model: ModelSection
    attention: AttentionSection
    data: DataSection
    attention_transfer: AttentionTransferSection = AttentionTransferSection()
    finetune: FinetuneSection = FinetuneSection()
    eval: EvalSection = EvalSection()
    export: ExportSection = ExportSection()
    run: RunSection

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.attention.auto_softmax_layers and not self.attention_transfer.enabled:
            raise ValueError(
                "attention.auto_softmax_layers ranks layers by transfer loss, so attention_transfer.enabled must be true"
            )
        if self.attention.fixed_gamma == 0 and self.attention_transfer.enabled:
            raise ValueError(
                "attention.fixed_gamma: 0 takes the linear part out of every output, so attention transfer has "
                "nothing to fit; fix: set attention_transfer.enabled: false (the maps then only choose the cache)"
            )
        if self.finetune.enabled and self.finetune.distill.weight > 0 and self.finetune.steps == 0:
            raise ValueError("finetune.distill.weight > 0 needs finetune.steps > 0")
        for stage in ("attention_transfer", "finetune"):
            prefix = getattr(self, stage).jrt_prefix_length
            if prefix and not self.attention.uses_jrt:
                raise ValueError(f"{stage}.jrt_prefix_length needs a JRT model (attention.name: jrt, or attention.jrt: true)")
            if prefix >= self.data.block_length:
                raise ValueError(
                    f"{stage}.jrt_prefix_length ({prefix}) must be shorter than data.block_length "
                    f"({self.data.block_length}): no token after the prefix would carry a loss"
                )
        return self

    @property
    def export_dir(self) -> Path:
        return Path(self.export.dir) if self.export.dir else Path(self.run.output_dir) / "export"


# --------------------------------------------------------------------------------------------------
# Loading, overrides, error messages
# --------------------------------------------------------------------------------------------------

FIXES = {
    "extra_forbidden": "remove it or check its spelling",
    "missing": "add it",
    "int_type": "use a whole number",
    "int_parsing": "use a whole number",
    "int_from_float": "use a whole number",
    "float_type": "use a number",
    "float_parsing": "use a number",
    "bool_type": "use true or false",
    "bool_parsing": "use true or false",
    "string_type": "use a string",
    "list_type": "use a list like [0, 5]",
    "literal_error": "use one of the allowed values",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than": "use a smaller value",
    "too_short": "add at least one entry",
    "model_type": "use a mapping of keys to values",
    "dict_type": "use a mapping of keys to values",
}


def _format_error(error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "recipe"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    shown = "" if error["type"] in ("missing",) or isinstance(value, dict) else f" (got {value!r})"
    fix = FIXES.get(error["type"])
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    return f"recipe field '{field}': {message}{shown}" + (f"; fix: {fix}" if fix else "")


def validate_recipe(data: Any) -> Recipe:
    """Validate a parsed recipe mapping; raises RecipeError listing every problem on one line."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError("; ".join(_format_error(e) for e in error.errors())) from None


def apply_override(data: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override to the parsed recipe ``data`` in place."""
    key, separator, text = override.partition("=")
    if not separator or not key.strip():
        raise RecipeError(f"override {override!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"override {override!r}: the value is not valid YAML ({error})") from None
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate the recipe at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist. Fix: check the path (ready recipes are in recipes/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {error}".replace("\n", " ")) from None
    data = data if data is not None else {}
    for override in overrides:
        if not isinstance(data, dict):
            break
        apply_override(data, override)
    return validate_recipe(data)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
