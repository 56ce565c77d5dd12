"""calib.baselines end to end on a tiny real Qwen3-VL-MoE (top-4 of 8 experts, 2 MoE layers) with
image inputs: every method tuned to a measured skip ratio, what each method's schedule holds,
honest reports of unreachable targets, the calibration statistics against an independent eager
measurement, and the ratio / rank rules through backend="modes" against a hook-based emulation."""
from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import modes_fx
from modes_fx.calib.baselines import METHODS, BaselineTuner
from modes_fx.calib.importance import GAMMAS
from modes_fx.rules import PiRule, RankRule, RatioToTop1Rule, rule_from_fields
from modes_fx.schedule import Schedule
from modes_fx.harness.testing import build, calibration_items, experts_modules, image_inputs

TARGET = 0.375
TOLERANCE = 0.02
TOP_K = 4




def _inputs(item):
    return {k: v for k, v in item.items() if k != "labels"}


@pytest.fixture(scope="module")
def model():
    return build("qwen3_vl_moe", experts_implementation="grouped_mm", num_experts_per_tok=TOP_K)


@pytest.fixture(scope="module")
def data(model):
    return calibration_items(model, batches=2)


@pytest.fixture(scope="module")
def tuner(model, data):
    with BaselineTuner(model, data, tolerance=TOLERANCE, grid_points=8) as tuner:
        yield tuner


@pytest.fixture(scope="module")
def tuned(tuner):
    return {method: tuner.tune(method, TARGET) for method in METHODS}


def _run(tuner, schedule, items):
    """Logits of every item and the track() counts, with ``schedule`` in force on the tuner's
    compiled model (the runtime swap deployment uses: no recompilation)."""
    tuner.session.state.set_thresholds(schedule.thresholds(), type(schedule.rule))
    with torch.no_grad(), modes_fx.track() as stats:
        logits = [tuner.session.model(**_inputs(item)).logits for item in items]
    return logits, stats


# ----------------------------------------------------------------------------------------------
# Tuning


def test_every_method_reaches_the_target_skip_on_the_calibration_data(tuned):
    for method, result in tuned.items():
        assert result.reached, f"{method}: skip {result.skip} for target {TARGET}"
        assert abs(result.skip - TARGET) <= TOLERANCE
        s = result.schedule
        assert (s.target_skip, s.measured_skip) == (TARGET, result.skip)
        assert s.calibration["method"] == method and s.calibration["kl"] == result.kl
        assert set(result.by_modality) == {"text", "vision"}
        assert result.kl > 0


def test_tuned_schedules_reproduce_their_skip_after_a_json_round_trip(tuner, tuned, data, tmp_path):
    for method, result in tuned.items():
        path = tmp_path / f"{method}.json"
        result.schedule.save(path)
        _, stats = _run(tuner, Schedule.load(path), data)
        assert stats.skip_ratio == result.skip, method
        assert stats.by_modality == result.by_modality, method


def test_skip_is_monotone_in_every_single_knob(tuned):
    for method in ("top_k", "uniform_threshold", "gmlg_one_threshold", "naee", "mc_moe"):
        trace = sorted(tuned[method].trace)
        assert len(trace) >= 2, method
        skips = [skip for _, skip in trace]
        assert skips == sorted(skips), f"{method}: {trace}"


def test_each_method_builds_the_schedule_it_describes(tuner, tuned):
    L, M = 2, 2
    top_k = tuned["top_k"]
    # 6 of L·M·(k-1) = 12 (layer, modality) slots: one per cell, one more on layer 1's: exactly 3/8
    assert top_k.schedule.rule == RankRule(kept_slots=[[3, 3], [2, 2]]) and top_k.knob == 6 and top_k.skip == 3 / 8

    uniform = tuned["uniform_threshold"].schedule
    assert uniform.rule.name == "pi" and uniform.rule.alpha == ((1.0,) * M,) * L and len(set(uniform.rule.tau)) == 1

    dmt = tuned["dmt_without_gmlg"].schedule
    assert dmt.rule == PiRule(alpha=[[1 / L] * M] * L, tau=tuned["dmt_without_gmlg"].knob)  # frontier methods: τ per modality

    gmlg = tuned["gmlg_one_threshold"].schedule
    assert gmlg.rule == PiRule(alpha=tuner.gmlg_alpha, tau=gmlg.rule.tau) and len(set(gmlg.rule.tau)) == 1
    paper = tuned["modes_paper"]
    assert paper.schedule.rule == PiRule(alpha=tuner.gmlg_alpha, tau=paper.knob)
    modes = tuned["modes"]
    gamma = modes.schedule.calibration["gamma"]
    assert gamma in GAMMAS and modes.schedule.calibration["gammas"] == list(GAMMAS)
    assert modes.schedule.rule == PiRule(alpha=tuner.tempered_alpha(gamma), tau=modes.knob)

    naee = tuned["naee"]
    assert naee.schedule.rule == RatioToTop1Rule(beta=[[naee.knob * m] * M for m in tuner.ratio_medians])

    mc_moe = tuned["mc_moe"]
    layers = mc_moe.schedule.calibration["layers"]
    assert layers == sorted(tuner.layers_by_sensitivity[: len(layers)])
    assert mc_moe.schedule.rule.name == "ratio_to_top1"
    for l, row in enumerate(mc_moe.schedule.rule.beta):
        assert row == ((mc_moe.knob * tuner.ratio_medians[l],) * M if l in layers else (0.0,) * M)


