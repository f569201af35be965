"""``kernels.benchmark`` writes its results (one tiny length, CPU, so it stays fast)."""

from __future__ import annotations

import json
from pathlib import Path

from linearize.kernels.benchmark import run_kernel_benchmark


def test_run_kernel_benchmark_writes_results(tmp_path: Path) -> None:
    result = run_kernel_benchmark(tmp_path, lengths=[64], device="cpu")
    assert result["variants"][0] == "sdpa" and len(result["variants"]) == 4  # sdpa, linear, quadratic, chunked
    assert [(row["length"], row["mode"]) for row in result["rows"]] == [(64, "fwd"), (64, "fwd+bwd")]
    for row in result["rows"]:
        assert all(ms > 0 for ms in row["ms"].values())
        assert set(row["speedup"]) == set(result["variants"][1:])
    assert json.loads((tmp_path / "kernels.json").read_text())["rows"] == result["rows"]
    table = (tmp_path / "kernels.md").read_text()
    assert "| T | mode | sdpa (ms)" in table and "| 64 | fwd+bwd |" in table
