"""Recipes: malformed ones fail before any work with one line naming field, value and fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from linearize.cli import main
from linearize.convert import attention_options
from linearize.recipe import RecipeError, apply_override, dump_recipe, load_recipe, validate_recipe

RECIPES = Path(__file__).parent.parent / "recipes"


def tiny_recipe(model_folder, output_dir) -> dict:
    return {
        "model": {"ref": str(model_folder)},
        "attention": {"name": "window_hedgehog", "window": 8, "sink_tokens": 2},
        "data": {"sources": [{"type": "corpus", "name": "c4_demo", "max_documents": 20}], "block_length": 64,
                 "validation_blocks": 2},
        "attention_transfer": {"steps": 4, "batch_size": 2, "validate_every": 2, "checkpoint_every": 2},
        "finetune": {"steps": 4, "batch_size": 2, "validate_every": 2, "checkpoint_every": 2},
        "eval": {"perplexity_chunks": 0, "max_new_tokens": 2},
        "run": {"output_dir": str(output_dir), "log_every": 1},
    }


DELETE = object()


def with_change(recipe: dict, path: str, value) -> dict:
    """A copy of ``recipe`` with the dotted ``path`` set to ``value`` (or removed, for DELETE)."""
    changed = copy.deepcopy(recipe)
    node = changed
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return changed

MALFORMED = [
    ("modle", {}, "recipe field 'modle': unknown field"),
    ("attention_transfer.stpes", 3, "recipe field 'attention_transfer.stpes': unknown field (got 3); fix: remove it"),
    ("run", DELETE, "recipe field 'run': Field required; fix: add it"),
    ("model.ref", DELETE, "recipe field 'model.ref': Field required"),
    ("attention_transfer.steps", -1, "'attention_transfer.steps': Input should be greater than or equal to 0 (got -1)"),
    ("finetune.lr", "fast", "'finetune.lr': Input should be a valid number"),
    ("finetune.lr", 0, "'finetune.lr': Input should be greater than 0 (got 0)"),
    ("attention.name", "softmax", "unknown attention 'softmax'; choose one of"),
    ("attention.init_gamma", 2, "'init_gamma' must be a number strictly between 0 and 1"),
    ("attention.window", "wide", "'attention.window': Input should be a valid integer"),
    ("data.sources", [], "'data.sources': List should have at least 1 item"),
    ("data.sources", [{"type": "text", "path": "/no/such/file.txt"}], "file '/no/such/file.txt' does not exist"),
    ("data.sources", [{"type": "corpus", "name": "pile"}], "unknown corpus 'pile'"),
    ("data.sources", [{"type": "jsonl"}], "a jsonl source needs 'path'"),
    ("data.sources", [{"type": "s3", "name": "x"}], "'data.sources.0.type': Input should be"),
    ("data.block_length", 4, "'data.block_length': Input should be greater than or equal to 8 (got 4)"),
    ("run.precision", "fp8", "'run.precision': Input should be 'fp32', 'bf16' or 'fp16' (got 'fp8')"),
    ("model.dtype", "bfloat16", "'model.dtype' is now set by run.precision"),
    ("attention.jrt_prefix_length", 128, "fix: use attention_transfer.jrt_prefix_length and finetune.jrt_prefix_length"),
    ("attention_transfer.jrt_prefix_length", 16, "attention_transfer.jrt_prefix_length needs a JRT model"),
    ("attention.feature_map", "relu", "'attention.feature_map': Input should be 'hedgehog' or 'based'"),
    ("attention.eps", 0, "'attention.eps': Input should be greater than 0"),
    ("attention_transfer.loss", {"xent": 0, "mse": 0}, "at least one of xent and mse must be > 0"),
    ("finetune.lora.dropout", 1.5, "'finetune.lora.dropout': Input should be less than 1 (got 1.5)"),
    ("attention_transfer.warmup_steps", 99, "warmup_steps (99) cannot exceed steps (4)"),
    ("attention.fixed_gamma", 0, "attention transfer has nothing to fit; fix: set attention_transfer.enabled: false"),
    ("attention.fixed_gamma", 1.5, "linear attention option 'fixed_gamma' must be null or a number in [0, 1]"),
    ("attention.global_cache", -1, "'attention.global_cache': Input should be greater than or equal to 0"),
]


@pytest.mark.parametrize("path,value,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_is_one_line_error_with_exit_2(tmp_path, capsys, tiny_model_folder, path, value, message):
    recipe = with_change(tiny_recipe(tiny_model_folder, tmp_path / "run"), path, value)
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(file)]) == 2
    error = capsys.readouterr().err
    assert message in error, error
    assert error.count("\n") == 1 and error.startswith("error: recipe"), "one line"
    assert "Traceback" not in error
    assert not (tmp_path / "run").exists(), "no work may start"


def test_jrt_prefix_must_leave_tokens_to_score(tmp_path, tiny_model_folder):
    recipe = tiny_recipe(tiny_model_folder, tmp_path)
    recipe["attention"] = {"name": "jrt"}
    recipe["finetune"]["jrt_prefix_length"] = 64
    with pytest.raises(RecipeError, match=r"finetune.jrt_prefix_length \(64\) must be shorter than data.block_length"):
        validate_recipe(recipe)
    recipe["finetune"]["jrt_prefix_length"] = 16
    assert validate_recipe(recipe).finetune.jrt_prefix_length == 16


def test_every_conversion_option_can_be_set_from_a_recipe(tmp_path, tiny_model_folder):
    recipe = tiny_recipe(tiny_model_folder, tmp_path)
    recipe["attention"].update(feature_map="based", feature_dim=4, jrt=True, eps=1e-3, chunk_size=16, init_gamma=0.2)
    options = attention_options(recipe["attention"]["name"], **validate_recipe(recipe).attention.options())
    assert (options.feature_map, options.feature_dim, options.jrt, options.eps, options.chunk_size) == ("based", 4, True, 1e-3, 16)
    recipe["attention"].update(global_cache=8, global_cache_block=4, fixed_gamma=0.25)
    options = attention_options(recipe["attention"]["name"], **validate_recipe(recipe).attention.options())
    assert (options.global_cache, options.global_cache_block, options.fixed_gamma) == (8, 4, 0.25)


def test_impossible_combination_is_rejected(tmp_path, tiny_model_folder):
    recipe = tiny_recipe(tiny_model_folder, tmp_path)
    recipe["attention"]["auto_softmax_layers"] = 2
    recipe["attention_transfer"]["enabled"] = False
    with pytest.raises(RecipeError, match="auto_softmax_layers ranks layers by transfer loss"):
        validate_recipe(recipe)


@pytest.mark.parametrize(
    "text,message",
    [("model: [unclosed", "is not valid YAML"), ("- a\n- b\n", "must be a YAML mapping")],
    ids=["bad-yaml", "not-a-mapping"],
)
def test_unreadable_recipe_files(tmp_path, text, message):
    file = tmp_path / "recipe.yaml"
    file.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(file)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_set_nested_values_parsed_as_yaml(tmp_path, tiny_model_folder):
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(tiny_recipe(tiny_model_folder, tmp_path)))
    recipe = load_recipe(file, ["finetune.lr=3e-4", "attention.softmax_layers=[0,2]", "finetune.lora.rank=4",
                                "export.dir=null", "eval.prompt=Hello there"])
    assert recipe.finetune.lr == 3e-4
    assert recipe.attention.softmax_layers == [0, 2]
    assert recipe.finetune.lora.rank == 4
    assert recipe.eval.prompt == "Hello there"


@pytest.mark.parametrize(
    "override,message",
    [("finetune.lr", "not of the form"), ("=3", "not of the form"), ("model.ref.x=1", "model.ref is not a section"),
     ("finetune.lr=[", "not valid YAML"), ("finetune.lrr=1", "'finetune.lrr': unknown field")],
)
def test_bad_overrides(tmp_path, tiny_model_folder, override, message):
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(tiny_recipe(tiny_model_folder, tmp_path)))
    with pytest.raises(RecipeError, match=message):
        load_recipe(file, [override])


def test_resolved_recipe_round_trips(tmp_path, tiny_model_folder):
    recipe = validate_recipe(tiny_recipe(tiny_model_folder, tmp_path))
    assert validate_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_apply_override_creates_missing_sections():
    data = {}
    apply_override(data, "finetune.distill.weight=0.5")
    assert data == {"finetune": {"distill": {"weight": 0.5}}}


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    load_recipe(path)