def test_modes_is_never_worse_than_its_special_cases_on_calibration_kl(tuner, tuned):
    """γ = 0 (uniform α: dmt_without_gmlg) and γ = 1 (the paper's α: modes_paper) are candidates
    of the default: it takes the γ with the lowest KL at exactly the target skip (each
    candidate's frontier read there), and its candidates' evaluations are shared with those
    methods (no extra passes for them)."""
    modes, dmt, paper = tuned["modes"], tuned["dmt_without_gmlg"], tuned["modes_paper"]
    at_target = dict(map(tuple, modes.schedule.calibration["kl_at_target"]))
    chosen = modes.schedule.calibration["gamma"]
    assert list(at_target) == list(GAMMAS)  # compared at exactly the target skip, γ = 0 and 1 included
    assert at_target[chosen] == min(at_target.values())
    if chosen == 0.0:
        assert modes.knob == dmt.knob and modes.kl == dmt.kl  # the same schedule
    if chosen == 1.0:
        assert modes.knob == paper.knob and modes.kl == paper.kl
    assert paper.passes == 1  # tuned after modes (METHODS order): only its final measurement
    assert tuner.tempered_alpha(0.0) == [[0.5, 0.5], [0.5, 0.5]] and tuner.tempered_alpha(1.0) == tuner.gmlg_alpha


def test_mc_moe_keeps_the_lowest_kl_layer_count(tuner, tuned):
    mc_moe = tuned["mc_moe"]
    tried = mc_moe.schedule.calibration["layers_tried"]
    assert tried[0] == 2
    for n in tried:
        other = tuner.bisect(tuner.ratio_knob(tuner.layers_by_sensitivity[:n]), TARGET).measurement
        if abs(other.skip - TARGET) <= TOLERANCE:
            assert mc_moe.kl <= other.kl


def test_unreachable_targets_report_the_closest_measured_skip(tuner):
    # top-k moves one (layer, modality) cell at a time: 0.25 (knob 4), ~0.30 (5: layer 1's vision
    # cell, vision tokens being ~40% here), 0.375 (6); 0.34 lies between 5 and 6
    between = tuner.tune("top_k", 0.34)
    assert (between.reached, between.skip, between.knob) == (False, 0.375, 6)
    assert any(knob == 5 and 0.25 < skip < 0.34 - TOLERANCE for knob, skip in between.trace)
    beyond = tuner.tune("naee", 0.9)  # ratio rules keep the top-1 slot: at most (k-1)/k skipped
    assert not beyond.reached and beyond.skip == beyond.max_skip == 0.75
    assert beyond.passes == 1 and not beyond.schedule.calibration["reached"]
    edge = tuner.tune("naee", 0.75 + TOLERANCE)  # 0.77 - 0.75 exceeds 0.02 by a float rounding
    assert edge.reached and edge.skip == 0.75


def test_bad_input_gives_clear_errors(tuner, model, data):
    with pytest.raises(ValueError, match=r"unknown method 'diep'; expected one of top_k, "):
        tuner.tune("diep", 0.5)
    for target in (0.0, 1.0, 1.5, math.nan, True):
        with pytest.raises(ValueError, match=r"target skip ratio must be in \(0, 1\) exclusive"):
            tuner.tune("naee", target)
    for tolerance in (0.0, -0.01, 0.5, math.nan):
        with pytest.raises(ValueError, match=r"tolerance must be in \(0, 0.5\)"):
            BaselineTuner(model, data, tolerance=tolerance)
    with pytest.raises(ValueError, match=r"calibration data is empty"):
        BaselineTuner(model, [])


# ----------------------------------------------------------------------------------------------
# Statistics and rules against independent references on an uncompiled model


