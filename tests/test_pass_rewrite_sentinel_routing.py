"""RewriteSentinelRouting on the graphs Dynamo makes of transformers' ``eager`` experts
implementation: the router is its own graph and the experts loop runs in Python."""
import pytest
import torch

import modes_fx
from modes_fx.passes.rewrite_masked_dispatch import RewriteMaskedDispatch
from modes_fx.passes.rewrite_sentinel_routing import RewriteSentinelRouting

from graph_capture import capture, count_targets, signature
from modes_fx.harness.testing import build, text_inputs


@pytest.fixture(scope="module")
def graphs():
    model = build("qwen3_moe", experts_implementation="eager")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={"text": 0.0}))
    yield model, capture(model, text_inputs(model))
    modes_fx.detach(model)


def _router_graphs(graphs):
    return [g for g in graphs if any("topk" in str(n.target) for n in g.gm.graph.nodes)]


def test_only_router_graphs_are_rewritten_with_one_sentinel_each(graphs):
    model, captured = graphs
    routers = _router_graphs(captured)
    assert routers, "the eager implementation should give router graphs"
    for g in captured:
        p = RewriteSentinelRouting(g.resolve)
        result = p(g.gm)
        if g in routers:
            counts = count_targets(result.graph_module)
            assert result.modified
            assert counts["modes.route_mask.default"] == 1
            assert counts[str(torch.where)] == 1
            (output,) = [n for n in result.graph_module.graph.nodes if n.op == "output"]
            marked = [a for a in output.all_input_nodes if a.target is torch.where]
            assert len(marked) == 1 and marked[0].args[2] == model.config.num_experts
        else:
            assert not result.modified and result.graph_module is g.gm


def test_router_graph_reused_for_every_layer(graphs):
    model, captured = graphs
    assert len(_router_graphs(captured)) == 1, "Dynamo should reuse one router graph for all layers"


def test_masked_dispatch_pass_leaves_router_graphs_alone(graphs):
    _, captured = graphs
    for g in _router_graphs(captured):
        assert not RewriteMaskedDispatch(g.resolve)(g.gm).modified


def test_sentinel_rewrite_is_idempotent_and_does_not_mutate(graphs):
    _, captured = graphs
    (g,) = _router_graphs(captured)
    before = signature(g.gm)
    once = RewriteSentinelRouting(g.resolve)(g.gm).graph_module
    assert signature(g.gm) == before
    again = RewriteSentinelRouting(g.resolve)(once)
    assert not again.modified and signature(again.graph_module) == signature(once)


def test_sentinel_marks_exactly_the_skipped_pairs(graphs):
    model, captured = graphs
    (g,) = _router_graphs(captured)
    gm = RewriteSentinelRouting(g.resolve)(g.gm).graph_module
    state = modes_fx.runtime.state_of(model)
    inputs = text_inputs(model)
    state.record_call(inputs["input_ids"], inputs["attention_mask"])
    table = state.thresholds.clone()
    table[:, 1] = 0.45
    state.set_thresholds(table)
    try:
        with torch.no_grad():
            original = g.gm(*g.example_inputs)
            rewritten = gm(*g.example_inputs)
    finally:
        state.set_thresholds(modes_fx.Schedule.constant(model, tau={"text": 0.0}).thresholds())
    (orig_idx,) = [t for t in original if t.dtype == torch.int64]
    (new_idx,) = [t for t in rewritten if t.dtype == torch.int64]
    (weights,) = [t for t in original if t.dtype.is_floating_point and t.shape == orig_idx.shape]
    mods = state.modality_ids
    expected = torch.where((weights < 0.45) & (mods[:, None] > 0), model.config.num_experts, orig_idx)
    assert torch.equal(new_idx, expected)
    assert (new_idx == model.config.num_experts).any() and (new_idx != model.config.num_experts).any()
