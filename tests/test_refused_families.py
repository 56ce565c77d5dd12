"""Families modes-fx refuses (``sites.REFUSED_BLOCKS``): Llama4 (every expert runs on every token
as one dense bmm; top-1 sigmoid scores scale the expert input), Ernie-4.5-VL-MoE (separate text
and vision expert groups on data-dependent token subsets, bias-corrected selection), Aria
(softmax over the top-k raw logits, transposed experts) and the transformers 5.24 multimodal MoE
families whose softmax routing selects by groups (Mistral-Large-4), whose router has no [E, H]
weight (Gemma4, DiffusionGemma), whose router scores routed and shared experts together (Inkling), whose selection is biased without groups, whose experts are not plain act(gate)·up, or
whose MoE is in the vision encoder; plus any router of an unknown kind, and any experts modes-fx
cannot run or cannot find the router of. Refused where users meet them: ``Schedule.constant`` /
``attach`` raise naming each block and why; compiled without a schedule, the backend's report
lists each router left untouched and the model computes exactly what it computes uncompiled
(checked on the families whose graph phrase is given: compiling every family would cost minutes)."""
import pytest
import torch

import modes_fx
from extra_models import extra_model, missing
from modes_fx.sites import REFUSED_BLOCKS, UnsupportedModelError, unsupported_moe_blocks
from modes_fx.harness.testing import TEXT_ID_HIGH, TEXT_ID_LOW, build

LM_MLP = ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]
# name: (refused block paths, the reason's key phrase, the graph report's key phrase or None)
REFUSED = {
    "llama4": (["model.layers.0.feed_forward", "model.layers.1.feed_forward"], "dense bmm over all experts", "raw router logits"),
    "ernie4_5_vl_moe": (["model.language_model.layers.1.mlp"], "separate text and vision expert groups", "adds a bias to the softmax"),
    "aria": (LM_MLP, "softmaxes only the selected ones", "raw router logits"),
    "mistral_large4": (LM_MLP, "group-limited selection", None),
    "gemma4": (["model.language_model.layers.0.router", "model.language_model.layers.1.router"], "per_expert_scale", None),
    "diffusion_gemma": (
        [f"model.{part}layers.{i}.router" for part in ("encoder.language_model.", "decoder.") for i in (0, 1)], "per_expert_scale", None,
    ),
    "inkling": (LM_MLP, "[E + shared, H]", None),
    "nemotron3_5_transcribe": (["model.language_model.layers.0.mixer", "model.language_model.layers.1.mixer"], "ungated experts", None),
    "dots3_note": (["model.vision_tower.blocks.0.mlp", "model.vision_tower.blocks.1.mlp"], "vision-encoder MoE", None),
    "hy_v4_vl": (LM_MLP, "clamped SwiGLU", None),
    "glm5_next": (LM_MLP, "clamped SwiGLU", None),
    "minimax_m3_vl": (LM_MLP, "without groups", None),
    "muse_spark": (LM_MLP, "post-expert norm", None),
    "step3p7": (LM_MLP, "not a transformers experts implementation", None),
    "inkling2": (LM_MLP, "softcapped SwiGLU", None),
    "inkling2_loop": (LM_MLP, "softcapped SwiGLU", None),
}
COMPILED = sorted(n for n, (_, _, graph_phrase) in REFUSED.items() if graph_phrase)


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.skipif(bool(missing(n)), reason=str(missing(n)))) for n in sorted(REFUSED)])
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


@pytest.mark.parametrize("name", COMPILED)
def test_backend_reports_the_routers_it_leaves_untouched(name):
    model = extra_model(name)
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


def test_experts_without_a_router_are_refused_at_attach():
    """An experts module whose router modes-fx cannot find must not run dense unnoticed."""
    model = build("qwen3_moe")
    model.model.layers[1].mlp.gate = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp\.experts: experts module .* has no router"):
        modes_fx.Schedule.constant(model, tau={"text": 0.1})


def test_experts_with_their_own_gate_function_are_refused_at_attach():
    """Experts that compute something other than act(gate)·up (here a clamped SwiGLU)."""
    model = build("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts.__class__ = type("ClampedExperts", (type(experts),), {"_apply_gate": lambda self, gate_up: gate_up.clamp(max=1.0)})
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp: experts .* cannot run them"):
        modes_fx.Schedule.constant(model, tau={"text": 0.1})
