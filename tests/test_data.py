"""Data sources and blocks: local datasets (save_to_disk folders, parquet), streaming that stops at
max_documents, clear errors for bad sources, and packed blocks built once and cached per run."""

from __future__ import annotations

import datasets
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

import linearize.data
from linearize.data import blocks_path, build_blocks, source_documents
from linearize.errors import UserError
from linearize.recipe import DataSection, DataSource, RecipeError, validate_recipe
from test_recipe import tiny_recipe

ROWS = {"text": [f"the capital of France is {i}" for i in range(30)], "id": list(range(30))}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_folder):
    return AutoTokenizer.from_pretrained(tiny_model_folder)


def documents(tokenizer, **source) -> list[str]:
    return list(source_documents(DataSource(**source), tokenizer, "data.sources.0"))


def test_local_datasets_read_like_the_hub(tmp_path, tokenizer):
    datasets.Dataset.from_dict(ROWS).save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS), "test": datasets.Dataset.from_dict(
        {"text": ["held out"], "id": [0]})}).save_to_disk(tmp_path / "splits")
    (tmp_path / "shards").mkdir()
    datasets.Dataset.from_dict(ROWS).to_parquet(tmp_path / "shards" / "part-0.parquet")
    expected = ROWS["text"][:7]
    assert documents(tokenizer, type="disk", path=str(tmp_path / "saved"), max_documents=7) == expected
    assert documents(tokenizer, type="disk", path=str(tmp_path / "splits"), split="test") == ["held out"]
    for path in ("shards", "shards/part-0.parquet", "shards/*.parquet"):
        assert documents(tokenizer, type="parquet", path=str(tmp_path / path), max_documents=7) == expected
    # An hf source streams whatever load_dataset reads; a local folder stands in for the hub here.
    assert documents(tokenizer, type="hf", name=str(tmp_path / "shards"), max_documents=7) == expected


def test_streamed_sources_stop_reading_at_max_documents(tmp_path, tokenizer):
    (tmp_path / "shards").mkdir()
    datasets.Dataset.from_dict(ROWS).to_parquet(tmp_path / "shards" / "part-0.parquet")
    (tmp_path / "shards" / "part-1.parquet").write_bytes(b"never read")
    source = {"type": "parquet", "path": str(tmp_path / "shards")}
    assert len(documents(tokenizer, **source, max_documents=30)) == 30
    with pytest.raises(UserError, match=r"data.sources.0: could not read the parquet dataset .* Fix: check the files"):
        documents(tokenizer, **source)


def test_chat_rows_and_missing_fields(tmp_path, tokenizer):
    rows = {"instruction": ["Name the capital of France."], "output": ["Paris."]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "chat.parquet")
    source = {"type": "parquet", "path": str(tmp_path / "chat.parquet")}
    # The tiny tokenizer has no chat template: instruction and response on two lines.
    assert documents(tokenizer, **source, instruction_field="instruction", response_field="output") == [
        "Name the capital of France.\nParis."
    ]
    with pytest.raises(UserError, match=r"data.sources.0 row 1 has no field 'text' "
                                        r"\(it has \['instruction', 'output'\]\)\. Fix: set data.sources.0.text_field"):
        documents(tokenizer, **source)


def test_missing_split_of_a_saved_dataset_dict(tmp_path, tokenizer):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS)}).save_to_disk(tmp_path / "splits")
    with pytest.raises(UserError, match=r"data.sources.0.split: .* has no split 'validation'\. Fix: use one of"):
        documents(tokenizer, type="disk", path=str(tmp_path / "splits"), split="validation")


@pytest.mark.parametrize(
    "source,message",
    [
        ({"type": "disk"}, "a disk source needs 'path'"),
        ({"type": "disk", "path": "PARQUET"}, "is not a folder written by save_to_disk (no state.json or"),
        ({"type": "parquet", "path": "/no/such/*.parquet"}, "no .parquet files at '/no/such/*.parquet'; fix: name a"),
        ({"type": "hf", "name": "HuggingFaceFW/fineweb-edu", "split": "train[:1000]"},
         "fix: give the plain split name and set max_documents"),
    ],
    ids=["disk-without-path", "disk-not-saved", "parquet-no-files", "hf-split-slice"],
)
def test_bad_dataset_sources_fail_before_any_work(tmp_path, tiny_model_folder, source, message):
    datasets.Dataset.from_dict(ROWS).to_parquet(tmp_path / "rows.parquet")
    source = {k: str(tmp_path / "rows.parquet") if v == "PARQUET" else v for k, v in source.items()}
    recipe = tiny_recipe(tiny_model_folder, tmp_path / "run")
    recipe["data"]["sources"] = [source]
    with pytest.raises(RecipeError, match="recipe field 'data.sources.0'") as error:
        validate_recipe(recipe)
    assert message in str(error.value)


def test_blocks_are_built_once_and_read_back(tmp_path, tokenizer, monkeypatch):
    datasets.Dataset.from_dict(ROWS).save_to_disk(tmp_path / "saved")
    section = DataSection(sources=[{"type": "disk", "path": str(tmp_path / "saved")},
                                   {"type": "corpus", "name": "c4_demo", "max_documents": 3}],
                          block_length=16, validation_blocks=2)
    accelerator = Accelerator(cpu=True)
    first = build_blocks(section, tokenizer, 0, tmp_path / "data", accelerator)
    assert first.train.dtype == torch.long and first.train.shape[1] == 16 and len(first.validation) == 2

    packed = []
    monkeypatch.setattr(linearize.data, "pack", lambda *args: packed.append(args))
    again = build_blocks(section, tokenizer, 0, tmp_path / "data", accelerator)
    assert not packed, "cached blocks must not be tokenized again"
    assert torch.equal(again.train, first.train) and torch.equal(again.validation, first.validation)

    other_seed, longer = blocks_path(section, tokenizer, 1, tmp_path), blocks_path(
        section.model_copy(update={"block_length": 32}), tokenizer, 0, tmp_path)
    assert len({blocks_path(section, tokenizer, 0, tmp_path), other_seed, longer}) == 3, "the key misses a setting"


def test_too_little_data_names_the_fields(tmp_path, tokenizer):
    section = DataSection(sources=[{"type": "corpus", "name": "c4_demo", "max_documents": 1}], block_length=512,
                          validation_blocks=8)
    with pytest.raises(UserError, match=r"data.validation_blocks=8 needs at least 9\. Fix: add data"):
        build_blocks(section, tokenizer, 0, tmp_path, Accelerator(cpu=True))
    assert not list(tmp_path.iterdir()), "no cache file for failed data"
