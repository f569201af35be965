"""Offline lm-eval tasks shipped with linearize: WikiText-2, LAMBADA (OpenAI), PIQA, ARC-Easy.

Each ``linearize_<name>`` task is lm-eval's built-in ``<name>`` task (same prompt, same metrics) on
data vendored in ``data/`` (each folder keeps its source's README with provenance and licence). The
YAML files load their data through ``task_data.py``, which finds the files next to itself, so the
tasks work wherever the package is installed and from any working directory, with no hub access.

Known differences from the hub versions: the WikiText document file lacks the blank lines that
``EleutherAI/wikitext_document_level`` keeps (see data/wikitext2_raw/README.txt), so its numbers are
close to, not identical with, stock ``wikitext``; with ``--num_fewshot`` > 0, PIQA and ARC-Easy
draw examples from the scored split because no train split is vendored.

Point the stock CLI at them with::

    lm_eval --include_path "$(python -m linearize.eval.tasks)" --tasks linearize ...
"""

from __future__ import annotations

from pathlib import Path

# Task name -> the lm-eval built-in task it reproduces.
SHIPPED_TASKS: dict[str, str] = {
    "linearize_wikitext": "wikitext",
    "linearize_lambada_openai": "lambada_openai",
    "linearize_piqa": "piqa",
    "linearize_arc_easy": "arc_easy",
}
GROUP = "linearize"


def include_path() -> Path:
    """The folder to pass as ``--include_path`` / ``TaskManager(include_path=...)``."""
    return Path(__file__).resolve().parent


__all__ = ["GROUP", "SHIPPED_TASKS", "include_path"]
