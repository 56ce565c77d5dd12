"""Frontier search (calib/frontier.py) and τ grids (calib/grids.py) on synthetic monotone surfaces.

A surface is KL and skip ratio on a D_0 × … grid, each a cumulative sum over every axis of
random non-negative integer increments (many zeros: plateaus and exact ties), skip divided by at
least its maximum so it lies in [0, 1] and may stay below 1 (unreachable targets). An oracle
computed directly from the arrays gives the expected optimum."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modes_fx.calib.frontier import Evaluation, FrontierResult, frontier_search, kl_at_skip
from modes_fx.calib.grids import PAPER_X_MAX, exp_tau, exp_x, tau_grid

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Surface:
    """Monotone (kl, skip) on a grid; ``evaluate`` records every call."""

    def __init__(self, grids: list[list[float]], kl: np.ndarray, skip: np.ndarray):
        self.grids, self.kl, self.skip = grids, kl, skip
        self.index = [{tau: k for k, tau in enumerate(grid)} for grid in grids]
        self.calls: list[tuple[float, ...]] = []

    def evaluate(self, taus):
        self.calls.append(taus)
        at = tuple(index[tau] for index, tau in zip(self.index, taus))
        return float(self.kl[at]), float(self.skip[at])

    def point(self, at) -> Evaluation:
        taus = tuple(grid[k] for grid, k in zip(self.grids, at))
        return Evaluation(taus, float(self.kl[at]), float(self.skip[at]))

    def oracle(self, target: float) -> Evaluation | None:
        """Lowest KL with skip ≥ target; ties: lower skip, then smaller τ tuple."""
        feasible = [self.point(at) for at in np.ndindex(self.skip.shape) if self.skip[at] >= target]
        return min(feasible, key=lambda p: (p.kl, p.skip, p.taus), default=None)


def monotone(rng: np.random.Generator, shape: tuple[int, ...], zeros: float) -> np.ndarray:
    """Cumulative sums over every axis of increments in {0, 1, 2}, a fraction ``zeros`` forced to 0."""
    surface = rng.integers(0, 3, shape) * (rng.random(shape) >= zeros)
    for axis in range(len(shape)):
        surface = np.cumsum(surface, axis=axis)
    return surface


def grid(rng: np.random.Generator, size: int, infinite_end: bool) -> list[float]:
    """Strictly ascending τ values from 0, the last one +inf when ``infinite_end``."""
    values = [0.0] + [float(v) for v in np.cumsum(rng.uniform(0.01, 1.0, size - 1))]
    if size > 1 and infinite_end:
        values[-1] = math.inf
    return values


@st.composite
def surfaces(draw, axes: int = 2, max_size: int = 25) -> Surface:
    shape = tuple(draw(st.integers(1, max_size)) for _ in range(axes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kl = monotone(rng, shape, draw(st.sampled_from([0.0, 0.5, 0.9]))) / draw(st.sampled_from([1.0, 3.0, 7.0]))
    counts = monotone(rng, shape, draw(st.sampled_from([0.0, 0.5, 0.9])))
    top = int(counts.max())
    skip = counts / (top + draw(st.integers(0, max(top, 1)))) if top else counts.astype(float)
    grids = [grid(rng, size, draw(st.booleans())) for size in shape]
    return Surface(grids, kl, skip)


@st.composite
def targets(draw, surface: Surface) -> float:
    attained = sorted({float(s) for s in surface.skip.flat if 0 < s < 1})
    choices = [st.floats(0.001, 0.999)] + ([st.sampled_from(attained)] if attained else [])
    return draw(st.one_of(choices))


def budget(surface: Surface) -> int:
    return sum(len(g) for g in surface.grids) + 2


def assert_matches_oracle(result: FrontierResult, surface: Surface, target: float) -> None:
    expected = surface.oracle(target)
    assert result.target == target
    assert result.best == expected
    assert result.feasible is (expected is not None)
    if expected is None:
        assert "unreachable" in result.message and str(target) in result.message


@SETTINGS
@given(st.data())
def test_two_pointer_equals_brute_force_within_budget(data):
    surface = data.draw(surfaces())
    target = data.draw(targets(surface))
    fast = frontier_search(surface.evaluate, surface.grids, target)
    fast_calls, surface.calls = surface.calls, []
    slow = frontier_search(surface.evaluate, surface.grids, target, mode="brute_force")
    assert_matches_oracle(fast, surface, target)
    assert_matches_oracle(slow, surface, target)
    assert len(fast_calls) == len(set(fast_calls)) <= budget(surface)
    assert len(surface.calls) == surface.skip.size
    assert [p.taus for p in fast.evaluated] == fast_calls
    assert all(p == surface.point(tuple(i[t] for i, t in zip(surface.index, p.taus))) for p in fast.evaluated)


@SETTINGS
@given(st.data())
def test_one_axis_search_equals_brute_force(data):
    surface = data.draw(surfaces(axes=1, max_size=60))
    target = data.draw(targets(surface))
    fast = frontier_search(surface.evaluate, surface.grids, target)
    fast_calls, surface.calls = len(surface.calls), []
    slow = frontier_search(surface.evaluate, surface.grids, target, mode="brute_force")
    assert_matches_oracle(fast, surface, target)
    assert_matches_oracle(slow, surface, target)
    size = len(surface.grids[0])
    assert fast_calls <= math.ceil(math.log2(size)) + 1 <= size + 2
    assert len(surface.calls) == size


@SETTINGS
@given(st.data())
def test_unreachable_target_detected_by_both_modes(data):
    surface = data.draw(surfaces())
    top = float(surface.skip.max())
    if top >= 0.999:
        surface.skip = surface.skip * 0.5
        top = float(surface.skip.max())
    target = data.draw(st.floats(top, 0.999, exclude_min=True))
    for mode in ("two_pointer", "brute_force"):
        result = frontier_search(surface.evaluate, surface.grids, target, mode=mode)
        assert result.best is None and result.feasible is False
        assert "unreachable" in result.message and str(target) in result.message
        if mode == "two_pointer":  # one evaluation, at the largest thresholds
            assert surface.calls == [tuple(g[-1] for g in surface.grids)]
    assert len(surface.calls) == 1 + surface.skip.size


@SETTINGS
@given(st.data())
def test_several_targets_share_evaluations(data):
    surface = data.draw(surfaces())
    wanted = data.draw(st.lists(targets(surface), min_size=1, max_size=5))
    separate, needed = [], set()
    for target in wanted:
        separate.append(frontier_search(surface.evaluate, surface.grids, target))
        needed |= set(surface.calls)
        surface.calls = []
    joint = frontier_search(surface.evaluate, surface.grids, wanted)
    assert isinstance(joint, list) and len(joint) == len(wanted)
    assert len(surface.calls) == len(set(surface.calls)) == len(needed)
    assert set(surface.calls) == needed
    for result, alone, target in zip(joint, separate, wanted):
        assert_matches_oracle(result, surface, target)
        assert result.best == alone.best
        assert result.evaluated == joint[0].evaluated
    assert {p.taus for p in joint[0].evaluated} == needed


@SETTINGS
@given(st.data())
def test_cache_reuse_makes_no_new_evaluations(data):
    surface = data.draw(surfaces())
    wanted = data.draw(st.lists(targets(surface), min_size=1, max_size=3))
    mode = data.draw(st.sampled_from(["two_pointer", "brute_force"]))
    cache = {}
    first = frontier_search(surface.evaluate, surface.grids, wanted, cache=cache, mode=mode)
    assert len(cache) == len(surface.calls)
    assert all(type(k) is tuple and all(type(t) is float for t in k) for k in cache)
    surface.calls = []
    again = frontier_search(surface.evaluate, surface.grids, wanted, cache=cache, mode=mode)
    assert surface.calls == []
    assert again == first


class Interrupted(Exception):
    pass


@SETTINGS
@given(st.data())
def test_resume_from_persisted_cache_after_interruption(data):
    surface = data.draw(surfaces())
    wanted = data.draw(st.lists(targets(surface), min_size=1, max_size=3))
    reference = frontier_search(surface.evaluate, surface.grids, wanted)
    total, surface.calls = len(surface.calls), []
    stop_after = data.draw(st.integers(0, total - 1))

    def dies(taus):
        if len(surface.calls) == stop_after:
            raise Interrupted
        return surface.evaluate(taus)

    cache = {}
    with pytest.raises(Interrupted):
        frontier_search(dies, surface.grids, wanted, cache=cache)
    on_disk = json.dumps([[list(k), list(v)] for k, v in cache.items()])
    restored = {tuple(k): tuple(v) for k, v in json.loads(on_disk)}
    surface.calls = []
    resumed = frontier_search(surface.evaluate, surface.grids, wanted, cache=restored)
    assert resumed == reference
    assert len(surface.calls) == total - stop_after


def test_more_than_two_axes():
    grids = [[0.0, 1.0], [0.0, 1.0, 2.0], [0.0, 1.0]]

    def evaluate(taus):
        return sum(taus) / 4, sum(taus) / 4

    with pytest.raises(NotImplementedError, match="1 or 2 τ axes, got 3.*coordinate"):
        frontier_search(evaluate, grids, 0.5, mode="two_pointer")
    expected = Evaluation((0.0, 1.0, 1.0), 0.5, 0.5)  # ties: smallest τ tuple
    assert frontier_search(evaluate, grids, 0.5, mode="brute_force").best == expected
    assert frontier_search(evaluate, grids, 0.5).best == expected  # auto: coordinate


def neighbours(surface: Surface, at: tuple[int, ...]) -> list[Evaluation]:
    """Every grid point that differs from ``at`` in at most two axes."""
    points = []
    for a, b in itertools.combinations(range(len(at)), 2):
        for i, j in itertools.product(range(len(surface.grids[a])), range(len(surface.grids[b]))):
            other = list(at)
            other[a], other[b] = i, j
            points.append(surface.point(tuple(other)))
    return points


@SETTINGS
@given(st.data())
def test_coordinate_search_is_exact_on_two_axes(data):
    surface = data.draw(surfaces())
    target = data.draw(targets(surface))
    result = frontier_search(surface.evaluate, surface.grids, target, mode="coordinate")
    assert_matches_oracle(result, surface, target)
    assert len(surface.calls) == len(set(surface.calls)) <= budget(surface)


@SETTINGS
@given(st.data(), st.integers(3, 4))
def test_coordinate_search_finds_a_pairwise_optimum_on_more_axes(data, axes):
    """Against brute force on small M-axis grids: feasible exactly when the grid is, never better
    than the optimum, and no point differing from it in at most two τ ranks before it."""
    surface = data.draw(surfaces(axes=axes, max_size=5))
    target = data.draw(targets(surface))
    result = frontier_search(surface.evaluate, surface.grids, target)  # auto → coordinate
    optimum = surface.oracle(target)
    assert result.feasible is (optimum is not None)
    assert len(surface.calls) == len(set(surface.calls))
    if optimum is None:
        assert surface.calls == [tuple(g[-1] for g in surface.grids)]
        return
    best = result.best
    at = tuple(i[t] for i, t in zip(surface.index, best.taus))
    assert best == surface.point(at) and best.skip >= target
    assert (best.kl, best.skip, best.taus) >= (optimum.kl, optimum.skip, optimum.taus)
    rank = (best.kl, best.skip, best.taus)
    assert not [p for p in neighbours(surface, at) if p.skip >= target and (p.kl, p.skip, p.taus) < rank]
    assert {p.taus for p in result.evaluated} == set(surface.calls)


def test_coordinate_search_steps_through_several_pairs():
    """A 3-axis surface whose optimum needs moves on every pair: skip = Σ τ, KL weights the axes
    1, 2, 3, so the optimum puts all the skip on axis 0; found from the largest thresholds."""
    grids = [[0.0, 1.0, 2.0, 3.0]] * 3

    def evaluate(taus):
        return (taus[0] + 2 * taus[1] + 3 * taus[2]) / 20, sum(taus) / 9

    result = frontier_search(evaluate, grids, 3 / 9, mode="coordinate")
    assert result.best == Evaluation((3.0, 0.0, 0.0), 3 / 20, 3 / 9)
    assert result.best == frontier_search(evaluate, grids, 3 / 9, mode="brute_force").best


def _linear(taus):
    return sum(taus) / 10, sum(taus) / 10


@pytest.mark.parametrize(
    "targets, shown",
    [(0, "0"), (1, "1"), (0.0, "0.0"), (1.0, "1.0"), (-0.5, "-0.5"), (1.5, "1.5"), (math.nan, "nan"),
     (math.inf, "inf"), (True, "True"), ([0.5, 1.0], "1.0"), ("0.5", "'0.5'"), ([], r"\[\]"), (None, "None")],
)
def test_bad_target(targets, shown):
    with pytest.raises(ValueError, match=rf"got {shown}$"):
        frontier_search(_linear, [[0.0, 1.0], [0.0, 1.0]], targets)


@pytest.mark.parametrize(
    "grids, shown",
    [([], "non-empty sequence of τ grids"), ("ab", "non-empty sequence of τ grids"), (None, "τ grids"),
     ([[]], r"grids\[0\] must be a non-empty"), ([[0.0, 1.0], []], r"grids\[1\] must be a non-empty"),
     ([[1.0, 0.0]], "strictly ascending, got 1.0 then 0.0"), ([[0.0, 0.0]], "strictly ascending"),
     ([[0.0, -0.0]], "strictly ascending"), ([[0.0, math.nan]], "nan"), ([[-math.inf, 0.0]], "-inf"),
     ([[0.0, True]], "True"), ([[0.0, "1"]], "'1'"), ([[0.0, 1.0], 3.0], r"grids\[1\]")],
)
def test_bad_grid(grids, shown):
    with pytest.raises(ValueError, match=shown):
        frontier_search(_linear, grids, 0.5)


def test_bad_mode():
    with pytest.raises(ValueError, match="unknown mode 'greedy'"):
        frontier_search(_linear, [[0.0, 1.0]], 0.5, mode="greedy")


@pytest.mark.parametrize(
    "value, shown",
    [((math.nan, 0.5), "KL nan"), ((math.inf, 0.5), "KL inf"), ((-math.inf, 0.5), "KL -inf"),
     ((0.1, -0.1), "skip ratio -0.1"), ((0.1, 1.1), "skip ratio 1.1"), ((0.1, math.nan), "skip ratio nan"),
     ((0.1,), "expected a pair"), ((0.1, 0.2, 0.3), "expected a pair"), (None, "expected a pair"),
     (("a", 0.5), "expected a pair")],
)
@pytest.mark.parametrize("mode", ["two_pointer", "brute_force"])
def test_bad_evaluation_names_tau(value, shown, mode):
    grids = [[0.0, 1.0, 2.0], [0.0, 0.5]]
    bad = (2.0, 0.5)  # the largest thresholds: the first point both modes evaluate

    def evaluate(taus):
        return value if taus == bad else _linear(taus)

    with pytest.raises(ValueError, match=rf"evaluate at τ=\(2\.0, 0\.5\) gave .*{shown}"):
        frontier_search(evaluate, grids, 0.01, mode=mode)


def test_bad_cached_value_names_tau():
    with pytest.raises(ValueError, match=r"cache at τ=\(1\.0,\) gave skip ratio 2\.0"):
        frontier_search(_linear, [[0.0, 1.0]], 0.01, cache={(1.0,): (0.0, 2.0)})


def test_accepts_numpy_grids_and_infinite_tau():
    grids = [np.linspace(0.0, 1.0, 5), np.array([0.0, 0.5, math.inf])]

    def evaluate(taus):
        skip = 1.0 if math.inf in taus else sum(taus) / 4
        return skip, skip

    result = frontier_search(evaluate, grids, 0.9)
    assert result.best == Evaluation((0.0, math.inf), 1.0, 1.0)
    assert all(type(t) is float for p in result.evaluated for t in p.taus)


# --- grids ---


def test_paper_grids():
    text, vision = tau_grid(), tau_grid(x_max=PAPER_X_MAX["vision"])
    assert PAPER_X_MAX == {"text": 0.71, "vision": 0.6}
    for grid, x_max in ((text, 0.71), (vision, 0.6)):
        assert len(grid) == 100
        assert grid[0] == pytest.approx(2 / (1 + math.exp(10)))
        assert grid[-1] == pytest.approx(2 / (1 + math.exp(-10 * (x_max - 1))))
        assert grid[50] == pytest.approx(exp_tau(x_max * 50 / 99))
    assert text[-1] == pytest.approx(0.104307, rel=1e-5)
    assert vision[-1] == pytest.approx(0.0359724, rel=1e-5)


def test_linear_grid():
    assert tau_grid(5, "linear", tau_max=2.0) == [0.0, 0.5, 1.0, 1.5, 2.0]
    default = tau_grid(3, "linear", x_max=0.6)
    assert default == [0.0, exp_tau(0.6) / 2, exp_tau(0.6)]


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 300), st.sampled_from(["exp", "linear"]), st.floats(0.01, 3.0))
def test_grid_ascending(points, mapping, x_max):
    grid = tau_grid(points, mapping, x_max)
    assert len(grid) == points
    assert all(a < b for a, b in zip(grid, grid[1:]))
    assert 0 <= grid[0] < 1e-4 and grid[-1] < 2


@pytest.mark.parametrize(
    "kwargs, shown",
    [({"points": 1}, "points must be an integer >= 2, got 1"), ({"points": 2.5}, "got 2.5"),
     ({"points": True}, "got True"), ({"mapping": "log"}, "unknown mapping 'log'"),
     ({"x_max": 0.0}, "x_max must be a finite number > 0, got 0.0"), ({"x_max": -1.0}, "got -1.0"),
     ({"x_max": math.nan}, "got nan"), ({"x_max": math.inf}, "got inf"),
     ({"tau_max": 1.0}, 'tau_max applies to the "linear" mapping'),
     ({"mapping": "linear", "tau_max": -1.0}, "tau_max must be a finite number > 0, got -1.0"),
     ({"mapping": "linear", "tau_max": math.inf}, "tau_max must be .* got inf"),
     ({"x_max": 10.0}, "repeat τ values")],
)
def test_bad_grid_arguments(kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        tau_grid(**kwargs)


@given(x=st.floats(-0.5, 1.5))
def test_exp_x_inverts_exp_tau(x):
    assert exp_x(exp_tau(x)) == pytest.approx(x, abs=1e-9)


points = st.lists(
    st.builds(lambda kl, skip: Evaluation((0.0,), kl, skip), st.floats(0, 5, allow_nan=False), st.floats(0, 1, allow_nan=False)),
    min_size=1,
    max_size=12,
)


@SETTINGS
@given(evaluated=points, skips=st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=2))
def test_kl_at_skip_reads_a_non_decreasing_lower_frontier(evaluated, skips):
    """Between the cheapest point below and the cheapest point reaching it; non-decreasing in the
    skip; inf beyond every point; a point's own KL where it is the cheapest at its skip."""
    low, high = sorted(skips)
    at_low, at_high = kl_at_skip(evaluated, low), kl_at_skip(evaluated, high)
    assert at_low <= at_high + 1e-12
    reach = [e.kl for e in evaluated if e.skip >= high]
    if not reach:
        assert at_high == math.inf
        return
    assert min(e.kl for e in evaluated) - 1e-12 <= at_high <= min(reach) + 1e-12
    cheapest = min(evaluated, key=lambda e: (e.kl, -e.skip))
    assert kl_at_skip(evaluated, cheapest.skip) == cheapest.kl


