"""Does calibration KL rank schedules the way test accuracy does?

Calibration picks, among schedules at the same skip ratio, the one with the lowest KL on the
calibration split; that is only as good as KL's agreement with what users measure, test accuracy.
For schedules tuned to one target skip ratio (one per method), :func:`agreement` compares the
two orders: Kendall's τ-b between −KL and accuracy (1: KL orders them exactly as accuracy does),
the pairs whose lower-KL schedule is less accurate (discordant), and of those the pairs whose
accuracy gap is larger than the test set's sampling noise (decisive: a real disagreement, not a
coin flip of the test questions).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Agreement:
    """Calibration KL (nats / answer token) against test accuracy (fraction) for ``schedules``
    schedules at one target skip ratio."""

    target: float
    schedules: int
    kendall_tau: float  # τ-b of (−KL, accuracy) in [−1, 1]; nan when either is constant
    pairs: int  # pairs with distinct KL and distinct accuracy
    discordant: int  # of those, pairs whose lower-KL schedule is less accurate
    decisive: int  # discordant pairs whose accuracy gap exceeds ``noise``
    noise: float  # accuracy gap (fraction) below which a difference is test-set sampling noise


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b of two equally long sequences (ties corrected); nan when either has no two
    distinct values."""
    if len(x) != len(y):
        raise ValueError(f"sequences of different lengths: {len(x)} and {len(y)}")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else math.nan


def sampling_noise(accuracy: float, questions: int) -> float:
    """Two standard errors of the difference between two accuracies near ``accuracy`` measured on
    the same ``questions`` test questions, taken as independent binomials (conservative: the
    schedules answer the same questions, so their errors are correlated)."""
    return 2 * math.sqrt(2 * accuracy * (1 - accuracy) / questions)


def paired_noise(hits_a: Sequence[bool], hits_b: Sequence[bool]) -> float:
    """Two standard errors of the accuracy gap between two schedules that answered the same
    questions (``hits_*``: correct or not, per question, same order): the standard error of the
    mean of the per-question differences (−1, 0, 1). Questions both answer alike do not count
    as noise, so this is the right yardstick for comparing two methods on one test split;
    0 when they agree on every question."""
    if len(hits_a) != len(hits_b) or len(hits_a) < 2:
        raise ValueError(f"need two equally long answer lists of ≥ 2 questions, got {len(hits_a)} and {len(hits_b)}")
    n = len(hits_a)
    diffs = [int(a) - int(b) for a, b in zip(hits_a, hits_b)]
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return 2 * math.sqrt(variance / n)


def agreement(target: float, kl: Sequence[float], accuracy: Sequence[float], noise: float) -> Agreement:
    """:class:`Agreement` of schedules with calibration ``kl`` and test ``accuracy`` (same order)."""
    pairs = discordant = decisive = 0
    for i in range(len(kl)):
        for j in range(i + 1, len(kl)):
            if kl[i] == kl[j] or accuracy[i] == accuracy[j]:
                continue
            pairs += 1
            lower, higher = (i, j) if kl[i] < kl[j] else (j, i)
            gap = accuracy[higher] - accuracy[lower]
            if gap > 0:
                discordant += 1
                decisive += gap > noise
    tau = kendall_tau_b([-k for k in kl], list(accuracy))
    return Agreement(target, len(kl), tau, pairs, discordant, decisive, noise)
