"""``kernels.benchmark`` writes its results (one tiny length and shape, CPU, so it stays fast)."""

from __future__ import annotations

import json
from pathlib import Path

from linearize.kernels.benchmark import BenchShape, run_kernel_benchmark

TINY = BenchShape(batch=1, heads=2, head_dim=16, feature_dim=32, value_dim=16, dtype="float32", warmup=0, repeats=1)


def test_run_kernel_benchmark_writes_results(tmp_path: Path) -> None:
    result = run_kernel_benchmark(tmp_path, lengths=[64], device="cpu", shape=TINY)
    assert result["shape"]["head_dim"] == 16
    assert result["variants"][0] == "sdpa" and len(result["variants"]) == 4  # sdpa, linear, quadratic, chunked
    assert [(row["length"], row["mode"]) for row in result["rows"]] == [(64, "fwd"), (64, "fwd+bwd")]
    for row in result["rows"]:
        assert all(ms > 0 for ms in row["ms"].values())
        assert set(row["speedup"]) == set(result["variants"][1:])
    assert json.loads((tmp_path / "kernels.json").read_text())["rows"] == result["rows"]
    table = (tmp_path / "kernels.md").read_text()
    assert "| T | mode | sdpa (ms)" in table and "| 64 | fwd+bwd |" in table
