"""Dataset loaders for the shipped lm-eval tasks, resolved next to this file.

lm-eval imports this module by file path (``!function task_data.NAME`` in the YAML files beside
it), so it must stand alone: no ``linearize`` imports, no relative imports. Each loader turns a
vendored jsonl file into the column layout of the hub dataset that lm-eval's built-in task of the
same name reads, so the YAML prompt templates are the built-in ones, character for character.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

# WikiText scoring is lm-eval's own code, reused rather than re-implemented: the built-in
# `wikitext` task's detokenizer and word/byte counts (`process_results`) define its metrics.
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401

DATA = Path(__file__).resolve().parent / "data"


def _rows(relative_path: str) -> list[dict]:
    with open(DATA / relative_path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _splits(**splits: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def wikitext(**_metadata) -> datasets.DatasetDict:
    """EleutherAI/wikitext_document_level (wikitext-2-raw-v1) layout: one ``page`` per article."""
    return _splits(test=_rows("wikitext2_raw/wikitext2_test_docs.jsonl"))


def lambada_openai(**_metadata) -> datasets.DatasetDict:
    """EleutherAI/lambada_openai layout: ``text`` is the passage; its last word is the target."""
    rows = _rows("lambada_openai/lambada_openai_test.jsonl")
    return _splits(test=[{"text": f"{row['context']} {row['continuation']}"} for row in rows])


def piqa(**_metadata) -> datasets.DatasetDict:
    """baber/piqa layout: ``goal``, ``sol1``, ``sol2``, ``label``."""
    prefix, suffix = "Question: ", "\n"
    rows = []
    for row in _rows("piqa/piqa_validation.jsonl"):
        query = row["query"]
        assert query.startswith(prefix) and query.endswith(suffix), f"unexpected PIQA query {query!r}"
        goal = query[len(prefix) : -len(suffix)]
        rows.append({"goal": goal, "sol1": row["choices"][0], "sol2": row["choices"][1], "label": row["gold"]})
    return _splits(validation=rows)


def arc_easy(**_metadata) -> datasets.DatasetDict:
    """allenai/ai2_arc ARC-Easy layout: ``question``, ``choices`` {text, label}, ``answerKey``.

    The vendored copy pads 3-choice questions to 4 with a repeated distractor; the repeat is
    dropped so the choices are the original ones.
    """
    prefix = "Question: "
    rows = []
    for row in _rows("arc_easy/arc_easy_test.jsonl"):
        assert row["query"].startswith(prefix), f"unexpected ARC query {row['query']!r}"
        gold_text = row["choices"][row["gold"]]
        choices = list(dict.fromkeys(row["choices"]))  # drops repeats, keeps first-seen order
        labels = [chr(ord("A") + i) for i in range(len(choices))]
        rows.append({
            "question": row["query"][len(prefix) :],
            "choices": {"text": choices, "label": labels},
            "answerKey": labels[choices.index(gold_text)],
        })
    return _splits(test=rows)
