"""Repeated sampling: the estimators against brute force, answer extraction, the fit, forking, resuming.

Seconds are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import replace

import pytest
import torch
from eval_testing import tiny_tokenizer
from model_testing import SMALL_WINDOW, tiny_llama

import linearize
from linearize.cli import main
from linearize.errors import UserError
from linearize.eval.sampling import SAMPLES_FILE, SamplingSettings, SampleStore, draw_samples, k_values, run_sampling
from linearize.eval.sampling_metrics import crossings, fit_power_law, majority_at_k, majority_vote, pass_at_k
from linearize.eval.sampling_tasks import (
    TASKS,
    arithmetic_problems,
    extract_gsm8k,
    gsm8k_problems,
    gsm8k_reference,
    normalize_number,
)

# --------------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_pass_at_k_equals_enumerating_every_subset(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(subset) for subset in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_majority_vote_ignores_unreadable_answers_and_breaks_ties_by_order():
    assert majority_vote(["3", None, None, "4", "3"]) == "3"
    assert majority_vote(["4", "3"]) == "4"
    assert majority_vote([None, None]) is None


def test_majority_at_k_matches_enumeration():
    answers = ["7", "7", "2", "2", "2", None]
    rng = random.Random(0)
    for k in range(1, len(answers) + 1):
        # Brute force: every ordered k-subset (order breaks ties, as a random draw does).
        ordered = list(itertools.permutations(answers, k))
        brute = sum(majority_vote(list(subset)) == "7" for subset in ordered) / len(ordered)
        assert majority_at_k(answers, "7", k, trials=20000, rng=rng) == pytest.approx(brute, abs=0.02), k


def test_fit_recovers_a_known_exponentiated_power_law():
    a, b = -2.3, -0.45
    ks = k_values(64)
    fit = fit_power_law(ks, [math.exp(a * k**b) for k in ks])
    assert fit["a"] == pytest.approx(a, rel=1e-9) and fit["b"] == pytest.approx(b, rel=1e-9)
    assert fit["rmse"] < 1e-12
    noisy = fit_power_law(ks, [math.exp(a * k**b) * (1 + 0.01 * (-1) ** i) for i, k in enumerate(ks)])
    assert noisy["a"] == pytest.approx(a, rel=0.1) and noisy["b"] == pytest.approx(b, rel=0.1)
    assert 0 < noisy["rmse"] < 0.02


def test_fit_needs_two_points_strictly_inside_zero_and_one():
    assert fit_power_law([1, 2, 4], [0.0, 0.0, 0.5]) is None
    assert fit_power_law([1, 2, 4], [0.5, 1.0, 1.0]) is None


def test_crossing_of_two_curves_on_a_log_seconds_axis():
    teacher = [(1.0, 0.2), (100.0, 0.4)]
    student = [(1.0, 0.1), (100.0, 0.5)]  # the gap is linear in log-seconds: it is zero at 10 s
    found = crossings(teacher, student)
    assert found["crossings"] == [pytest.approx(10.0)]
    assert found["leader"] == ["teacher", "student"]
    apart = crossings([(1.0, 0.5), (2.0, 0.6)], [(4.0, 0.9), (8.0, 0.9)])
    assert apart["range"] is None
    above = crossings(teacher, [(0.5, 0.3), (50.0, 0.6)])
    assert above["crossings"] == [] and above["leader"] == ["student"] and above["range"] == [1.0, 50.0]


def test_k_values_are_powers_of_two_and_the_sample_count():
    assert k_values(16) == [1, 2, 4, 8, 16]
    assert k_values(20) == [1, 2, 4, 8, 16, 20]
    assert k_values(1) == [1]


# --------------------------------------------------------------------------------------------------
# Tasks and answer extraction
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "number"), [
    ("1,000", "1000"), ("$1,234.50", "1234.5"), ("18.00", "18"), ("-3 degrees", "-3"), ("0.25", "0.25"),
    ("12,345,678 people", "12345678"), ("3, 4 and 5", "3"), ("no digits", None), ("18.", "18"),
])
def test_normalize_number(text, number):
    assert normalize_number(text) == number


@pytest.mark.parametrize(("completion", "answer"), [
    (" She has 16 - 3 - 4 = 9 eggs, so 9 * 2 = 18.\n#### 18", "18"),
    (" 2 + 3 = 5\n#### 1,250", "1250"),
    (" The total is 5 + 5 = 10. The answer is $12.", "12"),
    (" He pays 3 * 4 = 12 dollars", "12"),
    (" 20 apples minus 5 is 15 apples.", "15"),
    (" #### 70000 dollars", "70000"),
    (" I do not know.", None),
])
def test_gsm8k_answer_extraction(completion, answer):
    assert extract_gsm8k(completion) == answer


def test_every_gsm8k_test_reference_is_a_number():
    problems = gsm8k_problems(None, seed=0)
    assert len(problems) == 1319
    assert problems[0].answer == "18" and problems[2].answer == "70000"
    assert all(normalize_number(p.answer) == p.answer for p in problems)
    assert gsm8k_reference("... so 1,000 - 1 = 999\n#### 999") == "999"


def test_gsm8k_prompt_has_the_shots_without_calculator_annotations():
    prompt = gsm8k_problems(1, seed=0)[0].prompt
    assert prompt.count("Question:") == 6 and prompt.endswith("\nAnswer:")
    assert "<<" not in prompt and prompt.count("#### ") == 5
    assert "Janet" in prompt.rsplit("Question:", 1)[1]


def test_arithmetic_problems_are_right_and_stable_under_larger_limits():
    few, many = arithmetic_problems(5, seed=3), arithmetic_problems(50, seed=3)
    assert many[:5] == few
    for problem in many:
        a, b = problem.prompt.rsplit("\n", 1)[1].removesuffix(" =").split(" + ")
        assert int(a) + int(b) == int(problem.answer) and len(a) == len(b) == 2
    assert arithmetic_problems(5, seed=4) != few


# --------------------------------------------------------------------------------------------------
# Drawing samples on tiny models
# --------------------------------------------------------------------------------------------------


def _tiny_pair():
    torch.manual_seed(0)
    teacher = tiny_llama()
    student = linearize.convert(tiny_llama(), attention="window_hedgehog", **SMALL_WINDOW)
    tokenizer = tiny_tokenizer()
    return {"teacher": (teacher, tokenizer), "student": (student, tokenizer)}


SETTINGS = SamplingSettings(tasks=("arithmetic",), default_samples=6, default_limit=3, batch_size=4,
                            max_new_tokens=5, temperature=1.0)


def test_forked_sampling_draws_the_same_samples_as_unforked():
    models = _tiny_pair()
    student, tokenizer = models["student"]
    task = TASKS["arithmetic"]
    prompt = arithmetic_problems(1, seed=0)[0].prompt
    draws = [draw_samples(student, tokenizer, prompt, 6, seed=5, task=task, settings=SETTINGS, fork_prompts=fork)
             for fork in (True, False)]
    assert draws[0].completions == draws[1].completions and draws[0].tokens == draws[1].tokens
    assert len(set(draws[0].completions)) > 1, "samples of one prompt should differ (vacuous test)"
    again = draw_samples(student, tokenizer, prompt, 6, seed=5, task=task, settings=SETTINGS)
    assert again.completions == draws[0].completions
    other = draw_samples(student, tokenizer, prompt, 6, seed=6, task=task, settings=SETTINGS)
    assert other.completions != draws[0].completions


def test_run_sampling_summarises_both_models(tmp_path):
    result = run_sampling(_tiny_pair(), {"teacher": "t", "student": "s"}, SETTINGS, tmp_path, progress=False)
    task = result["tasks"]["arithmetic"]
    for role in ("teacher", "student"):
        summary = task[role]
        assert summary["problems"] == 3 and summary["samples"] == 6
        assert [p["k"] for p in summary["points"]] == [1, 2, 4, 6]
        coverage = [p["coverage"] for p in summary["points"]]
        assert coverage == sorted(coverage) and all(0 <= c <= 1 for c in coverage)
        assert summary["seconds"] > 0 and summary["tokens"] > 0
        assert summary["points"][-1]["seconds"] == pytest.approx(summary["seconds"])
    assert "crossing" in task
    assert result["settings"]["torch_threads"] >= 1 and result["models"] == {"teacher": "t", "student": "s"}


def test_interrupted_sampling_resumes_with_the_same_samples(tmp_path):
    references = {"teacher": "t", "student": "s"}
    whole = run_sampling(_tiny_pair(), references, SETTINGS, tmp_path / "whole", progress=False)
    draws = []

    def interrupt_after_three(task, role, problem):
        draws.append((role, problem))
        if len(draws) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sampling(_tiny_pair(), references, SETTINGS, tmp_path / "cut", progress=False,
                     on_problem=interrupt_after_three)
    path = tmp_path / "cut" / SAMPLES_FILE
    with open(path, "a", encoding="utf-8") as file:  # a line cut short by the interruption
        file.write('{"key": "half a rec')
    resumed_draws = []
    resumed = run_sampling(_tiny_pair(), references, SETTINGS, tmp_path / "cut", progress=False,
                           on_problem=lambda *names: resumed_draws.append(names[1:]))
    assert len(resumed_draws) == 6 - 3, "kept problems must not be drawn again"
    assert not set(resumed_draws) & set(draws)
    for role in references:
        kept = [r for r in SampleStore(path).records.values() if r["role"] == role]
        uncut = [r for r in SampleStore(tmp_path / "whole" / SAMPLES_FILE).records.values() if r["role"] == role]
        by_problem = {r["problem"]: r["completions"] for r in uncut}
        assert all(r["completions"] == by_problem[r["problem"]] for r in kept)
        for ours, theirs in zip(resumed["tasks"]["arithmetic"][role]["points"],
                                whole["tasks"]["arithmetic"][role]["points"]):
            assert ours["coverage"] == theirs["coverage"] and ours["majority"] == theirs["majority"]


def test_a_changed_prompt_format_draws_again(tmp_path, monkeypatch):
    references = {"student": "s"}
    models = {"student": _tiny_pair()["student"]}
    run_sampling(models, references, SETTINGS, tmp_path, progress=False)
    monkeypatch.setattr("linearize.eval.sampling_tasks.ARITHMETIC_SHOTS", 2)
    redrawn = []
    run_sampling(models, references, SETTINGS, tmp_path, progress=False, on_problem=lambda *n: redrawn.append(n))
    assert len(redrawn) == 3


def test_changed_settings_draw_again_instead_of_reusing(tmp_path):
    references = {"student": "s"}
    models = {"student": _tiny_pair()["student"]}
    run_sampling(models, references, SETTINGS, tmp_path, progress=False)
    redrawn = []
    hotter = replace(SETTINGS, temperature=2.0)
    run_sampling(models, references, hotter, tmp_path, progress=False, on_problem=lambda *n: redrawn.append(n))
    assert len(redrawn) == 3


@pytest.mark.parametrize(("change", "message"), [
    ({"tasks": ("nope",)}, "unknown sampling task"),
    ({"default_samples": 0}, "--samples must be >= 1"),
    ({"samples": {"gsm8k": 4}}, "--samples names task"),
    ({"limits": {"gsm8k": 4}}, "--limit names task"),
    ({"temperature": 0.0}, "--temperature must be > 0"),
    ({"top_p": 1.5}, "--top-p"),
    ({"batch_size": 0}, "--batch-size"),
])
def test_bad_settings_are_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        replace(SETTINGS, **change).validate()


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def test_bench_sampling_command_writes_results_plots_and_the_model_card(tiny_folders, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["bench", "sampling", str(tiny_folders["student"]), "--teacher", str(tiny_folders["teacher"]),
                 "--tasks", "arithmetic", "--samples", "4", "--limit", "2", "--max-new-tokens", "3",
                 "--batch-size", "2", "--device", "cpu", "--out", str(out), "--update-model-card"])
    assert code == 0
    sampling = json.loads((out / "sampling.json").read_text())
    assert set(sampling["tasks"]["arithmetic"]) == {"teacher", "student", "crossing"}
    for name in ("sampling.md", "coverage_k.png", "coverage_seconds.png", "report.md", SAMPLES_FILE):
        assert (out / name).is_file(), name
    assert "Repeated sampling" in (out / "report.md").read_text()
    assert "Repeated sampling" in (tiny_folders["student"] / "README.md").read_text()


def test_bench_sampling_bad_value_exits_with_one_message(tiny_folders, tmp_path, capsys):
    code = main(["bench", "sampling", str(tiny_folders["student"]), "--tasks", "arithmetic", "--samples", "4",
                 "--limit", "gsm8k=3", "--out", str(tmp_path)])
    assert code == 2
    assert "--limit names task(s) not sampled: gsm8k" in capsys.readouterr().err
