"""``scripts/gpu_check.sh``: the CPU smoke mode writes complete, finite results; without CUDA the GPU
mode stops with one clear line; the layer comparison and the section runner work on their own."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def load_script():
    """scripts/gpu_check.py as a module (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT.with_suffix(".py"))
    module = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_script()


def numbers(tree) -> list[float]:
    """Every number anywhere in a JSON tree (booleans are not numbers here)."""
    if isinstance(tree, dict):
        return [x for value in tree.values() for x in numbers(value)]
    if isinstance(tree, list):
        return [x for value in tree for x in numbers(value)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_smoke_mode_writes_finite_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT), str(out), "--smoke"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["environment"]["smoke"] and report["environment"]["torch"] == torch.__version__
    sections = report["sections"]
    assert list(sections) == ["pipeline", "decode"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "passed")
    values = numbers(sections)
    assert values and all(math.isfinite(x) for x in values)

    stages = sections["pipeline"]["results"]["stages"]
    assert [stages[name]["steps"] for name in ("attention_transfer", "finetune")] == [2, 2]
    assert len(sections["pipeline"]["results"]["reload"]["new_tokens"]) == 8
    assert not sections["pipeline"]["results"]["reload"]["model_class"].startswith("linearize")
    assert sections["decode"]["results"]["ratios"]["decode_tokens_per_second"] > 0
    assert {m["batch"] for m in sections["decode"]["results"]["measurements"]} == {1, 2}

    markdown = (out / "gpu_check.md").read_text()
    assert "| 3. 1B-shaped run | passed |" in markdown and "| decode tokens/s |" in markdown
    assert "| attention_transfer |" in markdown and "Every measured case" in markdown
    for name in sections:
        assert (out / "sections" / f"{name}.json").is_file() and (out / "logs" / f"{name}.log").is_file()


def test_gpu_mode_without_cuda_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "needs a CUDA device" in result.stderr and "--smoke" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_layer_comparison_on_the_cpu() -> None:
    """Against itself on the CPU: fp32 is exact, and bf16 is exactly the reference's own rounding,
    which its bounds allow; the layer runs every part (its window is shorter than the sequence)."""
    layer = gpu_check.layer_against_reference(gpu_check.SMOKE.layer, gpu_check.SMOKE.layer_length, "cpu")
    fp32, bf16 = layer["relative_errors"]["fp32"], layer["relative_errors"]["bf16"]
    assert fp32["logits"]["error"] == 0 and all(e["error"] == 0 for e in fp32["gradients"].values())
    assert 0 < bf16["logits"]["error"] <= bf16["logits"]["bound"]
    assert any(".core.mix_logit" in name for name in bf16["gradients"])
    assert all(0 < e["error"] <= e["bound"] for e in bf16["gradients"].values())


def test_kernel_bench_section_on_the_cpu(tmp_path: Path) -> None:
    outcome = gpu_check.kernel_bench(gpu_check.SMOKE, tmp_path, tmp_path)
    assert not outcome.problems and "| 64 | fwd+bwd |" in outcome.markdown
    assert outcome.results["fla"]["pip_install"] is None  # never installs anything off the GPU
    assert all(ms > 0 for row in outcome.results["rows"] for ms in row["ms"].values())


def test_a_section_past_its_time_limit_is_recorded_as_failed(tmp_path: Path) -> None:
    record = gpu_check.run_section("decode", 1, True, tmp_path, tmp_path / "work", dict(os.environ))
    assert record["status"] == "failed" and record["error"].startswith("timed out after 1 s"), record


def test_junit_counts_split_by_precision(tmp_path: Path) -> None:
    xml = tmp_path / "report.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.kernels.test_hybrid" name="test_a[fp32-B1]"/>'
        '<testcase classname="tests.kernels.test_hybrid" name="test_a[bf16-B1]"><failure message="x"/></testcase>'
        '<testcase classname="tests.kernels.test_hybrid" name="test_b[bf16-B2]"><skipped message="y"/></testcase>'
        '<testcase classname="tests.kernels.test_utils" name="test_c"/>'
        "</testsuite></testsuites>"
    )
    assert gpu_check.junit_counts(xml) == {
        "counts": {"fp32": {"passed": 1, "failed": 0, "skipped": 0}, "bf16": {"passed": 0, "failed": 1, "skipped": 1},
                   "other": {"passed": 1, "failed": 0, "skipped": 0}},
        "failed": ["tests.kernels.test_hybrid::test_a[bf16-B1]"],
    }
