"""Schedules travel with the model: ``Schedule.save_pretrained`` / ``from_pretrained`` write and
read modes_schedule.json beside config.json, and ``attach(model)`` without a schedule finds it in
the folder the model was loaded from."""
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import modes_fx
from modes_fx import cli, runtime
from modes_fx.schedule import SCHEDULE_FILE, Schedule
from modes_fx.compiled import set_compiled_forward
from modes_fx.harness.testing import build, text_inputs


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Qwen3-MoE saved with save_pretrained, and its schedule saved beside it."""
    path = tmp_path_factory.mktemp("model")
    model = build("qwen3_moe")
    model.save_pretrained(path)
    Schedule.constant(model, tau={"text": 0.1}).save_pretrained(path)
    return path


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, experts_implementation="grouped_mm").eval()


def test_save_pretrained_writes_the_file_beside_config_and_from_pretrained_reads_it(folder, tmp_path):
    assert (folder / "config.json").is_file() and (folder / SCHEDULE_FILE).is_file()
    schedule = Schedule.constant(build("qwen3_moe"), tau={"text": 0.1})
    written = schedule.save_pretrained(tmp_path / "new" / "dir")  # created when missing
    assert written == tmp_path / "new" / "dir" / SCHEDULE_FILE
    loaded = Schedule.from_pretrained(tmp_path / "new" / "dir")
    assert loaded == schedule and loaded.to_dict() == schedule.to_dict()
    assert loaded.source == str(written) and schedule.source is None
    assert json.loads(written.read_text())["format_version"] == modes_fx.schedule.FORMAT_VERSION


def test_attach_without_a_schedule_uses_the_one_in_the_model_folder(folder, caplog):
    model = _load(folder)
    with caplog.at_level(logging.INFO, logger="modes_fx"):
        assert modes_fx.attach(model) is model
    try:
        attached = runtime.state_of(model).schedule
        assert attached == Schedule.load(folder / SCHEDULE_FILE)
        assert attached.source == str(folder / SCHEDULE_FILE)
        assert str(folder / SCHEDULE_FILE) in caplog.text
    finally:
        modes_fx.detach(model)


def test_attach_without_a_schedule_or_a_file_names_the_folder_and_how_to_make_one(tmp_path):
    build("qwen3_moe").save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        modes_fx.attach(_load(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and SCHEDULE_FILE in message
    assert "modes calibrate" in message and "save_pretrained" in message
    with pytest.raises(ValueError, match="loaded from no folder"):
        modes_fx.attach(build("qwen3_moe"))  # built in memory: no folder to look in
    with pytest.raises(ValueError, match="is not a folder"):
        Schedule.from_pretrained(tmp_path / "missing")


def test_backend_modes_without_attach_uses_the_schedule_in_the_model_folder(folder, caplog):
    torch._dynamo.reset()
    model = _load(folder)
    inputs = text_inputs(model)
    with torch.no_grad():
        dense = model(**inputs).logits
    try:
        with caplog.at_level(logging.INFO, logger="modes_fx"):
            model.compile(backend="modes", options={"inner": "eager"})
            with torch.no_grad(), modes_fx.track() as t:
                model(**inputs)
        state = runtime.state_of(model)
        assert state is not None and state.schedule.source == str(folder / SCHEDULE_FILE)
        assert str(folder / SCHEDULE_FILE) in caplog.text
        assert t.skipped > 0 and t.calls == 2  # tau 0.1 skips; both MoE layers went through the op
    finally:
        set_compiled_forward(model, None)
        modes_fx.detach(model)
        torch._dynamo.reset()
    # a model without a schedule in its folder compiles dense, as before (and is warned about)
    plain = build("qwen3_moe")
    plain.compile(backend="modes", options={"inner": "eager"})
    with torch.no_grad(), pytest.warns(modes_fx.ModesFallbackWarning):
        out = plain(**inputs).logits
    set_compiled_forward(plain, None)
    torch._dynamo.reset()
    assert runtime.state_of(plain) is None and out.shape == dense.shape


def test_a_schedule_in_the_folder_made_for_another_model_is_the_usual_error(folder, tmp_path):
    model = build("qwen3_moe", num_hidden_layers=1)
    model.save_pretrained(tmp_path)
    (tmp_path / SCHEDULE_FILE).write_text((folder / SCHEDULE_FILE).read_text())
    with pytest.raises(ValueError, match="schedule has 2 MoE sites, model has 1"):
        modes_fx.attach(_load(tmp_path))
    other_weights = build("qwen3_moe", seed=1)
    other_weights.save_pretrained(tmp_path / "seed1")
    Schedule.constant(build("qwen3_moe"), tau={"text": 0.1}).save_pretrained(tmp_path / "seed1")
    model = _load(tmp_path / "seed1")
    with pytest.warns(UserWarning, match="router weights fingerprint differs"):
        modes_fx.attach(model)
    modes_fx.detach(model)


def test_calibrate_out_may_be_the_model_folder(folder, tmp_path, capsys):
    model_dir = tmp_path / "model"
    build("qwen3_moe").save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 9, 14, 30, 31, 32], "answer_mask": [0, 0, 0, 0, 1, 1]}))
    argv = ["calibrate", "--model", str(model_dir), "--data", str(data), "--target-skip", "0.3", "--points", "3",
            "--tau-max", "0.8", "--cache-dir", str(tmp_path / "cache"), "--out", str(model_dir)]
    assert cli.main(argv) == 0
    assert f"saved {model_dir / SCHEDULE_FILE}" in capsys.readouterr().out
    model = modes_fx.attach(_load(model_dir))
    assert runtime.state_of(model).schedule.source == str(model_dir / SCHEDULE_FILE)
    modes_fx.detach(model)
