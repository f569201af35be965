"""The pipeline on a tiny model: transfer lowers the loss, runs resume after a kill to the same
weights, merged exports reload exactly, and two processes compute what one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from model_testing import VOCAB, converted, reload_in_fresh_process
from safetensors.torch import load_file
from test_recipe import tiny_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.attention_transfer import layer_losses, run_attention_transfer
from linearize.corpora import read_corpus
from linearize.eval import chunk_tokens, perplexity
from linearize.finetune import add_lora, finetune_loss, merge_lora
from linearize.recipe import FinetuneSection
from linearize.recipe import AttentionTransferSection, LoraSection


def write_recipe(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def linearize_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "linearize", *args]


def run_to_end(recipe_path: Path) -> None:
    result = subprocess.run(linearize_command("run", str(recipe_path)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def run_and_kill_after(recipe_path: Path, checkpoint: Path, done: Path) -> None:
    """Start a run and SIGKILL it as soon as ``checkpoint`` exists (before ``done`` does)."""
    process = subprocess.Popen(linearize_command("run", str(recipe_path)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert checkpoint.exists() and not done.exists(), "the run was not interrupted mid-stage"


def test_ctrl_c_checkpoints_and_the_rerun_finishes(tmp_path, tiny_model_folder):
    recipe = tiny_recipe(tiny_model_folder, tmp_path / "run")
    recipe["attention_transfer"].update(steps=100_000, checkpoint_every=100_000, validate_every=100_000)
    recipe["export"] = {"enabled": False}
    path = write_recipe(tmp_path, recipe)
    # Background jobs (as CI may run us) inherit SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the run the default disposition a terminal would.
    process = subprocess.Popen(linearize_command("run", str(path)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = tmp_path / "run" / "attention_transfer" / "log.jsonl"
    deadline = time.monotonic() + 300
    while (not log.exists() or log.read_text().count("\n") < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    state = torch.load(tmp_path / "run" / "attention_transfer" / "checkpoint" / "state.pt", weights_only=False)
    assert 0 < state["step"] < 100_000, "Ctrl-C must checkpoint the steps done so far"
    recipe["attention_transfer"]["steps"] = state["step"] + 2  # finish quickly from the checkpoint
    run_to_end(write_recipe(tmp_path, recipe))
    assert (tmp_path / "run" / "attention_transfer" / "done.json").is_file()


def stage_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for stage in ("attention_transfer", "finetune"):
        weights.update({f"{stage}/{k}": v for k, v in load_file(run_dir / stage / "weights.safetensors").items()})
    return weights


def test_attention_transfer_lowers_the_transfer_loss(tmp_path):
    model = converted("llama", "window_hedgehog")
    torch.manual_seed(0)
    blocks = torch.randint(3, VOCAB, (12, 32))
    section = AttentionTransferSection(steps=30, batch_size=2, lr=0.05, validate_every=10, checkpoint_every=100,
                                       loss={"xent": 0.0, "mse": 1.0})
    before = layer_losses(model, blocks[:2], section)
    result = run_attention_transfer(Accelerator(cpu=True), model, blocks[2:], blocks[:2], section, tmp_path,
                                    seed=0, log_every=5)
    after = layer_losses(model, blocks[:2], section)
    assert result.first["loss"] == pytest.approx(before["loss"])
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    assert all(after[f"layer_{i}"] < before[f"layer_{i}"] for i in range(3)), "every layer improves"


def test_killed_runs_resume_to_the_same_weights(tmp_path, tiny_model_folder):
    recipe = tiny_recipe(tiny_model_folder, tmp_path / "reference")
    recipe["attention_transfer"].update(steps=24, checkpoint_every=3, validate_every=6)
    recipe["finetune"].update(steps=24, checkpoint_every=3, validate_every=6)
    recipe["export"] = {"enabled": False}
    run_to_end(write_recipe(tmp_path, recipe))

    for stage in ("attention_transfer", "finetune"):
        folder = tmp_path / f"killed-in-{stage}"
        folder.mkdir()
        recipe["run"]["output_dir"] = str(folder / "run")
        path = write_recipe(folder, recipe)
        run_and_kill_after(path, folder / "run" / stage / "checkpoint" / "state.pt", folder / "run" / stage / "done.json")
        run_to_end(path)
        expected, resumed = stage_weights(tmp_path / "reference"), stage_weights(folder / "run")
        assert expected.keys() == resumed.keys()
        for name in expected:
            assert torch.allclose(expected[name], resumed[name], atol=1e-6), f"{stage} resume changed {name}"


def test_finished_run_is_skipped_and_export_reloads_exactly(tmp_path, tiny_model_folder):
    recipe = tiny_recipe(tiny_model_folder, tmp_path / "run")
    recipe["finetune"]["distill"] = {"weight": 0.5, "temperature": 2.0}
    recipe["eval"]["perplexity_chunks"] = 2
    recipe["eval"]["sampling"] = {"tasks": ["arithmetic"], "samples": 2, "limit": 2, "max_new_tokens": 2,
                                  "batch_size": 2}
    path = write_recipe(tmp_path, recipe)
    run_to_end(path)
    export = tmp_path / "run" / "export"
    stamp = (export / "model.safetensors").stat().st_mtime_ns
    samples = tmp_path / "run" / "eval" / "sampling_samples.jsonl"
    sampled = samples.read_text()
    rerun = subprocess.run(linearize_command("run", str(path)), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "attention transfer:" not in rerun.stderr, "finished stages must be skipped"
    assert (export / "model.safetensors").stat().st_mtime_ns == stamp
    assert samples.read_text() == sampled, "kept samples must not be drawn again"
    sampling = json.loads((tmp_path / "run" / "eval" / "sampling.json").read_text())
    assert sampling["settings"]["temperature"] == 0.8 and sampling["tasks"]["arithmetic"]["student"]["problems"] == 2

    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "linearized_llama" and "recipe.resolved.yaml" in os.listdir(export)
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    assert not any("lora" in name for name, _ in model.named_parameters()), "LoRA must be merged"
    # The merged export equals the run's finetuned model: it re-scores its own perplexity.
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert json.loads((export / "metrics.json").read_text()) == metrics
    tokenizer = AutoTokenizer.from_pretrained(export)
    chunks = chunk_tokens(tokenizer, read_corpus("wikitext2"), 512, recipe["eval"]["perplexity_chunks"])
    assert perplexity(model, chunks, progress=False) == pytest.approx(metrics["finetuned_perplexity"], rel=1e-5)


def test_two_processes_compute_the_same_losses(tmp_path, tiny_model_folder):
    single = tiny_recipe(tiny_model_folder, tmp_path / "single")
    single["export"] = {"enabled": False}
    run_to_end(write_recipe(tmp_path, single))

    double = dict(single, run={**single["run"], "output_dir": str(tmp_path / "double")})
    (tmp_path / "ddp").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "linearize", "run", str(write_recipe(tmp_path / "ddp", double))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "double" / "run_info.json").read_text())["processes"] == 2

    for stage in ("attention_transfer", "finetune"):
        logs = {}
        for name in ("single", "double"):
            lines = (tmp_path / name / stage / "log.jsonl").read_text().splitlines()
            logs[name] = [json.loads(line)["loss"] for line in lines if '"loss"' in line and "validation" not in line]
        assert len(logs["single"]) == single[stage]["steps"]
        # The first step sees identical weights; later steps differ only by the order of the
        # gradient all-reduce, which Adam's normalisation can amplify a little.
        assert logs["double"][0] == pytest.approx(logs["single"][0], rel=1e-5), stage
        assert logs["double"] == pytest.approx(logs["single"], rel=1e-2), stage


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_merge_then_export_reloads_identical_logits(tmp_path, family):
    model = converted(family, "window_hedgehog")
    adapted = add_lora(model, LoraSection(rank=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():  # adapters start as a no-op (B = 0): give them something to merge
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    ids = torch.randint(3, VOCAB, (2, 21))
    with torch.no_grad():
        adapted_logits = adapted(ids).logits
        merged = merge_lora(adapted)
        merged_logits = merged(ids).logits
    assert not torch.allclose(adapted_logits, converted(family, "window_hedgehog")(ids).logits, atol=1e-3)
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-5), "merging changed the model"
    folder = linearize.export(merged, None, tmp_path / "merged")
    torch.save(ids, tmp_path / "ids.pt")
    reload_in_fresh_process([(folder, tmp_path / "ids.pt", tmp_path / "logits.pt")])
    assert (torch.load(tmp_path / "logits.pt") - merged_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("distill", [0.0, 0.5], ids=["ce", "ce+kd"])
def test_jrt_finetune_puts_no_loss_on_logits_that_read_their_target(distill):
    """With a JRT prefix of M tokens, logits at positions < M - 1 saw their targets: no gradient."""
    model = add_lora(converted("llama", "jrt"), LoraSection(rank=2, alpha=4))
    section = FinetuneSection(jrt_prefix_length=6, distill={"weight": distill})
    logits = {}
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: logits.setdefault("value", output) if torch.is_grad_enabled() else None
    )
    torch.manual_seed(8)
    loss, _ = finetune_loss(model, model, torch.randint(3, VOCAB, (2, 16)), section)
    handle.remove()
    logits["value"].retain_grad()
    loss.backward()
    per_position = logits["value"].grad.abs().sum(dim=(0, 2))
    assert torch.all(per_position[:5] == 0), per_position
    assert torch.all(per_position[5:15] > 0), per_position


def test_bf16_run_trains_fp32_masters_without_nan(tmp_path, tiny_model_folder):
    """run.precision=bf16: frozen weights in bf16, new parameters fp32 masters that do move at a
    small learning rate, every logged loss finite (JRT prefix, xent + mse, LoRA + KD)."""
    recipe = tiny_recipe(tiny_model_folder, tmp_path / "run")
    recipe["attention"] = {"name": "jrt", "window": 8, "sink_tokens": 2}
    recipe["attention_transfer"].update(lr=1e-4, jrt_prefix_length=16, loss={"xent": 1.0, "mse": 1.0})
    recipe["finetune"].update(lr=1e-4, jrt_prefix_length=16, distill={"weight": 0.5})
    recipe["run"]["precision"] = "bf16"
    recipe["export"] = {"enabled": False}
    run_to_end(write_recipe(tmp_path, recipe))
    for stage in ("attention_transfer", "finetune"):
        for line in (tmp_path / "run" / stage / "log.jsonl").read_text().splitlines():
            numbers = [v for v in json.loads(line).get("validation", json.loads(line)).values() if isinstance(v, float)]
            assert numbers and all(torch.isfinite(torch.tensor(numbers))), f"{stage}: {line}"
    weights = load_file(tmp_path / "run" / "attention_transfer" / "weights.safetensors")
    assert weights and all(t.dtype == torch.float32 for t in weights.values()), "new parameters must stay fp32"
    initial = converted_from_folder(tiny_model_folder, "jrt", window=8, sink_tokens=2)
    moved = [name for name, t in weights.items() if not torch.equal(t, initial[name])]
    assert any("feature_map" in n for n in moved) and any("enc_proj" in n for n in moved), "updates rounded away"


def converted_from_folder(folder: Path, attention: str, **options) -> dict[str, torch.Tensor]:
    """The new parameters right after conversion (the run's starting point, seed 0)."""
    model, _ = linearize.load(folder)
    student = linearize.convert(model, attention=attention, seed=0, **options)
    return {name: p.detach().float() for name, p in student.named_parameters()}


def test_training_free_cache_recipe_exports_the_model_it_scored(tmp_path, tiny_model_folder):
    """The shape of recipes/smollm2_recall.yaml: no training stage, a global cache, gamma fixed at 0."""
    recipe = tiny_recipe(tiny_model_folder, tmp_path / "run")
    recipe["attention"].update({"fixed_gamma": 0.0, "global_cache": 3, "global_cache_block": 4})
    recipe["attention_transfer"] = {"enabled": False}
    recipe["finetune"] = {"enabled": False}
    recipe["eval"]["perplexity_chunks"] = 2
    run_to_end(write_recipe(tmp_path, recipe))
    export = tmp_path / "run" / "export"
    options = json.loads((export / "config.json").read_text())["linear_attention"]
    assert (options["global_cache"], options["global_cache_block"], options["fixed_gamma"]) == (3, 4, 0.0)
    assert not (tmp_path / "run" / "attention_transfer").exists() and not (tmp_path / "run" / "finetune").exists()
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    chunks = chunk_tokens(AutoTokenizer.from_pretrained(export), read_corpus("wikitext2"), 512, 2)
    assert perplexity(model, chunks, progress=False) == pytest.approx(metrics["untrained_perplexity"], rel=1e-5)
