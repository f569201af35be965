"""`linearize eval` and `linearize bench decode` end to end on tiny models: files, report, model card,
and user mistakes as one-line errors."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest

from linearize.cli import main
from linearize.errors import UserError
from linearize.eval.report import CARD_START, update_model_card
from linearize.eval.tasks import include_path


@pytest.fixture(scope="module")
def evaluated(tiny_folders, tmp_path_factory):
    """One `linearize eval` and one `linearize bench decode` into the same folder."""
    out = tmp_path_factory.mktemp("eval")
    student, teacher = str(tiny_folders["student"]), str(tiny_folders["teacher"])
    assert main([
        "eval", student, "--teacher", teacher, "--tasks", "linearize_piqa,linearize_lambada_openai",
        "--limit", "3,linearize_lambada_openai=2", "--perplexity-chunks", "1", "--recall", "--jrt",
        "--mqar-vocabulary", "ids", "--mqar-lengths", "32,64", "--mqar-kv-pairs", "4", "--mqar-examples", "4",
        "--passkey-lengths", "64,96", "--out", str(out), "--update-model-card",
    ]) == 0
    assert main(["bench", "decode", student, "--teacher", teacher, "--lengths", "16,32",
                 "--decode-tokens", "3", "--out", str(out)]) == 0
    return out


def test_eval_records_settings_and_both_models(evaluated, tiny_folders):
    results = json.loads((evaluated / "eval.json").read_text())
    assert results["models"] == {"teacher": str(tiny_folders["teacher"]), "student": str(tiny_folders["student"])}
    settings = results["settings"]
    assert settings["lm_eval_version"] == version("lm_eval") and settings["num_fewshot"] is None
    assert settings["limit"] == 3 and settings["task_limits"] == {"linearize_lambada_openai": 2}
    for role in ("teacher", "student"):
        piqa = results["tasks"][role]["linearize_piqa"]
        assert set(piqa["metrics"]) == {"acc", "acc_norm"} and piqa["samples"] == 3 and piqa["num_fewshot"] == 0
        assert results["tasks"][role]["linearize_lambada_openai"]["samples"] == 2
        assert results["perplexity"][role] > 1
        assert set(results["recall"]["curves"][role]["mqar"]) == {"plain", "jrt"}


def test_report_has_every_section_and_plot(evaluated):
    report = (evaluated / "report.md").read_text()
    for heading in ("## Tasks (lm-eval)", "## Perplexity", "## Recall", "## Speed and memory", "## Settings"):
        assert heading in report, heading
    assert "| linearize_piqa | acc_norm ↑ |" in report and "Δ (student − teacher)" in report
    assert "lm-eval 0.4" in report and "limit: 3 examples per task, linearize_lambada_openai: 2" in report
    for image in ("recall.png", "decode.png"):
        assert f"]({image})" in report
        assert (evaluated / image).read_bytes().startswith(b"\x89PNG")
    decode = json.loads((evaluated / "decode.json").read_text())
    assert {(m["model"], m["context_length"]) for m in decode["measurements"]} == {
        (role, length) for role in ("teacher", "student") for length in (16, 32)
    }
    assert "cache ratio" in (evaluated / "decode.md").read_text()


def test_model_card_gets_one_evaluation_section(evaluated, tiny_folders):
    card = tiny_folders["student"] / "README.md"
    text = card.read_text()
    assert text.count(CARD_START) == 1 and "| linearize_piqa | acc ↑ |" in text
    assert text.startswith("---"), "the card's own content is kept"
    results = json.loads((evaluated / "eval.json").read_text())
    update_model_card(tiny_folders["student"], results)
    assert card.read_text().count(CARD_START) == 1, "a second update replaces the section"


def test_model_card_needs_a_model_folder(tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        update_model_card(tmp_path, {"models": {}, "tasks": {}})


def test_print_include_path(capsys):
    assert main(["eval", "--print-include-path"]) == 0
    assert capsys.readouterr().out.strip() == str(include_path())


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["eval", "{student}", "--tasks", "no_such_task"], "error: unknown lm-eval task(s): no_such_task"),
        (["eval", "{tmp}/missing-export"], "error: model '{tmp}/missing-export' was not found"),
        (["eval", "{student}", "--teacher", "no-such-teacher"], "error: model 'no-such-teacher' was not found"),
        (["eval"], "error: no model given"),
        (["eval", "{student}", "--tasks", "linearize_piqa", "--limit", "linearize_arc_easy=3"],
         "error: --limit names task(s) not evaluated: linearize_arc_easy"),
        (["bench", "decode", "{student}", "--lengths", "300"], "error: the student supports 256 positions"),
        (["bench", "decode", "{student}", "--device", "tpu9"], "error: unknown device 'tpu9'"),
        (["eval", "{student}", "--recall", "--passkey-depths", "0,1.5"], "error: passkey depth 1.5 is outside [0, 1]"),
        (["eval", "{student}", "--recall", "--mqar-lengths", "16,20"], "error: MQAR seq_len 16 cannot hold 8 pairs"),
    ],
    ids=["bad-task", "missing-model", "missing-teacher", "no-model", "limit-for-other-task", "too-long", "bad-device",
         "bad-depth", "mqar-too-short"],
)
def test_user_mistakes_are_one_line_errors(arguments, message, tiny_folders, tmp_path, capsys):
    argv = [a.format(student=tiny_folders["student"], tmp=tmp_path) for a in arguments]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in error and "Traceback" not in error
    assert not (tmp_path / "out").exists(), "nothing is written after a user mistake"
