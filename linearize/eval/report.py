"""report.md in an evaluation folder, and the same numbers in an export's model card.

An evaluation folder holds what the commands saved: ``eval.json`` (``linearize eval``: settings,
lm-eval task results, chunked perplexity, recall curves) and ``decode.json`` (``linearize bench
decode``). :func:`write_report` rebuilds ``report.md`` and its plots from whichever are present, so
running both commands with the same ``--out`` gives one report.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from linearize.errors import UserError
from linearize.eval import tables
from linearize.eval.harness import METRIC_NOTES

EVAL_FILE, DECODE_FILE, REPORT_FILE = "eval.json", "decode.json", "report.md"
CARD_START, CARD_END = "<!-- linearize-eval:start -->", "<!-- linearize-eval:end -->"


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain open() (not mkstemp, which makes 0600 files) so the result has the umask's permissions.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
    try:
        with open(temporary, "x", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_json(path: Path, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def result_sections(results: dict | None, decode: dict | None, heading: str = "##") -> list[str]:
    """Markdown sections with the numbers: tasks, perplexity, recall, speed and memory."""
    sections = []
    if results and results.get("tasks"):
        sections.append(f"{heading} Tasks (lm-eval)\n\n{tables.task_table(results['tasks'])}")
    if results and results.get("perplexity"):
        sections.append(f"{heading} Perplexity\n\n{tables.perplexity_table(results['perplexity'])}")
    if results and results.get("recall"):
        recall = results["recall"]
        sections.append(
            f"{heading} Recall\n\nMQAR accuracy ({recall['settings']['mqar_kv_pairs']} key-value pairs):\n\n"
            f"{tables.recall_table(recall['curves'], 'mqar')}\n\nPasskey retrieval accuracy "
            f"(depths {recall['settings']['passkey_depths']}):\n\n{tables.recall_table(recall['curves'], 'passkey')}"
        )
    if decode:
        sections.append(f"{heading} Speed and memory\n\n{tables.decode_table(decode['measurements'])}")
        if decode.get("fork"):
            sections.append(f"{heading} Many samples from one prompt\n\n{tables.fork_table(decode['fork'])}")
    return sections


def _shots(num_fewshot: int | None) -> str:
    if not num_fewshot:
        return "each task's default (0 for the shipped tasks)"
    # The shipped tasks vendor no train split; lm-eval then draws examples from the scored split.
    return f"{num_fewshot} (shipped tasks draw them from the scored split, never the scored example itself)"


def _settings_section(results: dict | None, decode: dict | None) -> str:
    lines = ["## Settings", ""]
    if results:
        models = ", ".join(f"{role}: `{reference}`" for role, reference in results["models"].items())
        lines += [f"Models: {models}.", ""]
        if results.get("tasks"):
            task_settings = results["settings"]
            lines += [
                f"lm-eval {task_settings['lm_eval_version']} (transformers {task_settings['transformers_version']}, "
                f"torch {task_settings['torch_version']}); shots: "
                f"{_shots(task_settings['num_fewshot'])}; limit: {task_settings['limit'] or 'none'} examples per task"
                + "".join(f", {task}: {n}" for task, n in task_settings["task_limits"].items())
                + f"; batch size {task_settings['batch_size']}; max length "
                f"{task_settings['max_length'] or 'the model default'}.",
                "",
                *(f"- `{metric}`: {note}" for metric, note in METRIC_NOTES.items()),
                "",
            ]
        if results.get("recall"):
            lines += [f"Recall settings: `{json.dumps(results['recall']['settings'])}`", ""]
    if decode:
        lines += [f"Speed settings: `{json.dumps(decode['settings'])}`", ""]
    return "\n".join(lines)


def write_report(eval_dir: str | os.PathLike) -> Path:
    """(Re)write ``report.md`` and its PNG plots in ``eval_dir`` from the saved result files."""
    from linearize.eval import plots  # matplotlib loads only when plotting, not on `import linearize.eval`

    eval_dir = Path(eval_dir)
    results, decode = read_json(eval_dir / EVAL_FILE), read_json(eval_dir / DECODE_FILE)
    if results is None and decode is None:
        raise UserError(f"{eval_dir} has neither {EVAL_FILE} nor {DECODE_FILE}. Fix: run `linearize eval` "
                        "or `linearize bench decode` with --out pointing there first")
    sections = result_sections(results, decode)
    if results and results.get("recall"):
        plots.plot_recall(results["recall"]["curves"], eval_dir / "recall.png")
        sections.append("![recall curves](recall.png)")
    if decode:
        plots.plot_decode(decode["measurements"], eval_dir / "decode.png")
        sections.append("![speed and memory](decode.png)")
    text = "\n\n".join(["# Evaluation report", *sections, _settings_section(results, decode)])
    return write_text_atomic(eval_dir / REPORT_FILE, text.rstrip() + "\n")


def update_model_card(export_dir: str | os.PathLike, results: dict, decode: dict | None = None) -> Path:
    """Put the evaluation numbers into ``export_dir``/README.md, replacing an earlier evaluation.

    ``results`` is the content of eval.json (``decode`` that of decode.json). The section sits
    between two HTML comments, so calling this again updates it instead of adding another.
    """
    card = Path(export_dir) / "README.md"
    if not (Path(export_dir) / "config.json").is_file():
        raise UserError(f"{export_dir} is not a model folder (no config.json). Fix: pass the export folder")
    body = "\n\n".join(result_sections(results, decode, heading="###"))
    models = ", ".join(f"{role} `{reference}`" for role, reference in results["models"].items())
    section = f"{CARD_START}\n## Evaluation\n\nMeasured with `linearize eval` ({models}).\n\n{body}\n{CARD_END}"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if CARD_START in text and CARD_END in text:
        before, rest = text.split(CARD_START, 1)
        text = before + section + rest.split(CARD_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    return write_text_atomic(card, text)
