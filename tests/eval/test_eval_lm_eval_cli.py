"""Stock lm-eval, unpatched, evaluates an export and its teacher offline on the shipped tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest

import linearize
from linearize.eval import harness
from linearize.eval.tasks import GROUP, SHIPPED_TASKS, include_path

LIMIT = 2


def stock_cli() -> str:
    """The `lm_eval` console script installed next to this interpreter (lm-eval is a dependency)."""
    script = Path(sys.executable).with_name("lm_eval")
    assert script.is_file(), f"no lm_eval script next to {sys.executable}: is lm-eval installed?"
    return str(script)


def run_stock_cli(model_args: str, out: Path, workdir: Path) -> dict:
    """`lm_eval --model hf` on the shipped group from an unrelated working directory, hub off,
    with an empty Hugging Face cache; returns lm-eval's saved results."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf-home")}
    command = [
        stock_cli(),
        "--model", "hf", "--model_args", model_args, "--include_path", str(include_path()), "--tasks", GROUP,
        "--limit", str(LIMIT), "--batch_size", "4", "--device", "cpu", "--output_path", str(out),
    ]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (results_file,) = out.rglob("results_*.json")
    return json.loads(results_file.read_text())


def metric_values(results: dict) -> dict[str, float]:
    return {
        f"{task}/{key}": value for task, values in results.items() if task in SHIPPED_TASKS
        for key, value in values.items() if "stderr" not in key and isinstance(value, float)
    }


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_stock_cli_matches_linearize_eval(role, tiny_folders, task_manager, tmp_path):
    folder = tiny_folders[role]
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    stock = run_stock_cli(f"pretrained={folder},trust_remote_code=True", tmp_path / "out", workdir)
    assert stock["versions"]["linearize_piqa"] is not None
    assert {task: stock["n-samples"][task]["effective"] for task in SHIPPED_TASKS} == dict.fromkeys(SHIPPED_TASKS, LIMIT)

    model, tokenizer = linearize.load(folder)
    settings = harness.TaskSettings(tasks=list(SHIPPED_TASKS), limit=LIMIT, task_limits={}, num_fewshot=None)
    ours = harness.evaluate(harness.wrap_model(model, tokenizer, 4, None), settings, task_manager)
    expected = metric_values(stock["results"])
    assert len(expected) == 9, expected
    for key, value in expected.items():
        task, metric = key.split("/")
        assert ours[task].metrics[metric.split(",")[0]] == pytest.approx(value, rel=1e-5), key


def test_python_simple_evaluate_on_an_export(tiny_folders, task_manager):
    output = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(tiny_folders["student"]), "trust_remote_code": True},
        tasks=["linearize_piqa"], limit=LIMIT, device="cpu", task_manager=task_manager,
    )
    assert output["n-samples"]["linearize_piqa"]["effective"] == LIMIT
    assert 0.0 <= output["results"]["linearize_piqa"]["acc,none"] <= 1.0
