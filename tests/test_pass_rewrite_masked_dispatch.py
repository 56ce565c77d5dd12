"""RewriteMaskedDispatch on real Dynamo graphs of tiny transformers models: what it rewrites,
what it must not rewrite, and the invariants of its output graph."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

import modes_fx
from modes_fx.backend import resolver_for
from modes_fx.passes.match_moe_sites import match_moe_sites
from modes_fx.passes.rewrite_masked_dispatch import RewriteMaskedDispatch
from modes_fx.sites import UnsupportedModelError, find_moe_sites

from extra_models import extra_model
from graph_capture import capture, count_targets, signature
from modes_fx.harness.testing import build, text_inputs

MASKED = "modes.masked_experts.default"
ROUTE = "modes.route_mask.default"
DENSE_DISPATCH = ("grouped_mm", "bmm", "histc", "sort", "repeat_interleave")


class GatheredFromBiasedScoresRouter(DeepseekV3TopkRouter):
    """DeepSeek-V3's router with one change: the weights are gathered from the *biased* scores
    (the correction bias leaks into π). Not a router modes supports: it must be left alone."""

    def forward(self, hidden_states):
        logits = F.linear(hidden_states.view(-1, self.hidden_dim).float(), self.weight.float())
        biased = logits.sigmoid() + self.e_score_correction_bias
        group_scores = biased.view(-1, self.num_group, self.num_experts // self.num_group).topk(2, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        mask = group_mask.unsqueeze(-1).expand(-1, self.num_group, self.num_experts // self.num_group).reshape(-1, self.num_experts)
        index = torch.topk(biased.masked_fill(~mask.bool(), float("-inf")), k=self.top_k, dim=-1, sorted=False)[1]
        weights = biased.gather(1, index)
        return logits, weights / weights.sum(-1, keepdim=True) * self.routed_scaling_factor, index


def _near_miss_deepseek_v3():
    """Tiny DeepSeek-V3 (2 MoE layers) whose routers are GatheredFromBiasedScoresRouter."""
    model = build("deepseek_v3", experts_implementation="grouped_mm")
    for site in find_moe_sites(model):
        model.get_submodule(site.router_path).__class__ = GatheredFromBiasedScoresRouter
    return model


def _attached(name, impl, **overrides):
    model = build(name, experts_implementation=impl, **overrides)
    return modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={"text": 0.0}))


@pytest.fixture(scope="module", params=["grouped_mm", "batched_mm"])
def captured(request):
    model = _attached("qwen3_moe", request.param, num_hidden_layers=3)
    (graph,) = capture(model, text_inputs(model))
    yield model, graph
    modes_fx.detach(model)


def test_one_masked_dispatch_op_per_moe_layer_and_no_dense_dispatch_left(captured):
    model, graph = captured
    result = RewriteMaskedDispatch(graph.resolve)(graph.gm)
    assert result.modified
    counts = count_targets(result.graph_module)
    layers = len(find_moe_sites(model))
    assert layers == 3
    assert counts[MASKED] == layers and counts[ROUTE] == layers
    leftovers = [t for t in counts if any(d in t for d in DENSE_DISPATCH)]
    assert leftovers == []


def test_rewrite_never_mutates_its_input(captured):
    _, graph = captured
    before = signature(graph.gm)
    code_before = graph.gm.code
    RewriteMaskedDispatch(graph.resolve)(graph.gm)
    assert signature(graph.gm) == before
    assert graph.gm.code == code_before


def test_rewrite_is_idempotent(captured):
    _, graph = captured
    once = RewriteMaskedDispatch(graph.resolve)(graph.gm).graph_module
    again = RewriteMaskedDispatch(graph.resolve)(once)
    assert not again.modified
    assert signature(again.graph_module) == signature(once)


def test_new_nodes_carry_coherent_meta(captured):
    _, graph = captured
    gm = RewriteMaskedDispatch(graph.resolve)(graph.gm).graph_module
    for node in gm.graph.nodes:
        if str(node.target) in (MASKED, ROUTE):
            value = node.meta["example_value"]
            assert "nn_module_stack" in node.meta
            if str(node.target) == ROUTE:
                scores = node.args[0].meta["example_value"]
                assert value.dtype == torch.bool and value.shape == scores.shape
            else:
                hidden = node.args[0].meta["example_value"]
                assert value.dtype == hidden.dtype and value.shape == hidden.shape
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    originals = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    assert [getattr(n, "_dynamo_source", None) for n in placeholders] == [getattr(n, "_dynamo_source", None) for n in originals]


def test_rewritten_graph_computes_what_the_original_did(captured):
    _, graph = captured
    gm = RewriteMaskedDispatch(graph.resolve)(graph.gm).graph_module
    model_inputs = graph.example_inputs
    with torch.no_grad():
        expected = graph.gm(*model_inputs)
        model = captured[0]
        from modes_fx import runtime

        runtime.state_of(model).record_call(*[text_inputs(model)[k] for k in ("input_ids", "attention_mask")])
        got = gm(*model_inputs)
    for e, g in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_graph_without_moe_is_left_node_for_node():
    model = extra_model("llama")
    (graph,) = capture(model, {"input_ids": torch.randint(0, 64, (1, 5))})
    p = RewriteMaskedDispatch(graph.resolve)
    result = p(graph.gm)
    assert not result.modified and result.graph_module is graph.gm
    assert p.rewrites == [] and p.unsupported == []


def test_unattached_model_is_reported_and_left_untouched():
    model = build("qwen3_moe", experts_implementation="grouped_mm")
    (graph,) = capture(model, text_inputs(model))
    p = RewriteMaskedDispatch(graph.resolve)
    result = p(graph.gm)
    assert not result.modified
    assert len(p.unsupported) == len(find_moe_sites(model))
    assert all("no attached model" in u.reason for u in p.unsupported)


def test_topk_outside_moe_modules_is_not_rewritten_nor_reported():
    class TopKHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 6, bias=False)

        def forward(self, x):
            probs = torch.softmax(self.proj(x), dim=-1)
            values, indices = torch.topk(probs, 2, dim=-1)
            return values / values.sum(-1, keepdim=True), indices

    (graph,) = capture(TopKHead(), {"x": torch.randn(4, 8)})
    matches = match_moe_sites(graph.gm.graph)
    assert len(matches.sites) == 1 and matches.sites[0].consumer == "graph_output"
    assert matches.unsupported == []
    p = RewriteMaskedDispatch(graph.resolve)
    assert not p(graph.gm).modified and p.unsupported == []


def test_near_miss_sigmoid_router_is_reported_unsupported_and_left_untouched():
    model = _near_miss_deepseek_v3()
    assert {s.router_kind for s in find_moe_sites(model)} == {"unknown"}  # the probe refuses it too
    with pytest.raises(UnsupportedModelError, match="selects experts by a formula modes-fx does not know"):
        modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={"text": 0.5}))
    (graph,) = capture(model, text_inputs(model))
    matches = match_moe_sites(graph.gm.graph)
    p = RewriteMaskedDispatch(graph.resolve)
    result = p(graph.gm)
    assert matches.sites == []
    assert [u.where for u in matches.unsupported] == [f"L['self'].{s.router_path}" for s in find_moe_sites(model)]
    assert all("gathered from" in u.reason and "correction bias" in u.reason for u in matches.unsupported)
    assert not result.modified and result.graph_module is graph.gm


def test_dynamic_shapes_graph_rewrites_every_layer():
    """Under dynamic shapes Dynamo computes symbolic sizes inside layer 0's experts and reuses
    them in later layers; layer 0 must still be rewritten (it once was silently skipped)."""
    model = _attached("qwen3_moe", "grouped_mm", num_hidden_layers=3)
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend, dynamic=True)(**text_inputs(model))
        (gm, example_inputs), = graphs
        assert match_moe_sites(gm.graph).unsupported == []
        result = RewriteMaskedDispatch(resolver_for(example_inputs))(gm)
    finally:
        torch._dynamo.reset()
        modes_fx.detach(model)
    counts = count_targets(result.graph_module)
    assert counts[MASKED] == 3 and counts[ROUTE] == 3
    assert [t for t in counts if any(d in t for d in DENSE_DISPATCH)] == []


def test_backend_reports_routing_it_cannot_take():
    """MiniMax-M2's router (sigmoid + correction bias, no groups, the bias passed as a forward
    argument) traces like a sigmoid router, but its behaviour is not probed as a known formula:
    attach refuses the model, and the backend (compiling it anyway) lists every site as
    untouched and leaves the numbers alone."""
    model = extra_model("minimax_m2")
    inputs = text_inputs(model)
    with torch.no_grad():
        dense = model(**inputs).logits
    with pytest.raises(UnsupportedModelError, match="minimax|MiniMax|does not know"):
        modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={"text": 0.5}))
    modes_fx.reset_report()
    torch._dynamo.reset()
    with torch.no_grad(), modes_fx.track() as t:
        got = torch.compile(model, backend="modes", options={"inner": "eager"})(**inputs).logits
    report = modes_fx.last_report()
    assert report.rewrites == [] and len(report.unsupported) == 2
    assert all("belongs to no attached model" in u.reason for u in report.unsupported)
    assert t.calls == 0
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
