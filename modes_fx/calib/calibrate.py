"""``calibrate``: layer importance (GMLG) then frontier search (DMT) → a deployable Schedule.

Methods: "paper" searches τ for the paper's α (GMLG, α ∝ KL); "modes" (the default) searches
τ for each tempered α ∝ KL^γ, γ in importance.GAMMAS (γ = 0 uniform α, γ = 1 the paper's), and
keeps the γ whose searched frontier has the lowest calibration KL at exactly the target skip
(``frontier.kl_at_skip``), so at the same skip it is never worse on its own objective than
uniform α or the paper's α (docs/calibration.md); no pass beyond the candidates' searches.

Cost: 1 reference pass + L·M ablation passes + the search passes over the calibration data, per
γ (≤ D_0 + D_1 for two columns; about R · (M - 1) · Σ D_m for M > 2 columns, see frontier.py).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from modes_fx.schedule import OperatingPoint, Schedule

from .cache import DiskCache, config_fingerprint, weights_fingerprint
from .data import fingerprint, prepare
from .frontier import FrontierResult, frontier_search, kl_at_skip, search_mode
from .grids import MAPPINGS, PAPER_POINTS, PAPER_X_MAX, score_grid, tau_grid, top_tau
from .importance import GAMMAS, importance_kls, normalise
from .measure import Measurement
from .scores import RoutingScores
from .session import CalibrationSession, default_modalities


@dataclass
class GridSpec:
    """τ grids of the search, one per schedule column.

    mapping "scores" (default): follows the calibration data (grids.score_grid): τ = 0, then the
    column's observed scores α · π at the quantiles k / (points − 1), then a τ above every α · π
    (skip ratio 1), so every target in (0, 1) is reachable on any depth; x_max and tau_max are
    not used. "exp" (the paper's grid, ``GridSpec(mapping="exp")``): x ∈ [0, x_max[column]]
    mapped by τ = 2 / (1 + e^(-10 (x - 1))); "linear": τ ∈ [0, tau_max[column]]. Columns
    missing from x_max use the paper's text range for "text" and its visual range otherwise."""

    points: int = PAPER_POINTS
    mapping: str = "scores"
    x_max: dict[str, float] = field(default_factory=dict)
    tau_max: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping {self.mapping!r}; expected one of {', '.join(MAPPINGS)}")
        if isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 2:
            raise ValueError(f"points must be an integer >= 2, got {self.points!r}")

    def grid(self, column: str, scores: torch.Tensor | None = None, alpha: list[float] | None = None) -> list[float]:
        """The ascending τ grid of ``column``. "scores" needs the column's observed scores
        α[l, m] · π (``scores.RoutingScores.scores``) and its α over layers; the fixed mappings
        ignore both."""
        if self.mapping == "scores":
            if scores is None or alpha is None:
                raise ValueError('the "scores" grid follows the calibration data: pass the column\'s scores α · π and α')
            return score_grid(scores, self.points, top_tau(alpha))
        x_max = self.x_max.get(column, PAPER_X_MAX["text" if column == "text" else "vision"])
        if self.mapping == "linear":
            return tau_grid(self.points, "linear", x_max=x_max, tau_max=self.tau_max.get(column))
        return tau_grid(self.points, "exp", x_max=x_max)


METHODS = ("modes", "paper")
"""``calibrate``'s methods: "modes" chooses the tempering γ of α among importance.GAMMAS by
calibration KL; "paper" is the paper's procedure (γ = 1)."""


def _check_targets(target_skip: float | Sequence[float]) -> list[float]:
    """The target skip ratios as a list: one, or several distinct ones, each in (0, 1)."""
    targets = list(target_skip) if isinstance(target_skip, Sequence) else [target_skip]
    if not targets:
        raise ValueError("target_skip must be a ratio or a non-empty sequence of ratios")
    for target in targets:
        if isinstance(target, bool) or not (isinstance(target, (int, float)) and 0.0 < target < 1.0):
            raise ValueError(f"target_skip must be in (0, 1) exclusive, got {target!r}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"target skips must be distinct, got {targets}")
    return targets


def _cache(cache_dir, session: CalibrationSession, grid: GridSpec, inner: str, mode: str) -> DiskCache | None:
    """The resumable cache, keyed by everything its entries depend on: every weight and buffer
    (bytes, dtype, shape, tensor type: quantized weights differ), the architecture (the
    ``model_fingerprint`` the session's base schedule holds, so the routers are not probed again)
    and config, the data, the columns, the grid, the search mode, the method, the inner compiler
    and the library version. The target skip is not in the key: the cache holds per-(layer, column)
    ablation KLs (importance.py: ``session.measure_table(session.ablation_table(l, m)).kl``) and
    per-τ (KL, skip) measurements (frontier.py: ``_Lookup`` stores ``evaluate(taus)``, a pass
    with α and τ only); the target only chooses among them (``_best``, ``_reachable``), so any
    target may reuse them (tested in tests/test_calibration_cache.py)."""
    if cache_dir is None:
        return None
    model, modalities = session.model, session.modalities
    key = {
        "weights": weights_fingerprint(model),
        "architecture": session.base.fingerprint["architecture"],
        "config": config_fingerprint(model),
        "data": fingerprint(session.source_batches),
        "modalities": modalities,
        "grid": asdict(grid),
        "search": search_mode(mode, len(modalities)),
        "method": "modes",
        "inner": inner,
        "version": importlib.metadata.version("modes-fx"),
    }
    return DiskCache(cache_dir, key)


def calibrate(
    model: torch.nn.Module,
    data: Iterable[dict],
    target_skip: float | Sequence[float] = 0.88,
    modalities: list[str] | None = None,
    grid: GridSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
    inner: str = "eager",
    mode: str = "auto",
    progress: bool = True,
    method: str = "modes",
) -> Schedule:
    """Calibrate a MoDES schedule for ``model`` on ``data`` reaching ``target_skip``.

    target_skip: one skip ratio in (0, 1), or a sequence of distinct ones: then the schedule
    holds one operating point per target (``Schedule.points``, the first active; switch with
    ``modes_fx.use``), all from one GMLG pass and one frontier cache (the walks share every
    evaluation).

    data: calibration items (calib/data.py); modalities: schedule columns (default text plus
    vision/audio when present in the data); grid: τ grids (default: ``GridSpec()``, D = 100
    points per column following the data's scores α · π, so any target is reachable; the
    paper's grid is ``GridSpec(mapping="exp")``);
    cache_dir: where the resumable cache lives (None: no cache); inner: the inner compiler of
    the ``modes`` backend used for every pass; mode: the frontier search ("auto": exact
    two-pointer walk for ≤ 2 columns, coordinate-wise frontier steps for more; see frontier.py).
    method: "modes" (default: for each target, the tempering γ of α ∝ KL^γ among
    importance.GAMMAS with the lowest calibration KL at exactly that skip) or "paper" (γ = 1,
    the paper's α). The returned schedule records the searched KL (nats per answer token) and
    skip ratio of the active point, its γ and every candidate's (γ, KL, skip, KL at the target
    skip, passes), and in
    ``calibration["grid"]`` the grid spec with the τ values searched per column ("taus")."""
    targets = _check_targets(target_skip)
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    grid = grid or GridSpec()
    batches = prepare(data)
    modalities = modalities or default_modalities(model, batches)
    fixed = None if grid.mapping == "scores" else [grid.grid(column) for column in modalities]
    session = CalibrationSession(model, batches, modalities, inner)
    cache = _cache(cache_dir, session, grid, inner, mode)
    gammas = GAMMAS if method == "modes" else (1.0,)
    observed = session.reference_observer = RoutingScores(session.num_sites, len(modalities)) if fixed is None else None
    candidates = []  # (γ, α, grids, FrontierResult)
    with session:
        kls = importance_kls(session, cache.section("importance") if cache else None, progress)
        for gamma in gammas:
            alpha = normalise(kls, modalities, gamma)
            grids = fixed or [
                grid.grid(column, observed.scores(alpha, m), [row[m] for row in alpha]) for m, column in enumerate(modalities)
            ]
            section = cache.section(f"frontier-gamma={gamma}") if cache else None
            candidates.append((gamma, alpha, grids, search_thresholds(session, alpha, grids, targets, section, mode, progress)))
    chosen = [_best_candidate(candidates, t) for t in range(len(targets))]  # per target: (γ, α, grids, result)
    points = [OperatingPoint(session.schedule(a, list(r.best.taus)).rule, r.target, r.best.skip, r.best.kl) for _, a, _, r in chosen]
    gamma, alpha, grids, found = chosen[0]
    return dataclasses.replace(
        session.schedule(alpha, list(found.best.taus)),
        target_skip=found.target,
        measured_skip=found.best.skip,
        points=tuple(points) if len(points) > 1 else (),
        calibration={
            "method": method,
            "gamma": gamma,
            "candidates": [
                {"gamma": g, "kl": f[0].best.kl if f[0].feasible else None, "skip": f[0].best.skip if f[0].feasible else None,
                 "kl_at_target": kl_at_skip(f[0].evaluated, f[0].target) if f[0].feasible else None,  # finite when feasible
                 "passes": len(f[0].evaluated)}
                for g, _, _, f in candidates
            ],
            "kl": found.best.kl,
            "batches": len(batches),
            "answer_tokens": sum(b.num_answer_tokens for b in batches),
            "grid": {**asdict(grid), "taus": dict(zip(modalities, grids))},
            "search": search_mode(mode, len(grids)),
            "passes": 1 + len(alpha) * len(modalities) + sum(len(c[3][0].evaluated) for c in candidates),
            "frontier": [[list(e.taus), e.kl, e.skip] for e in found.evaluated],
        },
    )


def _best_candidate(candidates: list[tuple], target: int) -> tuple:
    """Of (γ, α, grids, [FrontierResult per target]) candidates, (γ, α, grids, result) of the
    lowest calibration KL at exactly target number ``target``'s skip, read on each candidate's
    evaluated frontier (``frontier.kl_at_skip``: a candidate whose best point overshoots the
    target is not penalised against one that barely reaches it; a tie: the larger γ);
    ValueError when no candidate reaches it."""
    feasible = [(g, a, grids, results[target]) for g, a, grids, results in candidates if results[target].feasible]
    if not feasible:
        raise ValueError(
            f"{candidates[-1][3][target].message}; the default grid (GridSpec(mapping=\"scores\"), "
            "`modes calibrate --mapping scores`) follows the data's scores and reaches any target"
        )
    return min(feasible, key=lambda c: (kl_at_skip(c[3].evaluated, c[3].target), -c[0]))


def search_thresholds(
    session: CalibrationSession,
    alpha: list[list[float]],
    grids: Sequence[Sequence[float]],
    target_skip: float | Sequence[float],
    cache: MutableMapping | None = None,
    mode: str = "auto",
    progress: bool = True,
) -> FrontierResult | list[FrontierResult]:
    """Frontier search (DMT) of one τ per schedule column for layer importance α [L][M]: the
    lowest-KL point of ``grids`` (one ascending τ grid per column) whose skip ratio measured on
    the session's data reaches ``target_skip`` (one target, or a list sharing evaluations: one
    result each). cache: τ tuple → (KL, skip), read and filled."""
    with tqdm(desc="frontier search", disable=not progress) as bar:

        def evaluate(taus: tuple[float, ...]) -> tuple[float, float]:
            bar.update()
            result: Measurement = session.measure_table(session.schedule(alpha, list(taus)).thresholds())
            return result.kl, result.skip

        return frontier_search(evaluate, grids, target_skip, cache=cache, mode=mode)


def evaluate_schedule(model: torch.nn.Module, data: Iterable[dict], schedule: Schedule, inner: str = "eager") -> Measurement:
    """A fresh measurement of ``schedule`` on ``data``: KL against the unskipped model and skip ratio."""
    schedule.check_model(model)
    batches = prepare(data)
    with CalibrationSession(model, batches, schedule.modalities, inner) as session:
        return session.measure_schedule(schedule)
