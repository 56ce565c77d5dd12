"""Families modes-fx refuses: Llama4 (every expert runs on every token as one dense bmm; top-1
sigmoid scores scale the expert input), Ernie-4.5-VL-MoE (separate text and vision expert
groups on data-dependent token subsets, bias-corrected selection) and Aria (softmax over the
top-k raw logits, transposed experts), plus any router of an unknown kind. Refused where users meet them: ``Schedule.constant`` / ``attach`` raise naming each block
and why; compiled without a schedule, the backend's report lists each router left untouched and
the model computes exactly what it computes uncompiled."""
import pytest
import torch

import modes_fx
from extra_models import extra_model
from modes_fx.sites import REFUSED_BLOCKS, UnsupportedModelError, unsupported_moe_blocks
from modes_fx.harness.testing import TEXT_ID_HIGH, TEXT_ID_LOW, build

# name: (refused block paths, the reason's key phrase, the graph report's key phrase)
REFUSED = {
    "llama4": (["model.layers.0.feed_forward", "model.layers.1.feed_forward"], "dense bmm over all experts", "raw router logits"),
    "ernie4_5_vl_moe": (["model.language_model.layers.1.mlp"], "separate text and vision expert groups", "adds a bias to the softmax"),
    "aria": (["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"], "softmaxes only the selected ones", "raw router logits"),
}


@pytest.fixture(scope="module", params=sorted(REFUSED))
def refused(request):
    return request.param, extra_model(request.param)


def test_refused_blocks_are_listed_with_their_reason(refused):
    name, model = refused
    paths, phrase, _ = REFUSED[name]
    blocks = unsupported_moe_blocks(model)
    assert [b.path for b in blocks] == paths
    assert all(b.reason == REFUSED_BLOCKS[type(model.get_submodule(b.path)).__name__] for b in blocks)
    assert all(phrase in b.reason for b in blocks)


def test_schedule_and_attach_refuse_naming_each_block(refused):
    name, model = refused
    paths, phrase, _ = REFUSED[name]
    with pytest.raises(UnsupportedModelError, match=f"{type(model).__name__} is not supported") as error:
        modes_fx.Schedule.constant(model, tau={"text": 0.1})
    assert all(f"{p}: " in str(error.value) for p in paths) and phrase in str(error.value)
    other = build("qwen3_moe")
    with pytest.raises(UnsupportedModelError, match=phrase):
        modes_fx.attach(model, modes_fx.Schedule.constant(other, tau={"text": 0.1}))
    assert modes_fx.runtime.state_of(model) is None


def test_backend_reports_the_routers_it_leaves_untouched(refused):
    name, model = refused
    paths, _, graph_phrase = REFUSED[name]
    input_ids = torch.randint(TEXT_ID_LOW, TEXT_ID_HIGH, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    modes_fx.reset_report()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(model, backend="modes", options={"inner": "eager"})(input_ids=input_ids).logits
    finally:
        torch._dynamo.reset()
    report = modes_fx.last_report()
    assert report.rewrites == []
    untouched = report.unsupported
    assert untouched and all(graph_phrase in u.reason for u in untouched)
    assert all(any(p in u.where for p in paths) for u in untouched)
    assert graph_phrase in str(report)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["ernie4_5_moe", "minimax_m2"])  # selection bias; sigmoid without groups
def test_unknown_router_kind_is_refused_at_attach(name):
    model = extra_model(name)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp: router model\.layers\.1\.mlp\.gate selects experts by a formula"):
        modes_fx.Schedule.constant(model, tau={"text": 0.1})