@contextlib.contextmanager
def hooked(model, drop=None):
    """An independent emulation (no modes_fx code) on the uncompiled ``eager`` experts
    implementation: a pre-hook on each experts module sees (layer, routing weights float64 [T, k],
    token kind [T]: 0 padding, 1 text, 2 image) and, when ``drop`` is given, replaces the index
    of every pair ``drop(layer, weights, kind)`` marks by the sentinel E, which transformers'
    loop skips. Yields the list of (layer, weights, kind) seen and the skip counts."""
    seen, counts, current = [], {"skipped": 0, "total": 0}, {}

    def on_call(module, args, kwargs):
        ids = kwargs["input_ids"]
        real = kwargs["attention_mask"][:, -ids.shape[1]:].bool()
        current["kind"] = torch.where(real, torch.where(ids == model.config.image_token_id, 2, 1), 0).reshape(-1)

    def make_hook(layer):
        def hook(module, args):
            hidden, index, weights = args
            kind = current["kind"]
            seen.append((layer, weights.double(), kind))
            if drop is None:
                return None
            dropped = drop(layer, weights.double(), kind) & (kind[:, None] > 0)
            counts["skipped"] += int(dropped.sum())
            counts["total"] += int((kind > 0).sum()) * index.shape[1]
            return hidden, torch.where(dropped, module.num_experts, index), weights

        return hook

    handles = [model.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(make_hook(l)) for l, (_, m) in enumerate(experts_modules(model))]
    try:
        yield seen, counts
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def reference():
    return build("qwen3_vl_moe", experts_implementation="eager", num_experts_per_tok=TOP_K)


def test_ratio_medians_match_an_independent_eager_measurement(tuner, reference, data):
    with torch.no_grad(), hooked(reference) as (seen, _):
        for item in data:
            reference(**_inputs(item))
    for layer, median in enumerate(tuner.ratio_medians):
        ratios = []
        for l, weights, kind in seen:
            if l == layer:
                for row in weights[kind > 0].tolist():
                    top = row.index(max(row))
                    ratios += [w / row[top] for j, w in enumerate(row) if j != top]
        ratios.sort()
        assert median == pytest.approx(ratios[(len(ratios) - 1) // 2], rel=1e-5)


def _ratio_drop(beta):
    def drop(layer, weights, kind):
        column = (kind - 1).clamp_min(0)
        limit = torch.tensor(beta[layer], dtype=torch.float64)[column][:, None] * weights.max(dim=1, keepdim=True).values
        first_top = torch.zeros_like(weights, dtype=torch.bool).scatter_(1, weights.argmax(dim=1, keepdim=True), True)
        return (weights < limit) & ~first_top

    return drop


def _rank_drop(kept):
    def drop(layer, weights, kind):
        column = (kind - 1).clamp_min(0)
        out = torch.zeros_like(weights, dtype=torch.bool)
        for t, row in enumerate(weights.tolist()):
            ranked = sorted(range(len(row)), key=lambda j: (-row[j], j))
            for j in ranked[kept[layer][int(column[t])]:]:
                out[t, j] = True
        return out

    return drop


def test_rules_through_the_modes_backend_equal_a_hook_emulation_under_graph_reuse(tuner, reference):
    """β and k' differ per layer and modality, and with use_cache=False one compiled graph
    serves both MoE layers, so each layer's values must be looked up at run time."""
    inputs = {**image_inputs(reference, batch=2, seed=7, pad=True), "use_cache": False}
    cases = [
        ("ratio_to_top1", {"beta": [[0.6, 0.3], [0.2, 0.9]]}, _ratio_drop([[0.6, 0.3], [0.2, 0.9]])),
        ("rank", {"kept_slots": [[2, 1], [3, 2]]}, _rank_drop([[2, 1], [3, 2]])),
    ]
    modes_fx.reset_report()
    for rule, values, drop in cases:
        with torch.no_grad(), hooked(reference, drop) as (_, counts):
            expected = reference(**inputs).logits
        assert 0 < counts["skipped"] < counts["total"]
        (got,), stats = _run(tuner, tuner.base.with_rule(rule_from_fields(rule, values)), [inputs])
        assert (stats.skipped, stats.kept + stats.skipped) == (counts["skipped"], counts["total"]), rule
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(modes_fx.last_report().rewrites) == 1  # one rewritten graph for both layers


@given(
    breaks=st.lists(st.integers(0, 1000).map(lambda i: i / 1000), min_size=1, max_size=40),
    target=st.floats(0.01, 0.99),
    integer=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_bisect_knob_finds_the_target_on_any_monotone_knob(breaks, target, integer):
    """``bisect_knob`` (the baselines' and the speed benchmark's solver): on a non-decreasing skip
    ratio it measures each point once, at most max_steps of them, and returns the closest
    measured point; within tolerance whenever a point of the knob's range is."""
    from modes_fx.calib.baselines import bisect_knob

    breaks = sorted(breaks)
    high = 64 if integer else 1.0
    calls = []

    def skip_at(x):
        calls.append(x)
        return sum(b <= x / high for b in breaks) / len(breaks)

    best, measured = bisect_knob(skip_at, 0, high, target, tolerance=0.02, max_steps=40, integer=integer)
    assert len(calls) == len(set(calls)) == len(measured) <= 40 and list(measured) == calls
    assert abs(measured[best] - target) == min(abs(s - target) for s in measured.values())
    grid = range(high + 1) if integer else [b * high for b in breaks] + [0.0, high]
    if any(abs(skip_at(x) - target) <= 0.02 for x in grid) and not integer:
        assert abs(measured[best] - target) <= 0.02
