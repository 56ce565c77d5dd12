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

Searches (``mode``):

- "two_pointer", M = 2: the staircase walk, exact, ≤ D_0 + D_1 evaluations; M = 1: bisection,
  exact, ≤ ⌈log2 D⌉ + 1 evaluations.
- "coordinate", any M ≥ 1 (for more than two modalities, where an exact search must visit a
  whole (M - 1)-dimensional frontier, O(D^(M-1)) points): coordinate-wise frontier steps. Start
  at the largest thresholds; for each pair of axes (a, b) in turn, hold the other τ fixed and
  move to the best point of that 2-D slice, found exactly by the staircase walk (≤ D_a + D_b
  evaluations); repeat rounds over all pairs until a round moves nowhere. The point only moves to
  better-ranked points, so the search ends, at a *pairwise optimum*: no point that differs from
  it in at most two τ ranks before it. For M ≤ 2 that is the exact optimum. Cost: about
  R · (M - 1) · Σ D_m evaluations for R rounds (the last round only re-reads the cache for
  slices whose fixed τ did not change).
- "brute_force": all Π D_m points, for verification.
- "auto" (default): "two_pointer" for M ≤ 2, "coordinate" for more.

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
MODES = ("auto", "two_pointer", "coordinate", "brute_force")


@dataclass(frozen=True)
class Evaluation:
    """One evaluated grid point: thresholds (one per axis), KL (nats per answer token), skip ratio."""

    taus: Taus
    kl: float
    skip: float


def kl_at_skip(evaluated: Sequence[Evaluation], skip: float) -> float:
    """KL (nats per answer token) of the evaluated points' lower frontier at exactly ``skip``:
    the frontier is the points no other point beats on both axes (more skip for no more KL),
    read by linear interpolation between the two frontier points around ``skip``; ``inf`` when
    no point reaches it; a point at exactly ``skip`` gives its own KL. Compares searches that
    landed at different skips (one per tempering γ) at the same skip, where their best points
    alone would favour the one that skipped less."""
    reach = [e for e in evaluated if e.skip >= skip]
    if not reach:
        return math.inf
    above = min(reach, key=lambda e: (e.kl, e.skip))
    below = [e for e in evaluated if e.skip < skip and e.kl < above.kl]
    if not below:
        return above.kl
    # the frontier point just below: the highest skip among those cheaper than ``above``
    under = max(below, key=lambda e: (e.skip, -e.kl))
    share = (skip - under.skip) / (above.skip - under.skip)
    return under.kl + share * (above.kl - under.kl)


@dataclass
class FrontierResult:
    """Outcome of the search for one target skip ratio.

    Attributes:
        target: the target skip ratio ρ, in (0, 1).
        best: the lowest-KL grid point with skip ≥ target (ties: lower skip, then smaller τ);
            for "coordinate" on more than two axes, a pairwise optimum (see the module
            docstring); None when the target is unreachable.
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
    mode: str = "auto",
) -> FrontierResult | list[FrontierResult]:
    """Lowest-KL thresholds reaching each target skip ratio.

    Args:
        evaluate: ``evaluate(taus) -> (kl, skip)`` with ``taus`` a tuple of M floats (one per
            axis, in ``grids`` order); KL finite, skip in [0, 1]. Called at most once per point.
        grids: M ascending τ grids, e.g. [text τ, vision τ]; each non-empty, strictly
            ascending, values finite or +inf. Any M ≥ 1 (two_pointer: M ≤ 2).
        targets: one target skip ratio in (0, 1), or a sequence of them (sharing evaluations).
        cache: dict τ tuple -> (kl, skip), read and filled in place; None for a private one.
        mode: "auto", "two_pointer", "coordinate" or "brute_force" (see the module docstring:
            exact for M ≤ 2; "coordinate" returns a pairwise optimum for M > 2).

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
    """Feasible points of the two-axis walk over the whole grid; they include the optimum."""
    if not _reachable(lookup, axes, target):
        return []
    return _slice_staircase(lookup, axes, target, [len(axis) - 1 for axis in axes], 0, 1)


def _slice_staircase(lookup: _Lookup, axes: list[list[float]], target: float, at: list[int], a: int, b: int) -> list[Evaluation]:
    """Feasible points of the staircase walk over axes ``a`` < ``b``, the other axes held at the
    grid indices ``at``; they include the optimum of that slice. The slice's largest point
    (``a`` and ``b`` at their last index) must be feasible.

    For index i on axis a the smallest feasible index j*(i) on axis b is non-increasing in i,
    and the optimum is some (i, j*(i)) with j*(i) < j*(i - 1) (any other feasible point ranks
    after one of those). Start at (0, last); a feasible point lowers j, an infeasible one moves
    to the next i, so the walk visits every such corner in at most D_a + D_b - 1 lookups.
    """
    point_at = list(at)
    i, j = 0, len(axes[b]) - 1
    feasible = []
    while i < len(axes[a]) and j >= 0:
        point_at[a], point_at[b] = i, j
        point = lookup(tuple(axis[k] for axis, k in zip(axes, point_at)))
        if point.skip >= target:
            feasible.append(point)
            j -= 1
        else:
            i += 1
    return feasible


def _coordinate(lookup: _Lookup, axes: list[list[float]], target: float) -> list[Evaluation]:
    """Feasible points of the coordinate-wise frontier steps (module docstring); the best of
    them is a pairwise optimum, the exact optimum for M ≤ 2."""
    if len(axes) == 1:
        return _bisect(lookup, axes, target)
    if not _reachable(lookup, axes, target):
        return []
    at = [len(axis) - 1 for axis in axes]
    best = lookup(_top(axes))
    visited = [best]
    moved = True
    while moved:
        moved = False
        for a, b in itertools.combinations(range(len(axes)), 2):
            found = _slice_staircase(lookup, axes, target, at, a, b)
            visited += found
            step = min(found, key=_rank)
            if _rank(step) < _rank(best):
                best, moved = step, True
                at = [axis.index(tau) for axis, tau in zip(axes, step.taus)]
    return visited


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


def search_mode(mode: str, num_axes: int) -> str:
    """The search ``mode`` runs on ``num_axes`` τ axes ("auto" resolved); ValueError for an
    unknown mode, NotImplementedError for "two_pointer" on more than 2 axes."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "two_pointer" if num_axes <= 2 else "coordinate"
    if mode == "two_pointer" and num_axes > 2:
        raise NotImplementedError(
            f"two_pointer search supports 1 or 2 τ axes, got {num_axes}; use mode=\"coordinate\" "
            '(coordinate-wise frontier steps, a pairwise optimum) or "brute_force" (every grid point)'
        )
    return mode


def _search_function(mode: str, num_axes: int) -> Search:
    mode = search_mode(mode, num_axes)
    searches = {"brute_force": _every_point, "coordinate": _coordinate}
    return searches.get(mode, _bisect if num_axes == 1 else _staircase)


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
