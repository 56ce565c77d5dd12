"""Bad input gets a clear error naming the problem, not a traceback from deep inside.

Library: token ids outside the vocabulary (attached model, calibration data), NaN / inf router
weights, calibration data files of the wrong kind. CLI: ``modes: error: <one line>`` on stderr,
exit status 2, no traceback, checked before any model is loaded."""
import importlib
import json
import math
import subprocess
import sys

import pytest
import torch

import modes_fx
from modes_fx import cli
from modes_fx.calib import calibrate
from modes_fx.calib.files import load_data
from modes_fx.modality import check_input_ids
from modes_fx.harness.testing import VOCAB, build, text_inputs


@pytest.fixture
def qwen3_moe():
    model = build("qwen3_moe")
    yield model
    modes_fx.detach(model)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Qwen3-MoE saved with save_pretrained: a folder ``modes calibrate --model`` loads."""
    folder = tmp_path_factory.mktemp("model")
    build("qwen3_moe").save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Library


@pytest.mark.filterwarnings("ignore:.*ran dense")  # attached, not compiled: the eager path
def test_attached_model_refuses_token_ids_outside_the_vocabulary(qwen3_moe):
    assert qwen3_moe.config.get_text_config().vocab_size == VOCAB
    modes_fx.attach(qwen3_moe, modes_fx.Schedule.constant(qwen3_moe, tau={"text": 0.1}))
    inputs = text_inputs(qwen3_moe, batch=2, seq=6, pad=False)
    with torch.no_grad():
        qwen3_moe(**inputs)  # valid ids pass
        inputs["input_ids"][1, 3] = VOCAB
        with pytest.raises(ValueError, match=rf"token id {VOCAB} at \(batch row 1, column 3\), outside the model's vocabulary of {VOCAB} ids"):
            qwen3_moe(**inputs)
        inputs["input_ids"][1, 3] = 5
        inputs["input_ids"][0, 2] = -1
        with pytest.raises(ValueError, match=r"token id -1 at \(batch row 0, column 2\)"):
            qwen3_moe(**inputs)


def test_check_input_ids_accepts_placeholder_ids_and_counts_the_bad_ones():
    ids = torch.tensor([[1, 2, 200], [300, 4, 5]])
    check_input_ids(ids, 400)
    check_input_ids(ids[:, :2].clone().fill_(1), 2)
    with pytest.raises(ValueError, match=r"token id 200 at \(batch row 0, column 2\).*\(2 such ids in all\)"):
        check_input_ids(ids, 128)
    with pytest.raises(ValueError, match=r"token id 300 at \(batch row 1, column 0\)"):
        check_input_ids(ids, 128, special_ids=(200,))  # an image placeholder id may lie outside


def test_calibration_refuses_an_item_with_a_token_outside_the_vocabulary(qwen3_moe, monkeypatch):
    def fingerprint_weights(*args):
        raise AssertionError("the data must be checked before the cache fingerprints the weights")

    monkeypatch.setattr(importlib.import_module("modes_fx.calib.calibrate"), "_cache", fingerprint_weights)
    good = {"input_ids": torch.tensor([[5, 9, 14, 30]]), "labels": torch.tensor([[-100, -100, 14, 30]])}
    bad = {"input_ids": torch.tensor([[5, 9, VOCAB + 7, 30]]), "labels": torch.tensor([[-100, -100, -100, 30]])}
    with pytest.raises(ValueError, match=rf"calibration item 1: input_ids holds token id {VOCAB + 7} at \(batch row 0, column 2\).*vocabulary of {VOCAB}"):
        calibrate(qwen3_moe, [good, bad], target_skip=0.3, cache_dir="unused", progress=False)


@pytest.mark.parametrize("value, named", [(math.nan, "NaN"), (math.inf, "inf")])
def test_non_finite_router_weight_is_named_at_attach(qwen3_moe, value, named):
    schedule = modes_fx.Schedule.constant(qwen3_moe, tau={"text": 0.1})
    with torch.no_grad():
        qwen3_moe.model.layers[1].mlp.gate.weight[3, 5] = value
    message = rf"router weight of MoE site 1 \(model\.layers\.1\.mlp\.gate\.weight\) has {named}"
    with pytest.raises(ValueError, match=message):
        modes_fx.attach(qwen3_moe, schedule)
    with pytest.raises(ValueError, match=message):
        modes_fx.Schedule.constant(qwen3_moe, tau={"text": 0.1})


def test_calibration_data_file_suffix_and_content_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"d\.txt: calibration data must be \.pt or \.jsonl \(accepted suffixes: \.pt, \.jsonl\), got '\.txt'"):
        load_data(tmp_path / "d.txt")
    (tmp_path / "d.jsonl").write_text('{"input_ids": [1, 2]}\nnot json\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        load_data(tmp_path / "d.jsonl")
    (tmp_path / "d.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match=r"d\.pt: cannot be read as a torch.save'd list of dicts"):
        load_data(tmp_path / "d.pt")


# ----------------------------------------------------------------------------------------------
# CLI


def _cli_error(capsys, argv: list[str]) -> str:
    """Run ``modes ARGV`` in-process; check exit 2 and one ``modes: error:`` line, return it."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("modes: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


