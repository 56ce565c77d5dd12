"""The ``modes`` command line: the quick demo and ``schedule show``."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

import modes_fx
from modes_fx import cli
from modes_fx.harness import demo
from modes_fx.harness.testing import build

# a line printed by torchao's logger, torch's Dynamo / Inductor / pytree loggers, transformers'
# logger, or a Python warning raised in those packages (the library's own warnings may name them)
THIRD_PARTY = re.compile(
    r"^(?:[A-Z]+:torchao|[DIWE]\d{4} .*torch/(?:_dynamo|_inductor|utils/_pytree)|\[transformers\]"
    r"|\S*site-packages/(?:torch|torchao|transformers)/\S+:\d+: \w+).*$",
    re.MULTILINE,
)
# `modes demo --quick` through cli.main, in a fresh process (torchao's import-time messages happen
# there, and torch's log handlers write to that process's real stderr), then the DemoResult
QUICK_DEMO = """
import dataclasses, json
from modes_fx import cli
from modes_fx.harness import demo
results, run = [], demo.run
demo.run = lambda **kwargs: results.append(run(**kwargs)) or results[-1]
assert cli.main(["demo", "--quick"]) == 0
print("DEMO_RESULT " + json.dumps(dataclasses.asdict(results[0])))
"""


def test_quick_demo_calibrates_skips_and_reports():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as conftest's torch_single_thread
    done = subprocess.run([sys.executable, "-c", QUICK_DEMO], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out, _, line = done.stdout.rpartition("DEMO_RESULT ")
    result = demo.DemoResult(**json.loads(line))
    assert THIRD_PARTY.findall(done.stdout + done.stderr) == [], done.stdout + done.stderr  # quiet by default
    assert "ModesFallbackWarning" not in done.stderr, done.stderr  # every MoDES call skipped; dense runs are on purpose
    assert abs(result.skip_ratio - demo.TARGET_SKIP) < 0.05  # measured on held-out questions
    assert set(result.skip_by_modality) == {"text", "vision"}
    assert result.sites_rewritten >= 1
    assert 0.0 <= result.modes_accuracy <= 1.0 and result.dense_accuracy > 0.9
    assert result.prefill_speedup > 0 and result.decode_speedup > 0
    assert "| MoDES |" in out and "| dense |" in out and "Q: " in out
    assert f"modes bench accuracy --model {demo.DEMO_MODEL}" in out  # the benchmark of the model it ran
    assert f"{result.sites_rewritten} site rewrite(s), 0 left untouched" in out  # the backend report it printed


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


def test_calibrate_command_on_a_saved_model_and_jsonl_data(tmp_path, capsys):
    import json

    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    lines = [{"input_ids": [5, 9, 14, 30, 31, 32], "labels": [-100, -100, -100, -100, 31, 32]}, {"input_ids": [7, 8, 40, 41], "answer_mask": [0, 0, 1, 1]}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "schedule.json"
    argv = ["calibrate", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"), "--target-skip", "0.3",
            "--points", "6", "--tau-max", "0.8", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert cli.main(argv) == 0
    schedule = modes_fx.Schedule.load(out)
    assert schedule.modalities == ["text"] and schedule.measured_skip >= 0.3
    assert "saved" in capsys.readouterr().out


def test_calibration_data_files_reject_bad_input(tmp_path):
    from modes_fx.calib.files import load_data

    (tmp_path / "d.jsonl").write_text('{"input_ids": [1, 2], "pixels": [3]}')
    with pytest.raises(ValueError, match="unknown field"):
        load_data(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match=".pt or .jsonl"):
        load_data(tmp_path / "d.csv")
