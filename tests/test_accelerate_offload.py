"""A model loaded with accelerate's ``device_map`` and modules offloaded to disk (accelerate's
dispatch hooks load their weights for each call, meta tensors in between): calibrated, attached
and compiled with ``backend="modes"``. On a CPU-only machine a "cpu" entry is the execution
device, so the offloaded modules are the "disk" entries (``offload_folder``): here the vision
tower and the LM head of a tiny Qwen3-VL-MoE. MoE layers offloaded too are refused at attach with
the reason: modes-fx finds a site by its router weight and runs the experts from their weights."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

import modes_fx
from modes_fx import runtime
from modes_fx.calib import GridSpec, calibrate
from modes_fx.compiled import set_compiled_forward
from modes_fx.harness.testing import build, calibration_items, greedy_generate, image_inputs, skip_rule_reference
from modes_fx.sites import UnsupportedModelError

OFFLOAD_TOWER_AND_HEAD = {"model.visual": "disk", "model.language_model": "cpu", "lm_head": "disk"}
OFFLOAD_MOE_LAYER_1 = {
    "model.visual": "cpu",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "disk",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
TAU = {"text": 0.3, "image": 0.25, "video": 0.35}
ALPHA = {"text": [0.7, 0.3], "image": [0.4, 0.6], "video": [0.5, 0.5]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The in-memory tiny model and the folder it was saved to."""
    model = build("qwen3_vl_moe")
    folder = tmp_path_factory.mktemp("tiny_qwen3_vl_moe")
    model.save_pretrained(folder)
    return model, folder


def _load(folder, offload_folder, device_map) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_pretrained(folder, device_map=device_map, offload_folder=offload_folder).eval()


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_offloaded_model_attaches_compiles_and_skips(saved, tmp_path):
    dense_model, folder = saved
    model = _load(folder, tmp_path, OFFLOAD_TOWER_AND_HEAD)
    assert model.model.visual.patch_embed.proj.weight.is_meta and model.lm_head.weight.is_meta  # really offloaded
    inputs = image_inputs(dense_model, batch=2, pad=True)
    dense, dense_tokens = _logits(dense_model, inputs), greedy_generate(dense_model, inputs, max_new_tokens=2)
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    torch._dynamo.reset()
    model.compile(backend="modes", options={"inner": "eager"})
    try:
        with modes_fx.track() as t:
            got = _logits(model, inputs)
            tokens = greedy_generate(model, inputs, max_new_tokens=2)
        assert (got - dense).abs().max().item() <= 1e-5
        assert torch.equal(tokens, dense_tokens)
        assert t.skipped == 0 and t.kept > 0

        runtime.state_of(model).set_thresholds(modes_fx.Schedule.constant(model, tau=TAU, alpha=ALPHA).thresholds())
        with skip_rule_reference(dense_model, TAU, ALPHA) as counts:
            expected = _logits(dense_model, inputs)
        with modes_fx.track() as t:
            got = _logits(model, inputs)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for kind in ("text", "image"):
            assert 0 < counts[kind]["skipped"] < counts[kind]["total"], counts
            assert t.by_modality[kind] == counts[kind]["skipped"] / counts[kind]["total"], kind
    finally:
        set_compiled_forward(model, None)
        modes_fx.detach(model)
        torch._dynamo.reset()


def test_offloaded_model_calibrates_to_its_target(saved, tmp_path):
    _, folder = saved
    model = _load(folder, tmp_path, OFFLOAD_TOWER_AND_HEAD)
    data = calibration_items(model, batches=1, answer_tokens=2)
    grid = GridSpec(points=4, mapping="linear", tau_max={"text": 0.6, "vision": 0.6})
    schedule = calibrate(model, data, target_skip=0.5, grid=grid, progress=False)
    assert schedule.measured_skip >= 0.5
    assert model.model.visual.patch_embed.proj.weight.is_meta  # still offloaded after calibration


def test_offloaded_moe_layers_are_refused_at_attach(saved, tmp_path):
    _, folder = saved
    model = _load(folder, tmp_path, OFFLOAD_MOE_LAYER_1)
    assert model.model.language_model.layers[1].mlp.experts.gate_up_proj.is_meta
    with pytest.raises(UnsupportedModelError, match=r"model\.language_model\.layers\.1\.mlp: its router or expert weights are on the meta device") as error:
        modes_fx.Schedule.constant(model, tau={"text": 0.1})
    assert "layers.0.mlp" not in str(error.value)
