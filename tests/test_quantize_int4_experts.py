"""Int4ExpertsTensor (stacked per-expert torchao int4 weights): indexing, quantization error,
transformers' grouped GEMM and ``modes::masked_experts`` on int4 weights, against independent
references."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_op_masked_experts import make_case, per_token_reference
from torch.nn import functional as F
from torchao.prototype.quantization.int4 import Int4OpaqueTensor

from modes_fx.quant.int4_experts import GROUP_SIZES, Int4ExpertsTensor
from modes_fx.kernels.reference import masked_experts_reference
from modes_fx.quant.quantize import stored_bytes

BF16 = torch.bfloat16


def _weight(seed: int, experts: int, rows: int, cols: int) -> torch.Tensor:
    """bf16 [E, N, K] with a different spread per row (so groups differ)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(experts, rows, cols, generator=g) * (0.1 + 3 * torch.rand(experts, rows, 1, generator=g))).to(BF16)


def dequantized(weight: Int4ExpertsTensor, expert: int) -> torch.Tensor:
    """Expert ``expert`` as the bf16 [N, K] matrix the int4 kernel multiplies by (read back
    through the kernel with an identity input)."""
    cols = weight.shape[-1]
    return F.linear(torch.eye(cols, dtype=BF16), weight[expert]).t()


weights = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "experts": st.integers(1, 4),
        "rows": st.sampled_from([16, 32, 48]),
        "group_size": st.sampled_from(GROUP_SIZES),
        "groups": st.integers(1, 3),
    }
)


@settings(max_examples=30, deadline=None)
@given(case=weights)
def test_each_expert_is_torchaos_int4_weight_within_half_a_quantization_step(case):
    w = _weight(case["seed"], case["experts"], case["rows"], case["group_size"] * case["groups"])
    q = Int4ExpertsTensor.from_hp(w, case["group_size"])
    assert q.shape == w.shape and q.dtype == BF16 and isinstance(q, Int4ExpertsTensor)
    x = torch.randn(5, w.shape[-1], generator=torch.Generator().manual_seed(case["seed"])).to(BF16)
    for e in range(case["experts"]):
        expert = q[e]
        assert isinstance(expert, Int4OpaqueTensor) and expert.shape == w[e].shape
        # the same result as torchao quantizing this expert alone
        assert torch.equal(F.linear(x, expert), F.linear(x, Int4OpaqueTensor.from_hp(w[e], [1, case["group_size"]])))
        # asymmetric int4 per group: error ≤ half a step (range / 15), plus bf16 rounding
        groups = w[e].float().reshape(case["rows"], -1, case["group_size"])
        step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
        bound = 0.5 * step + groups.abs().amax(-1, keepdim=True) / 64
        error = (dequantized(q, e).float().reshape(groups.shape) - groups).abs()
        assert (error <= bound).all(), f"expert {e}: max error/step {(error / step).max()}"
    experts, rows, cols = w.shape  # stored: 4 bits per weight + a bf16 scale and zero per group
    assert stored_bytes([q]) == experts * rows * cols // 2 + experts * (cols // case["group_size"]) * rows * 2 * 2


@settings(max_examples=30, deadline=None)
@given(case=weights, counts=st.lists(st.integers(0, 5), min_size=4, max_size=4), tail=st.integers(0, 3))
def test_grouped_mm_equals_one_linear_per_expert(case, counts, tail):
    """torch._grouped_mm(x, w.transpose(-2, -1), offs) as transformers' grouped_mm experts call it:
    rows offs[e-1]:offs[e] times expert e; rows past offs[-1] (expert-parallel sentinels) are 0."""
    counts = counts[: case["experts"]]
    w = _weight(case["seed"], case["experts"], case["rows"], case["group_size"] * case["groups"])
    q = Int4ExpertsTensor.from_hp(w, case["group_size"])
    x = torch.randn(sum(counts) + tail, w.shape[-1], generator=torch.Generator().manual_seed(1)).to(BF16)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    got = torch._grouped_mm(x, q.transpose(-2, -1), offs=offs)
    assert got.shape == (x.shape[0], case["rows"]) and got.dtype == BF16
    start = 0
    for e, n in enumerate(counts):
        assert torch.equal(got[start : start + n], F.linear(x[start : start + n], q[e]))
        start += n
    assert not got[start:].any()


