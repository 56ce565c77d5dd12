"""The default τ grid ("scores") follows the calibration data's scores α · π, so `modes calibrate`
with defaults reaches any target on a shallow model (the paper's grid reaches only about half
the pairs of a 2-MoE-layer model); the paper's grid stays available, unchanged."""
import math
import random

import pytest
import torch

import modes_fx
from modes_fx import cli
from modes_fx.calib import GridSpec, calibrate, tau_grid
from modes_fx.calib.grids import exp_tau, score_grid, top_tau
from modes_fx.calib.scores import RoutingScores, _Sample
from modes_fx.harness.testing import build, calibration_items, text_inputs

POINTS = 12
# The search promises skip ≥ target at the lowest KL; with one column it is the first grid point
# that reaches the target, and adjacent points of a "scores" grid differ by about 1 / (D − 1) of
# the pairs (grids.py), so the measured skip lies in [target, target + one step].
STEP = 1 / (POINTS - 1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny 2-MoE-layer Qwen3-MoE saved with save_pretrained, and a .pt calibration file."""
    folder = tmp_path_factory.mktemp("default_grid")
    model = build("qwen3_moe")
    assert len(modes_fx.Schedule.constant(model, tau={"text": 0.0}).site_paths) == 2
    model.save_pretrained(folder / "model")
    torch.save(calibration_items(model, batches=4, inputs=text_inputs), folder / "data.pt")
    return folder


@pytest.mark.parametrize("target", [0.5, 0.75, 0.88])
def test_calibrate_command_with_defaults_reaches_the_target_on_two_moe_layers(saved, target, capsys):
    out = saved / f"schedule-{target}.json"
    argv = ["calibrate", "--model", str(saved / "model"), "--data", str(saved / "data.pt"), "--target-skip", str(target),
            "--points", str(POINTS), "--cache-dir", str(saved / "cache"), "--out", str(out)]
    assert cli.main(argv) == 0
    schedule = modes_fx.Schedule.load(out)
    assert len(schedule.rule.alpha) == 2 and schedule.modalities == ["text"]
    assert target <= schedule.measured_skip <= target + STEP
    grid = schedule.calibration["grid"]
    assert grid["mapping"] == "scores" and grid["points"] == POINTS
    taus = grid["taus"]["text"]
    assert taus[0] == 0.0 and taus == sorted(set(taus)) and 2 < len(taus) <= POINTS
    assert taus[-1] > max(row[0] for row in schedule.rule.alpha)  # the top point skips every pair
    assert "saved" in capsys.readouterr().out


def test_top_of_the_scores_grid_skips_every_pair_and_the_paper_grid_does_not(saved):
    """Measured, not assumed: the top τ of the default grid skips all pairs; the paper's top τ
    on this shallow model falls short of 0.5, and calibrate says which grid reaches it."""
    model = build("qwen3_moe")
    data = torch.load(saved / "data.pt")
    schedule = calibrate(model, data, target_skip=0.99, grid=GridSpec(points=4), progress=False)
    assert schedule.measured_skip == 1.0
    with pytest.raises(ValueError, match=r'unreachable on this grid.*mapping="scores"'):
        calibrate(model, data, target_skip=0.5, grid=GridSpec(points=4, mapping="exp"), progress=False)


def test_paper_grid_is_exactly_the_exp_grid_of_before():
    text, vision = GridSpec(mapping="exp").grid("text"), GridSpec(mapping="exp").grid("vision")
    assert text == tau_grid() == tau_grid(100, "exp", x_max=0.71)
    assert vision == tau_grid(100, "exp", x_max=0.6)
    assert text == [2.0 / (1.0 + math.exp(-10.0 * (0.71 * k / 99 - 1.0))) for k in range(100)]
    assert (text[0], text[1], text[50], text[-1]) == (
        9.079573740486879e-05, 9.754620234332922e-05, 0.0032710929350443234, 0.10430712615683543
    )
    assert vision[-1] == 0.03597241992418312 and len(vision) == 100
    assert GridSpec().mapping == "scores"
    with pytest.raises(ValueError, match="scores"):
        GridSpec().grid("text")  # needs the data's scores
    with pytest.raises(ValueError, match="unknown mapping"):
        GridSpec(mapping="paper")


def test_score_grid_points_sit_at_even_skip_fractions_of_the_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(10_000, generator=gen) * 0.3
    top = top_tau([0.3, 0.1])
    grid = score_grid(scores, 11, top)
    assert len(grid) == 11 and grid[0] == 0.0 and grid[-1] == top > 0.3
    skipped = [float((scores < tau).double().mean()) for tau in grid]
    assert skipped == pytest.approx([k / 10 for k in range(11)], abs=1e-3)
    # repeated scores (α = 0 layers score 0, ties) merge points: still strictly ascending
    tied = torch.cat([torch.zeros(500), torch.full((500,), 0.2)])
    assert score_grid(tied, 11, 0.5) == [0.0, pytest.approx(0.2), 0.5]
    assert score_grid(torch.empty(0), 5, 0.5) == [0.0, 0.5]
    assert exp_tau(0.71) == tau_grid()[-1]


def test_routing_scores_split_columns_drop_padding_and_thin_systematically():
    observed = RoutingScores(sites=2, columns=2, cap=4)
    scores = torch.arange(12.0).reshape(6, 2)
    ids = torch.tensor([0, 1, 2, 1, 2, 1])
    observed(1, scores, ids)
    assert observed.pi(1, 0).tolist() == [2.0, 3.0, 6.0, 7.0, 10.0, 11.0]
    assert observed.pi(1, 1).tolist() == [4.0, 5.0, 8.0, 9.0]
    assert observed.pi(0, 0).numel() == 0
    assert observed.scores([[0.0, 0.0], [0.5, 1.0]], 0).tolist() == [1.0, 1.5, 3.0, 3.5, 5.0, 5.5]
    rng = random.Random(0)
    for _ in range(200):
        cap, n = rng.randint(1, 9), rng.randint(0, 2000)
        sample, at = _Sample(cap), 0
        while at < n:
            size = rng.choice([3, 40, 500])
            sample.add(torch.arange(float(at), float(min(n, at + size))))
            at = min(n, at + size)
        values = sample.values()
        assert values.tolist() == list(map(float, range(0, n, sample.stride)))  # every stride-th value
        assert values.numel() <= 2 * cap and (sample.stride == 1 or values.numel() > cap // 2)
        assert sample.seen == n
