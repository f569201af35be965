"""The shipped offline tasks: lm-eval's built-in prompts and metrics, the vendored data, and scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.tasks.wikitext import preprocess_wikitext

import linearize
from linearize.eval import harness
from linearize.eval.tasks import SHIPPED_TASKS, include_path

BUILTIN_YAML = {
    "wikitext": "wikitext/wikitext.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
}
PROMPT_FIELDS = ["output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_results", "metric_list"]
DATA = include_path() / "data"


class FunctionTagLoader(yaml.SafeLoader):
    """Reads ``!function module.name`` as the string ``!function name`` (module files differ)."""


FunctionTagLoader.add_constructor(
    "!function", lambda loader, node: "!function " + loader.construct_scalar(node).rsplit(".", 1)[-1]
)


def read_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=FunctionTagLoader)


@pytest.mark.parametrize("task", sorted(SHIPPED_TASKS))
def test_prompts_and_metrics_are_the_builtin_tasks(task):
    ours = read_yaml(include_path() / f"{task}.yaml")
    builtin = read_yaml(Path(lm_eval.__file__).parent / "tasks" / BUILTIN_YAML[SHIPPED_TASKS[task]])
    for field in PROMPT_FIELDS:
        assert ours.get(field) == builtin.get(field), f"{task}.{field} differs from lm-eval's {SHIPPED_TASKS[task]}"
    assert ours["metadata"]["version"] == builtin["metadata"]["version"]


def test_wikitext_scoring_functions_are_lm_evals_own(task_manager):
    config = task_manager.load("linearize_wikitext")["tasks"]["linearize_wikitext"].config
    assert config.doc_to_target is preprocess_wikitext.wikitext_detokenizer
    assert config.process_results is preprocess_wikitext.process_results


def raw_rows(relative_path: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / relative_path).read_text().splitlines()]


def test_vendored_data_renders_to_the_documented_prompts(task_manager):
    """Every document, rendered by lm-eval, is the prompt its source README documents."""
    tasks = task_manager.load(list(SHIPPED_TASKS))["tasks"]

    wikitext = tasks["linearize_wikitext"]
    pages = raw_rows("wikitext2_raw/wikitext2_test_docs.jsonl")
    docs = list(wikitext.test_docs())
    assert [doc["page"] for doc in docs] == [row["page"] for row in pages] and len(docs) == 62

    lambada = tasks["linearize_lambada_openai"]
    rows = raw_rows("lambada_openai/lambada_openai_test.jsonl")
    docs = list(lambada.test_docs())
    assert len(docs) == len(rows) == 5153
    for doc, row in zip(docs, rows):
        assert lambada.doc_to_text(doc) == row["context"]
        assert lambada.doc_to_target(doc) == " " + row["continuation"]

    piqa = tasks["linearize_piqa"]
    rows = raw_rows("piqa/piqa_validation.jsonl")
    docs = list(piqa.validation_docs())
    assert len(docs) == len(rows) == 1838
    for doc, row in zip(docs, rows):
        assert piqa.doc_to_text(doc) == row["query"] + "Answer:"  # the README's '{{query}}Answer:'
        assert piqa.doc_to_choice(doc) == row["choices"] and piqa.doc_to_target(doc) == row["gold"]

    arc = tasks["linearize_arc_easy"]
    rows = raw_rows("arc_easy/arc_easy_test.jsonl")
    docs = list(arc.test_docs())
    assert len(docs) == len(rows) == 2376
    for doc, row in zip(docs, rows):
        choices = arc.doc_to_choice(doc)
        assert arc.doc_to_text(doc) == row["query"] + "\nAnswer:"
        assert choices == list(dict.fromkeys(row["choices"])), "repeated padding distractors are dropped"
        assert choices[arc.doc_to_target(doc)] == row["choices"][row["gold"]]
    assert sum(len(arc.doc_to_choice(doc)) == 3 for doc in docs) == 7


def test_each_shipped_task_scores_a_tiny_model(tiny_folders, task_manager):
    model, tokenizer = linearize.load(tiny_folders["student"])
    settings = harness.TaskSettings(
        tasks=list(SHIPPED_TASKS), limit=3, task_limits={"linearize_wikitext": 1}, num_fewshot=None,
    )
    results = harness.evaluate(harness.wrap_model(model, tokenizer, 4, None), settings, task_manager)
    assert set(results) == set(SHIPPED_TASKS)
    expected = {
        "linearize_wikitext": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
        "linearize_lambada_openai": {"perplexity", "acc"},
        "linearize_piqa": {"acc", "acc_norm"},
        "linearize_arc_easy": {"acc", "acc_norm"},
    }
    for task, result in results.items():
        assert set(result.metrics) == expected[task], task
        assert all(math.isfinite(v) for v in result.metrics.values()), result
        assert result.samples == settings.limit_for(task) and result.num_fewshot == 0
    # An untrained model spreads probability: perplexities are large but finite and above 1.
    assert 1 < results["linearize_wikitext"].metrics["byte_perplexity"] < math.inf
