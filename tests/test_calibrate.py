"""calibrate() end to end on a tiny real Qwen3-VL-MoE with image inputs: α, the searched schedule
deployed with attach + backend="modes", resuming an interrupted run, and bad input."""
import math

import pytest
import torch

import modes_fx
from modes_fx.calib import GridSpec, calibrate, evaluate_schedule, layer_importance
from modes_fx.calib import session as session_module
from modes_fx.calib.data import prepare
from modes_fx.calib.importance import GAMMAS, normalise
from modes_fx.compiled import compiled_forward, compiled_forward_as
from modes_fx.harness.testing import build, calibration_items
from modes_fx.rules import PiRule

GRID = GridSpec(points=8, mapping="linear", tau_max={"text": 0.6, "vision": 0.6})
TARGET = 0.5




@pytest.fixture(scope="module")
def model():
    return build("qwen3_vl_moe", experts_implementation="grouped_mm")


@pytest.fixture(scope="module")
def data(model):
    return calibration_items(model, batches=3)


@pytest.fixture(scope="module")
def schedule(model, data):
    return calibrate(model, data, target_skip=TARGET, grid=GRID, progress=False)


@pytest.fixture(scope="module")
def paper(model, data):
    return calibrate(model, data, target_skip=TARGET, grid=GRID, progress=False, method="paper")


def test_alpha_has_one_nonnegative_value_per_layer_and_modality_summing_to_one(schedule):
    assert schedule.modalities == ["text", "vision"]
    alpha = schedule.rule.alpha
    assert len(alpha) == 2 and all(len(row) == 2 for row in alpha)
    assert all(a >= 0 for row in alpha for a in row)
    for m in range(2):
        assert math.isclose(sum(row[m] for row in alpha), 1.0, rel_tol=1e-9)


def test_layer_importance_alone_matches_calibrate(model, data, schedule, paper):
    gmlg = layer_importance(model, data, progress=False)
    assert PiRule(alpha=gmlg, tau=paper.rule.tau) == paper.rule
    # α ∝ KL, so tempering GMLG's α by γ is the default's tempering of the KLs
    tempered = normalise(gmlg, schedule.modalities, schedule.calibration["gamma"])
    for row, expected in zip(schedule.rule.alpha, tempered):
        assert list(row) == pytest.approx(expected)


def test_deployed_schedule_reaches_the_searched_skip_and_kl(model, data, schedule):
    assert schedule.measured_skip >= TARGET
    modes_fx.attach(model, schedule)
    compiled = torch.compile(model, backend="modes", options={"inner": "eager"})
    try:
        with torch.no_grad(), modes_fx.track() as stats:
            for item in data:
                compiled(**{k: v for k, v in item.items() if k != "labels"})
    finally:
        modes_fx.detach(model)
    assert stats.skip_ratio >= TARGET
    assert abs(stats.skip_ratio - schedule.measured_skip) <= 0.02
    fresh = evaluate_schedule(model, data, schedule)
    assert math.isclose(fresh.kl, schedule.calibration["kl"], rel_tol=1e-3)
    assert fresh.kl > 0


def test_search_reports_its_frontier_and_cost(schedule):
    frontier = schedule.calibration["frontier"]
    candidates = schedule.calibration["candidates"]
    assert [c["gamma"] for c in candidates] == list(GAMMAS)
    assert all(c["passes"] <= 2 * GRID.points + 2 for c in candidates)  # O(D) per candidate
    assert schedule.calibration["passes"] == 1 + 2 * 2 + sum(c["passes"] for c in candidates)
    assert [p for p in frontier if p[2] >= TARGET and p[1] < schedule.calibration["kl"]] == []


