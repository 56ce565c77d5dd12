"""``backend="modes"`` end to end on the DeepSeek-V3 router family (DeepseekV3ForCausalLM,
Kimi_K25ForConditionalGeneration with images, Glm4vMoeForConditionalGeneration with images),
with every experts implementation: τ = 0 equals the uncompiled model (forward and generate),
τ = +inf for one modality equals removing that modality's routed experts (shared experts still
run), mid thresholds with per-layer α equal an independent MoDES emulation, and ``track()``
counts the pairs that emulation skips.

Each case builds and compiles its model once: thresholds change between calls without a
recompile (``AttachedState.set_thresholds``), so the references are taken first, uncompiled."""
import contextlib
import math

import pytest
import torch

import modes_fx
from modes_fx import runtime
from modes_fx.compiled import set_compiled_forward
from modes_fx.harness.testing import (
    EXPERTS_IMPLEMENTATIONS,
    SIGMOID_MODEL_NAMES,
    SIGMOID_MOE_LAYERS,
    build,
    experts_modules,
    greedy_generate,
    image_inputs,
    modality_mask,
    remove_routed_experts,
    router_modules,
    text_inputs,
)

MID_TAU = {"text": 0.4, "image": 0.35}
MID_ALPHA = {"text": [0.7, 0.3], "image": [0.4, 0.6]}  # one α per MoE layer
KIND_IDS = {"text": 1, "image": 2}  # modality ids of the schedule columns ["text", "image", "video"]


def _inputs(model, name):
    return text_inputs(model) if name == "deepseek_v3" else image_inputs(model, batch=2, pad=True)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@contextlib.contextmanager
def modes_emulation(model, tau, alpha):
    """Independent MoDES emulation (no modes_fx code) on an uncompiled model, any experts
    implementation: a pre-hook on each experts module recomputes π from the MoE block input and
    the router weight — sigmoid(h Wᵀ) at the selected experts, renormalised when the config says
    so, without the correction bias or the routed scaling factor — and zeroes the weight of every
    pair with α[l, m]·π < τ[m] (dropped, not renormalised; shared experts untouched). Padding is
    never skipped. Yields counts {"skipped", "total"} over non-padding tokens."""
    cfg = model.config.get_text_config()
    counts = {"skipped": 0, "total": 0}
    current = {}

    def on_call(module, args, kwargs):
        ids = kwargs["input_ids"]
        attended = kwargs["attention_mask"][:, -ids.shape[1]:].bool()
        kind = torch.where(ids == getattr(model.config, "image_token_id", -1), KIND_IDS["image"], KIND_IDS["text"])
        current["kind"] = torch.where(attended, kind, 0).reshape(-1)

    def make_hook(layer, router):
        def drop(module, args):
            hidden, index, weights = args
            pi = torch.sigmoid(hidden.float() @ router.weight.float().T).gather(1, index)
            if cfg.norm_topk_prob:
                pi = pi / pi.sum(-1, keepdim=True)
            torch.testing.assert_close(weights.float(), pi * cfg.routed_scaling_factor)  # the router we emulate
            kind = current["kind"]
            a = torch.tensor([0.0] + [alpha[k][layer] for k in KIND_IDS])[kind]
            t = torch.tensor([0.0] + [tau.get(k, 0.0) for k in KIND_IDS])[kind]
            skip = (a[:, None] * pi < t[:, None]) & (kind[:, None] > 0)
            counts["skipped"] += int(skip.sum())
            counts["total"] += int((kind > 0).sum()) * index.shape[1]
            return hidden, index, weights.masked_fill(skip, 0.0)

        return drop

    handles = [model.register_forward_pre_hook(on_call, with_kwargs=True)]
    for layer, ((_, experts), (_, router)) in enumerate(zip(experts_modules(model), router_modules(model))):
        handles.append(experts.register_forward_pre_hook(make_hook(layer, router)))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _thresholds(model, tau, alpha=None):
    alpha = {k: v for k, v in (alpha or {}).items() if k in _columns(model)}
    return modes_fx.Schedule.constant(model, tau=tau, alpha=alpha, modalities=_columns(model)).thresholds()


def _columns(model):
    return ["text", "image", "video"] if hasattr(model.config, "image_token_id") else ["text"]


