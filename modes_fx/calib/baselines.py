"""The baselines of the paper's comparison (and MoDES itself) as schedules, each tuned on the
calibration data to a measured skip ratio.

Every single-knob method is a family of schedules indexed by a knob x, the skip ratio
non-decreasing in x; tuning bisects x until the skip ratio ``track()`` measures on the
calibration batches is within ``tolerance`` of the target (or returns the closest value it
measured, with ``reached=False``). The frontier methods search τ per modality instead (below).
All methods share one ``CalibrationSession``: the model is compiled once with ``backend="modes"``
and each measurement only swaps the threshold table and rule, so every method runs through the
same op as deployment. π is the normalised top-k routing weight; L MoE layers, top-k of E.

| method | rule | per-(layer, modality) values | knob |
|---|---|---|---|
| ``top_k`` | rank | k'_lm = k − n_lm, n_lm = s // (L·M), +1 on the last s mod (L·M) cells (l-major) | s ∈ {0 … L·M(k−1)} |
| ``uniform_threshold`` | pi | α = 1, one τ | τ |
| ``dmt_without_gmlg`` | pi | α = 1/L, τ per modality (frontier search) | — |
| ``gmlg_one_threshold`` | pi | α = GMLG, one τ | τ |
| ``naee`` | ratio_to_top1 | β_l = c · median_l | c |
| ``mc_moe`` | ratio_to_top1 | β_l = c · median_l on the n least sensitive layers, 0 elsewhere | c (n: lowest KL) |
| ``modes`` | pi | α ∝ KL^γ, γ ∈ GAMMAS chosen by calibration KL, τ per modality (frontier search) | — |
| ``modes_paper`` | pi | α = GMLG (γ = 1, the paper's), τ per modality (frontier search) | — |

- median_l: median over the calibration tokens of π_j / π_top1 over the non-top-1 slots at layer
  l (NAEE's per-layer median of w2 / w1, generalised to top-k); c = 1 is NAEE's own rule.
- Layer sensitivity (``mc_moe``): the layer's GMLG ablation KLs summed over modalities. For each
  n from L down, c is tuned; the n whose tuned schedule has the lowest KL wins.
- Frontier methods: ``calibrate``'s search (lowest KL subject to skip ≥ target) restricted to
  the tolerance window: its staircase walks for the targets ρ − tolerance and ρ evaluate the
  lowest-skip feasible point of every τ_text row, and among the points they evaluated the
  lowest-KL one with |skip − ρ| ≤ tolerance wins (plain MoDES would take any skip ≥ ρ, which
  may lie far above ρ when KL is not monotone in τ). Default grids: the paper's "exp" mapping
  (nearly geometric at small τ, where the skip ratio moves fastest), D points per column up to
  τ = max_l α[l, m] (which skips everything).
- Reachable skip ratios: the rank and ratio rules never skip a token's top-1 slot, so they reach at
  most (k−1)/k; ``top_k`` moves in steps of share_m/(L·k), share_m the fraction of modality m's
  tokens (one (layer, modality) cell per step; one k per layer would move in steps of 1/(L·k),
  3.1% for the 4-layer top-8 digits model, too coarse to meet other methods within ±1%). ``Tuned.max_skip`` is the largest skip ratio
  the method reached on the calibration data.

Statistics (GMLG: 1 + L·M passes; ratio medians: 1 pass) are computed once per tuner, on first use.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from modes_fx.rules import RankRule, RatioToTop1Rule
from modes_fx.schedule import Schedule

from .calibrate import GridSpec, search_thresholds
from .data import prepare
from .frontier import kl_at_skip
from .grids import exp_x
from .importance import GAMMAS, importance_kls, normalise
from .measure import Measurement
from .session import CalibrationSession, default_modalities

_EPS = 1e-9  # float slack of the tolerance check: 0.88 - 0.875 is 0.0050000000000000044


@dataclass
class Tuned:
    """One method tuned to one target skip ratio on the calibration data.

    schedule: deployable (target_skip, measured_skip and calibration metadata filled in).
    knob: the chosen knob value (frontier methods: τ per modality); skip / by_modality: skip
    ratio measured by ``track()`` overall /
    per schedule column; kl: mean KL from the unskipped model per answer token (nats);
    reached: |skip − target| ≤ tolerance; max_skip: the largest skip ratio the method reached;
    passes: measurement passes this tuning ran (statistics passes not included); trace: the
    (knob, skip ratio) pairs the bisection measured, in order (for ``mc_moe``: of the chosen
    layer count)."""

    method: str
    target: float
    schedule: Schedule
    knob: float
    skip: float
    by_modality: dict[str, float]
    kl: float
    reached: bool
    max_skip: float
    passes: int
    trace: list[tuple[float | tuple[float, ...], float]]


@dataclass(frozen=True)
class Knob:
    """A family of schedules: ``schedule(x)`` for x in [low, high], skip ratio non-decreasing in x;
    ``integer``: x takes integer values only."""

    schedule: Callable[[float], Schedule]
    low: float
    high: float
    integer: bool = False


@dataclass
class KnobSearch:
    """Outcome of a tuning: the chosen knob value, its schedule and measurement, the largest skip
    ratio measured (the knob's high end), and every (knob, skip ratio) measured, in order."""

    knob: float | tuple[float, ...]
    schedule: Schedule
    measurement: Measurement
    max_skip: float
    trace: list[tuple[float | tuple[float, ...], float]]


class BaselineTuner:
    """Tunes the methods of ``METHODS`` on one model and calibration set (context manager: the
    model is compiled once on entry and restored on exit).

    Args:
        model: a Hugging Face MoE model (attached or not; its attachment is restored on exit).
        data: calibration items (calib/data.py).
        modalities: schedule columns (default text plus vision/audio when present in the data).
        inner: inner compiler of the ``modes`` backend for every pass.
        tolerance: accepted |measured skip − target| (absolute; 0.005 keeps every method of one
            target within ±1% of each other).
        grid: τ grids of the frontier methods (default: "exp" mapping, ``grid_points`` per column
            up to τ = max_l α[l, m]).
        grid_points: D of the default grids.
        max_steps: most bisection steps (measurement passes) per knob.
        progress: show progress bars.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data: Iterable[dict],
        modalities: list[str] | None = None,
        inner: str = "eager",
        tolerance: float = 0.005,
        grid: GridSpec | None = None,
        grid_points: int = 100,
        max_steps: int = 24,
        progress: bool = False,
    ):
        if not 0 < tolerance < 0.5:
            raise ValueError(f"tolerance must be in (0, 0.5), got {tolerance!r}")
        batches = prepare(data)
        self.session = CalibrationSession(model, batches, modalities or default_modalities(model, batches), inner)
        self.tolerance, self.grid, self.grid_points = tolerance, grid, grid_points
        self.max_steps, self.progress = max_steps, progress
        self.passes = 0
        self._frontier_caches: dict[str, dict] = {}

    def __enter__(self) -> BaselineTuner:
        self.session.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.session.__exit__(*exc)

    # ------------------------------------------------------------------------------------------
    # Calibration statistics (computed once, on first use)

    @property
    def base(self) -> Schedule:
        return self.session.base

    @functools.cached_property
    def importance_kls(self) -> list[list[float]]:
        """KL [L][M] of removing layer l's routed experts for modality m's tokens (GMLG passes)."""
        return importance_kls(self.session, progress=self.progress)

    @functools.cached_property
    def gmlg_alpha(self) -> list[list[float]]:
        """GMLG layer importance α [L][M], each column summing to 1."""
        return normalise(self.importance_kls, self.session.modalities)

    @functools.cached_property
    def ratio_medians(self) -> list[float]:
        """Per MoE layer: median of π_j / π_top1 over the non-top-1 slots of the calibration
        tokens (padding excluded), measured in one unskipped pass."""
        if self.base.top_k < 2:
            raise ValueError("ratio rules need top_k ≥ 2: with top-1 routing there is no slot to skip")
        ratios: list[list[torch.Tensor]] = [[] for _ in self.base.site_paths]

        def observe(site: int, scores: torch.Tensor, modality_ids: torch.Tensor) -> None:
            scores = scores[modality_ids > 0].float()
            tail = torch.ones_like(scores, dtype=torch.bool).scatter_(1, scores.argmax(dim=1, keepdim=True), False)
            ratios[site].append(RatioToTop1Rule.scores(scores)[tail].cpu())

        with self.session.state.observing_scores(observe):
            self.session.measure_schedule(self.base)
        medians = []
        for site, pieces in enumerate(ratios):
            values = torch.cat(pieces) if pieces else torch.empty(0)
            if values.numel() == 0:
                raise ValueError(f"MoE site {site} ({self.base.site_paths[site]}) saw no calibration token")
            medians.append(float(values.median()))
        return medians

    @functools.cached_property
    def layers_by_sensitivity(self) -> list[int]:
        """MoE layer indices, least sensitive first (GMLG ablation KLs summed over modalities)."""
        totals = [sum(row) for row in self.importance_kls]
        return sorted(range(len(totals)), key=lambda l: (totals[l], l))

    # ------------------------------------------------------------------------------------------
    # Tuning

    def tune(self, method: str, target: float) -> Tuned:
        """``method`` (one of METHODS) tuned so that its measured skip ratio on the calibration
        data is ``target`` ± tolerance; target in (0, 1)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
            raise ValueError(f"target skip ratio must be in (0, 1) exclusive, got {target!r}")
        start = self.passes
        details: dict = {}
        found = _TUNERS[method](self, target, details)
        m = found.measurement
        reached = self._within(m.skip, target)
        passes = self.passes - start
        calibration = {
            "method": method,
            "knob": _plain(found.knob),
            "kl": m.kl,
            "skip_by_modality": m.by_modality,
            "tolerance": self.tolerance,
            "reached": reached,
            "max_skip": found.max_skip,
            "passes": passes,
            "trace": [[_plain(x), skip] for x, skip in found.trace],
            "batches": len(self.session.batches),
            **details,
        }
        schedule = dataclasses.replace(found.schedule, target_skip=target, measured_skip=m.skip, calibration=calibration)
        return Tuned(
            method, target, schedule, found.knob, m.skip, m.by_modality, m.kl, reached, found.max_skip, passes, found.trace
        )

    def knob(self, method: str) -> Knob:
        """The knob of a single-knob method: ``top_k``, ``uniform_threshold``,
        ``gmlg_one_threshold`` or ``naee`` (``mc_moe`` has one ``ratio_knob`` per layer count)."""
        if method not in _KNOBS:
            raise ValueError(f"method {method!r} has no single knob")
        return _KNOBS[method](self)

    def _top_k_knob(self) -> Knob:
        """Rank rule: knob s slots skipped in all, spread over the (layer, modality) cells."""
        L, M, k = len(self.base.site_paths), len(self.base.modalities), self.base.top_k

        def kept(s: float) -> Schedule:
            skipped = _spread(int(s), L * M)  # (layer, modality) cells, layer-major
            return self.base.with_rule(RankRule(kept_slots=[[k - skipped[l * M + m] for m in range(M)] for l in range(L)]))

        return Knob(kept, 0, L * M * (k - 1), integer=True)

    def _uniform_threshold_knob(self) -> Knob:
        L, M = len(self.base.site_paths), len(self.base.modalities)
        return self._threshold_knob([[1.0] * M for _ in range(L)])

    def _gmlg_one_threshold_knob(self) -> Knob:
        return self._threshold_knob(self.gmlg_alpha)

    def _naee_knob(self) -> Knob:
        return self.ratio_knob(range(len(self.base.site_paths)))

    def ratio_knob(self, layers: Iterable[int]) -> Knob:
        """Ratio rule β_l = c · median_l on ``layers`` (β = 0, nothing skipped, elsewhere); knob c
        up to 2 / min median (β ≥ 2 > every ratio: only top-1 slots kept)."""
        layers = set(layers)
        medians, M = self.ratio_medians, len(self.base.modalities)
        positive = [medians[l] for l in layers if medians[l] > 0]
        if not positive:
            raise ValueError(
                f"the median routing-weight ratio is 0 in every layer of {sorted(layers)}: the ratio rule cannot skip"
            )

        def schedule(c: float) -> Schedule:
            beta = [[c * median if l in layers else 0.0] * M for l, median in enumerate(medians)]
            return self.base.with_rule(RatioToTop1Rule(beta=beta))

        return Knob(schedule, 0.0, 2.0 / min(positive))

    def _threshold_knob(self, alpha: list[list[float]]) -> Knob:
        """One τ shared by every modality with α [L][M]; τ = 2 · max α skips every pair (π ≤ 1)."""
        M = len(self.base.modalities)
        return Knob(lambda tau: self.session.schedule(alpha, [tau] * M), 0.0, 2.0 * max(max(row) for row in alpha))

    def tempered_alpha(self, gamma: float) -> list[list[float]]:
        """α [L][M] ∝ KL^γ (``importance.normalise``); γ = 0 is uniform 1/L without any GMLG
        pass, γ = 1 the paper's GMLG α."""
        if gamma == 0:
            L, M = len(self.base.site_paths), len(self.base.modalities)
            return [[1.0 / L] * M for _ in range(L)]
        return normalise(self.importance_kls, self.session.modalities, gamma)

    def _tune_frontier(self, gammas: Sequence[float], target: float, details: dict) -> KnobSearch:
        """Frontier search of τ per modality for α tempered by each γ of ``gammas``, restricted to
        the tolerance window (see the module docstring): of the γ with a point in the window,
        the one whose evaluated frontier has the lowest KL at exactly the target
        (``frontier.kl_at_skip``; the larger γ on a tie), and its lowest-KL point in the window;
        else the point closest to the target. Evaluations are cached per γ (shared by the
        methods); the chosen schedule is measured once more for its per-modality skip."""
        found = []  # (in window, KL at the target or distance, -γ, point, α, evaluated)
        for gamma in gammas:
            alpha = self.tempered_alpha(gamma)
            grid = self.grid or GridSpec(
                points=self.grid_points,
                mapping="exp",
                x_max={column: exp_x(max(row[m] for row in alpha)) for m, column in enumerate(self.base.modalities)},
            )
            grids = [grid.grid(column) for column in self.base.modalities]
            cache = self._frontier_caches.setdefault(f"gamma={gamma}", {})
            before = len(cache)
            targets = [max(target - self.tolerance, target / 2), target]
            evaluated = search_thresholds(self.session, alpha, grids, targets, cache, progress=self.progress)[0].evaluated
            self.passes += len(cache) - before
            window = [e for e in evaluated if self._within(e.skip, target)]
            if window:
                best = min(window, key=lambda e: (e.kl, abs(e.skip - target), e.taus))
                found.append((0, kl_at_skip(evaluated, target), -gamma, best, alpha, evaluated))
            else:
                best = min(evaluated, key=lambda e: (abs(e.skip - target), e.taus))
                found.append((1, abs(best.skip - target), -gamma, best, alpha, evaluated))
        _, _, gamma, best, alpha, evaluated = min(found, key=lambda f: f[:3])
        if len(gammas) > 1:
            at_target = [[-f[2], f[1] if f[0] == 0 and math.isfinite(f[1]) else None] for f in found]
            details.update(gamma=-gamma, gammas=list(gammas), kl_at_target=at_target)
        schedule = self.session.schedule(alpha, list(best.taus))
        trace = [(e.taus, e.skip) for e in evaluated]
        return KnobSearch(best.taus, schedule, self._measure(schedule), max(e.skip for e in evaluated), trace)

    def _tune_mc_moe(self, target: float, details: dict) -> KnobSearch:
        """Ratio rule on the n least sensitive layers, for n = L, L − 1, … while the target stays
        reachable; the tuned schedule with the lowest KL (among those reaching the target)."""
        order = self.layers_by_sensitivity
        tried = []
        for n in range(len(order), 0, -1):
            found = self.bisect(self.ratio_knob(order[:n]), target)
            if found.max_skip < target and not self._within(found.max_skip, target):
                break
            tried.append((n, found))
        if not tried:  # even every layer falls short: report that attempt
            tried.append((len(order), found))
        reaching = [t for t in tried if self._within(t[1].measurement.skip, target)] or tried
        n, best = min(reaching, key=lambda t: (t[1].measurement.kl, -t[0]))
        details.update(layers=sorted(order[:n]), layers_tried=[t[0] for t in tried])
        return best

    def bisect(self, knob: Knob, target: float) -> KnobSearch:
        """``bisect_knob`` on ``knob``, each point's schedule measured on the calibration data."""
        measured: dict[float, tuple[Schedule, Measurement]] = {}

        def skip_at(x: float) -> float:
            schedule = knob.schedule(x)
            measured[x] = (schedule, self._measure(schedule))
            return measured[x][1].skip

        best, skips = bisect_knob(skip_at, knob.low, knob.high, target, self.tolerance + _EPS, self.max_steps, knob.integer)
        schedule, measurement = measured[best]
        return KnobSearch(best, schedule, measurement, max_skip=skips[knob.high], trace=list(skips.items()))

    def _within(self, skip: float, target: float) -> bool:
        return abs(skip - target) <= self.tolerance + _EPS

    def _measure(self, schedule: Schedule) -> Measurement:
        self.passes += 1
        return self.session.measure_schedule(schedule)


_KNOBS: dict[str, Callable[[BaselineTuner], Knob]] = {
    "top_k": BaselineTuner._top_k_knob,
    "uniform_threshold": BaselineTuner._uniform_threshold_knob,
    "gmlg_one_threshold": BaselineTuner._gmlg_one_threshold_knob,
    "naee": BaselineTuner._naee_knob,
}
"""The single-knob methods: name → the tuner's knob of that method."""


def _bisected(method: str) -> Callable[[BaselineTuner, float, dict], KnobSearch]:
    return lambda tuner, target, details: tuner.bisect(tuner.knob(method), target)


def _frontier(gammas: Sequence[float]) -> Callable[[BaselineTuner, float, dict], KnobSearch]:
    return lambda tuner, target, details: tuner._tune_frontier(gammas, target, details)


_TUNERS: dict[str, Callable[[BaselineTuner, float, dict], KnobSearch]] = {
    "top_k": _bisected("top_k"),
    "uniform_threshold": _bisected("uniform_threshold"),
    "dmt_without_gmlg": _frontier((0.0,)),
    "gmlg_one_threshold": _bisected("gmlg_one_threshold"),
    "naee": _bisected("naee"),
    "mc_moe": BaselineTuner._tune_mc_moe,
    "modes": _frontier(GAMMAS),
    "modes_paper": _frontier((1.0,)),
}
"""How each method is tuned: name → f(tuner, target, details) → KnobSearch (``details``: extra
calibration metadata the method records)."""
METHODS = tuple(_TUNERS)


def bisect_knob(
    skip_at: Callable[[float], float],
    low: float,
    high: float,
    target: float,
    tolerance: float,
    max_steps: int = 24,
    integer: bool = False,
) -> tuple[float, dict[float, float]]:
    """Bisection for a knob value x in [low, high] whose skip ratio ``skip_at(x)`` (non-decreasing
    in x) is within ``tolerance`` of ``target``. Measures ``high`` first (when even it falls
    short, that is the answer), at most ``max_steps`` points, each once; ``integer`` knobs take
    integer values. Returns the measured x closest to the target (the smaller x on a tie) and
    every measured {x: skip ratio}, in measuring order."""
    measured: dict[float, float] = {}

    def at(x: float) -> float:
        if x not in measured:
            measured[x] = skip_at(x)
        return measured[x]

    top = x = high
    for _ in range(max_steps):
        skip = at(x)
        if abs(skip - target) <= tolerance or (x == top and skip < target):
            break
        low, high = (x, high) if skip < target else (low, x)
        if integer and high - low <= 1:
            at(low)
            break
        x = (low + high) // 2 if integer else (low + high) / 2
    best = min(measured, key=lambda x: (abs(measured[x] - target), x))
    return best, measured


def _plain(knob: float | tuple[float, ...]) -> float | list[float]:
    """A knob value as JSON reads it back (τ tuples as lists)."""
    return list(knob) if isinstance(knob, tuple) else knob


def _spread(total: int, cells: int) -> list[int]:
    """Slots to skip per cell: ``total // cells`` each, one more on the last ``total % cells``."""
    base, extra = divmod(total, cells)
    return [base + (1 if c >= cells - extra else 0) for c in range(cells)]


def tune_methods(
    model: torch.nn.Module,
    data: Iterable[dict],
    methods: Iterable[str] = METHODS,
    targets: Iterable[float] = (0.5,),
    **options,
) -> list[Tuned]:
    """Every method of ``methods`` tuned to every target skip ratio of ``targets`` on calibration
    ``data``, sharing one compiled session; ``options`` are ``BaselineTuner``'s. Method-major order."""
    targets = list(targets)
    with BaselineTuner(model, data, **options) as tuner:
        return [tuner.tune(method, target) for method in methods for target in targets]
