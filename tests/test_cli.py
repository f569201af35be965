"""The command line: a tiny model end to end, and user mistakes as one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from linearize.cli import main


def test_convert_command_exports_and_checks(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "student"
    code = main(["convert", str(tiny_model_folder), "--attention", "window_based", "--window", "8",
                 "--out", str(out), "--perplexity-chunks", "1", "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "reload parity: max |logits(export) - logits(in memory)| = 0.00e+00" in printed
    assert "WikiText-2 perplexity (1 x 512 tokens): teacher" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attention"] == "window_based" and metrics["student_perplexity"] > 1
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["convert", "no-such-model", "--out", "{tmp}/x"], "error: model 'no-such-model' was not found"),
        (["convert", "{model}", "--out", "{tmp}/x", "--init-gamma", "2"], "error: linear attention option 'init_gamma'"),
        (["convert", "{model}", "--out", "{tmp}/x", "--window", "-4"], "error: linear attention option 'window'"),
        (["convert", "{model}", "--out", "{tmp}", "--perplexity-chunks", "0"], "already exists"),
        (["convert", "{model}", "--out", "{tmp}/x", "--softmax-layers", "9"], "error: softmax_layers [9] are out of range"),
        (["convert", "{tmp}", "--out", "{tmp}/x"], "has no config.json"),
    ],
    ids=["unknown-model", "bad-gamma", "negative-window", "existing-out", "layer-out-of-range", "not-a-model"],
)
def test_user_mistakes_are_one_line_errors(tiny_model_folder, tmp_path, capsys, arguments, message):
    argv = [a.format(tmp=tmp_path, model=tiny_model_folder) for a in arguments]
    assert main(argv + ["--perplexity-chunks", "0"]) == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error


def test_argument_errors_exit_2_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "linearize", "convert", "x", "--out", "y", "--attention", "softmax"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "invalid choice: 'softmax'" in result.stderr and "Traceback" not in result.stderr
