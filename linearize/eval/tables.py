"""Markdown tables of evaluation results, shared by report.md and the model card.

Every function takes the JSON-ready dicts that ``linearize eval`` and ``linearize bench decode``
save (eval.json, decode.json), so a report can be rebuilt from the files alone.
"""

from __future__ import annotations

MODELS = ("teacher", "student")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _bytes(value: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def task_table(task_results: dict[str, dict[str, dict]]) -> str:
    """One row per (task, metric): teacher, student, student − teacher, examples and shots.

    ``task_results`` maps a model role to ``{task: TaskResult as a dict}``; a missing teacher
    leaves its columns empty.
    """
    student = task_results["student"]
    teacher = task_results.get("teacher", {})
    rows = []
    for task, result in student.items():
        for metric, value in result["metrics"].items():
            reference = teacher.get(task, {}).get("metrics", {}).get(metric)
            arrow = "↑" if result["higher_is_better"].get(metric, True) else "↓"
            delta = None if reference is None else value - reference
            rows.append([
                task, f"{metric} {arrow}", _number(reference), _number(value),
                "–" if delta is None else f"{delta:+.4f}", str(result["samples"]), str(result["num_fewshot"]),
            ])
    return markdown_table(["task", "metric", "teacher", "student", "Δ (student − teacher)", "examples", "shots"], rows)


def perplexity_table(perplexity: dict | list[dict]) -> str:
    """Chunked WikiText-2 perplexity (the protocol of DESIGN.md's reference numbers) with the ratio,
    one row per chunk length (``perplexity``: one entry, or a list of them)."""
    rows = []
    for entry in [perplexity] if isinstance(perplexity, dict) else perplexity:
        teacher, student = entry.get("teacher"), entry["student"]
        ratio = "–" if teacher is None else f"{student / teacher:.2f}×"
        start = f", from {entry['start']:.0%} of the text" if entry.get("start") else ""
        rows.append([f"WikiText-2, {entry['chunks']} × {entry['chunk_length']} tokens{start}",
                     _number(teacher, 2), _number(student, 2), ratio])
    return markdown_table(["text", "teacher", "student", "student / teacher"], rows)


def recall_table(recall: dict[str, dict], test: str) -> str:
    """Accuracy per length (and MQAR pair count) for ``test`` ("mqar" or "passkey"), one column per
    model and prompt."""
    columns = [(role, prompt) for role in recall for prompt in recall[role][test]]
    columns.sort(key=lambda column: MODELS.index(column[0]) if column[0] in MODELS else len(MODELS))
    accuracy = {
        (role, prompt, point.get("pairs"), point["length"]): point["accuracy"]
        for role, prompt in columns for point in recall[role][test][prompt]
    }
    cases = sorted({(pairs or 0, length) for (_, _, pairs, length) in accuracy})
    with_pairs = any(pairs for pairs, _ in cases)
    rows = [
        ([str(pairs)] if with_pairs else []) + [str(length)]
        + [_number(accuracy.get((role, prompt, pairs or None, length)), 3) for role, prompt in columns]
        for pairs, length in cases
    ]
    return markdown_table((["pairs"] if with_pairs else []) + ["length"]
                          + [f"{role} ({prompt})" for role, prompt in columns], rows)


def decode_table(measurements: list[dict]) -> str:
    """Per (context, batch): each model's prefill time, decode speed, peak memory and cache size, and ratios."""
    by_key = {(m["model"], m["context_length"], m.get("batch", 1)): m for m in measurements}
    roles = [role for role in MODELS if any(m["model"] == role for m in measurements)]
    cases = sorted({(m["context_length"], m.get("batch", 1)) for m in measurements})
    header = ["context", "batch"]
    for role in roles:
        header += [f"{role} prefill s", f"{role} decode tok/s", f"{role} peak mem", f"{role} cache"]
    both = len(roles) == 2
    if both:
        header += ["prefill speedup", "decode speedup", "cache ratio"]
    rows = []
    for length, batch in cases:
        row = [str(length), str(batch)]
        for role in roles:
            m = by_key[(role, length, batch)]
            row += [f"{m['prefill_seconds']:.2f}", f"{m['decode_tokens_per_second']:.1f}",
                    _bytes(m["peak_memory_bytes"]), _bytes(m["cache_bytes"])]
        if both:
            teacher, student = by_key[("teacher", length, batch)], by_key[("student", length, batch)]
            row += [
                f"{teacher['prefill_seconds'] / student['prefill_seconds']:.2f}×",
                f"{student['decode_tokens_per_second'] / teacher['decode_tokens_per_second']:.2f}×",
                f"{student['cache_bytes'] / teacher['cache_bytes']:.3f}×",
            ]
        rows.append(row)
    return markdown_table(header, rows)


def fork_table(forks: list[dict]) -> str:
    """The fork case: wall time of N samples from one prompt per model, and the speed-up."""
    by_role = {f["model"]: f for f in forks}
    header = ["prompt", "samples × new tokens"] + [f"{role} s" for role in MODELS if role in by_role]
    first = forks[0]
    row = [str(first["prompt_length"]), f"{first['samples']} × {first['new_tokens']}"]
    row += [f"{by_role[role]['seconds']:.2f}" for role in MODELS if role in by_role]
    if "teacher" in by_role and "student" in by_role:
        header.append("speedup")
        row.append(f"{by_role['teacher']['seconds'] / by_role['student']['seconds']:.2f}×")
    return markdown_table(header, [row])


def sampling_tables(sampling: dict) -> str:
    """Per task: coverage and majority vote at each k and the seconds they cost, per model; then the
    power-law fits and where the coverage-vs-seconds curves cross."""
    sections = []
    for task, per_role in sampling["tasks"].items():
        roles = [role for role in MODELS if role in per_role]
        header = ["k"] + [f"{role} {column}" for role in roles for column in ("coverage", "majority", "seconds")]
        by_k = {role: {p["k"]: p for p in per_role[role]["points"]} for role in roles}
        rows = [
            [str(k)] + [cell for role in roles for cell in (
                _number(by_k[role][k]["coverage"], 3), _number(by_k[role][k]["majority"], 3),
                f"{by_k[role][k]['seconds']:.1f}")]
            for k in sorted(by_k[roles[0]])
        ]
        first = per_role[roles[0]]
        lines = [f"**{task}**: {first['problems']} problems, {first['samples']} samples each.", "",
                 markdown_table(header, rows), ""]
        fits = []
        for role in roles:
            fit, result = per_role[role]["fit"], per_role[role]
            fits.append([role, "–" if fit is None else f"{fit['a']:.3f}", "–" if fit is None else f"{fit['b']:.3f}",
                         "–" if fit is None else f"{fit['rmse']:.4f}", f"{result['seconds']:.1f}", str(result["tokens"]),
                         _number(result["samples_per_second"], 2)])
        lines += [markdown_table(["model", "fit a", "fit b", "fit rmse", "seconds", "tokens", "samples/s"], fits)]
        if "crossing" in per_role:
            lines += ["", crossing_sentence(per_role["crossing"])]
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def crossing_sentence(crossing: dict) -> str:
    """Plain words for where the student's coverage-vs-seconds curve meets the teacher's."""
    if crossing["range"] is None:
        return "The two curves share no range of seconds, so they cannot be compared at equal cost."
    lo, hi = crossing["range"]
    span = f"between {lo:.1f} s and {hi:.1f} s"
    if not crossing["crossings"]:
        leader = crossing["leader"][0]
        if leader == "tie":
            return f"At equal seconds ({span}) the two curves coincide."
        return f"The curves do not cross: at equal seconds ({span}) the {leader} covers more problems throughout."
    points = ", ".join(f"{s:.1f} s" for s in crossing["crossings"])
    order = " then ".join(crossing["leader"])
    return f"At equal seconds ({span}) the curves cross at {points}; ahead: {order}."


def frontier_table(points: list[dict]) -> str:
    """One row per configuration: decode state at the frontier's context, its ratio to the teacher's
    KV cache, and passkey (per length and mean) and MQAR (mean) accuracy, sorted by state size."""
    teacher = next((p for p in points if p["label"] == "teacher"), None)
    lengths = sorted({q["length"] for p in points for q in p["curves"]["passkey"]["plain"]})
    rows = []
    for point in sorted(points, key=lambda p: p["state_bytes"]):
        passkey = {q["length"]: q["accuracy"] for q in point["curves"]["passkey"]["plain"]}
        ratio = "–" if teacher is None else f"{point['state_bytes'] / teacher['state_bytes']:.3f}×"
        rows.append([point["label"], _bytes(point["state_bytes"]), ratio,
                     *[_number(passkey.get(length), 2) for length in lengths],
                     _number(point["passkey"], 3), _number(point["mqar"], 3)])
    context = points[0]["state_context"] if points else 0
    return markdown_table(
        ["configuration", f"state at {context} tokens", "vs teacher KV",
         *[f"passkey {length}" for length in lengths], "passkey mean", "MQAR mean"], rows)