def test_default_is_never_worse_than_uniform_or_the_papers_alpha(model, data, schedule, paper):
    """γ = 0 (uniform α) and γ = 1 (the paper's) are candidates: the chosen one has the lowest KL
    at exactly the target skip on its evaluated frontier (so no lower than either special case
    at the same skip); the paper's method is γ = 1 alone and equals the γ = 1 candidate."""
    candidates = {c["gamma"]: c for c in schedule.calibration["candidates"]}
    at_target = {g: c["kl_at_target"] for g, c in candidates.items()}
    chosen = schedule.calibration["gamma"]
    assert at_target[chosen] == min(at_target.values()) <= min(at_target[0.0], at_target[1.0])
    assert schedule.calibration["kl"] == candidates[chosen]["kl"]
    assert paper.calibration["gamma"] == 1.0 and [c["gamma"] for c in paper.calibration["candidates"]] == [1.0]
    assert paper.calibration["kl"] == candidates[1.0]["kl"]
    assert paper.calibration["candidates"][0]["kl_at_target"] == at_target[1.0]
    with pytest.raises(ValueError, match="unknown calibration method 'best'"):
        calibrate(model, data, target_skip=TARGET, grid=GRID, progress=False, method="best")


class Interrupted(Exception):
    pass


def test_interrupted_calibration_resumes_from_the_cache(model, data, schedule, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = session_module.CalibrationSession.measure_table

    def flaky(self, table):
        calls["n"] += 1
        if calls["n"] == 9:  # after the 4 ablations and a few search points
            raise Interrupted()
        return original(self, table)

    monkeypatch.setattr(session_module.CalibrationSession, "measure_table", flaky)
    with pytest.raises(Interrupted):
        calibrate(model, data, target_skip=TARGET, grid=GRID, cache_dir=tmp_path, progress=False)
    done_before = calls["n"] - 1
    calls["n"] = -10**9  # no more interruptions
    resumed = calibrate(model, data, target_skip=TARGET, grid=GRID, cache_dir=tmp_path, progress=False)
    resumed_passes = calls["n"] + 10**9
    assert resumed.to_dict() == schedule.to_dict()
    assert resumed_passes == resumed.calibration["passes"] - 1 - done_before
    assert len(list(tmp_path.glob("modes-calibration-*.json"))) == 1


def test_bad_input_gives_clear_errors(model, data):
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], grid=GRID, progress=False)
    no_answers = [{**item, "labels": torch.full_like(item["labels"], -100)} for item in data]
    with pytest.raises(ValueError, match="no answer token"):
        calibrate(model, no_answers, grid=GRID, progress=False)
    for target in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="target_skip must be in"):
            calibrate(model, data, target_skip=target, grid=GRID, progress=False)
    tiny_grid = GridSpec(points=4, mapping="linear", tau_max={"text": 1e-4, "vision": 1e-4})
    with pytest.raises(ValueError, match="(?i)unreachable|infeasible|not reach"):
        calibrate(model, data[:1], target_skip=0.9, grid=tiny_grid, progress=False)


def test_non_finite_logits_are_an_error():
    broken = build("qwen3_vl_moe", experts_implementation="grouped_mm")
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        calibrate(broken, calibration_items(broken, batches=1), grid=GRID, progress=False)


def test_a_pass_that_bypasses_the_rewrite_is_an_error_not_a_measurement(model, data):
    """If part of the model runs without the modes op (e.g. Dynamo fell back to eager after its
    recompile limit), its experts run dense and uncounted; the session must refuse to measure."""
    with session_module.CalibrationSession(model, prepare(data), ["text", "vision"]) as session:
        table = session.ablation_table(0, 0)
        session.measure_table(table)  # compiled: fine
        with compiled_forward_as(model, None):  # run uncompiled
            with pytest.raises(RuntimeError, match="without the modes rewrite"):
                session.measure_table(table)


def test_a_failed_session_start_restores_the_model_and_dynamo_limits():
    broken = build("qwen3_vl_moe", experts_implementation="grouped_mm")
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    limit = torch._dynamo.config.recompile_limit
    session = session_module.CalibrationSession(broken, prepare(calibration_items(broken, batches=1)), ["text", "vision"])
    with pytest.raises(FloatingPointError):
        session.__enter__()
    assert torch._dynamo.config.recompile_limit == limit
    assert compiled_forward(broken) is None and modes_fx.runtime.state_of(broken) is None
