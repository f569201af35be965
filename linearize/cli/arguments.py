"""argparse types shared by the subcommands."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated integers such as ``0,5,11``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,5,11, got {text!r}") from None


def float_list(text: str) -> list[float]:
    """argparse type for comma-separated numbers such as ``0,0.5,1``."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,0.5,1, got {text!r}") from None


def limit_spec(text: str) -> tuple[int | None, dict[str, int]]:
    """argparse type for ``--limit``: ``N``, ``task=N`` or both, comma-separated (``200,linearize_wikitext=4``)."""
    default, per_task = None, {}
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            task, _, count = part.rpartition("=")
            value = int(count)
            if value < 1:
                raise ValueError
            if task:
                per_task[task] = value
            else:
                default = value
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive count and/or task=count pairs like 200,linearize_wikitext=4, got {text!r}"
        ) from None
    return default, per_task
