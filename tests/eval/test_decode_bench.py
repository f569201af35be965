"""`run_decode_benchmark`: every (model, length) is measured; cache sizes follow the math.

Speed is never asserted: it depends on the machine and its load.
"""

from __future__ import annotations

import pytest
import torch
from eval_testing import tiny_tokenizer
from model_testing import SMALL_WINDOW, tiny_gpt2, tiny_llama

import linearize
from linearize.errors import UserError
from linearize.eval.decode_bench import cache_num_bytes, new_cache, run_decode_benchmark

LENGTHS = [24, 40]
DECODE = 4


def test_cache_sizes_flat_for_the_student_and_linear_for_the_teacher():
    tokenizer = tiny_tokenizer()
    teacher = tiny_llama()
    student = linearize.convert(tiny_llama(), attention="window_hedgehog", **SMALL_WINDOW)
    result = run_decode_benchmark({"teacher": (teacher, tokenizer), "student": (student, tokenizer)}, LENGTHS, DECODE)
    measured = {(m["model"], m["context_length"]): m for m in result["measurements"]}
    assert set(measured) == {(role, n) for role in ("teacher", "student") for n in LENGTHS}
    config = teacher.config
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * (config.hidden_size // 4) * 4  # fp32 K+V
    for length in LENGTHS:
        teacher_run, student_run = measured[("teacher", length)], measured[("student", length)]
        assert teacher_run["cache_bytes"] == per_token * (length + DECODE)
        assert student_run["cache_bytes"] == measured[("student", LENGTHS[0])]["cache_bytes"] > 0
        for run in (teacher_run, student_run):
            assert run["prefill_seconds"] > 0 and run["decode_tokens_per_second"] > 0 and run["peak_memory_bytes"] >= 0
    assert result["settings"]["lengths"] == LENGTHS and result["settings"]["decode_tokens"] == DECODE


def test_teacher_cache_bytes_count_keys_and_values():
    model = tiny_llama()
    cache = new_cache(model)
    with torch.no_grad():
        model(torch.randint(3, 90, (1, 10)), cache=cache, use_cache=True)
    assert cache_num_bytes(cache) == 3 * 2 * 2 * 12 * 10 * 4  # layers, K+V, KV heads, head dim, tokens, fp32


def test_lengths_beyond_learned_positions_are_user_errors():
    with pytest.raises(UserError, match="supports 256 positions"):
        run_decode_benchmark({"teacher": (tiny_gpt2(), tiny_tokenizer())}, [256], DECODE)


def test_batch_sizes_and_the_fork_case(tmp_path):
    from linearize.eval import plots, tables

    tokenizer = tiny_tokenizer()
    models = {"teacher": (tiny_llama(), tokenizer),
              "student": (linearize.convert(tiny_llama(), attention="window_hedgehog", **SMALL_WINDOW), tokenizer)}
    result = run_decode_benchmark(models, [24, 40], DECODE, batch_sizes=[3], batch_lengths=[32], fork_samples=3,
                                  fork_prompt=16, fork_tokens=2)
    measured = {(m["model"], m["context_length"], m["batch"]): m for m in result["measurements"]}
    assert set(measured) == {(role, n, b) for role in models for n, b in ((24, 1), (32, 1), (32, 3), (40, 1))}
    for role in models:  # three rows hold three times the cache of one
        assert measured[(role, 32, 3)]["cache_bytes"] == 3 * measured[(role, 32, 1)]["cache_bytes"]
    assert [(f["model"], f["samples"], f["new_tokens"]) for f in result["fork"]] == [
        ("teacher", 3, 2), ("student", 3, 2)]
    assert all(f["seconds"] > 0 for f in result["fork"])
    assert "| 32 | 3 |" in tables.decode_table(result["measurements"])
    assert "3 × 2" in tables.fork_table(result["fork"])
    assert plots.plot_decode(result["measurements"], tmp_path / "decode.png").stat().st_size > 0


def test_bad_batch_and_fork_settings_are_user_errors():
    models = {"teacher": (tiny_llama(), tiny_tokenizer())}
    with pytest.raises(UserError, match="--batch-sizes"):
        run_decode_benchmark(models, [24], DECODE, batch_sizes=[0])
    with pytest.raises(UserError, match="--fork-samples"):
        run_decode_benchmark(models, [24], DECODE, fork_samples=-1)
