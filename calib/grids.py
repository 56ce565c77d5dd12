"""Threshold grids for the frontier search: the D candidate τ values of one modality.

MoDES maps D evenly spaced x ∈ [0, x_max] through τ = 2 / (1 + exp(-10 (x - 1))) ("exp"
mapping), which puts most grid points at small τ where the skip ratio changes fastest. The paper
uses D = 100, x_max = 0.71 for text and 0.6 for vision tokens. A "linear" grid spaces τ evenly
on [0, tau_max] instead.
"""
from __future__ import annotations

import math
import numbers

PAPER_POINTS = 100
PAPER_X_MAX = {"text": 0.71, "vision": 0.6}
MAPPINGS = ("exp", "linear")


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
    if mapping not in MAPPINGS:
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


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
