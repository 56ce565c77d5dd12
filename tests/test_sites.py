"""modes_fx.sites: MoE site discovery on tiny randomly initialised transformers models."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from extra_models import extra_model
from modes_fx.sites import find_moe_sites, model_fingerprint, site_parameters
from modes_fx.harness.testing import MODEL_NAMES, ROUTED_SCALING_FACTOR, SIGMOID_MODEL_NAMES, build

# ----------------------------------------------------------------------------------------------
# Tiny models (random weights, no downloads): modes_fx.harness.testing.build for MODEL_NAMES, the
# extra_models test helper for the other families


def tiny_model(name: str, seed: int = 0, **config) -> torch.nn.Module:
    """An eval-mode tiny ``name`` model, config overridden by ``config``, seeded."""
    if name in MODEL_NAMES + SIGMOID_MODEL_NAMES:
        return build(name, seed=seed, **config)
    return extra_model(name, seed=seed, **config)


# ----------------------------------------------------------------------------------------------
# Discovery on real model classes

_QWEN2_MOE_4_LAYERS = {"num_hidden_layers": 4}

# name, config overrides, expected MoE layer indices, router_kind, normalizes_top_k, shared experts
EXPECTED = {
    "qwen3_vl_moe": ("qwen3_vl_moe", {}, [0, 1], "softmax_topk", True, False),
    "qwen3_moe_norm": ("qwen3_moe", {"norm_topk_prob": True}, [0, 1], "softmax_topk", True, False),
    "qwen3_moe_no_norm": ("qwen3_moe", {"norm_topk_prob": False}, [0, 1], "softmax_topk", False, False),
    "mixtral": ("mixtral", {}, [0, 1], "softmax_topk", True, False),
    "olmoe": ("olmoe", {"norm_topk_prob": False}, [0, 1], "softmax_topk", False, False),
    "qwen2_moe_mlp_only_0": ("qwen2_moe", {**_QWEN2_MOE_4_LAYERS, "mlp_only_layers": [0]}, [1, 2, 3], "softmax_topk", False, True),
    "qwen2_moe_sparse_step_2": ("qwen2_moe", {**_QWEN2_MOE_4_LAYERS, "decoder_sparse_step": 2}, [1, 3], "softmax_topk", False, True),
    "deepseek_v3": ("deepseek_v3", {}, [1, 2], "sigmoid_grouped_topk", True, True),
    "deepseek_v3_no_norm_scaled": ("deepseek_v3", {"first_k_dense_replace": 0, "norm_topk_prob": False, "routed_scaling_factor": 1.7}, [0, 1, 2], "sigmoid_grouped_topk", False, True),
    "kimi_k25": ("kimi_k25", {}, [1, 2], "sigmoid_grouped_topk", True, True),
    "glm4v_moe": ("glm4v_moe", {}, [1, 2], "sigmoid_grouped_topk", True, True),
    # Same router attributes as Mixtral, but the top-k weights are not renormalised.
    "jamba": ("jamba", {}, [0, 1], "softmax_topk", False, False),
    # Softmax router whose selection adds a bias (gate.moe_statics.e_score_correction_bias).
    "ernie4_5_moe": ("ernie4_5_moe", {}, [1], "unknown", False, True),
    # Sigmoid router, no groups, takes the correction bias as a forward argument.
    "minimax_m2": ("minimax_m2", {}, [0, 1], "unknown", False, False),
}
_MLP_NAME = {"jamba": "feed_forward"}
_PREFIX = {n: "model.language_model.layers" for n in ("qwen3_vl_moe", "kimi_k25", "glm4v_moe")}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def case(request):
    name, overrides, layers, kind, normalizes, shared = EXPECTED[request.param]
    return tiny_model(name, **overrides), name, overrides, layers, kind, normalizes, shared


def test_sites_are_found_in_layer_order_with_their_routing(case):
    model, name, _, layers, kind, normalizes, shared = case
    prefix, mlp = _PREFIX.get(name, "model.layers"), _MLP_NAME.get(name, "mlp")
    sites = find_moe_sites(model)
    assert [s.path for s in sites] == [f"{prefix}.{i}.{mlp}" for i in layers]
    assert [s.index for s in sites] == list(range(len(layers)))
    assert {s.router_kind for s in sites} == {kind}
    assert {s.normalizes_top_k for s in sites} == {normalizes}
    assert {s.has_shared_experts for s in sites} == {shared}
    assert {s.activation for s in sites} == {"silu"}


def test_weight_scale_is_where_pi_comes_from(case):
    """The router's weights are weight_scale · π: the routed scaling factor for sigmoid routers."""
    model, name, overrides, *_ = case
    scale = overrides.get("routed_scaling_factor", ROUTED_SCALING_FACTOR) if name in SIGMOID_MODEL_NAMES else 1.0
    assert {s.weight_scale for s in find_moe_sites(model)} == {scale}


