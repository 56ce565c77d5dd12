"""The backend's report: totals over every graph, details of the newest KEPT_GRAPHS only (a
server that recompiles for new shapes does not grow it), and one report per attached model."""
import gc

import torch

import modes_fx
from modes_fx.compiled import set_compiled_forward
from modes_fx.harness.testing import build, text_inputs
from modes_fx.passes.match_moe_sites import Unsupported
from modes_fx.report import KEPT_GRAPHS, GraphReport, Report


def test_report_keeps_totals_of_all_graphs_and_details_of_the_newest():
    report = Report()
    for i in range(KEPT_GRAPHS + 10):
        report.add(GraphReport(index=i, num_nodes=3, unsupported=[Unsupported("softmax", "no top-k")] if i % 2 else []))
    assert report.compiled == KEPT_GRAPHS + 10
    assert len(report.graphs) == KEPT_GRAPHS and report.graphs[0].index == 10
    assert report.untouched_sites == (KEPT_GRAPHS + 10) // 2
    assert str(report).splitlines()[:2] == [
        f"modes backend: {KEPT_GRAPHS + 10} graph(s), 0 site rewrite(s), {(KEPT_GRAPHS + 10) // 2} left untouched",
        f"(details of the newest {KEPT_GRAPHS} graphs)",
    ]
    report.clear()
    assert report.compiled == 0 and not report.graphs and str(report) == "modes backend: no graph compiled yet"


def _compiled_run(model) -> None:
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    model.compile(backend="modes", options={"inner": "eager"})
    with torch.no_grad():
        model(**text_inputs(model))


def test_each_attached_model_has_its_own_report():
    torch._dynamo.reset()
    modes_fx.reset_report()
    first, second = build("qwen3_moe"), build("olmoe")
    try:
        _compiled_run(first)
        _compiled_run(second)
        mine, theirs = modes_fx.last_report(first), modes_fx.last_report(second)
        assert {r.site.path for r in mine.rewrites} == {"model.layers.0.mlp", "model.layers.1.mlp"}
        assert mine.rewritten_sites == len(mine.rewrites) >= 2 and theirs.rewritten_sites >= 2
        assert modes_fx.last_report().rewritten_sites == mine.rewritten_sites + theirs.rewritten_sites
        assert modes_fx.last_report(build("mixtral")).compiled == 0  # never compiled: empty
    finally:
        for model in (first, second):
            set_compiled_forward(model, None)
            modes_fx.detach(model)
        torch._dynamo.reset()
    modes_fx.reset_report()
    assert modes_fx.last_report(first).compiled == 0


def test_a_model_report_dies_with_its_model():
    import modes_fx.backend as backend

    torch._dynamo.reset()
    modes_fx.reset_report()
    model = build("qwen3_moe")
    _compiled_run(model)
    assert len(backend._MODEL_REPORTS) == 1
    set_compiled_forward(model, None)
    modes_fx.detach(model)
    del model
    torch._dynamo.reset()
    gc.collect()
    assert len(backend._MODEL_REPORTS) == 0
