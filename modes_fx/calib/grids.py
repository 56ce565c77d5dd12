"""Threshold grids for the frontier search: the D candidate τ values of one modality.

Default ("scores", ``score_grid``): the grid follows the calibration data's own scores
s = α[l, m] · π of the column's routed pairs, observed in the unskipped reference pass. τ_0 = 0
skips nothing; τ_1 … τ_(D-2) are the scores at ranks ⌈k · n / (D − 1)⌉ (k = 1 … D − 2, n scores
in ascending order), so on the reference pass τ_k skips about k / (D − 1) of the column's pairs;
the last τ is just above max_l α[l, m], which skips every pair whatever the routing (π ≤ 1).
Every skip ratio in (0, 1) is therefore reachable on any depth, and adjacent points differ by
about 1 / (D − 1) of the column's pairs (repeated scores, e.g. α = 0 layers, merge points, so a
grid may hold fewer than D values).

The paper's grid ("exp"): MoDES maps D evenly spaced x ∈ [0, x_max] through τ = 2 / (1 + exp(-10 (x - 1))) ("exp"
mapping), which puts most grid points at small τ where the skip ratio changes fastest. The paper
uses D = 100, x_max = 0.71 for text and 0.6 for vision tokens. A "linear" grid spaces τ evenly
on [0, tau_max] instead.
"""
from __future__ import annotations

import math
import numbers

import torch

PAPER_POINTS = 100
PAPER_X_MAX = {"text": 0.71, "vision": 0.6}
MAPPINGS = ("scores", "exp", "linear")
FIXED_MAPPINGS = ("exp", "linear")  # grids that do not depend on the calibration data
TOP_MARGIN = 1e-6  # the last "scores" τ is max_l α[l, m] · (1 + TOP_MARGIN): above every α · π


def exp_tau(x: float) -> float:
    """The paper's map from a grid coordinate x to a threshold: τ = 2 / (1 + exp(-10 (x - 1)))."""
    return 2.0 / (1.0 + math.exp(-10.0 * (x - 1.0)))


def exp_x(tau: float) -> float:
    """Inverse of ``exp_tau`` for τ in (0, 2): the grid coordinate x with exp_tau(x) = τ."""
    return 1.0 - math.log(2.0 / tau - 1.0) / 10.0


def tau_grid(
    points: int = PAPER_POINTS,
    mapping: str = "exp",
    x_max: float = PAPER_X_MAX["text"],
    tau_max: float | None = None,
) -> list[float]:
    """Strictly ascending thresholds τ, ``points`` of them (unitless, compared with α · π).

    Args:
        points: grid size D, an integer ≥ 2.
        mapping: "exp": τ_k = exp_tau(x_k), x_k = k · x_max / (D - 1); the first value is
            exp_tau(0) ≈ 9.1e-5. "linear": τ_k = k · tau_max / (D - 1), from exactly 0.
        x_max: finite, > 0; the end of the x range ("exp"), and by default of the τ range
            ("linear": tau_max = exp_tau(x_max), the same span as the exp grid).
        tau_max: finite, > 0; only for "linear".

    Raises ValueError for points < 2, an unknown mapping, a non-finite or non-positive range,
    tau_max given with "exp", or an x_max so large that exp_tau saturates (repeated values).
    """
    if isinstance(points, bool) or not isinstance(points, numbers.Integral) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    if mapping not in FIXED_MAPPINGS:
        if mapping == "scores":
            raise ValueError('the "scores" grid follows the calibration data: use score_grid(scores, points, top)')
        raise ValueError(f"unknown mapping {mapping!r}; expected one of {', '.join(MAPPINGS)}")
    _check_positive("x_max", x_max)
    steps = range(points)
    if mapping == "exp":
        if tau_max is not None:
            raise ValueError('tau_max applies to the "linear" mapping; the "exp" range is set by x_max')
        grid = [exp_tau(x_max * k / (points - 1)) for k in steps]
    else:
        top = exp_tau(x_max) if tau_max is None else tau_max
        _check_positive("tau_max", top)
        grid = [top * k / (points - 1) for k in steps]
    if any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"{points} points up to x_max={x_max} repeat τ values (τ saturates at 2); use a smaller x_max")
    return grid


def score_grid(scores: torch.Tensor, points: int, top: float) -> list[float]:
    """The "scores" grid (module docstring): strictly ascending τ, at most ``points`` of them.

    Args:
        scores: float 1-D, the column's observed scores α[l, m] · π (every layer; any order);
            may be empty (then the grid is [0, top]).
        points: grid size D, an integer ≥ 2.
        top: finite, > 0, a τ that skips every pair (``top_tau``); the last value.
    """
    if isinstance(points, bool) or not isinstance(points, numbers.Integral) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    _check_positive("top", top)
    ordered = torch.sort(scores.detach().flatten().to(torch.float64).cpu()).values
    n = ordered.numel()
    middle = []
    if n:
        ranks = [min(n - 1, math.ceil(k * n / (points - 1))) for k in range(1, points - 1)]
        middle = ordered[torch.tensor(ranks, dtype=torch.long)].tolist() if ranks else []
    grid = [0.0]
    for tau in middle + [top]:
        if tau > grid[-1] and tau <= top:
            grid.append(float(tau))
    return grid


def top_tau(alpha_column: list[float]) -> float:
    """A τ above α[l, m] · π for every layer l and every π ≤ 1 (softmax and sigmoid routing
    weights, renormalised or not): max_l α[l, m] · (1 + TOP_MARGIN); 1.0 when every α is 0."""
    largest = max(alpha_column, default=0.0)
    return largest * (1.0 + TOP_MARGIN) if largest > 0 else 1.0


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