def test_kl_at_skip_compares_searches_at_the_same_skip():
    """The case of the digits benchmark at 88%: candidate A's best point reaches the target barely
    (0.876, KL 0.0301), B's overshoots (0.885, 0.0305) but B costs less KL at exactly 0.876."""
    a = [Evaluation((1.0,), 0.0250, 0.860), Evaluation((2.0,), 0.0301, 0.876)]
    b = [Evaluation((1.0,), 0.0200, 0.860), Evaluation((2.0,), 0.0305, 0.885)]
    assert min(e.kl for e in a if e.skip >= 0.876) < min(e.kl for e in b if e.skip >= 0.876)
    assert kl_at_skip(b, 0.876) == pytest.approx(0.0200 + (0.876 - 0.860) / (0.885 - 0.860) * 0.0105)
    assert kl_at_skip(b, 0.876) < kl_at_skip(a, 0.876) == 0.0301


def test_calibrate_chooses_the_candidate_with_the_lowest_kl_at_the_target():
    """``calibrate``'s choice among γ candidates: B (lower KL at exactly the target, best point
    overshooting it) over A (lower best-point KL, barely reaching the target)."""
    from modes_fx.calib.calibrate import _best_candidate

    a = [Evaluation((1.0,), 0.0250, 0.860), Evaluation((2.0,), 0.0301, 0.876)]
    b = [Evaluation((1.0,), 0.0200, 0.860), Evaluation((2.0,), 0.0305, 0.885)]
    results = {g: FrontierResult(0.876, points[-1], True, points, "") for g, points in ((0.5, a), (0.0, b))}
    candidates = [(g, f"alpha {g}", [], [r]) for g, r in results.items()]
    assert _best_candidate(candidates, 0)[0] == 0.0