def test_site_paths_resolve_to_router_and_experts(case):
    model, *_ = case
    for site in find_moe_sites(model):
        experts = model.get_submodule(site.experts_path)
        router = model.get_submodule(site.router_path)
        assert site.experts_path == f"{site.path}.experts"
        assert router.weight.shape == (site.num_experts, experts.down_proj.shape[1])
        assert site.top_k == 2
        assert site.num_experts == experts.down_proj.shape[0]


def test_model_without_moe_has_no_sites():
    assert find_moe_sites(tiny_model("llama")) == []


def test_top_k_and_num_experts_come_from_the_model():
    sites = find_moe_sites(tiny_model("mixtral", num_local_experts=6, num_experts_per_tok=3))
    assert [(s.top_k, s.num_experts) for s in sites] == [(3, 6), (3, 6)]


def test_activation_is_the_config_hidden_act():
    sites = find_moe_sites(tiny_model("mixtral", hidden_act="gelu"))
    assert {s.activation for s in sites} == {"gelu"}


def test_standard_layout_false_for_transposed_biased_experts():
    sites = find_moe_sites(tiny_model("gpt_oss"))
    assert len(sites) == 2
    assert not any(s.standard_layout for s in sites)
    assert all(s.standard_layout for s in find_moe_sites(tiny_model("mixtral")))


@pytest.mark.parametrize(
    ("flag", "value"),
    [("has_gate", False), ("is_concatenated", False), ("is_transposed", True), ("has_bias", True), ("has_post_expert_norm", True)],
)
def test_each_layout_flag_breaks_the_standard_layout(flag, value):
    model = tiny_model("mixtral")
    setattr(model.model.layers[1].mlp.experts, flag, value)
    assert [s.standard_layout for s in find_moe_sites(model)] == [True, False]


# ----------------------------------------------------------------------------------------------
# Router classification is measured, not guessed


def test_router_kind_follows_the_router_behaviour():
    model = tiny_model("mixtral")
    router = model.model.layers[0].mlp.gate
    original = router.forward

    def unnormalised(h):  # Jamba's formula: softmax, top-k, no renormalisation
        logits = torch.nn.functional.linear(h, router.weight)
        weights, index = logits.softmax(dim=-1).topk(router.top_k, dim=-1)
        return logits, weights, index

    router.forward = unnormalised
    sites = find_moe_sites(model)
    assert (sites[0].router_kind, sites[0].normalizes_top_k) == ("softmax_topk", False)
    assert (sites[1].router_kind, sites[1].normalizes_top_k) == ("softmax_topk", True)

    router.forward = lambda h: tuple(t * 2 if i == 1 else t for i, t in enumerate(original(h)))
    assert find_moe_sites(model)[0].router_kind == "unknown"

    def bottom_k(h):  # weights fit the formula but the experts are not the top-k
        logits = torch.nn.functional.linear(h, router.weight)
        weights, index = (-logits.softmax(dim=-1)).topk(router.top_k, dim=-1)
        return logits, -weights, index

    router.forward = bottom_k
    assert find_moe_sites(model)[0].router_kind == "unknown"


def test_zero_router_weights_still_classify():
    model = tiny_model("mixtral")
    with torch.no_grad():
        for site in find_moe_sites(model):
            model.get_submodule(site.router_path).weight.zero_()
    assert {(s.router_kind, s.normalizes_top_k) for s in find_moe_sites(model)} == {("softmax_topk", True)}


