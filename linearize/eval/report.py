"""report.md in an evaluation folder, and the same numbers in an export's model card.

An evaluation folder holds what the commands saved: ``eval.json`` (``linearize eval``: settings,
lm-eval task results, chunked perplexity, recall curves), ``decode.json`` (``linearize bench
decode``) and ``sampling.json`` (``linearize bench sampling``). :func:`write_report` rebuilds
``report.md`` and its plots from whichever are present, so running the commands with the same
``--out`` gives one report.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from linearize.errors import UserError
from linearize.eval import tables
from linearize.eval.harness import METRIC_NOTES

EVAL_FILE, DECODE_FILE, SAMPLING_FILE, REPORT_FILE = "eval.json", "decode.json", "sampling.json", "report.md"
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


def result_sections(
    results: dict | None, decode: dict | None, sampling: dict | None = None, heading: str = "##"
) -> list[str]:
    """Markdown sections with the numbers: tasks, perplexity, recall, speed and memory, repeated sampling."""
    sections = []
    if results and results.get("tasks"):
        sections.append(f"{heading} Tasks (lm-eval)\n\n{tables.task_table(results['tasks'])}")
    if results and results.get("perplexity"):
        sections.append(f"{heading} Perplexity\n\n{tables.perplexity_table(results['perplexity'])}")
    if results and results.get("recall"):
        recall = results["recall"]
        sections.append(
            f"{heading} Recall\n\nMQAR accuracy, per key-value pair count and length:\n\n"
            f"{tables.recall_table(recall['curves'], 'mqar')}\n\nPasskey retrieval accuracy "
            f"({recall['settings'].get('passkey_haystack', 'filler')} haystack, depths {recall['settings']['passkey_depths']}):\n\n{tables.recall_table(recall['curves'], 'passkey')}"
        )
        if recall.get("frontier"):
            sections.append(f"{heading} Recall vs state size\n\n{tables.frontier_table(recall['frontier'])}")
    if decode:
        sections.append(f"{heading} Speed and memory\n\n{tables.decode_table(decode['measurements'])}")
        if decode.get("fork"):
            sections.append(f"{heading} Many samples from one prompt\n\n{tables.fork_table(decode['fork'])}")
    if sampling:
        sections.append(f"{heading} Repeated sampling\n\nCoverage@k (unbiased pass@k), majority vote@k and the "
                        f"seconds k samples per problem cost at the measured throughput.\n\n"
                        f"{tables.sampling_tables(sampling)}")
    return sections


def _shots(num_fewshot: int | None) -> str:
    if not num_fewshot:
        return "each task's default (0 for the shipped tasks)"
    # The shipped tasks vendor no train split; lm-eval then draws examples from the scored split.
    return f"{num_fewshot} (shipped tasks draw them from the scored split, never the scored example itself)"


def _settings_section(results: dict | None, decode: dict | None, sampling: dict | None) -> str:
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
    if sampling:
        lines += [f"Sampling settings: `{json.dumps(sampling['settings'])}`", ""]
    return "\n".join(lines)


def write_report(eval_dir: str | os.PathLike) -> Path:
    """(Re)write ``report.md`` and its PNG plots in ``eval_dir`` from the saved result files."""
    from linearize.eval import plots  # matplotlib loads only when plotting, not on `import linearize.eval`

    eval_dir = Path(eval_dir)
    results, decode = read_json(eval_dir / EVAL_FILE), read_json(eval_dir / DECODE_FILE)
    sampling = read_json(eval_dir / SAMPLING_FILE)
    if results is None and decode is None and sampling is None:
        raise UserError(f"{eval_dir} has none of {EVAL_FILE}, {DECODE_FILE} and {SAMPLING_FILE}. Fix: run "
                        "`linearize eval` or a `linearize bench` command with --out pointing there first")
    sections = result_sections(results, decode, sampling)
    if results and results.get("recall"):
        plots.plot_recall(results["recall"]["curves"], eval_dir / "recall.png")
        sections.append("![recall curves](recall.png)")
        if results["recall"].get("frontier"):
            plots.plot_frontier(results["recall"]["frontier"], eval_dir / "frontier.png")
            sections.append("![recall vs state size](frontier.png)")
    if decode:
        plots.plot_decode(decode["measurements"], eval_dir / "decode.png")
        sections.append("![speed and memory](decode.png)")
    if sampling:
        plots.plot_sampling(sampling, eval_dir / "coverage_k.png", eval_dir / "coverage_seconds.png")
        sections.append("![coverage against k](coverage_k.png)\n\n![coverage against seconds](coverage_seconds.png)")
    text = "\n\n".join(["# Evaluation report", *sections, _settings_section(results, decode, sampling)])
    return write_text_atomic(eval_dir / REPORT_FILE, text.rstrip() + "\n")


def write_sampling(eval_dir: str | os.PathLike, sampling: dict) -> str:
    """Save ``sampling`` (what ``run_sampling`` returns) as sampling.json and sampling.md in ``eval_dir``,
    rebuild report.md, and return the tables."""
    eval_dir = Path(eval_dir)
    write_json(eval_dir / SAMPLING_FILE, sampling)
    text = tables.sampling_tables(sampling)
    write_text_atomic(eval_dir / "sampling.md",
                      f"# Repeated sampling\n\n{text}\n\nSettings: `{json.dumps(sampling['settings'])}`\n")
    write_report(eval_dir)
    return text


def update_model_card(
    export_dir: str | os.PathLike, results: dict | None = None, decode: dict | None = None,
    sampling: dict | None = None,
) -> Path:
    """Put the evaluation numbers into ``export_dir``/README.md, replacing an earlier evaluation.

    ``results``, ``decode`` and ``sampling`` are the contents of eval.json, decode.json and
    sampling.json. The section sits between two HTML comments, so calling this again updates it
    instead of adding another.
    """
    card = Path(export_dir) / "README.md"
    if not (Path(export_dir) / "config.json").is_file():
        raise UserError(f"{export_dir} is not a model folder (no config.json). Fix: pass the export folder")
    body = "\n\n".join(result_sections(results, decode, sampling, heading="###"))
    named = next(found["models"] for found in (results, decode, sampling) if found and found.get("models"))
    models = ", ".join(f"{role} `{reference}`" for role, reference in named.items())
    section = (f"{CARD_START}\n## Evaluation\n\nMeasured with `linearize eval` and `linearize bench` ({models})."
               f"\n\n{body}\n{CARD_END}")
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if CARD_START in text and CARD_END in text:
        before, rest = text.split(CARD_START, 1)
        text = before + section + rest.split(CARD_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    return write_text_atomic(card, text)
