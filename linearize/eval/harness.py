"""Run lm-eval tasks on a model reference, with the shipped offline tasks registered.

Any reference that :func:`linearize.load` resolves (an export folder, a saved teacher, a ``.gguf``
file, the ``smollm2-135m`` shorthand, a hub id) is loaded in memory and wrapped in lm-eval's stock
``HFLM``, so teacher and student go through the same lm-eval code with the same settings. The
shipped ``linearize_*`` tasks are added to lm-eval's task index through ``include_path``; lm-eval's
built-in tasks stay available where a hub is reachable.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from importlib.metadata import version

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from linearize.errors import UserError
from linearize.eval.tasks import GROUP, SHIPPED_TASKS, include_path

# lm-eval's own definitions, recorded with every result so acc and acc_norm are never confused.
METRIC_NOTES = {
    "acc": "accuracy: the choice with the highest summed log-likelihood",
    "acc_norm": "accuracy: the choice with the highest log-likelihood per character of the choice",
    "perplexity": "exp(-mean log-likelihood of the target word), per example",
    "word_perplexity": "exp(-total log-likelihood / words of the original WikiText document)",
    "byte_perplexity": "exp(-total log-likelihood / UTF-8 bytes of the original document)",
    "bits_per_byte": "-total log-likelihood / bytes / ln 2",
}


@dataclass(frozen=True)
class TaskSettings:
    """Everything that decides an lm-eval number besides the model; saved next to the numbers."""

    tasks: list[str]  # the shipped group is expanded to its tasks
    limit: int | None  # examples per task; None scores the whole split
    task_limits: dict[str, int]  # per-task overrides of `limit`
    num_fewshot: int | None  # None: each task's own default (0 for the shipped tasks)
    batch_size: int = 4
    max_length: int | None = None  # None: lm-eval's default, the model's max_position_embeddings
    lm_eval_version: str = field(default_factory=lambda: version("lm_eval"))
    transformers_version: str = field(default_factory=lambda: version("transformers"))
    torch_version: str = field(default_factory=lambda: torch.__version__)

    def limit_for(self, task: str) -> int | None:
        return self.task_limits.get(task, self.limit)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TaskResult:
    """One task's numbers for one model: metric -> value, stderr and direction."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    higher_is_better: dict[str, bool]
    num_fewshot: int
    samples: int  # examples scored (after --limit)
    version: str


def task_manager():
    """lm-eval's task index plus the shipped tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path()))


def check_task_names(names: list[str], manager) -> list[str]:
    """``names`` with the shipped group expanded; a UserError names any task lm-eval does not know."""
    if not names:
        raise UserError(f"no tasks given. Fix: pass --tasks {GROUP} or some of {', '.join(SHIPPED_TASKS)}")
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s): {', '.join(unknown)}. Fix: use the shipped offline tasks "
            f"({', '.join(SHIPPED_TASKS)}, or the group {GROUP!r}) or a task listed by `lm_eval ls tasks`"
        )
    expanded = [task for name in names for task in (SHIPPED_TASKS if name == GROUP else [name])]
    return list(dict.fromkeys(expanded))


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int, max_length: int | None):
    """lm-eval's stock ``HFLM`` around an in-memory model (any reference ``linearize.load`` resolves)."""
    from lm_eval.models.huggingface import HFLM

    # HFLM warns that device/dtype arguments are ignored for an in-memory model; that is intended.
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _task_results(output: dict) -> dict[str, TaskResult]:
    """lm-eval's results dict -> one TaskResult per task that has metrics (groups are skipped)."""
    results = {}
    for task, values in output["results"].items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            name, _, _filter = key.partition(",")
            if not _filter or not isinstance(value, (int, float)):
                continue  # `alias`, and stderr "N/A" where lm-eval cannot bootstrap one
            if name.endswith("_stderr"):
                stderr[name.removesuffix("_stderr")] = float(value)
            else:
                metrics[name] = float(value)
        if not metrics:
            continue
        results[task] = TaskResult(
            task=task, metrics=metrics, stderr={m: stderr.get(m) for m in metrics},
            higher_is_better=dict(output["higher_is_better"].get(task, {})),
            num_fewshot=int(output["n-shot"].get(task, 0)),
            samples=int(output["n-samples"][task]["effective"]), version=str(output["versions"].get(task, "")),
        )
    return results


def evaluate(lm, settings: TaskSettings, manager=None) -> dict[str, TaskResult]:
    """Score ``lm`` (an lm-eval LM) on ``settings.tasks``; tasks sharing a limit run in one call."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager()
    by_limit: dict[int | None, list[str]] = {}
    for task in settings.tasks:
        by_limit.setdefault(settings.limit_for(task), []).append(task)
    results: dict[str, TaskResult] = {}
    for limit, tasks in by_limit.items():
        output = simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=settings.num_fewshot, limit=limit, task_manager=manager,
            log_samples=False,
        )
        results.update(_task_results(output))
    return results