@pytest.mark.parametrize(("name", "overrides", "normalizes"), [
    ("mixtral", {"num_local_experts": 2}, True),  # no norm_topk_prob attribute: renormalising is assumed
    ("olmoe", {"num_experts": 2, "norm_topk_prob": False}, False),
    ("olmoe", {"num_experts": 2, "norm_topk_prob": True}, True),
])
def test_norm_topk_prob_decides_when_both_variants_fit(name, overrides, normalizes):
    """With k = E the selected weights already sum to 1: renormalised or not looks the same."""
    sites = find_moe_sites(tiny_model(name, **overrides))
    assert {(s.router_kind, s.top_k, s.num_experts, s.normalizes_top_k) for s in sites} == {("softmax_topk", 2, 2, normalizes)}


def test_bf16_router_is_classified():
    sites = find_moe_sites(tiny_model("qwen3_moe", norm_topk_prob=True).to(torch.bfloat16))
    assert {(s.router_kind, s.normalizes_top_k) for s in sites} == {("softmax_topk", True)}


def test_meta_device_router_is_unknown_but_found():
    config = build("mixtral").config
    with torch.device("meta"):
        model = tf.MixtralForCausalLM(config)
    sites = find_moe_sites(model)
    assert [s.router_kind for s in sites] == ["unknown", "unknown"]
    assert [s.path for s in sites] == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_probe_fires_no_hooks():
    model = tiny_model("mixtral")
    calls = []
    model.model.layers[0].mlp.gate.register_forward_hook(lambda *args: calls.append(1))
    find_moe_sites(model)
    assert calls == []


# ----------------------------------------------------------------------------------------------
# Parameters and fingerprints


def test_site_parameters_are_the_model_parameters():
    model = tiny_model("mixtral", intermediate_size=16)
    site = find_moe_sites(model)[1]
    params = site_parameters(model, site)
    layer = model.model.layers[1].mlp
    assert params["router_weight"] is layer.gate.weight
    assert params["gate_up_proj"] is layer.experts.gate_up_proj
    assert params["down_proj"] is layer.experts.down_proj
    assert params["gate_up_proj"].shape == (8, 32, 64)  # [E, 2I, H]
    assert params["down_proj"].shape == (8, 64, 16)  # [E, H, I]


def test_fingerprint_is_deterministic_and_separates_weights_from_architecture():
    a, b = tiny_model("mixtral", seed=0), tiny_model("mixtral", seed=1)
    fa = model_fingerprint(a)
    assert fa == model_fingerprint(a)
    assert fa == model_fingerprint(tiny_model("mixtral", seed=0))
    fb = model_fingerprint(b)
    assert fb["architecture"] == fa["architecture"]
    assert fb["weights"] != fa["weights"]
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in fa.values())


def test_fingerprint_weights_change_with_one_router_weight():
    model = tiny_model("mixtral")
    before = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[0, 0] += 1.0
    after = model_fingerprint(model)
    assert after["architecture"] == before["architecture"]
    assert after["weights"] != before["weights"]


@pytest.mark.parametrize(
    "overrides",
    [{"num_local_experts": 4}, {"num_experts_per_tok": 1}, {"intermediate_size": 8}, {"num_hidden_layers": 3}],
)
def test_fingerprint_architecture_changes_with_the_sites(overrides):
    base = model_fingerprint(tiny_model("mixtral"))["architecture"]
    assert model_fingerprint(tiny_model("mixtral", **overrides))["architecture"] != base


def test_fingerprint_architecture_includes_the_class_name():
    mixtral, olmoe = tiny_model("mixtral"), tiny_model("olmoe")

    def described(model):
        return [
            (s.path, s.top_k, s.num_experts, *(tuple(p.shape) for p in site_parameters(model, s).values()))
            for s in find_moe_sites(model)
        ]

    assert described(mixtral) == described(olmoe)  # only the class name differs
    assert model_fingerprint(mixtral)["architecture"] != model_fingerprint(olmoe)["architecture"]
