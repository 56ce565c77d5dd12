"""calib.encoded.pre_encoded: calibration batches with the vision encoder's outputs and the M-RoPE
position ids computed once. The forward on a pre-encoded batch gives bit-identical logits on
every tiny multimodal family; what it rewrites is counted per family; an encoder that runs an
MoE site, a text-only model and a text-only batch are left alone; a calibration session's
reference pass is the same with and without it."""
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modes_fx.calib import session as session_module
from modes_fx.calib.data import prepare
from modes_fx.calib.encoded import pre_encoded
from modes_fx.calib.session import CalibrationSession, default_modalities
from modes_fx.harness.testing import build, calibration_items, image_inputs, mixed_inputs, text_inputs

# family -> (inputs builder, rewrites expected: encoder outputs, position ids)
FAMILIES = {
    "qwen3_vl_moe": (image_inputs, True, True),
    "qwen3_5_moe": (mixed_inputs, True, True),
    "glm4v_moe": (image_inputs, True, True),
    "internvl_moe": (mixed_inputs, True, False),
    "qwen3_omni_moe": (mixed_inputs, True, True),
}


def _sites(model):
    from modes_fx.sites import known_sites

    return [model.get_submodule(s.path) for s in known_sites(model, None)]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _batch(model, inputs_fn, seed=0, batch=2):
    return prepare(calibration_items(model, 1, inputs=lambda m, **kw: inputs_fn(m, **{**kw, "seed": seed, "batch": batch})))[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_same_logits_and_what_is_rewritten(name):
    inputs_fn, encodes, positions = FAMILIES[name]
    model = build(name)
    batch = _batch(model, inputs_fn)
    encoded = pre_encoded(model, batch, _sites(model))
    assert ("mm_encoder_outputs" in encoded.inputs) == encodes
    assert ("pixel_values" in encoded.inputs) != encodes
    assert ("position_ids" in encoded.inputs) == positions
    assert batch.inputs.keys() != encoded.inputs.keys() or not (encodes or positions)
    assert torch.equal(_logits(model, batch.inputs), _logits(model, encoded.inputs))


@pytest.fixture(scope="module")
def qwen3_vl():
    return build("qwen3_vl_moe")


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_same_logits_any_batch(qwen3_vl, seed, batch):
    b = _batch(qwen3_vl, image_inputs, seed=seed, batch=batch)
    encoded = pre_encoded(qwen3_vl, b, _sites(qwen3_vl))
    assert torch.equal(_logits(qwen3_vl, b.inputs), _logits(qwen3_vl, encoded.inputs))


def test_encoder_that_runs_a_site_is_not_pre_encoded(qwen3_vl):
    batch = _batch(qwen3_vl, image_inputs)
    encoded = pre_encoded(qwen3_vl, batch, [qwen3_vl.model.visual.blocks[0]])  # as if it were an MoE site
    assert "mm_encoder_outputs" not in encoded.inputs
    assert "pixel_values" in encoded.inputs


def test_text_only_model_and_batch_unchanged(qwen3_vl):
    text_model = build("qwen3_moe")
    batch = _batch(text_model, text_inputs)
    assert pre_encoded(text_model, batch, _sites(text_model)).inputs.keys() == batch.inputs.keys()
    batch = _batch(qwen3_vl, text_inputs)
    encoded = pre_encoded(qwen3_vl, batch, _sites(qwen3_vl))
    assert "mm_encoder_outputs" not in encoded.inputs
    assert torch.equal(_logits(qwen3_vl, batch.inputs), _logits(qwen3_vl, encoded.inputs))


def test_session_reference_pass_unchanged(qwen3_vl):
    batches = prepare(calibration_items(qwen3_vl, 2))
    modalities = default_modalities(qwen3_vl, batches)
    with CalibrationSession(qwen3_vl, batches, modalities) as s:
        assert all("mm_encoder_outputs" in b.inputs for b in s.batches)
        table = s.base.thresholds()
        table[:, 1:] = 0.3
        with_pre = (s.reference, s.measure_table(table))
    with mock.patch.object(session_module, "pre_encoded", lambda model, batch, sites: batch):
        with CalibrationSession(qwen3_vl, batches, modalities) as s:
            assert all("pixel_values" in b.inputs for b in s.batches)
            without = (s.reference, s.measure_table(table))
    assert all(torch.equal(a, b) for a, b in zip(with_pre[0], without[0], strict=True))
    assert with_pre[1] == without[1]
