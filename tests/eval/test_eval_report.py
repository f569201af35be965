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
        "--limit", "3,linearize_lambada_openai=2", "--perplexity-chunks", "1", "--perplexity-lengths", "32,64",
        "--perplexity-start", "0.5", "--recall", "--jrt",
        "--mqar-vocabulary", "ids", "--mqar-lengths", "32,64", "--mqar-kv-pairs", "4,16", "--mqar-examples", "4",
        "--passkey-lengths", "64,96", "--passkey-keys", "2", "--passkey-haystack", "wikitext", "--configs", "gamma=0;global_cache=4",
        "--out", str(out), "--update-model-card",
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
        assert [entry["chunk_length"] for entry in results["perplexity"]] == [32, 64]
        assert all(entry[role] > 1 and entry["start"] == 0.5 for entry in results["perplexity"])
        assert set(results["recall"]["curves"][role]["mqar"]) == {"plain", "jrt"}
        mqar = results["recall"]["curves"][role]["mqar"]["plain"]
        assert [(p["pairs"], p["length"]) for p in mqar] == [(4, 32), (4, 64), (16, 64)]  # 16 pairs need >= 64
    assert results["recall"]["settings"]["passkey_haystack"] == "wikitext"
    assert "Passkey retrieval accuracy (wikitext haystack" in (evaluated / "report.md").read_text()


def test_frontier_has_a_point_per_configuration(evaluated):
    frontier = json.loads((evaluated / "eval.json").read_text())["recall"]["frontier"]
    labels = [p["label"] for p in frontier]
    assert labels == ["teacher", "student (as exported)", "student (gamma=0.0)", "student (global_cache=4)"]
    size = {p["label"]: p["state_bytes"] for p in frontier}
    assert size["student (gamma=0.0)"] == size["student (as exported)"] < size["student (global_cache=4)"]
    assert size["student (global_cache=4)"] < size["teacher"]  # 4k tokens of KV outweigh a fixed state
    assert all(0 <= p["passkey"] <= 1 and 0 <= p["mqar"] <= 1 and p["state_context"] == 4096 for p in frontier)


def test_report_has_every_section_and_plot(evaluated):
    report = (evaluated / "report.md").read_text()
    for heading in ("## Tasks (lm-eval)", "## Perplexity", "## Recall", "## Recall vs state size",
                    "## Speed and memory", "## Settings"):
        assert heading in report, heading
    assert "| linearize_piqa | acc_norm ↑ |" in report and "Δ (student − teacher)" in report
    assert "lm-eval 0.4" in report and "limit: 3 examples per task, linearize_lambada_openai: 2" in report
    assert "| student (global_cache=4) |" in report
    for image in ("recall.png", "frontier.png", "decode.png"):
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
        (["eval", "{student}", "--recall", "--mqar-lengths", "16,20"], "error: MQAR with 8 pairs needs a length >= 32"),
        (["eval", "{student}", "--recall", "--passkey-keys", "0"], "error: passkey keys per depth must be >= 1"),
        (["eval", "{student}", "--configs", "window=8"], "error: --configs adds points to the recall-state frontier"),
        (["eval", "{student}", "--recall", "--configs", "windw=8"], "error: bad configuration item 'windw=8'"),
    ],
    ids=["bad-task", "missing-model", "missing-teacher", "no-model", "limit-for-other-task", "too-long", "bad-device",
         "bad-depth", "mqar-too-short", "no-passkeys", "configs-without-recall", "bad-config"],
)
def test_user_mistakes_are_one_line_errors(arguments, message, tiny_folders, tmp_path, capsys):
    argv = [a.format(student=tiny_folders["student"], tmp=tmp_path) for a in arguments]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in error and "Traceback" not in error
    assert not (tmp_path / "out").exists(), "nothing is written after a user mistake"


def test_eval_without_lm_eval_tasks(tiny_folders, tmp_path):
    """--tasks none: only perplexity (and recall when asked), no lm-eval run."""
    out = tmp_path / "out"
    assert main(["eval", str(tiny_folders["student"]), "--tasks", "none", "--perplexity-chunks", "1",
                 "--perplexity-lengths", "32", "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["tasks"] == {} and results["perplexity"][0]["student"] > 1
    assert "## Perplexity" in (out / "report.md").read_text()
