"""``backend="modes"`` end to end on real tiny transformers MoE models: forward and generate(),
every experts implementation, τ = 0 / τ = +inf semantics, per-layer α under graph reuse, and
``track()`` against a direct count."""
import contextlib
import math

import pytest
import torch

import modes_fx

from modes_fx.compiled import set_compiled_forward
from modes_fx.harness.testing import (
    EXPERTS_IMPLEMENTATIONS,
    MODEL_NAMES,
    build,
    greedy_generate,
    image_inputs,
    modality_mask,
    remove_routed_experts,
    experts_modules,
    text_inputs,
)

EAGER_INNER = {"inner": "eager"}


def _inputs(model, name, with_image):
    return image_inputs(model, batch=2) if with_image else text_inputs(model)


def _compiled(model, options=EAGER_INNER):
    torch._dynamo.reset()
    return torch.compile(model, backend="modes", options=options)


def _logits(fn, inputs, **kw):
    with torch.no_grad():
        return fn(**inputs, **kw).logits


# transformers' eager experts loop is the same code in all five families (a Dynamo trace of it
# costs ~25 s per case): it runs on the model with shared experts (qwen2_moe) and with images
EAGER_CASES = {("qwen2_moe", False), ("qwen3_vl_moe", True)}
CASES = [
    (n, impl, image)
    for n, image in [*((n, False) for n in MODEL_NAMES), ("qwen3_vl_moe", True)]
    for impl in EXPERTS_IMPLEMENTATIONS
    if impl != "eager" or (n, image) in EAGER_CASES
]


@pytest.mark.parametrize("name,impl,with_image", CASES, ids=lambda v: str(v))
def test_tau_zero_equals_uncompiled_forward_and_generate(name, impl, with_image):
    model = build(name, experts_implementation=impl)
    inputs = _inputs(model, name, with_image)
    dense_logits = _logits(model, inputs)
    dense_tokens = greedy_generate(model, inputs, max_new_tokens=2)

    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    modes_fx.reset_report()
    got = _logits(_compiled(model), inputs)
    assert (got - dense_logits).abs().max().item() <= 1e-5
    assert len(modes_fx.last_report().rewrites) >= 1

    torch._dynamo.reset()
    model.compile(backend="modes", options=EAGER_INNER)
    try:
        with modes_fx.track() as t:
            tokens = greedy_generate(model, inputs, max_new_tokens=2)
    finally:
        set_compiled_forward(model, None)
        modes_fx.detach(model)
    assert torch.equal(tokens, dense_tokens)
    assert t.calls > 0 and t.skipped == 0


@pytest.mark.parametrize("name,impl", [("qwen3_vl_moe", "grouped_mm"), ("qwen2_moe", "batched_mm")])
def test_tau_zero_with_inductor(name, impl):
    model = build(name, experts_implementation=impl)
    inputs = _inputs(model, name, with_image=False)
    dense = _logits(model, inputs)
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    try:
        got = _logits(_compiled(model, options=None), inputs)
    finally:
        modes_fx.detach(model)
    assert (got - dense).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "name,impl,kind",
    [
        ("qwen3_vl_moe", "grouped_mm", "image"),
        ("qwen3_vl_moe", "batched_mm", "text"),
        ("qwen3_vl_moe", "eager", "image"),
        ("qwen2_moe", "grouped_mm", "text"),
        ("olmoe", "eager", "text"),
    ],
)
def test_tau_inf_for_one_modality_equals_removing_its_routed_experts(name, impl, kind):
    model = build(name, experts_implementation=impl)
    inputs = _inputs(model, name, with_image=name == "qwen3_vl_moe")
    with remove_routed_experts(model, modality_mask(model, kind)):
        expected = _logits(model, inputs)
    dense = _logits(model, inputs)
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={kind: math.inf}))
    try:
        with modes_fx.track() as t:
            got = _logits(_compiled(model), inputs)
    finally:
        modes_fx.detach(model)
    assert (expected - dense).abs().max().item() > 1e-3, "the reference must differ from dense"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert t.by_modality[kind] == 1.0
    others = [r for m, r in t.by_modality.items() if m != kind]
    assert all(r == 0.0 for r in others)


