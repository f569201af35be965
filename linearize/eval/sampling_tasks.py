"""Verifiable tasks for repeated sampling: a prompt per problem, its answer, and answer extraction.

* ``gsm8k``: the GSM8K test set (Cobbe et al. 2021, arXiv 2110.14168), vendored in
  ``tasks/data/gsm8k``, with the first ``shots`` train problems as the few-shot prompt (their
  ``<<calc>>`` annotations removed). A completion is right when the number it ends on (after
  ``####``, after "the answer is", else its last number) equals the reference number.
* ``arithmetic``: synthetic sums of two ``digits``-digit numbers, few-shot, one line per sum; a
  completion is right when its first number is the sum. A 135M model solves some, not all, so
  coverage curves over k are informative at that size.

Numbers compare after normalisation: thousands separators, ``$``, trailing zeros and units drop
(``$1,000.00 dollars`` -> ``1000``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from linearize.errors import UserError

GSM8K_DATA = Path(__file__).resolve().parent / "tasks" / "data" / "gsm8k"
# Thousands groups first, so "1,000" is one number and "3, 4" two.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_CALCULATOR = re.compile(r"<<[^>]*>>")


@dataclass(frozen=True)
class Problem:
    """One verifiable problem: ``key`` names it across runs, ``answer`` is a normalised number."""

    key: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class SamplingTask:
    """A task: its problems (``limit`` of them, or the default count), when a completion stops,
    how to read its answer, and how many new tokens a completion may take by default."""

    name: str
    problems: Callable[[int | None, int], list[Problem]]  # (limit, seed) -> problems
    extract: Callable[[str], str | None]
    stop_strings: tuple[str, ...]
    max_new_tokens: int


def normalize_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``, ``"18.00"`` -> ``"18"``; None when ``text`` holds no number."""
    match = _NUMBER.search(text.replace("$", ""))
    if match is None:
        return None
    try:
        value = Decimal(match.group().replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    return [match.group() for match in _NUMBER.finditer(text.replace("$", ""))]


def gsm8k_reference(solution: str) -> str:
    """The reference number of a GSM8K solution: what follows its ``####``."""
    answer = normalize_number(solution.rsplit("####", 1)[-1])
    if answer is None:
        raise ValueError(f"GSM8K solution without a final number: {solution[-80:]!r}")
    return answer


def extract_gsm8k(completion: str) -> str | None:
    """The number a GSM8K completion answers: after ``####``, else after "the answer is", else its last."""
    if "####" in completion:
        return normalize_number(completion.split("####", 1)[1])
    lowered = completion.lower()
    if "answer is" in lowered:
        found = normalize_number(completion[lowered.rindex("answer is"):])
        if found is not None:
            return found
    numbers = _numbers(completion)
    return normalize_number(numbers[-1]) if numbers else None


def _gsm8k_rows(name: str) -> list[dict]:
    with open(GSM8K_DATA / name, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


GSM8K_SHOTS = 5  # lm-eval's default for its gsm8k task


def _gsm8k_example(question: str, solution: str | None) -> str:
    if solution is None:
        return f"Question: {question}\nAnswer:"
    reasoning, _, final = _CALCULATOR.sub("", solution).rpartition("####")
    return f"Question: {question}\nAnswer: {reasoning.strip()}\n#### {final.strip()}"


def gsm8k_problems(limit: int | None, seed: int, shots: int = GSM8K_SHOTS) -> list[Problem]:
    """The first ``limit`` GSM8K test problems (all 1319 by default) behind ``shots`` train examples.
    The test order is the file's, so a larger limit extends a smaller one; ``seed`` is unused."""
    examples = _gsm8k_rows("gsm8k_train_fewshot.jsonl")[:shots]
    header = "".join(_gsm8k_example(row["question"], row["answer"]) + "\n\n" for row in examples)
    rows = _gsm8k_rows("gsm8k_test.jsonl")[:limit]
    return [
        Problem(f"gsm8k/{index}", header + _gsm8k_example(row["question"], None), gsm8k_reference(row["answer"]))
        for index, row in enumerate(rows)
    ]


ARITHMETIC_DIGITS = 2
ARITHMETIC_SHOTS = 4
ARITHMETIC_PROBLEMS = 100


def arithmetic_problems(limit: int | None, seed: int, digits: int = ARITHMETIC_DIGITS) -> list[Problem]:
    """``limit`` (default 100) sums of two ``digits``-digit numbers, after four worked sums; problem
    i is the same for every limit and depends only on ``seed``."""
    low, high = 10 ** (digits - 1), 10**digits - 1
    shot_rng = random.Random(f"arithmetic-shots/{seed}")
    shots = [(shot_rng.randint(low, high), shot_rng.randint(low, high)) for _ in range(ARITHMETIC_SHOTS)]
    header = "".join(f"{a} + {b} = {a + b}\n" for a, b in shots)
    problems = []
    for index in range(ARITHMETIC_PROBLEMS if limit is None else limit):
        rng = random.Random(f"arithmetic/{seed}/{index}")
        a, b = rng.randint(low, high), rng.randint(low, high)
        problems.append(Problem(f"arithmetic/{index}", f"{header}{a} + {b} =", str(a + b)))
    return problems


TASKS: dict[str, SamplingTask] = {
    "gsm8k": SamplingTask("gsm8k", gsm8k_problems, extract_gsm8k, ("\n\n", "Question:"), 192),
    "arithmetic": SamplingTask("arithmetic", arithmetic_problems, normalize_number, ("\n",), 8),
}


def sampling_task(name: str) -> SamplingTask:
    if name not in TASKS:
        raise UserError(f"unknown sampling task {name!r}. Fix: use one of {', '.join(TASKS)}")
    return TASKS[name]
