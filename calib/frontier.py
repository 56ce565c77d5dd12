"""Frontier search: the per-modality thresholds τ with the lowest KL that reach a skip ratio.

Model-agnostic: the search only calls ``evaluate(taus) -> (kl, skip)``, one expensive pass of a
model over the calibration data with thresholds ``taus`` (one per modality axis). KL (the
divergence from the unskipped model on answer tokens, ≥ 0) and skip (skipped / routed pairs,
in [0, 1]) are both assumed non-decreasing in every τ.

Objective, per target ρ: minimise KL subject to skip ≥ ρ over the grid points. Ties are broken
by the lower skip ratio, then the lexicographically smaller τ tuple: with that order the optimum
is always the first feasible point of its row, so the O(D) walk provably returns the same point
as the O(D^M) brute force (a "higher skip wins" order could pick an interior point of a KL
plateau that the walk never evaluates).

Every evaluation goes through ``cache``: a dict keyed by the τ tuple (Python floats, the grid
values themselves) holding ``(kl, skip)``. Persist it (e.g. JSON lists of
``[list(key), list(value)]``; floats round-trip exactly) and pass it back to resume.
"""
from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass

Taus = tuple[float, ...]
Evaluate = Callable[[Taus], tuple[float, float]]
Search = Callable[["_Lookup", list[list[float]], float], list["Evaluation"]]
MODES = ("two_pointer", "brute_force")


@dataclass(frozen=True)
class Evaluation:
    """One evaluated grid point: thresholds (one per axis), KL (nats per answer token), skip ratio."""

    taus: Taus
    kl: float
    skip: float


@dataclass
class FrontierResult:
    """Outcome of the search for one target skip ratio.

    Attributes:
        target: the target skip ratio ρ, in (0, 1).
        best: the lowest-KL grid point with skip ≥ target (ties: lower skip, then smaller τ),
            or None when the target is unreachable.
        feasible: whether some grid point reaches the target (``best is not None``).
        evaluated: every point looked up during the call, for all targets of the call, in
            lookup order (the KL-vs-skip frontier to plot); shared by the results of one call.
        message: one line describing the outcome; for an unreachable target, why and what to do.
    """

    target: float
    best: Evaluation | None
    feasible: bool
    evaluated: list[Evaluation]
    message: str


def frontier_search(
    evaluate: Evaluate,
    grids: Sequence[Sequence[float]],
    targets: float | Sequence[float],
    cache: MutableMapping[Taus, tuple[float, float]] | None = None,
    mode: str = "two_pointer",
) -> FrontierResult | list[FrontierResult]:
    """Lowest-KL thresholds reaching each target skip ratio.

    Args:
        evaluate: ``evaluate(taus) -> (kl, skip)`` with ``taus`` a tuple of M floats (one per
            axis, in ``grids`` order); KL finite, skip in [0, 1]. Called at most once per point.
        grids: M ascending τ grids, e.g. [text τ, vision τ]; each non-empty, strictly
            ascending, values finite or +inf. M = 1 or 2 (brute_force: any M ≥ 1).
        targets: one target skip ratio in (0, 1), or a sequence of them (sharing evaluations).
        cache: dict τ tuple -> (kl, skip), read and filled in place; None for a private one.
        mode: "two_pointer" (M = 2: staircase walk, ≤ D_0 + D_1 evaluations; M = 1: bisection,
            ≤ ⌈log2 D⌉ + 1 evaluations) or "brute_force" (all Π D_m points, for verification).

    Returns one FrontierResult for a single target, else a list in ``targets`` order.
    Raises ValueError on a bad target, grid, mode or evaluate result (naming the τ), and
    NotImplementedError for two_pointer with more than 2 axes.
    """
    target_list = _check_targets(targets)
    axes = [_check_grid(m, grid) for m, grid in enumerate(_check_axes(grids))]
    search = _search_function(mode, len(axes))
    lookup = _Lookup(evaluate, {} if cache is None else cache)
    found = [_best(lookup, axes, target, search) for target in target_list]
    evaluated = list(lookup.seen.values())
    results = [
        FrontierResult(target, best, best is not None, list(evaluated), _message(target, best, lookup, axes))
        for target, best in zip(target_list, found)
    ]
    return results[0] if isinstance(targets, numbers.Real) else results


class _Lookup:
    """Evaluations through the cache, remembering which points this call looked up."""

    def __init__(self, evaluate: Evaluate, cache: MutableMapping[Taus, tuple[float, float]]):
        self._evaluate = evaluate
        self._cache = cache
        self.seen: dict[Taus, Evaluation] = {}

    def __call__(self, taus: Taus) -> Evaluation:
        if taus not in self._cache:
            self._cache[taus] = _check_result(taus, self._evaluate(taus), "evaluate")
        point = Evaluation(taus, *_check_result(taus, self._cache[taus], "cache"))
        self.seen[taus] = point
        return point


def _best(lookup: _Lookup, axes: list[list[float]], target: float, search: Search) -> Evaluation | None:
    """The optimum among the feasible points ``search`` visits, or None if it visits none."""
    return min(search(lookup, axes, target), key=_rank, default=None)


