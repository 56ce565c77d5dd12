"""The backend copies and matches each graph Dynamo hands it exactly once, whatever the passes
(issue 13, "match once, rewrite once"), and hands a graph it did not rewrite to the inner
compiler as it received it."""
from collections import Counter

import pytest
import torch

import modes_fx
import modes_fx.backend as backend
import modes_fx.passes.graph_edit as graph_edit
from modes_fx.harness.testing import build, text_inputs

from graph_capture import count_targets

MODES_OPS = ("modes.route_mask.default", "modes.masked_experts.default")


@pytest.fixture
def counted(monkeypatch):
    """Counts of ``match_moe_sites`` / ``copy_graph_module`` calls (wherever the backend and the
    passes look them up), the GraphModules copied from, and those handed to the inner compiler."""
    seen = {"calls": Counter(), "copied": [], "inner": []}

    def counting(name, fn):
        def wrapper(arg, *args, **kwargs):
            seen["calls"][name] += 1
            if name == "copy_graph_module":
                seen["copied"].append(arg)
            return fn(arg, *args, **kwargs)

        return wrapper

    for name in ("match_moe_sites", "copy_graph_module"):
        wrapper = counting(name, getattr(graph_edit, name))
        for module in (backend, graph_edit):
            monkeypatch.setattr(module, name, wrapper, raising=False)
    real_inner = backend._inner_compile

    def inner(gm, *args, **kwargs):
        seen["inner"].append(gm)
        return real_inner(gm, *args, **kwargs)

    monkeypatch.setattr(backend, "_inner_compile", inner)
    torch._dynamo.reset()
    modes_fx.reset_report()
    yield seen
    torch._dynamo.reset()


def test_moe_graph_is_copied_once_and_matched_once(counted):
    model = build("qwen3_moe")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    try:
        model.compile(backend="modes", options={"inner": "eager"})
        with torch.no_grad():
            model(**text_inputs(model))
    finally:
        modes_fx.detach(model)
    report = modes_fx.last_report()
    graphs = len(report.graphs)
    assert graphs >= 1 and report.rewrites and report.unsupported == []
    assert counted["calls"] == {"match_moe_sites": graphs, "copy_graph_module": graphs}
    # Dynamo's graphs are left as they were; the inner compiler gets the rewritten copies
    assert all(not any(count_targets(gm)[op] for op in MODES_OPS) for gm in counted["copied"])
    rewritten = [gm for gm in counted["inner"] if count_targets(gm)[MODES_OPS[1]]]
    assert len(rewritten) == sum(1 for g in report.graphs if g.rewrites)
    assert not any(gm is src for gm in rewritten for src in counted["copied"])


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_graph_without_moe_routing_is_handed_over_uncopied(counted):
    model = TwoLayers().eval()
    model.compile(backend="modes", options={"inner": "eager"})
    with torch.no_grad():
        model(torch.randn(3, 8))
    (graph,) = modes_fx.last_report().graphs
    assert graph.rewrites == [] and graph.unsupported == []
    assert counted["calls"] == {"match_moe_sites": 1, "copy_graph_module": 1}
    (handed,) = counted["copied"]
    assert [id(gm) for gm in counted["inner"]] == [id(handed)]  # the very GraphModule Dynamo handed over
