"""``backend="modes"`` on the MoE blocks of families whose whole-model Dynamo trace is too slow for
the suite (Qwen4-Exp: ~40 s per compile on this machine): the model is attached, each MoE block
is compiled with the modes backend, the rest runs eagerly. τ = 0 equals the uncompiled model,
τ = +inf for text equals removing the routed experts of the text tokens (the independent
reference of ``modes_fx.harness.testing``), for every vectorised experts implementation."""
import math

import pytest
import torch

import modes_fx
from extra_models import extra_model
from modes_fx import runtime
from modes_fx.harness.testing import current_experts_implementation, modality_mask, remove_routed_experts, text_inputs

NAMES = ("qwen4_exp",)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module", params=[(n, i) for n in NAMES for i in ("grouped_mm", "batched_mm")], ids="-".join)
def blocks_compiled(request):
    """(model with its MoE blocks compiled by the modes backend, uncompiled twin, text inputs)."""
    name, impl = request.param
    model, twin = extra_model(name), extra_model(name)
    for m in (model, twin):
        m.set_experts_implementation(impl)
        assert current_experts_implementation(m) == impl
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    torch._dynamo.reset()
    modes_fx.reset_report()
    for site in runtime.state_of(model).sites:
        model.get_submodule(site.path).compile(backend="modes", options={"inner": "eager"})
    yield model, twin, text_inputs(model)
    modes_fx.detach(model)
    torch._dynamo.reset()


def test_moe_blocks_at_tau_zero_equal_uncompiled(blocks_compiled):
    model, twin, inputs = blocks_compiled
    runtime.state_of(model).set_thresholds(modes_fx.Schedule.constant(model, tau={}).thresholds())
    with modes_fx.track() as t:
        got = _logits(model, inputs)
    report = modes_fx.last_report()
    assert report.rewrites and report.unsupported == []
    assert (got - _logits(twin, inputs)).abs().max().item() <= 1e-5
    assert t.calls == len(runtime.state_of(model).sites) and t.skipped == 0 and t.kept > 0


def test_moe_blocks_at_tau_inf_for_text_equal_removing_its_routed_experts(blocks_compiled):
    model, twin, inputs = blocks_compiled
    with remove_routed_experts(twin, modality_mask(twin, "text")):
        expected = _logits(twin, inputs)
    runtime.state_of(model).set_thresholds(modes_fx.Schedule.constant(model, tau={"text": math.inf}).thresholds())
    with modes_fx.track() as t:
        got = _logits(model, inputs)
    assert (expected - _logits(twin, inputs)).abs().max().item() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert t.by_modality["text"] == 1.0
