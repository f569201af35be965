"""PNG plots of recall curves and decode speed/memory, teacher against student."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from linearize.eval.tables import MODELS  # noqa: E402

STYLE = {"teacher": {"color": "tab:blue"}, "student": {"color": "tab:orange"}}


def plot_recall(recall: dict[str, dict], path: Path) -> Path:
    """Accuracy vs length, one panel per test (MQAR, passkey); JRT-Prompt curves dashed."""
    tests = ["mqar", "passkey"]
    figure, axes = plt.subplots(1, len(tests), figsize=(10, 4))
    for axis, test in zip(axes, tests):
        for role in MODELS:
            for prompt, points in recall.get(role, {}).get(test, {}).items():
                counts = sorted({p.get("pairs") or 0 for p in points})
                for marker, pairs in zip("os^vDP*X" * len(counts), counts):  # one line per MQAR pair count
                    line = [p for p in points if (p.get("pairs") or 0) == pairs]
                    label = f"{role} ({prompt}{f', {pairs} pairs' if pairs else ''})"
                    axis.plot([p["length"] for p in line], [p["accuracy"] for p in line], marker=marker,
                              linestyle="--" if prompt == "jrt" else "-", label=label, **STYLE[role])
        axis.set(title="MQAR" if test == "mqar" else "passkey", xlabel="sequence length (tokens)",
                 ylabel="accuracy", ylim=(-0.05, 1.05))
        _length_axis(axis, [p["length"] for curves in recall.values() for points in curves.get(test, {}).values()
                            for p in points])
        axis.legend()
    return _save(figure, path)


def plot_decode(measurements: list[dict], path: Path) -> Path:
    """Panels vs context length at batch 1: prefill seconds, decode tokens/s, peak memory, cache size,
    plus decode tokens/s vs batch size when several were measured; the student/teacher ratio is
    written at each student point."""
    panels = [
        ("prefill_seconds", "prefill time (s)", 1), ("decode_tokens_per_second", "decode tokens/s", 1),
        ("peak_memory_bytes", "peak memory (MiB)", 2**20), ("cache_bytes", "cache (MiB)", 2**20),
    ]
    single = [m for m in measurements if m.get("batch", 1) == 1]
    batched = sorted({m["context_length"] for m in measurements if m.get("batch", 1) > 1})
    figure, axes = plt.subplots(1, len(panels) + bool(batched), figsize=(18 + 4.5 * bool(batched), 4))
    for axis, (field, label, scale) in zip(axes, panels):
        _ratio_lines(axis, single, "context_length", field, scale)
        axis.set(title=label, xlabel="context length (tokens)")
        _length_axis(axis, [m["context_length"] for m in single])
        axis.legend()
    if batched:
        axis = axes[-1]
        chosen = [m for m in measurements if m["context_length"] == batched[0]]
        _ratio_lines(axis, chosen, "batch", "decode_tokens_per_second", 1)
        axis.set(title=f"decode tokens/s at {batched[0]} context", xlabel="batch size")
        _length_axis(axis, [m["batch"] for m in chosen])
        axis.legend()
    figure.suptitle("student / teacher ratios annotated")
    return _save(figure, path)


def _ratio_lines(axis, measurements: list[dict], x: str, field: str, scale: float) -> None:
    """One line per model of ``field`` against ``x``, each student point annotated with its ratio."""
    by_key = {(m["model"], m[x]): m for m in measurements}
    for role in MODELS:
        points = sorted((m[x], m[field] / scale) for m in measurements if m["model"] == role)
        if not points:
            continue
        axis.plot(*zip(*points), marker="o", label=role, **STYLE[role])
        if role == "student":
            for at, value in points:
                teacher = by_key.get(("teacher", at))
                if teacher and teacher[field]:
                    axis.annotate(f"{value * scale / teacher[field]:.2f}×", (at, value), fontsize=7,
                                  textcoords="offset points", xytext=(0, 6), ha="center")


def _length_axis(axis, lengths: list[int]) -> None:
    """Log-2 x axis labelled with the measured lengths themselves (lengths usually double)."""
    axis.set_xscale("log", base=2)
    ticks = sorted(set(lengths))
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.minorticks_off()


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_sampling(sampling: dict, by_k: Path, by_seconds: Path) -> tuple[Path, Path]:
    """Two figures, one panel per task: coverage (solid; fitted power law dotted) and majority vote
    (dashed) against k; coverage against wall-clock seconds, teacher and student on the same axes."""
    tasks = list(sampling["tasks"])
    paths = []
    for x, path in (("k", by_k), ("seconds", by_seconds)):
        figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
        for axis, task in zip(axes[0], tasks):
            for role in MODELS:
                result = sampling["tasks"][task].get(role)
                if result is None:
                    continue
                points = result["points"]
                xs = [p[x] for p in points]
                axis.plot(xs, [p["coverage"] for p in points], marker="o", label=f"{role} coverage", **STYLE[role])
                if x == "k":
                    axis.plot(xs, [p["majority"] for p in points], linestyle="--", marker=".",
                              label=f"{role} majority vote", **STYLE[role])
                    if result["fit"]:
                        a, b = result["fit"]["a"], result["fit"]["b"]
                        axis.plot(xs, [math.exp(a * k**b) for k in xs], linestyle=":", **STYLE[role])
            axis.set(title=task, xlabel="samples per problem (k)" if x == "k" else "wall-clock seconds (all problems)",
                     ylabel="fraction of problems", ylim=(-0.02, 1.02))
            if x == "k":
                _length_axis(axis, [p["k"] for role in MODELS if role in sampling["tasks"][task]
                                    for p in sampling["tasks"][task][role]["points"]])
            else:
                axis.set_xscale("log")
            axis.legend(fontsize=7)
        figure.suptitle("repeated sampling: coverage@k" + (" and majority vote@k (dotted: power-law fit)"
                                                           if x == "k" else " at equal wall-clock cost"))
        paths.append(_save(figure, path))
    return paths[0], paths[1]


def plot_frontier(points: list[dict], path: Path) -> Path:
    """Recall against decode-state bytes (log x), one labelled point per configuration: passkey and
    MQAR panels, the teacher in its own colour (BASED's recall-memory figure, for converted models)."""
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, test, title in zip(axes, ("passkey", "mqar"), ("passkey (mean over lengths)", "MQAR (mean)")):
        for point in points:
            style = STYLE["teacher" if point["label"] == "teacher" else "student"]
            mib = point["state_bytes"] / 2**20
            axis.scatter([mib], [point[test]], **style)
            axis.annotate(point["label"].removeprefix("student "), (mib, point[test]), fontsize=7,
                          xytext=(4, 4), textcoords="offset points")
        context = points[0]["state_context"] if points else 0
        axis.set(title=title, xlabel=f"decode state at {context} tokens (MiB, log)", ylabel="accuracy",
                 ylim=(-0.05, 1.05), xscale="log")
    figure.suptitle("recall vs state size")
    return _save(figure, path)
