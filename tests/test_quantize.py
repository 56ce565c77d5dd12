"""``quantize_experts`` end to end on a tiny real Qwen3-VL-MoE: what is quantized and the memory
saved, τ = 0 equal to the unskipped quantized model (forward and generate()), skipping against
an independent reference, inductor, calibration on the quantized model, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from extra_models import extra_model
from torchao.prototype.quantization.int4 import Int4OpaqueTensor, PrototypeInt4WeightOnlyConfig
from torchao.quantization import Int4WeightOnlyConfig

import modes_fx
from modes_fx import runtime
from modes_fx.calib import GridSpec, calibrate, evaluate_schedule
from modes_fx.quant.int4_experts import Int4ExpertsTensor
from modes_fx.quant.quantize import expert_weight_bytes, quantize_experts
from modes_fx.sites import find_moe_sites, site_parameters
from modes_fx.harness.testing import build, experts_modules, greedy_generate, modality_mask, remove_routed_experts, router_modules, text_inputs

BF16 = torch.bfloat16
EAGER_INNER = {"inner": "eager"}


def _quantized(impl: str = "grouped_mm", **overrides) -> torch.nn.Module:
    model = build("qwen3_vl_moe", experts_implementation=impl, dtype=BF16, **overrides)
    quantize_experts(model)
    return model


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _set_tau(model, **tau) -> None:
    """Change the attached thresholds in place (compiled graphs stay valid: no recompilation)."""
    runtime.state_of(model).set_thresholds(modes_fx.Schedule.constant(model, tau=tau).thresholds())


@pytest.fixture(scope="module")
def inputs():
    return text_inputs(build("qwen3_vl_moe"), batch=2, seq=9)


@pytest.fixture(scope="module")
def unskipped(inputs):
    """The quantized model uncompiled (transformers' own experts forward on the int4 weights):
    logits and 3 greedy tokens."""
    model = _quantized()
    return _logits(model, inputs), greedy_generate(model, inputs, max_new_tokens=3)


@pytest.fixture(scope="module")
def compiled(inputs):
    """A quantized model attached with τ = 0 and compiled in place with backend="modes"."""
    model = _quantized()
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    torch._dynamo.reset()
    modes_fx.reset_report()
    model.compile(backend="modes", options=EAGER_INNER)
    yield model
    modes_fx.detach(model)
    torch._dynamo.reset()


def test_experts_and_linears_are_int4_routers_and_head_stay_bf16():
    reference = build("qwen3_vl_moe", dtype=BF16, hidden_size=128, moe_intermediate_size=128)
    model = build("qwen3_vl_moe", dtype=BF16, hidden_size=128, moe_intermediate_size=128)
    bytes_bf16 = expert_weight_bytes(model)
    report = quantize_experts(model)

    assert report.group_size == 128
    assert report.experts == [path for path, _ in experts_modules(model)]
    for _, experts in experts_modules(model):
        assert isinstance(experts.gate_up_proj, Int4ExpertsTensor) and isinstance(experts.down_proj, Int4ExpertsTensor)
    for (_, router), (_, original) in zip(router_modules(model), router_modules(reference)):
        assert router.weight.dtype == BF16 and torch.equal(router.weight, original.weight)
    assert report.kept["lm_head"] == "output head" and model.lm_head.weight.dtype == BF16
    assert report.kept["model.visual.blocks.0.attn.qkv"] == "input size 32 is not a multiple of group_size 128"
    linears = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(report.linears) == sorted(p for p in linears if p not in report.kept)
    assert all(isinstance(model.get_submodule(p).weight, Int4OpaqueTensor) for p in report.linears)
    assert any(".self_attn." in p for p in report.linears)

    # memory, measured from the tensors' storages: 4 bits per weight + a bf16 scale and zero per 128
    weights = [w for _, e in experts_modules(model) for w in (e.gate_up_proj, e.down_proj)]
    numel = sum(w.numel() for w in weights)
    assert report.expert_bytes_before == bytes_bf16 == 2 * numel
    assert report.expert_bytes_after == expert_weight_bytes(model) == numel // 2 + numel // 128 * 4
    assert report.expert_memory_ratio == pytest.approx(2 / (0.5 + 4 / 128)) and report.expert_memory_ratio >= 3.5
    assert "3.76x smaller" in str(report)


def test_a_linear_the_int4_kernel_cannot_take_stays_bf16_with_the_reason():
    model = build("qwen2_moe", dtype=BF16)  # shared_expert_gate: Linear(H, 1)
    report = quantize_experts(model)
    assert report.kept["model.layers.0.mlp.shared_expert_gate"] == "output size 1 is not a multiple of 16"
    assert model.model.layers[0].mlp.shared_expert_gate.weight.dtype == BF16
    assert "model.layers.0.mlp.shared_expert.down_proj" in report.linears


def test_each_int4_weight_is_found_by_the_runtime_as_its_own_site_and_role():
    model = _quantized()
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    try:
        for site in find_moe_sites(model):
            for role, param in site_parameters(model, site).items():
                found = runtime.role_of(param)
                assert (found.site, found.role) == (site.index, role)
    finally:
        modes_fx.detach(model)


def test_tau_zero_equals_the_unskipped_quantized_model_exactly(compiled, unskipped, inputs):
    """τ = 0 through modes::masked_experts == transformers' grouped_mm (uncompiled) and eager
    experts loop on the same int4 weights: every path multiplies each kept row by the same
    per-expert int4 kernel. Then generate() on the compiled model gives the same tokens."""
    logits, tokens = unskipped
    assert torch.equal(_logits(_quantized("eager"), inputs), logits)
    with modes_fx.track() as stats:
        got = _logits(compiled, inputs)
    assert torch.equal(got, logits)
    assert stats.skip_ratio == 0.0 and stats.kept > 0
    assert [len(g.rewrites) for g in modes_fx.last_report().graphs] == [2]
    assert torch.equal(greedy_generate(compiled, inputs, max_new_tokens=3), tokens)


def test_skipping_on_int4_experts_matches_removing_routed_experts(compiled, inputs):
    model = compiled
    _set_tau(model, text=math.inf)
    try:
        with modes_fx.track() as stats:
            got = _logits(model, inputs)
        _set_tau(model, text=0.4)
        with modes_fx.track() as mid:
            partly = _logits(model, inputs)
    finally:
        _set_tau(model)
    assert stats.skip_ratio == 1.0
    reference = _quantized()
    with remove_routed_experts(reference, modality_mask(reference, "text")):
        expected = _logits(reference, inputs)
    assert torch.equal(got, expected)
    assert 0.0 < mid.skip_ratio < 1.0 and not torch.equal(partly, got)


def test_inductor_runs_the_int4_experts(unskipped, inputs):
    model = _quantized()
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    torch._dynamo.reset()
    modes_fx.reset_report()
    try:
        got = _logits(torch.compile(model, backend="modes"), inputs)
    finally:
        modes_fx.detach(model)
        torch._dynamo.reset()
    assert [len(g.rewrites) for g in modes_fx.last_report().graphs] == [2]
    # inductor fuses the bf16 elementwise ops around the op differently: bf16-level agreement
    torch.testing.assert_close(got, unskipped[0], rtol=0.05, atol=0.1)


def test_calibration_runs_on_the_quantized_model(inputs):
    model = _quantized()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]
    data = [{**inputs, "labels": labels}]
    grid = GridSpec(points=4, mapping="linear", tau_max={"text": 0.6})
    schedule = calibrate(model, data, target_skip=0.3, grid=grid, progress=False)
    assert schedule.modalities == ["text"] and schedule.measured_skip >= 0.3
    assert all(isinstance(e.gate_up_proj, Int4ExpertsTensor) for _, e in experts_modules(model))
    again = evaluate_schedule(model, data, schedule)
    assert again.skip == schedule.measured_skip and math.isclose(again.kl, schedule.calibration["kl"], rel_tol=1e-3)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, and the model left as it was


def _unchanged(model) -> bool:
    return not any(isinstance(p, (Int4ExpertsTensor, Int4OpaqueTensor)) for p in model.parameters())


def test_quantizing_twice_is_an_error():
    model = _quantized()
    with pytest.raises(ValueError, match="already quantized"):
        quantize_experts(model)


def test_a_model_without_moe_experts_is_an_error():
    model = extra_model("llama").to(BF16)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MoE experts to quantize"):
        quantize_experts(model)
    assert _unchanged(model)


@pytest.mark.parametrize(
    "make, config, error, message",
    [
        ("bf16", Int4WeightOnlyConfig(group_size=32), TypeError, "Int4WeightOnlyConfig cannot quantize MoE experts on this CPU"),
        ("bf16", PrototypeInt4WeightOnlyConfig(group_size=256), ValueError, "group_size 256 is not supported"),
        ("bf16", PrototypeInt4WeightOnlyConfig(group_size=128), ValueError, "input size 64 is not a multiple of group_size 128"),
        ("fp32", None, ValueError, "is torch.float32: the CPU int4 kernel runs bf16 activations"),
        ("batched_mm", None, ValueError, "experts_implementation 'batched_mm' cannot run int4 experts"),
        ("meta", None, ValueError, "is on meta: W4A16 experts run on CPU only"),
    ],
    ids=["cuda-only config", "group size", "shape", "fp32 activations", "batched_mm", "not on CPU"],
)
def test_a_config_this_device_cannot_run_is_an_error(make, config, error, message):
    impl = "batched_mm" if make == "batched_mm" else "grouped_mm"
    model = build("qwen3_vl_moe", experts_implementation=impl, dtype=torch.float32 if make == "fp32" else BF16)
    if make == "meta":
        model.to("meta")
    with pytest.raises(error, match=message):
        quantize_experts(model, config)
    assert _unchanged(model)
