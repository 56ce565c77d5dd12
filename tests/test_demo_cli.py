"""The ``modes`` command line: the quick demo and ``schedule show``."""
import math

import pytest

import modes_fx
from modes_fx import cli, demo
from modes_fx.testing import build


def test_quick_demo_skips_and_reports(capsys):
    result = demo.run(quick=True)
    out = capsys.readouterr().out
    assert 0.3 < result.skip_ratio < 1.0
    assert set(result.skip_by_modality) == {"text", "image"}
    assert result.sites_rewritten >= 2
    assert "masked_dispatch" in out and "measured skip ratio" in out


def test_schedule_show_prints_alpha_and_tau(tmp_path, capsys):
    model = build("qwen3_moe")
    path = tmp_path / "s.json"
    modes_fx.Schedule.constant(model, tau={"text": math.inf}, alpha=[[0.25], [0.75]]).save(path)
    assert cli.main(["schedule", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "inf" in out and "0.25" in out and "0.75" in out and "model.layers.1.mlp" in out


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