@pytest.fixture
def calibrate_files(tmp_path):
    """A valid data file, and the argv of ``modes calibrate`` on a given model folder."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 9, 14, 30], "labels": [-100, -100, 14, 30]}))

    def argv(model, *extra, data=data):
        return ["calibrate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "s.json"),
                "--cache-dir", str(tmp_path / "cache"), "--points", "3", *extra]

    return argv


@pytest.fixture
def no_model_loading(monkeypatch):
    """Argument and file errors must come before the model is loaded."""

    def load(*args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", load)


checked_before_loading = pytest.mark.usefixtures("no_model_loading")


@checked_before_loading
def test_cli_model_folder_that_does_not_exist(tmp_path, capsys, calibrate_files):
    line = _cli_error(capsys, calibrate_files(tmp_path / "nope"))
    assert line == f"modes: error: --model {tmp_path / 'nope'}: no such folder"


@checked_before_loading
def test_cli_model_folder_without_config_json(tmp_path, capsys, calibrate_files):
    (tmp_path / "empty").mkdir()
    line = _cli_error(capsys, calibrate_files(tmp_path / "empty"))
    assert line.endswith("is not a model folder: no config.json")


@checked_before_loading
def test_cli_data_file_with_another_suffix(saved_model, tmp_path, capsys, calibrate_files):
    (tmp_path / "data.txt").write_text("5 9 14 30\n")
    line = _cli_error(capsys, calibrate_files(saved_model, data=tmp_path / "data.txt"))
    assert "data.txt" in line and ".pt or .jsonl" in line and "'.txt'" in line


@checked_before_loading
def test_cli_data_file_missing(saved_model, tmp_path, capsys, calibrate_files):
    line = _cli_error(capsys, calibrate_files(saved_model, data=tmp_path / "missing.jsonl"))
    assert line.endswith("missing.jsonl: no such file")


@checked_before_loading
@pytest.mark.parametrize("skip", ["0", "1", "1.5", "-0.2", "nan"])
def test_cli_target_skip_outside_the_open_unit_interval(saved_model, capsys, calibrate_files, skip):
    line = _cli_error(capsys, calibrate_files(saved_model, "--target-skip", skip))
    assert "--target-skip must be in (0, 1)" in line


@checked_before_loading
def test_cli_fewer_than_two_grid_points(saved_model, capsys, calibrate_files):
    line = _cli_error(capsys, calibrate_files(saved_model, "--points", "1"))
    assert "--points must be at least 2, got 1" in line


def test_cli_library_error_during_the_run_is_one_line(saved_model, tmp_path, capsys, calibrate_files):
    """A ValueError the library raises once the model is loaded (a token id outside the
    vocabulary of the calibration data) ends the command the same way."""
    data = tmp_path / "oov.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 9, 500, 30], "labels": [-100, -100, -100, 30]}))
    line = _cli_error(capsys, calibrate_files(saved_model, "--target-skip", "0.3", data=data))
    assert "calibration item 0: input_ids holds token id 500" in line and f"vocabulary of {VOCAB}" in line


def test_cli_schedule_show_missing_or_invalid_file(tmp_path, capsys):
    assert _cli_error(capsys, ["schedule", "show", str(tmp_path / "none.json")]).endswith("none.json: no such file")
    (tmp_path / "bad.json").write_text("{not json")
    assert "bad.json: not valid JSON" in _cli_error(capsys, ["schedule", "show", str(tmp_path / "bad.json")])
    (tmp_path / "old.json").write_text('{"format_version": 99}')
    assert "format_version 99 is not supported" in _cli_error(capsys, ["schedule", "show", str(tmp_path / "old.json")])


def test_cli_error_in_a_subprocess_prints_no_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    argv = ["calibrate", "--model", str(tmp_path / "empty"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "s.json")]
    done = subprocess.run([sys.executable, "-m", "modes_fx.cli", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("modes: error:")]
    assert errors == [f"modes: error: --model {tmp_path / 'empty'} is not a model folder: no config.json"]
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_cli_bugs_keep_their_traceback_and_verbose_exists(monkeypatch):
    assert cli.parser().parse_args(["schedule", "show", "x"]).verbose is False
    assert cli.parser().parse_args(["-v", "schedule", "show", "x"]).verbose is True

    def bug(args):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(cli, "_schedule_show", bug)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        cli.main(["schedule", "show", "x"])
