"""``backend="modes"`` end to end on real tiny transformers MoE models: forward and generate(),
every experts implementation, τ = 0 / τ = +inf semantics, per-layer α under graph reuse, and
``track()`` against a direct count."""
import math

import pytest
import torch

import modes_fx
from modes_fx.sites import find_moe_sites

from tiny_models import (
    EXPERTS_IMPLEMENTATIONS,
    MODEL_NAMES,
    build,
    greedy_generate,
    image_inputs,
    modality_mask,
    remove_routed_experts,
    router_modules,
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


CASES = [(n, impl, False) for n in MODEL_NAMES for impl in EXPERTS_IMPLEMENTATIONS] + [
    ("qwen3_vl_moe", impl, True) for impl in EXPERTS_IMPLEMENTATIONS
]


@pytest.mark.parametrize("name,impl,with_image", CASES, ids=lambda v: str(v))
def test_tau_zero_equals_uncompiled_forward_and_generate(name, impl, with_image):
    model = build(name, experts_implementation=impl)
    inputs = _inputs(model, name, with_image)
    dense_logits = _logits(model, inputs)
    dense_tokens = greedy_generate(model, inputs, max_new_tokens=3)

    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    modes_fx.reset_report()
    got = _logits(_compiled(model), inputs)
    assert (got - dense_logits).abs().max().item() <= 1e-5
    assert len(modes_fx.last_report().rewrites) >= 1

    torch._dynamo.reset()
    model.compile(backend="modes", options=EAGER_INNER)
    try:
        with modes_fx.track() as t:
            tokens = greedy_generate(model, inputs, max_new_tokens=3)
    finally:
        model._compiled_call_impl = None
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
    others = [r for m, r in t.by_modality.items() if m != kind and not math.isnan(r)]
    assert all(r == 0.0 for r in others)


def _direct_skip_count(model, inputs, schedule):
    """Skipped / total pairs computed from the uncompiled routers' outputs, without modes code."""
    sites = find_moe_sites(model)
    table = schedule.thresholds()
    seen = []
    hooks = [r.register_forward_hook(lambda m, a, out: seen.append(out[1].float())) for _, r in router_modules(model)]
    try:
        _logits(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(sites)
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"][:, -ids.shape[1]:].bool()
    image = model.config.image_token_id
    column = torch.where(ids == image, schedule.modalities.index("image") + 1, schedule.modalities.index("text") + 1)
    column = torch.where(mask, column, 0).reshape(-1)
    skipped = total = 0
    for layer, weights in enumerate(seen):
        thr = table[layer][column]
        counted = column > 0
        skipped += int(((weights < thr[:, None]) & counted[:, None]).sum())
        total += int(counted.sum()) * weights.shape[1]
    return skipped, total


@pytest.mark.parametrize("impl", EXPERTS_IMPLEMENTATIONS)
def test_track_counts_equal_a_direct_count(impl):
    model = build("qwen3_vl_moe", experts_implementation=impl)
    inputs = image_inputs(model, batch=2)
    L = len(find_moe_sites(model))
    schedule = modes_fx.Schedule.constant(
        model, tau={"text": 0.3, "image": 0.25}, alpha={"text": [0.7, 0.3][:L], "image": [0.4, 0.6][:L]}, modalities=["text", "image", "video"]
    )
    skipped, total = _direct_skip_count(model, inputs, schedule)
    assert 0 < skipped < total
    modes_fx.attach(model, schedule)
    try:
        with modes_fx.track() as t:
            _logits(_compiled(model), inputs)
    finally:
        modes_fx.detach(model)
    assert (t.skipped, t.kept + t.skipped) == (skipped, total)
    assert t.skip_ratio == pytest.approx(skipped / total)


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
    assert [t.by_layer[p] for p in layers] == [0.0, 1.0, 0.0, 0.0]
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


def test_grad_mode_call_runs_inference_only():
    model = build("qwen3_moe", experts_implementation="grouped_mm")
    inputs = text_inputs(model)
    dense = _logits(model, inputs)
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    try:
        out = _compiled(model)(**inputs).logits
    finally:
        modes_fx.detach(model)
    assert not out.requires_grad
    assert (out - dense).abs().max().item() <= 1e-5
