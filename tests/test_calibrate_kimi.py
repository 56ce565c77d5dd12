"""calibrate() end to end on a tiny real Kimi-K2.5 (DeepSeek-V3 language model: sigmoid router,
correction bias, grouped top-k, routed scaling factor, shared experts) with image inputs: the
searched schedule, deployed with attach + backend="modes", meets its skip target."""
import math

import pytest
import torch

import modes_fx
from modes_fx.calib import GridSpec, calibrate
from modes_fx.harness.testing import SIGMOID_MOE_LAYERS, build, calibration_items

GRID = GridSpec(points=6, mapping="linear", tau_max={"text": 0.8, "vision": 0.8})
TARGET = 0.4




@pytest.mark.parametrize("name", ["kimi_k25"])  # the id names the model for docs/models.md
def test_calibrated_schedule_meets_its_target_when_deployed(name):
    model = build(name, experts_implementation="grouped_mm")
    data = calibration_items(model, batches=2)
    schedule = calibrate(model, data, target_skip=TARGET, grid=GRID, progress=False)

    assert schedule.model_class == "Kimi_K25ForConditionalGeneration"
    assert schedule.modalities == ["text", "vision"]
    assert len(schedule.rule.alpha) == SIGMOID_MOE_LAYERS
    for m in range(2):
        assert math.isclose(sum(row[m] for row in schedule.rule.alpha), 1.0, rel_tol=1e-9)
    assert schedule.measured_skip >= TARGET and schedule.calibration["kl"] > 0

    modes_fx.attach(model, schedule)
    modes_fx.reset_report()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="modes", options={"inner": "eager"})
        with torch.no_grad(), modes_fx.track() as stats:
            for item in data:
                compiled(**{k: v for k, v in item.items() if k != "labels"})
    finally:
        modes_fx.detach(model)
        torch._dynamo.reset()
    assert {r.site.router_kind for r in modes_fx.last_report().rewrites} == {"sigmoid_grouped_topk"}
    assert stats.skip_ratio >= TARGET
    assert abs(stats.skip_ratio - schedule.measured_skip) <= 1e-9
    assert set(stats.by_modality) == {"text", "vision"}
