"""examples/calibrate_your_model.py runs end to end: checkpoint folder → samples → calibrate →
evaluate → compile → generate → schedule saved beside the model."""
import importlib.util
from pathlib import Path

import torch

import modes_fx

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "calibrate_your_model.py"


def test_example_runs_the_whole_path(tmp_path, capsys):
    torch._dynamo.reset()
    spec = importlib.util.spec_from_file_location("calibrate_your_model", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--out", str(tmp_path), "--inner", "eager"])
    out = capsys.readouterr().out
    assert "| exact match |" in out and "Q: " in out and "saved " in out
    assert 0.0 < result["evaluation"].skip_ratio < 1.0 and 0.0 < result["skip_ratio"] < 1.0
    assert modes_fx.Schedule.from_pretrained(tmp_path / "checkpoint") == result["schedule"]
