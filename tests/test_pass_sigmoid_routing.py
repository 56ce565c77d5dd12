"""The passes on Dynamo graphs of DeepSeek-V3-style routers (sigmoid scores, selection-only
correction bias, grouped top-k, renormalisation, routed scaling factor): what is matched, what
the modes ops are fed (π before the scaling factor, the scaled weights for the dispatch), and the
invariants of the output graph."""
import operator

import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

import modes_fx
from modes_fx.passes.match_moe_sites import match_moe_sites
from modes_fx.passes.rewrite_masked_dispatch import RewriteMaskedDispatch
from modes_fx.passes.rewrite_sentinel_routing import RewriteSentinelRouting
from modes_fx.sites import find_moe_sites

from graph_capture import capture, count_targets, signature
from modes_fx.harness.testing import ROUTED_SCALING_FACTOR, SIGMOID_MODEL_NAMES, SIGMOID_MOE_LAYERS, build, text_inputs

MASKED = "modes.masked_experts.default"
ROUTE = "modes.route_mask.default"
DENSE_DISPATCH = ("grouped_mm", "bmm", "histc", "sort", "repeat_interleave")
ROUTER_NODES = ("sigmoid", "gather", "scatter_", "masked_fill")  # the model's own selection stays


def _attached(name, impl):
    model = build(name, experts_implementation=impl)
    return modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={"text": 0.0}))


@pytest.fixture(
    scope="module",
    params=[(n, "grouped_mm") for n in SIGMOID_MODEL_NAMES] + [("deepseek_v3", "batched_mm")],
    ids=lambda p: "-".join(p),
)
def captured(request):
    model = _attached(*request.param)
    inputs = text_inputs(model)
    (graph,) = [g for g in capture(model, inputs) if match_moe_sites(g.gm.graph).sites]
    yield model, inputs, graph
    modes_fx.detach(model)


def test_each_router_is_matched_as_sigmoid_grouped_topk_with_pi_before_the_scaling_factor(captured):
    _, _, graph = captured
    matches = match_moe_sites(graph.gm.graph)
    assert matches.unsupported == []
    assert len(matches.sites) == SIGMOID_MOE_LAYERS
    for match in matches.sites:
        r = match.routing
        assert (match.consumer, r.kind, r.normalizes, r.scale) == ("experts_region", "sigmoid_grouped_topk", True, ROUTED_SCALING_FACTOR)
        assert r.scores.target is operator.itruediv  # gather / (sum + eps): π, renormalised
        assert r.weights.target is operator.mul and r.weights.args == (r.scores, ROUTED_SCALING_FACTOR)
        assert len(r.selection_topks) == 2  # group scores and group choice: part of the router
        assert r.router_weight.op == "placeholder"


def test_one_masked_dispatch_op_per_moe_layer_and_nothing_dense_left(captured):
    model, _, graph = captured
    gm = RewriteMaskedDispatch(graph.resolve)(graph.gm).graph_module
    counts = count_targets(gm)
    assert counts[MASKED] == counts[ROUTE] == len(find_moe_sites(model)) == SIGMOID_MOE_LAYERS
    assert [t for t in counts if any(d in t for d in DENSE_DISPATCH)] == []
    assert all(counts[t] == SIGMOID_MOE_LAYERS for t in ROUTER_NODES)
    routings = [m.routing for m in match_moe_sites(graph.gm.graph).sites]
    route = [n for n in gm.graph.nodes if str(n.target) == ROUTE]
    masked = [n for n in gm.graph.nodes if str(n.target) == MASKED]
    assert [n.args[0].name for n in route] == [r.scores.name for r in routings]  # thresholds compare π
    assert [n.args[2].name for n in masked] == [r.weights.name for r in routings]  # dispatch: scaled weights
    assert [n.args[3] for n in masked] == route


def test_rewrite_never_mutates_its_input_and_is_idempotent(captured):
    _, _, graph = captured
    before, code_before = signature(graph.gm), graph.gm.code
    once = RewriteMaskedDispatch(graph.resolve)(graph.gm).graph_module
    assert signature(graph.gm) == before and graph.gm.code == code_before
    again = RewriteMaskedDispatch(graph.resolve)(once)
    assert not again.modified and signature(again.graph_module) == signature(once)
    assert match_moe_sites(once.graph).unsupported == []
    assert {m.consumer for m in match_moe_sites(once.graph).sites} == {"rewritten"}


