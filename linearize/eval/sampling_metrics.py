"""Statistics of repeated sampling: coverage@k, majority vote@k, the power-law fit and curve crossings.

* Coverage@k is the chance that at least one of k samples is right. From n >= k samples of which c
  are right, the unbiased estimator is ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021, arXiv
  2107.03374), computed as a product so it never overflows.
* Large Language Monkeys (Brown et al. 2024, arXiv 2407.21787) model coverage over k by an
  exponentiated power law, ``log c = a k^b`` (a, b < 0); with ``y = log(-log c)`` it is the line
  ``y = log(-a) + b log k``, fitted by least squares on the points with 0 < c < 1.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased chance that k of ``n`` samples, ``c`` of them right, drawn without replacement hold a right one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common answer (None, an unreadable answer, never wins); ties go to the earliest."""
    counts = Counter(answer for answer in answers if answer is not None)
    return counts.most_common(1)[0][0] if counts else None


def majority_at_k(answers: Sequence[str | None], reference: str, k: int, trials: int, rng: random.Random) -> float:
    """Chance that the majority answer of k random samples of ``answers`` is ``reference``, over ``trials``
    random subsets (exact when k is all of them); subset order is random, so ties break at random."""
    if k >= len(answers):
        return float(majority_vote(answers) == reference)
    return sum(majority_vote(rng.sample(list(answers), k)) == reference for _ in range(trials)) / trials


def fit_power_law(ks: Sequence[int], coverage: Sequence[float]) -> dict | None:
    """``{"a", "b", "rmse"}`` of ``log c = a k^b`` (rmse of the fitted coverage over all points), or
    None when fewer than two points lie strictly between 0 and 1."""
    points = [(k, c) for k, c in zip(ks, coverage) if 0.0 < c < 1.0]
    if len({k for k, _ in points}) < 2:
        return None
    x = np.log([k for k, _ in points])
    y = np.log([-math.log(c) for _, c in points])
    b, intercept = np.polyfit(x, y, 1)
    a = -math.exp(intercept)
    fitted = [math.exp(a * k**b) for k in ks]
    rmse = math.sqrt(sum((f - c) ** 2 for f, c in zip(fitted, coverage)) / len(ks))
    return {"a": a, "b": float(b), "rmse": rmse}


def _interpolate(curve: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear value of ``curve`` (points sorted by x) at ``x``, on a log-x axis."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y1
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    raise ValueError(f"{x} is outside the curve")


def crossings(teacher: Sequence[tuple[float, float]], student: Sequence[tuple[float, float]]) -> dict:
    """Where two (seconds, coverage) curves cross over the seconds both cover (log-linear between points).

    Returns ``{"range": [lo, hi] or None, "crossings": [seconds, ...], "leader": [...]}`` where
    ``leader`` lists which model is ahead on each stretch between crossings ("teacher", "student"
    or "tie"), from the cheapest common budget to the dearest.
    """
    teacher, student = sorted(teacher), sorted(student)
    lo, hi = max(teacher[0][0], student[0][0]), min(teacher[-1][0], student[-1][0])
    if lo > hi:
        return {"range": None, "crossings": [], "leader": []}
    xs = sorted({lo, hi, *(x for x, _ in teacher + student if lo <= x <= hi)})
    gaps = [_interpolate(student, x) - _interpolate(teacher, x) for x in xs]
    found, leaders = [], []

    def leader(gap: float) -> str:
        return "student" if gap > 1e-12 else "teacher" if gap < -1e-12 else "tie"

    for (x0, g0), (x1, g1) in zip(zip(xs, gaps), zip(xs[1:], gaps[1:])):
        if leader(g0) != "tie" and leader(g1) != "tie" and leader(g0) != leader(g1):
            t = g0 / (g0 - g1)  # the gap is linear in log-seconds between these points
            found.append(math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0))))
    for gap in gaps:
        if leader(gap) != "tie" and (not leaders or leaders[-1] != leader(gap)):
            leaders.append(leader(gap))
    return {"range": [lo, hi], "crossings": found, "leader": leaders or ["tie"]}