# transformers' eager experts loop is one shared piece of code (a Dynamo trace of it costs ~25 s):
# it runs on Kimi-K2.5, whose experts default to it
@pytest.mark.parametrize(
    "impl,name",
    [(i, n) for i in EXPERTS_IMPLEMENTATIONS for n in SIGMOID_MODEL_NAMES if i != "eager" or n == "kimi_k25"],
    ids=lambda v: str(v),
)
def test_tau_zero_inf_and_mid_thresholds_against_independent_references(impl, name):
    model = build(name, experts_implementation=impl)
    inputs = _inputs(model, name)
    removed_kind = "text" if name == "deepseek_v3" else "image"
    tau = {k: v for k, v in MID_TAU.items() if k in _columns(model)}
    dense = _logits(model, inputs)
    dense_tokens = greedy_generate(model, inputs, max_new_tokens=2)
    with remove_routed_experts(model, modality_mask(model, removed_kind)):
        removed = _logits(model, inputs)
    with modes_emulation(model, tau, MID_ALPHA) as counts:
        emulated = _logits(model, inputs)
    assert (removed - dense).abs().max() > 1e-3 and (emulated - dense).abs().max() > 1e-3
    assert 0 < counts["skipped"] < counts["total"]

    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}, modalities=_columns(model)))
    state = runtime.state_of(model)
    modes_fx.reset_report()
    torch._dynamo.reset()
    model.compile(backend="modes", options={"inner": "eager"})
    try:
        with modes_fx.track() as at_zero:
            got = _logits(model, inputs)
            tokens = greedy_generate(model, inputs, max_new_tokens=2)
        state.set_thresholds(_thresholds(model, {removed_kind: math.inf}))
        with modes_fx.track() as at_inf:
            got_removed = _logits(model, inputs)
        state.set_thresholds(_thresholds(model, tau, MID_ALPHA))
        with modes_fx.track() as at_mid:
            got_mid = _logits(model, inputs)
    finally:
        set_compiled_forward(model, None)
        modes_fx.detach(model)
        torch._dynamo.reset()

    report = modes_fx.last_report()
    assert report.rewrites and report.unsupported == []
    assert {r.site.router_kind for r in report.rewrites} == {"sigmoid_grouped_topk"}
    assert (got - dense).abs().max().item() <= 1e-5
    assert torch.equal(tokens, dense_tokens)
    # every MoE layer of every call (forward, prefill, one decode step) went through modes:
    # L·k pairs per non-padding token of the forward and the prefill, and per row when decoding
    attended, rows = int(inputs["attention_mask"].sum()), inputs["input_ids"].shape[0]
    top_k = model.config.get_text_config().num_experts_per_tok
    assert at_zero.calls == 3 * SIGMOID_MOE_LAYERS
    assert (at_zero.kept, at_zero.skipped) == (SIGMOID_MOE_LAYERS * top_k * (2 * attended + rows), 0)

    torch.testing.assert_close(got_removed, removed, rtol=1e-5, atol=1e-5)
    assert at_inf.by_modality[removed_kind] == 1.0
    assert all(r == 0.0 for m, r in at_inf.by_modality.items() if m != removed_kind)

    torch.testing.assert_close(got_mid, emulated, rtol=1e-4, atol=1e-4)
    assert (at_mid.skipped, at_mid.kept + at_mid.skipped) == (counts["skipped"], counts["total"])


def test_mid_thresholds_with_inductor():
    """Inductor compiles the rewritten router (in-place renormalisation, π read by route_mask)."""
    model = build("deepseek_v3", experts_implementation="grouped_mm")
    inputs = _inputs(model, "deepseek_v3")
    tau, alpha = {"text": MID_TAU["text"]}, {"text": MID_ALPHA["text"]}
    with modes_emulation(model, tau, MID_ALPHA) as counts:
        emulated = _logits(model, inputs)
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau=tau, alpha=alpha))
    torch._dynamo.reset()
    try:
        with modes_fx.track() as t:
            got = _logits(torch.compile(model, backend="modes"), inputs)
    finally:
        modes_fx.detach(model)
        torch._dynamo.reset()
    assert 0 < counts["skipped"] < counts["total"]
    torch.testing.assert_close(got, emulated, rtol=1e-4, atol=1e-4)
    assert (t.skipped, t.kept + t.skipped) == (counts["skipped"], counts["total"])
