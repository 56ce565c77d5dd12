"""``backend="modes"`` end to end on the multimodal MoE families beyond Qwen3-VL-MoE:
InternVL with a Qwen3-MoE language model (InternVL-3.5 MoE; image tokens from its own image
token id), the Qwen3-Omni-MoE thinker (text, image, video and audio tokens in one input, a
four-column schedule) and Qwen3.5-MoE (linear and full attention layers, so ``generate`` runs
on a hybrid cache; a sigmoid-gated shared expert in every MoE block). Every experts
implementation; τ = 0 equals the uncompiled model (forward and generate), τ = +inf for one
modality equals removing that modality's routed experts, τ = +inf for all of them leaves only
the shared experts running, and mid thresholds equal an independent emulation of the rule, with
``track()`` counting the same pairs."""
import math

import pytest
import torch

import modes_fx
from modes_fx import runtime
from modes_fx.compiled import set_compiled_forward
from modes_fx.harness.testing import (
    EXPERTS_IMPLEMENTATIONS,
    MULTIMODAL_MOE_NAMES,
    build,
    greedy_generate,
    mixed_inputs,
    mixed_kinds,
    modality_mask,
    remove_routed_experts,
    skip_rule_reference,
)

EAGER_INNER = {"inner": "eager"}
COLUMNS = {
    "internvl_moe": ["text", "image"],
    "qwen3_omni_moe": ["text", "image", "video", "audio"],
    "qwen3_5_moe": ["text", "image", "video"],
}
# Thresholds and per-layer importance that skip some but not all pairs of every modality.
TAU = {"text": 0.3, "image": 0.25, "video": 0.35, "audio": 0.2}
ALPHA = {"text": [0.7, 0.3], "image": [0.4, 0.6], "video": [0.5, 0.5], "audio": [0.8, 0.2]}


def _logits(fn, inputs):
    with torch.no_grad():
        return fn(**inputs).logits


class Compiled:
    """One tiny model attached and compiled in place with ``backend="modes"`` (compiled once per
    family and experts implementation: thresholds change between tests without recompiling, as
    in calibration), an uncompiled twin with the same weights for the references, and inputs
    holding every modality the model takes."""

    def __init__(self, name: str, impl: str):
        self.name = name
        self.model = build(name, experts_implementation=impl)
        self.twin = build(name, experts_implementation=impl)
        self.inputs = mixed_inputs(self.model, batch=2, pad=True)
        modes_fx.attach(self.model, modes_fx.Schedule.constant(self.model, tau={}))
        torch._dynamo.reset()
        modes_fx.reset_report()
        self.model.compile(backend="modes", options=EAGER_INNER)

    def use(self, **schedule) -> None:
        """Put ``Schedule.constant(model, **schedule)``'s thresholds in force (no recompile)."""
        runtime.state_of(self.model).set_thresholds(modes_fx.Schedule.constant(self.model, **schedule).thresholds())

    def close(self) -> None:
        set_compiled_forward(self.model, None)
        modes_fx.detach(self.model)
        torch._dynamo.reset()


# transformers' eager experts loop is one shared piece of code: it runs on the four-modality Omni thinker
@pytest.fixture(
    scope="module",
    params=[(n, i) for n in MULTIMODAL_MOE_NAMES for i in EXPERTS_IMPLEMENTATIONS if i != "eager" or n == "qwen3_omni_moe"],
    ids=lambda p: "-".join(p),
)
def compiled(request):
    case = Compiled(*request.param)
    yield case
    case.close()


def test_schedule_columns_come_from_the_models_own_token_ids(compiled):
    schedule = runtime.state_of(compiled.model).schedule
    assert schedule.modalities == COLUMNS[compiled.name] == ["text", *mixed_kinds(compiled.model)]
    assert schedule.site_paths == ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]


def test_tau_zero_equals_uncompiled_forward_and_generate(compiled):
    compiled.use(tau={})
    dense_logits = _logits(compiled.twin, compiled.inputs)
    dense_tokens = greedy_generate(compiled.twin, compiled.inputs, max_new_tokens=2)
    with modes_fx.track() as t:
        got = _logits(compiled.model, compiled.inputs)
        tokens = greedy_generate(compiled.model, compiled.inputs, max_new_tokens=2)
    report = modes_fx.last_report()
    assert report.rewrites and report.unsupported == []
    assert (got - dense_logits).abs().max().item() <= 1e-5
    assert torch.equal(tokens, dense_tokens)
    assert t.calls > 0 and t.skipped == 0 and t.kept > 0
    assert set(t.by_modality) == set(COLUMNS[compiled.name])


def test_tau_inf_for_one_modality_equals_removing_its_routed_experts(compiled):
    dense = _logits(compiled.twin, compiled.inputs)
    for kind in COLUMNS[compiled.name]:
        with remove_routed_experts(compiled.twin, modality_mask(compiled.twin, kind)):
            expected = _logits(compiled.twin, compiled.inputs)
        compiled.use(tau={kind: math.inf})
        with modes_fx.track() as t:
            got = _logits(compiled.model, compiled.inputs)
        assert (expected - dense).abs().max().item() > 1e-3, f"the {kind} reference must differ from dense"
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert t.by_modality[kind] == 1.0
        assert all(r == 0.0 for m, r in t.by_modality.items() if m != kind), (kind, t.by_modality)


def test_tau_inf_for_every_modality_leaves_only_the_shared_experts(compiled):
    compiled.use(tau={kind: math.inf for kind in COLUMNS[compiled.name]})
    with modes_fx.track() as t:
        got = _logits(compiled.model, compiled.inputs)
    blocks = [compiled.twin.get_submodule(s.path) for s in runtime.state_of(compiled.model).sites]
    shared = [getattr(b, n) for b in blocks for n in ("shared_expert", "shared_experts") if hasattr(b, n)]
    with remove_routed_experts(compiled.twin, modality_mask(compiled.twin, "all")):
        routed_removed = _logits(compiled.twin, compiled.inputs)
        handles = [m.register_forward_hook(lambda module, args, out: torch.zeros_like(out)) for m in shared]
        try:
            moe_removed = _logits(compiled.twin, compiled.inputs)
        finally:
            for h in handles:
                h.remove()
    assert t.skip_ratio == 1.0
    torch.testing.assert_close(got, routed_removed, rtol=1e-5, atol=1e-5)
    if shared:  # Qwen3.5-MoE: a sigmoid-gated shared expert in every block
        assert (routed_removed - moe_removed).abs().max().item() > 1e-3, "the shared experts must change the output"


def test_mid_thresholds_match_an_independent_reference_and_track_counts(compiled):
    columns = COLUMNS[compiled.name]
    tau, alpha = {c: TAU[c] for c in columns}, {c: ALPHA[c] for c in columns}
    with skip_rule_reference(compiled.twin, tau, alpha) as counts:
        expected = _logits(compiled.twin, compiled.inputs)
    assert all(0 < c["skipped"] < c["total"] for c in counts.values()), counts
    compiled.use(tau=tau, alpha=alpha)
    with modes_fx.track() as t:
        got = _logits(compiled.model, compiled.inputs)
    for kind in columns:
        assert t.by_modality[kind] == counts[kind]["skipped"] / counts[kind]["total"], kind
    assert (t.skipped, t.kept + t.skipped) == (
        sum(c["skipped"] for c in counts.values()),
        sum(c["total"] for c in counts.values()),
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
