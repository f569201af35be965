"""Two CPU processes (gloo): the blocks are tokenized once and shared, interrupted runs resume to
the uninterrupted weights under DDP and FSDP2, and a whole recipe under the shipped FSDP config
equals a one-process run.

accelerate switches FSDP off on CPU (see distributed_worker.py), so the FSDP cases run torch's
FSDP2 through accelerate with that switch turned back on by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from test_recipe import tiny_recipe

from linearize.corpora import corpus_documents
from linearize.errors import UserError
from linearize.training import check_accelerator

WORKER = Path(__file__).parent / "distributed_worker.py"
FSDP_CONFIG = Path(__file__).parent.parent / "recipes" / "accelerate" / "fsdp.yaml"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def two_processes(*arguments: str, port: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(WORKER), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]


def local_dataset_recipe(folder: Path, model_folder: Path) -> Path:
    """A tiny recipe whose data are a parquet file and a save_to_disk folder."""
    documents = corpus_documents("c4_demo")[:40]
    datasets.Dataset.from_dict({"text": documents[:20]}).to_parquet(folder / "part-0.parquet")
    datasets.Dataset.from_dict({"text": documents[20:]}).save_to_disk(folder / "saved")
    recipe = tiny_recipe(model_folder, folder / "run")
    recipe["data"]["sources"] = [{"type": "parquet", "path": str(folder / "part-0.parquet")},
                                 {"type": "disk", "path": str(folder / "saved"), "max_documents": 10}]
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    "fsdp_version,ram_efficient,message",
    [(1, False, "Fix: set fsdp_version: 2"), (2, True, "Fix: set fsdp_cpu_ram_efficient_loading: false")],
    ids=["fsdp1", "cpu-ram-efficient-loading"],
)
def test_unsupported_fsdp_settings_fail_early(fsdp_version, ram_efficient, message):
    plugin = SimpleNamespace(fsdp_version=fsdp_version, cpu_ram_efficient_loading=ram_efficient)
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=fsdp_version == 2,
                                  state=SimpleNamespace(fsdp_plugin=plugin))
    with pytest.raises(UserError, match=message):
        check_accelerator(accelerator)


def test_two_processes_tokenize_once_and_read_the_same_blocks(tmp_path, tiny_model_folder):
    recipe = local_dataset_recipe(tmp_path, tiny_model_folder)
    for run in ("first", "rerun"):
        (tmp_path / run).mkdir()
        two_processes("blocks", str(recipe), str(tmp_path / run), port=29531)
        ranks = [json.loads((tmp_path / run / f"rank{i}.json").read_text()) for i in range(2)]
        assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["train"] > 0, "ranks read different blocks"
        assert [rank["tokenized"] for rank in ranks] == ([1, 0] if run == "first" else [0, 0])
        cached = list((tmp_path / "run" / "data").iterdir())
        assert len(cached) == 1, cached
        if run == "first":
            stamp = cached[0].stat().st_mtime_ns
    assert cached[0].stat().st_mtime_ns == stamp, "the rerun rewrote the cache"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_interrupted_runs_resume_to_the_uninterrupted_weights(tmp_path, mode):
    """Ctrl-C mid-stage (attention transfer; LoRA with dropout, mid gradient accumulation), then a
    rerun: the trainable weights of both stages equal an uninterrupted run's, bit for bit."""
    two_processes("resume", mode, str(tmp_path), port=29532)
    for stage in ("transfer", "finetune"):
        runs = torch.load(tmp_path / f"{stage}.pt")
        assert runs["reference"].keys() == runs["resumed"].keys() and len(runs["reference"]) == 39
        for name, expected in runs["reference"].items():
            assert torch.equal(runs["resumed"][name], expected), f"{mode}: interrupting {stage} changed {name}"


def test_recipe_under_the_fsdp_config_equals_one_process(tmp_path, tiny_model_folder):
    recipe = local_dataset_recipe(tmp_path, tiny_model_folder)
    command = [sys.executable, "-m", "linearize", "run", str(recipe), f"run.output_dir={tmp_path / 'single'}"]
    single = subprocess.run(command, capture_output=True, text=True, timeout=600, env=OFFLINE)
    assert single.returncode == 0, single.stderr[-3000:]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", "2", "--main_process_port", "29533", str(WORKER), "run", str(recipe)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert (info["processes"], info["distributed"]) == (2, "FSDP")
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file(), "the export needs a whole model"
    for stage in ("attention_transfer", "finetune"):
        expected, sharded = (load_file(tmp_path / run / stage / "weights.safetensors") for run in ("single", "run"))
        assert expected.keys() == sharded.keys()
        for name in expected:
            assert torch.allclose(sharded[name], expected[name], rtol=1e-4, atol=1e-6), f"{stage}: {name}"


def test_gathered_trainable_state_of_a_tied_model_names_only_trainable_weights():
    """Tied embeddings put the frozen shared weight in the state dict twice; a checkpoint must hold
    the trainable weights only, or reloading it refuses the file (SmolLM2 and Llama-3.2 are tied)."""
    from model_testing import converted
    from linearize.training import gather_trainable_state, trainable_state

    model = converted("llama", "window_hedgehog")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("feature_map" in name)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    gathered = gather_trainable_state(model)
    assert set(gathered) == set(trainable_state(model)) and gathered
