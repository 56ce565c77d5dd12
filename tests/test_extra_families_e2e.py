"""``backend="modes"`` end to end, on text inputs, on the transformers 5.24 multimodal MoE families
built by ``extra_models``: DeepSeek-OCR-2 and Unlimited-OCR (DeepSeek-V2 routers: softmax top-k,
not renormalised, times ``routed_scaling_factor``, set to 2 here so that π and the dispatched
weights differ) and Qwen4-Exp (Qwen3.5-MoE family). Only the MoE blocks are compiled with the
modes backend, the rest runs eagerly (modality ids still come from the model's own forward): a
whole-model Dynamo trace costs ~15 s per tiny OCR model and ~40 s for Qwen4-Exp on this machine,
and the router-to-experts graph the backend matches is the block's own either way.

τ = 0 equals the uncompiled model (forward and generate), τ = +inf for text equals removing the
routed experts of the text tokens, and mid thresholds with per-layer α equal the independent
``skip_rule_reference`` (which compares α·w with τ on the dispatched weights w = scale·π, so it
is given scale·τ), with ``track()`` counting the pairs it skips."""
import math

import pytest
import torch

import modes_fx
from extra_models import extra_model
from modes_fx import runtime
from modes_fx.compiled import set_compiled_forward
from modes_fx.harness.testing import (
    current_experts_implementation,
    greedy_generate,
    modality_mask,
    remove_routed_experts,
    router_modules,
    skip_rule_reference,
    text_inputs,
)

# name: config overrides
FAMILIES = {
    "deepseek_ocr2": dict(text_config=dict(routed_scaling_factor=2.0)),
    "unlimited_ocr": dict(text_config=dict(routed_scaling_factor=2.0)),
    "qwen4_exp": {},
}
MID_TAU, MID_ALPHA = 0.3, [0.7, 0.4]  # π thresholds that skip some but not all pairs
ROUTER_STD = 2.0  # × 1/sqrt(H): router logits with std ~2, so top-k weights differ across tokens


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _tiny(name: str, impl: str):
    """The tiny model with routers re-initialised (seeded) so that routing weights spread out."""
    model = extra_model(name, **FAMILIES[name])
    model.set_experts_implementation(impl)
    assert current_experts_implementation(model) == impl
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, router in router_modules(model):
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * ROUTER_STD / router.weight.shape[1] ** 0.5)
    return model


class Compiled:
    """One tiny model attached, its MoE blocks compiled with ``backend="modes"`` once (thresholds
    change without recompiling), an uncompiled twin with the same weights, and text inputs (one
    left-padded row)."""

    def __init__(self, name: str, impl: str):
        self.model, self.twin = _tiny(name, impl), _tiny(name, impl)
        self.inputs = text_inputs(self.model)
        self.sites = modes_fx.Schedule.constant(self.model, tau={}).site_paths
        modes_fx.attach(self.model, modes_fx.Schedule.constant(self.model, tau={}))
        torch._dynamo.reset()
        modes_fx.reset_report()
        for path in self.sites:
            self.model.get_submodule(path).compile(backend="modes", options={"inner": "eager"})

    def use(self, **schedule) -> None:
        """Put ``Schedule.constant(model, **schedule)``'s thresholds in force (no recompile)."""
        runtime.state_of(self.model).set_thresholds(modes_fx.Schedule.constant(self.model, **schedule).thresholds())

    def close(self) -> None:
        for path in self.sites:
            set_compiled_forward(self.model.get_submodule(path), None)
        modes_fx.detach(self.model)
        torch._dynamo.reset()


@pytest.fixture(scope="module", params=[(n, i) for n in FAMILIES for i in ("grouped_mm", "batched_mm")], ids="-".join)
def compiled(request):
    case = Compiled(*request.param)
    yield case
    case.close()


def test_tau_zero_equals_uncompiled_forward_and_generate(compiled):
    compiled.use(tau={})
    dense, dense_tokens = _logits(compiled.twin, compiled.inputs), greedy_generate(compiled.twin, compiled.inputs, max_new_tokens=2)
    with modes_fx.track() as t:
        got = _logits(compiled.model, compiled.inputs)
        tokens = greedy_generate(compiled.model, compiled.inputs, max_new_tokens=2)
    report = modes_fx.last_report()
    assert report.rewrites and report.unsupported == []
    assert (got - dense).abs().max().item() <= 1e-5
    assert torch.equal(tokens, dense_tokens)
    assert t.calls == 3 * len(compiled.sites) and t.skipped == 0 and t.kept > 0  # forward, prefill, one decode step


def test_tau_inf_for_one_modality_equals_removing_its_routed_experts(compiled):
    with remove_routed_experts(compiled.twin, modality_mask(compiled.twin, "text")):
        expected = _logits(compiled.twin, compiled.inputs)
    compiled.use(tau={"text": math.inf})
    with modes_fx.track() as t:
        got = _logits(compiled.model, compiled.inputs)
    assert (expected - _logits(compiled.twin, compiled.inputs)).abs().max().item() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert t.by_modality["text"] == 1.0


def test_mid_thresholds_match_an_independent_reference_and_track_counts(compiled):
    scale = runtime.state_of(compiled.model).sites[0].weight_scale
    with skip_rule_reference(compiled.twin, {"text": MID_TAU * scale}, {"text": MID_ALPHA}) as counts:
        expected = _logits(compiled.twin, compiled.inputs)
    assert 0 < counts["text"]["skipped"] < counts["text"]["total"], counts
    compiled.use(tau={"text": MID_TAU}, alpha={"text": MID_ALPHA})
    with modes_fx.track() as t:
        got = _logits(compiled.model, compiled.inputs)
    assert (t.skipped, t.kept + t.skipped) == (counts["text"]["skipped"], counts["text"]["total"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