def test_new_nodes_carry_coherent_meta(captured):
    _, _, graph = captured
    gm = RewriteMaskedDispatch(graph.resolve)(graph.gm).graph_module
    for node in gm.graph.nodes:
        if str(node.target) in (MASKED, ROUTE):
            value = node.meta["example_value"]
            assert node.meta["nn_module_stack"] and node.meta["stack_trace"]
            like = node.args[0].meta["example_value"]
            assert value.shape == like.shape
            assert value.dtype == (torch.bool if str(node.target) == ROUTE else like.dtype)
    placeholders = [getattr(n, "_dynamo_source", None) for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == [getattr(n, "_dynamo_source", None) for n in graph.gm.graph.nodes if n.op == "placeholder"]


def test_rewritten_graph_at_tau_zero_computes_what_the_original_did(captured):
    model, inputs, graph = captured
    gm = RewriteMaskedDispatch(graph.resolve)(graph.gm).graph_module
    modes_fx.runtime.state_of(model).record_call(inputs["input_ids"], inputs["attention_mask"])
    with torch.no_grad():
        expected, got = graph.gm(*graph.example_inputs), gm(*graph.example_inputs)
    pairs = list(zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)))
    assert pairs
    for e, g in pairs:
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_eager_experts_router_graph_marks_pairs_below_threshold_with_the_sentinel():
    """The ``eager`` experts loop runs in Python: the router graph outputs (scaled weights,
    indices); the rewrite replaces the indices of pairs with π = weights / scale < threshold by E.
    (One family: the three share the router code; their eager end-to-end runs are in
    test_backend_e2e_sigmoid.py.)"""
    model = _attached("deepseek_v3", "eager")
    inputs = text_inputs(model)
    threshold = 0.5
    try:
        graphs = [g for g in capture(model, inputs) if match_moe_sites(g.gm.graph).sites]
        assert len(graphs) == 1, "Dynamo should reuse one router graph for every layer"
        (g,) = graphs
        p = RewriteSentinelRouting(g.resolve)
        gm = p(g.gm).graph_module
        assert [r.action for r in p.rewrites] == ["sentinel_routing"] and p.unsupported == []
        state = modes_fx.runtime.state_of(model)
        state.record_call(inputs["input_ids"], inputs["attention_mask"])
        table = state.thresholds.clone()
        table[:, 1] = threshold
        state.set_thresholds(table)
        with torch.no_grad():
            original, rewritten = g.gm(*g.example_inputs), gm(*g.example_inputs)
        mods = state.modality_ids
    finally:
        modes_fx.detach(model)
    (index,) = [t for t in original if t.dtype == torch.int64]
    (marked,) = [t for t in rewritten if t.dtype == torch.int64]
    (weights,) = [t for t in original if t.is_floating_point() and t.shape == index.shape]
    pi = weights / ROUTED_SCALING_FACTOR
    torch.testing.assert_close(pi.sum(-1), torch.ones(len(pi)))  # renormalised before scaling
    num_experts = find_moe_sites(model)[0].num_experts
    expected = torch.where((pi < threshold) & (mods[:, None] > 0), num_experts, index)
    assert torch.equal(marked, expected)
    assert (marked == num_experts).any() and (marked != num_experts).any()


class _Values(fx.Interpreter):
    """Runs a graph and keeps the value of the nodes in ``wanted``."""

    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.values = set(wanted), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out.clone()
        return out


@settings(max_examples=5, deadline=None)
@given(
    groups=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4)]),
    top_k=st.integers(1, 3),
    normalizes=st.booleans(),
    scale=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**16),
)
def test_matched_pi_is_the_unbiased_selected_sigmoid_score_renormalised_before_scaling(groups, top_k, normalizes, scale, seed):
    """Property, on a bare DeepseekV3MoE block of random routing config: the matcher reads the
    config off the graph (kind, renormalisation, scaling factor), and the π node evaluates to an
    independent π — sigmoid(h Wᵀ) at the selected experts, no bias, renormalised iff configured —
    with the dispatch weights = scale · π."""
    n_group, topk_group = groups
    config = tf.DeepseekV3Config(
        hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=top_k,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale, norm_topk_prob=normalizes,
    )
    config._experts_implementation = "grouped_mm"
    gen = torch.Generator().manual_seed(seed)
    block = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=gen))
        block.gate.e_score_correction_bias.copy_(torch.randn(8, generator=gen) * 0.3)
    hidden = torch.randn(1, 6, 16, generator=gen)
    (graph,) = capture(block, {"hidden_states": hidden})
    (match,) = match_moe_sites(graph.gm.graph).sites
    r = match.routing
    assert (r.kind, r.normalizes, r.scale) == ("sigmoid_grouped_topk", normalizes, scale)
    run = _Values(graph.gm, [r.scores, r.weights, r.indices])
    with torch.no_grad():
        run.run(*graph.example_inputs)
    index = run.values[r.indices]
    pi = torch.sigmoid(hidden.reshape(-1, 16) @ block.gate.weight.T).gather(1, index)
    if normalizes:
        pi = pi / pi.sum(-1, keepdim=True)
    torch.testing.assert_close(run.values[r.scores], pi)
    torch.testing.assert_close(run.values[r.weights], pi * scale)
