"""attach / detach, the backend's options, and clear errors for bad input."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import modes_fx
from modes_fx import runtime

from extra_models import extra_model
from modes_fx.harness.testing import build, image_inputs, text_inputs

TESTS_DIR = os.path.dirname(__file__)


@pytest.fixture
def qwen3_moe():
    model = build("qwen3_moe")
    yield model
    modes_fx.detach(model)


def test_attach_is_idempotent_and_detach_undoes_it(qwen3_moe):
    schedule = modes_fx.Schedule.constant(qwen3_moe, tau={"text": 0.1})
    modes_fx.attach(qwen3_moe, schedule)
    modes_fx.attach(qwen3_moe, schedule)
    assert len(qwen3_moe._forward_pre_hooks) == 1
    assert sum(s.model_ref() is qwen3_moe for s in runtime._STATES) == 1
    router = qwen3_moe.model.layers[1].mlp.gate.weight
    assert runtime.role_of(router).site == 1
    modes_fx.detach(qwen3_moe)
    assert len(qwen3_moe._forward_pre_hooks) == 0
    assert runtime.role_of(router) is None


def test_attach_accepts_a_schedule_path(qwen3_moe, tmp_path):
    path = tmp_path / "s.json"
    modes_fx.Schedule.constant(qwen3_moe, tau={"text": 0.25}).save(path)
    modes_fx.attach(qwen3_moe, str(path))
    assert runtime.state_of(qwen3_moe).schedule.rule.tau == (0.25,)


def test_modality_ids_padding_and_decode(qwen3_moe):
    modes_fx.attach(qwen3_moe, modes_fx.Schedule.constant(qwen3_moe, tau={}))
    inputs = text_inputs(qwen3_moe, batch=2, seq=6, pad=True)
    with torch.no_grad():
        qwen3_moe(**inputs)
    ids = runtime.state_of(qwen3_moe).modality_ids.reshape(2, 6)
    assert torch.equal(ids == 0, inputs["attention_mask"] == 0)
    assert (ids[inputs["attention_mask"] == 1] == 1).all()


def test_image_tokens_get_the_image_column():
    model = build("qwen3_vl_moe")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}, modalities=["text", "vision"]))
    try:
        inputs = image_inputs(model, batch=1)
        with torch.no_grad():
            model(**inputs)
        ids = runtime.state_of(model).modality_ids
        is_image = (inputs["input_ids"] == model.config.image_token_id).reshape(-1)
        assert is_image.any()
        assert (ids[is_image] == 2).all() and (ids[~is_image] == 1).all()
    finally:
        modes_fx.detach(model)


def test_schedule_without_a_column_for_present_tokens_is_an_error():
    model = build("qwen3_vl_moe")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}, modalities=["text"]))
    try:
        with pytest.raises(ValueError, match="no threshold for.*image"), torch.no_grad():
            model(**image_inputs(model))
    finally:
        modes_fx.detach(model)


def test_schedule_for_another_model_is_rejected(qwen3_moe):
    other = build("mixtral")
    with pytest.raises(ValueError, match="Mixtral|model class"):
        modes_fx.attach(qwen3_moe, modes_fx.Schedule.constant(other, tau={}))


def test_wrong_site_count_is_rejected(qwen3_moe):
    deeper = build("qwen3_moe", num_hidden_layers=3)
    with pytest.raises(ValueError, match="3 MoE sites, model has 2"):
        modes_fx.attach(qwen3_moe, modes_fx.Schedule.constant(deeper, tau={}))


@pytest.mark.parametrize("field,value,match", [("alpha", math.nan, "alpha"), ("alpha", -0.5, "alpha"), ("tau", math.nan, "tau"), ("tau", -1.0, "tau")])
def test_nan_or_negative_alpha_or_tau_is_rejected(qwen3_moe, field, value, match):
    doc = modes_fx.Schedule.constant(qwen3_moe, tau={"text": 0.1}).to_dict()
    if field == "alpha":
        doc["alpha"][0][0] = value
    else:
        doc["tau"][0] = value
    with pytest.raises(ValueError, match=match):
        modes_fx.Schedule.from_dict(doc)


def test_unknown_modality_is_rejected(qwen3_moe):
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        modes_fx.Schedule.constant(qwen3_moe, tau={"smell": 0.1})


def test_model_without_moe_is_rejected():
    llama = extra_model("llama")
    with pytest.raises(ValueError, match="no MoE"):
        modes_fx.Schedule.constant(llama, tau={})


def test_unknown_backend_option_and_inner_compiler_are_rejected(qwen3_moe):
    modes_fx.attach(qwen3_moe, modes_fx.Schedule.constant(qwen3_moe, tau={}))
    for options, match in (({"bogus": 1}, "unknown option"), ({"inner": "tvm"}, "unknown inner compiler")):
        torch._dynamo.reset()
        with pytest.raises(Exception, match=match), torch.no_grad():
            torch.compile(qwen3_moe, backend="modes", options=options)(**text_inputs(qwen3_moe))


def test_calling_a_submodule_without_the_hook_is_an_error(qwen3_moe):
    modes_fx.attach(qwen3_moe, modes_fx.Schedule.constant(qwen3_moe, tau={}))
    runtime.state_of(qwen3_moe).modality_ids = None
    torch._dynamo.reset()
    inner = torch.compile(qwen3_moe.model, backend="modes", options={"inner": "eager"})
    with pytest.raises(Exception, match="no token modalities"), torch.no_grad():
        inner(**text_inputs(qwen3_moe))


def test_entry_point_and_schedule_option_in_a_fresh_interpreter(tmp_path):
    """backend="modes" resolves through the entry point: modes_fx is never imported by the script."""
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    modes_fx.Schedule.constant(model, tau={"text": math.inf}).save(tmp_path / "schedule.json")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, experts_implementation="grouped_mm").eval()
        ids = torch.tensor([[3, 5, 7, 9, 11]])
        with torch.no_grad():
            dense = model(input_ids=ids).logits
            assert "modes_fx" not in sys.modules
            compiled = torch.compile(model, backend="modes", options={{"schedule": {str(tmp_path / 'schedule.json')!r}, "inner": "eager"}})
            first = compiled(input_ids=ids).logits
            second = compiled(input_ids=ids).logits
        import modes_fx
        print("REWRITES", len(modes_fx.last_report().rewrites))
        print("SAME", torch.equal(first, second), "DIFFERS", (first - dense).abs().max().item() > 1e-4)
        """
    )
    env = dict(os.environ, PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REWRITES 2" in done.stdout
    assert "SAME True DIFFERS True" in done.stdout
