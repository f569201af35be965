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