@contextlib.contextmanager
def modes_reference(model, tau, alpha):
    """An independent MoDES emulation (no modes_fx code): on the uncompiled ``eager`` experts
    implementation, a pre-hook on each experts module replaces the index of every pair with
    α[l, m]·π < τ[m] by the sentinel E, which transformers' loop skips. tau: {kind: τ};
    alpha: {kind: [α per layer]}; kinds text/image; padding never skipped. Yields counts
    {"skipped": n, "total": n} over non-padding tokens."""
    counts = {"skipped": 0, "total": 0}
    current = {}

    def on_call(module, args, kwargs):
        ids = kwargs["input_ids"]
        mask = kwargs["attention_mask"][:, -ids.shape[1]:].bool()
        kind = torch.where(ids == model.config.image_token_id, 2, 1)
        current["kind"] = torch.where(mask, kind, 0).reshape(-1)

    def make_hook(layer):
        def skip(module, args):
            hidden, index, weights = args
            kind = current["kind"]
            a = torch.tensor([0.0, alpha["text"][layer], alpha["image"][layer]])[kind]
            t = torch.tensor([0.0, tau["text"], tau["image"]])[kind]
            drop = (a[:, None] * weights.float() < t[:, None]) & (kind[:, None] > 0)
            counts["skipped"] += int(drop.sum())
            counts["total"] += int((kind > 0).sum()) * index.shape[1]
            return hidden, torch.where(drop, module.num_experts, index), weights

        return skip

    handles = [model.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(make_hook(l)) for l, (_, m) in enumerate(experts_modules(model))]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("impl", EXPERTS_IMPLEMENTATIONS)
def test_mid_thresholds_match_an_independent_reference_and_track_counts(impl):
    tau, alpha = {"text": 0.3, "image": 0.25}, {"text": [0.7, 0.3], "image": [0.4, 0.6]}
    reference = build("qwen3_vl_moe", experts_implementation="eager")
    inputs = image_inputs(reference, batch=2, pad=True)
    with modes_reference(reference, tau, alpha) as counts:
        expected = _logits(reference, inputs)
    assert 0 < counts["skipped"] < counts["total"]

    model = build("qwen3_vl_moe", experts_implementation=impl)
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau=tau, alpha=alpha, modalities=["text", "image", "video"]))
    try:
        with modes_fx.track() as t:
            got = _logits(_compiled(model), inputs)
    finally:
        modes_fx.detach(model)
    assert (t.skipped, t.kept + t.skipped) == (counts["skipped"], counts["total"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "impl,kw",
    [("eager", {}), ("grouped_mm", {"use_cache": False})],
    ids=["eager-router-graph-reused", "image-decoder-layer-graph-reused"],
)
def test_one_graph_serving_several_layers_applies_each_layers_alpha(impl, kw):
    model = build("qwen3_vl_moe", experts_implementation=impl, num_hidden_layers=4)
    inputs = image_inputs(model, batch=1)
    # α = 0 with τ > 0 skips every text pair of layer 1 only; the other layers keep everything.
    schedule = modes_fx.Schedule.constant(model, tau={"text": 1e-9}, alpha={"text": [1.0, 0.0, 1.0, 1.0]})
    with remove_routed_experts(model, modality_mask(model, "text"), layers=[1]):
        expected = _logits(model, inputs, **kw)
    modes_fx.attach(model, schedule)
    modes_fx.reset_report()
    try:
        with modes_fx.track() as t:
            got = _logits(_compiled(model), inputs, **kw)
    finally:
        modes_fx.detach(model)
    rewrites = modes_fx.last_report().rewrites
    assert len(rewrites) < 4, "one graph should serve several layers"
    layers = sorted(t.by_layer)
    assert [t.counts[(p, "text")].skip_ratio for p in layers] == [0.0, 1.0, 0.0, 0.0]
    assert [t.counts[(p, "image")].skip_ratio for p in layers] == [0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compilations_do_not_grow_with_layers():
    counts = []
    for layers in (2, 4):
        model = build("qwen3_vl_moe", experts_implementation="grouped_mm", num_hidden_layers=layers)
        modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={"text": 0.2}))
        modes_fx.reset_report()
        try:
            _logits(_compiled(model), image_inputs(model), use_cache=False)
        finally:
            modes_fx.detach(model)
        counts.append(len(modes_fx.last_report().graphs))
    assert counts[0] == counts[1]


def test_call_with_grad_enabled_runs_rewritten_graphs_without_autograd():
    model = build("qwen3_moe", experts_implementation="grouped_mm")
    inputs = text_inputs(model)
    dense = _logits(model, inputs)
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    try:
        out = _compiled(model)(**inputs).logits
    finally:
        modes_fx.detach(model)
    assert (out.detach() - dense).abs().max().item() <= 1e-5
