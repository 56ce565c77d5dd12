"""calibrate() end to end beyond Qwen3-VL-MoE: a tiny InternVL-MoE with image inputs (two
columns, exact two-pointer search), the tiny Qwen3-Omni-MoE thinker with text, image, video
and audio tokens in every input (four τ columns, coordinate-wise frontier search) and a tiny
Qwen3.5-MoE with an image and a video in every input (text and vision columns). Each yields a
schedule that reaches its target when deployed with attach + backend="modes"."""
import math

import pytest
import torch

import modes_fx
from modes_fx.calib import GridSpec, calibrate
from modes_fx.harness.testing import build, calibration_items, mixed_inputs

TARGET = 0.5
POINTS = 4




def _deployed_skip(model, data, schedule) -> modes_fx.tracking.SkipTracker:
    modes_fx.attach(model, schedule)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="modes", options={"inner": "eager"})
    try:
        with torch.no_grad(), modes_fx.track() as stats:
            for item in data:
                compiled(**{k: v for k, v in item.items() if k != "labels"})
    finally:
        modes_fx.detach(model)
        torch._dynamo.reset()
    return stats


@pytest.mark.parametrize(
    "name,modalities,search",
    [
        ("internvl_moe", None, "two_pointer"),
        ("qwen3_omni_moe", ["text", "image", "video", "audio"], "coordinate"),
        ("qwen3_5_moe", None, "two_pointer"),
    ],
)
def test_calibrated_schedule_meets_its_target_when_deployed(name, modalities, search):
    model = build(name, experts_implementation="grouped_mm")
    data = calibration_items(model, batches=1, answer_tokens=2, inputs=mixed_inputs)
    columns = modalities or ["text", "vision"]
    grid = GridSpec(points=POINTS, mapping="linear", tau_max={c: 0.6 for c in columns})
    schedule = calibrate(model, data, target_skip=TARGET, modalities=modalities, grid=grid, progress=False)

    assert schedule.modalities == columns and len(schedule.rule.tau) == len(columns)
    for m in range(len(columns)):
        assert math.isclose(sum(row[m] for row in schedule.rule.alpha), 1.0, rel_tol=1e-9)
    assert schedule.calibration["search"] == search
    frontier = schedule.calibration["frontier"]
    candidates = schedule.calibration["candidates"]
    assert schedule.calibration["passes"] == 1 + len(schedule.rule.alpha) * len(columns) + sum(c["passes"] for c in candidates)
    assert len(frontier) in [c["passes"] for c in candidates]
    assert all(c["passes"] < POINTS ** len(columns) for c in candidates)  # never the whole grid
    assert schedule.measured_skip >= TARGET

    stats = _deployed_skip(model, data, schedule)
    assert stats.skip_ratio >= TARGET
    assert abs(stats.skip_ratio - schedule.measured_skip) <= 1e-9
    assert set(stats.by_modality) == set(columns)