def _rank(point: Evaluation) -> tuple:
    return (point.kl, point.skip, point.taus)


def _staircase(lookup: _Lookup, axes: list[list[float]], target: float) -> list[Evaluation]:
    """Feasible points of the two-axis walk; they include the optimum.

    For text index i the smallest feasible visual index j*(i) is non-increasing in i, and the
    optimum is some (i, j*(i)) with j*(i) < j*(i - 1) (any other feasible point ranks after one
    of those). Start at (0, last); a feasible point lowers j, an infeasible one moves to the
    next i, so the walk visits every such corner in at most D_0 + D_1 - 1 lookups (plus one for
    the largest τ pair).
    """
    text, vision = axes
    if not _reachable(lookup, axes, target):
        return []
    i, j = 0, len(vision) - 1
    feasible = []
    while i < len(text) and j >= 0:
        point = lookup((text[i], vision[j]))
        if point.skip >= target:
            feasible.append(point)
            j -= 1
        else:
            i += 1
    return feasible


def _bisect(lookup: _Lookup, axes: list[list[float]], target: float) -> list[Evaluation]:
    """Feasible points of a bisection for the first feasible τ on one axis (the optimum)."""
    (grid,) = axes
    if not _reachable(lookup, axes, target):
        return []
    low, high = 0, len(grid) - 1  # grid[high] is feasible
    while low < high:
        middle = (low + high) // 2
        if lookup((grid[middle],)).skip >= target:
            high = middle
        else:
            low = middle + 1
    return [lookup((grid[high],))]


def _reachable(lookup: _Lookup, axes: list[list[float]], target: float) -> bool:
    """Whether the largest thresholds reach the target (by monotonicity, whether any point does)."""
    return lookup(_top(axes)).skip >= target


def _top(axes: list[list[float]]) -> Taus:
    return tuple(axis[-1] for axis in axes)


def _every_point(lookup: _Lookup, axes: list[list[float]], target: float) -> list[Evaluation]:
    points = (lookup(taus) for taus in itertools.product(*axes))
    return [point for point in points if point.skip >= target]


def _search_function(mode: str, num_axes: int) -> Search:
    if mode == "brute_force":
        return _every_point
    if mode != "two_pointer":
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if num_axes > 2:
        raise NotImplementedError(
            f"two_pointer search supports 1 or 2 τ axes, got {num_axes}; "
            'use mode="brute_force" (evaluates every grid point) for more modalities'
        )
    return _bisect if num_axes == 1 else _staircase


def _message(target: float, best: Evaluation | None, lookup: _Lookup, axes: list[list[float]]) -> str:
    if best is not None:
        return f"target skip {target}: KL {best.kl:.6g} at τ={best.taus} (skip {best.skip:.4g})"
    top = lookup(_top(axes))
    return (
        f"target skip {target} is unreachable on this grid: the largest thresholds τ={top.taus} "
        f"skip only {top.skip:.4g}; extend the grid (larger x_max / tau_max) or lower the target"
    )


def _check_targets(targets) -> list[float]:
    values = [targets] if isinstance(targets, numbers.Real) else _as_list(targets)
    if not values:
        raise ValueError(f"targets must be a skip ratio in (0, 1) or a non-empty sequence of them, got {targets!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
            raise ValueError(f"target skip ratio must be in (0, 1) exclusive, got {value!r}")
    return [float(value) for value in values]


def _check_axes(grids) -> list:
    axes = _as_list(grids)
    if not axes:
        raise ValueError(f"grids must be a non-empty sequence of τ grids (one per modality), got {grids!r}")
    return axes


def _check_grid(axis: int, grid) -> list[float]:
    values = _as_list(grid)
    if not values:
        raise ValueError(f"grids[{axis}] must be a non-empty sequence of τ values, got {grid!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value == -math.inf:
            raise ValueError(f"grids[{axis}] has {value!r}; τ values must be finite or +inf")
    values = [float(value) for value in values]
    for a, b in zip(values, values[1:]):
        if b <= a:
            raise ValueError(f"grids[{axis}] must be strictly ascending, got {a!r} then {b!r}")
    return values


def _as_list(items) -> list | None:
    """``items`` as a list (sequences, numpy arrays, ...); None for a string or a non-iterable."""
    if isinstance(items, (str, bytes)):
        return None
    try:
        return list(items)
    except TypeError:
        return None


def _check_result(taus: Taus, result, source: str) -> tuple[float, float]:
    """(kl, skip) as floats; ValueError naming τ unless KL is finite and skip in [0, 1]."""
    try:
        kl, skip = (float(value) for value in result)
    except (TypeError, ValueError):
        raise ValueError(f"{source} at τ={taus} gave {result!r}; expected a pair (kl, skip) of numbers") from None
    if not math.isfinite(kl):
        raise ValueError(f"{source} at τ={taus} gave KL {kl}; KL must be finite")
    if not 0.0 <= skip <= 1.0:
        raise ValueError(f"{source} at τ={taus} gave skip ratio {skip}; expected a value in [0, 1]")
    return kl, skip