def test_unsupported_uses_raise():
    q = Int4ExpertsTensor.from_hp(_weight(0, 2, 16, 32), 32)
    with pytest.raises(NotImplementedError, match="select along dim 1"):
        q.select(1, 0)
    with pytest.raises(NotImplementedError, match="transposed expert"):
        q.transpose(-2, -1)[0]
    with pytest.raises(NotImplementedError, match="only torch._grouped_mm"):
        torch._grouped_mm(torch.ones(2, 32, dtype=BF16), q.transpose(-2, -1))


op_cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "tokens": st.sampled_from([0, 1, 3, 4, 5, 11]),  # both sides of the kernel's decode path
        "hidden_size": st.sampled_from([32, 64]),
        "intermediate": st.sampled_from([32, 64]),
        "num_experts": st.integers(1, 6),
        "top_k": st.integers(1, 3),
        "keep_mode": st.sampled_from(["random", "all_true", "all_false", "empty_rows", "drop_one_expert"]),
    }
)


@settings(max_examples=40, deadline=None)
@given(case=op_cases, activation=st.sampled_from(["silu", "gelu"]))
def test_masked_experts_op_on_int4_weights(case, activation):
    """The op with int4 weights matches the reference kernel on the same int4 weights, and a
    float64 per-token loop over the dequantized weights, within bf16 rounding of the magnitudes
    involved (the kernels accumulate a token's k expert outputs in different bf16 orders)."""
    case = {**case, "top_k": min(case["top_k"], case["num_experts"])}
    hidden, index, routing, keep, gate_up, down = make_case(
        **case, weight_dtype=BF16, hidden_dtype=BF16, routing_dtype=BF16
    )
    q_gate_up, q_down = Int4ExpertsTensor.from_hp(gate_up, 32), Int4ExpertsTensor.from_hp(down, 32)
    got = torch.ops.modes.masked_experts(hidden, index, routing, keep, q_gate_up, q_down, activation)
    assert got.dtype == BF16 and got.shape == hidden.shape
    reference = masked_experts_reference(hidden, index, routing, keep, q_gate_up, q_down, activation)

    experts = range(case["num_experts"])
    deq_gate_up = torch.stack([dequantized(q_gate_up, e) for e in experts])
    deq_down = torch.stack([dequantized(q_down, e) for e in experts])
    expected, scale = per_token_reference(hidden, index, routing, keep, deq_gate_up, deq_down, activation)
    for name, value in (("reference kernel", reference.double()), ("float64 loop", expected)):
        error = (got.double() - value).abs()
        assert (error <= 1e-5 + 2e-2 * scale).all(), f"{name}: max error {error.max()} vs scale {scale.max()}"
    assert not got[~keep.any(1)].any()  # tokens with every pair skipped get no expert output


@pytest.mark.parametrize("tokens", [1, 3, 9])  # the decode (host-grouped) and prefill paths
def test_masked_experts_op_calls_the_int4_kernel_itself(linear_calls, monkeypatch, tokens):
    """The op on int4 weights runs ``aten._weight_int4pack_mm_for_cpu`` once per matrix of each
    kept expert, bit-identical to the fast kernel driving torchao's int4 weights through
    ``F.linear``, and never goes through ``F.linear`` (torchao's Python handler) itself."""
    from modes_fx.kernels.fast import masked_experts_fast

    hidden, index, routing, keep, gate_up, down = make_case(
        4, tokens, 64, 32, 6, 3, "random", weight_dtype=BF16, hidden_dtype=BF16, routing_dtype=BF16
    )
    q_gate_up, q_down = Int4ExpertsTensor.from_hp(gate_up, 32), Int4ExpertsTensor.from_hp(down, 32)
    via_linear = masked_experts_fast(hidden, index, routing, keep, q_gate_up, q_down, "silu")
    kernel_calls = []
    real = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(
        torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: kernel_calls.append(a[0].shape[0]) or real(*a)
    )
    linear_calls.clear()
    got = torch.ops.modes.masked_experts(hidden, index, routing, keep, q_gate_up, q_down, "silu")
    assert torch.equal(got, via_linear)
    assert linear_calls == []
    assert len(kernel_calls) == 2 * len(index[keep].unique()) and sum(kernel_calls) == 2 * int(keep.sum())
