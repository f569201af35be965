"""Exports reload in a fresh process, without linearize, with identical logits; writes are atomic."""

from __future__ import annotations

import json

import pytest
import torch
from model_testing import ALL_ATTENTIONS, TEACHERS, VOCAB, converted, reload_in_fresh_process

import linearize
from linearize.export import ExportError

def test_saved_folders_reload_in_fresh_process_without_linearize(tmp_path):
    """Plain ``save_pretrained`` (what push_to_hub and HF Trainer call) and ``linearize.export`` both
    write self-contained folders: every family and variant, reloaded where linearize cannot be
    imported, gives the same logits."""
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 23))
    ids_file = tmp_path / "ids.pt"
    torch.save(ids, ids_file)
    jobs, expected = [], {}
    for family in TEACHERS:
        for attention in ALL_ATTENTIONS:
            name = f"{family}-{attention}"
            model = converted(family, attention, softmax_layers=[1])
            with torch.no_grad():
                expected[name] = model(ids).logits
            folder = tmp_path / name
            if attention == "window_hedgehog":
                linearize.export(model, None, folder)
            else:
                model.save_pretrained(folder)
            jobs.append((folder, ids_file, tmp_path / f"{name}.logits.pt"))
    reload_in_fresh_process(jobs)
    for name, logits in expected.items():
        reloaded = torch.load(tmp_path / f"{name}.logits.pt")
        difference = (reloaded - logits).abs().max().item()
        assert difference <= 1e-5, f"{name}: reloaded logits differ by {difference:.2e}"


def test_export_folder_is_self_describing(tmp_path):
    folder = linearize.export(converted("llama", "window_hedgehog"), None, tmp_path / "out", metrics={"ppl": 1.0})
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "linearized_llama"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_linearized.LinearizedLlamaForCausalLM"
    assert config["linear_attention"]["window"] == 6
    for name in ("model.safetensors", "modeling_linearized.py", "attention_math.py", "README.md", "metrics.json"):
        assert (folder / name).is_file(), name
    source = (folder / "modeling_linearized.py").read_text()
    assert "\nfrom linearize" not in source and "\nimport linearize" not in source, "top-level linearize import"


def test_import_linearize_registers_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM

    model = converted("gpt2", "based")
    folder = linearize.export(model, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    assert type(reloaded) is type(model)
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_existing_folder_is_not_overwritten_by_default(tmp_path):
    model = converted("llama", "hedgehog")
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ExportError, match="already exists"):
        linearize.export(model, None, target)
    linearize.export(model, None, target, overwrite=True)
    assert (target / "config.json").is_file()


def test_failed_export_leaves_nothing_behind(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        linearize.export(converted("llama", "hedgehog"), BrokenTokenizer(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == [], "a partial export was left behind"


def test_exporting_a_teacher_is_rejected(tmp_path):
    from model_testing import tiny_llama

    with pytest.raises(ExportError, match="not a linearized model"):
        linearize.export(tiny_llama(), None, tmp_path / "out")
