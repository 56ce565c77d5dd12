"""Routers are probed once per site per ``attach`` (issue 13): ``Schedule.check_model`` finds the
MoE sites and hands them to the support check, the fingerprint check and the attached state.

Probe counts for a model with L MoE sites (before this change in brackets):
``attach`` L [4 L], ``Schedule.constant`` L [3 L], ``calibrate`` 2 L with or without a cache
directory [7 L, 8 L with one], plus L when it re-attaches a schedule attached before it [4 L].
The calibration session's two discoveries (its base ``Schedule.constant`` and its ``attach``)
are separate calls with user code possible in between; docs/architecture.md says why they are
not merged through a memo."""
import pytest

import modes_fx
from modes_fx import runtime, sites
from modes_fx.calib import GridSpec, calibrate
from modes_fx.harness.testing import build, calibration_items, text_inputs


@pytest.fixture
def probes(monkeypatch):
    """Number of router probes (``sites._probe`` calls) so far; reset with ``probes.clear()``."""
    calls = []
    real = sites._probe

    def counting(router, top_k):
        calls.append(router)
        return real(router, top_k)

    monkeypatch.setattr(sites, "_probe", counting)
    return calls


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_vl_moe"])
def test_attach_probes_each_router_once(name, probes):
    model = build(name)
    L = len(sites.find_moe_sites(model))
    assert L == 2
    probes.clear()
    schedule = modes_fx.Schedule.constant(model, tau={"text": 0.1})
    assert len(probes) == L
    probes.clear()
    modes_fx.attach(model, schedule)
    try:
        assert len(probes) == L
        assert len(set(map(id, probes))) == L  # one probe per router, not two of one
        assert runtime.state_of(model).sites == sites.find_moe_sites(model)
    finally:
        modes_fx.detach(model)


def test_check_model_returns_the_sites_it_probed(probes):
    model = build("qwen3_moe")
    schedule = modes_fx.Schedule.constant(model, tau={})
    probes.clear()
    found = schedule.check_model(model)
    assert len(probes) == len(found) == 2
    assert found == sites.find_moe_sites(model)


def test_calibration_probes_each_router_twice_and_once_more_to_restore(probes, tmp_path):
    model = build("qwen3_moe")
    data = calibration_items(model, batches=1, inputs=text_inputs)
    previous = modes_fx.Schedule.constant(model, tau={"text": 0.1})
    modes_fx.attach(model, previous)
    try:
        probes.clear()
        schedule = calibrate(model, data, target_skip=0.3, grid=GridSpec(points=2), cache_dir=tmp_path, progress=False)
        # 2 L for the session (base Schedule.constant, attach), L to re-attach ``previous``
        assert len(probes) == 3 * 2
        assert runtime.state_of(model).schedule is previous
        assert schedule.measured_skip >= 0.3
    finally:
        modes_fx.detach(model)
