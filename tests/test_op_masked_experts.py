"""Property tests of ``modes::masked_experts`` and ``PiRule.keep_mask``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from modes_fx.rules import PiRule
from modes_fx.ops import masked_experts

ACTIVATIONS = {
    "silu": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "relu": lambda x: torch.clamp(x, min=0.0),
    "gelu_pytorch_tanh": lambda x: 0.5
    * x
    * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
}

KEEP_MODES = ("random", "all_true", "all_false", "empty_rows", "drop_one_expert")


def make_case(
    seed: int,
    tokens: int,
    hidden_size: int,
    intermediate: int,
    num_experts: int,
    top_k: int,
    keep_mode: str,
    p_keep: float = 0.5,
    weight_dtype: torch.dtype = torch.float32,
    hidden_dtype: torch.dtype = torch.float32,
    routing_dtype: torch.dtype = torch.float32,
):
    """Random op inputs; each token routes to ``top_k`` distinct experts (as top-k does)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(hidden_dtype)
    top_k_index = torch.argsort(torch.rand(tokens, num_experts, generator=g), dim=1)[:, :top_k]
    top_k_weights = torch.rand(tokens, top_k, generator=g).to(routing_dtype)
    keep = torch.rand(tokens, top_k, generator=g) < p_keep
    if keep_mode == "all_true":
        keep = torch.ones_like(keep)
    elif keep_mode == "all_false":
        keep = torch.zeros_like(keep)
    elif keep_mode == "empty_rows":
        keep[::2] = False
    elif keep_mode == "drop_one_expert":
        # expert 0 is routed to but all its pairs are skipped
        keep = top_k_index != 0
    gate_up_proj = (
        torch.randn(num_experts, 2 * intermediate, hidden_size, generator=g) / math.sqrt(hidden_size)
    ).to(weight_dtype)
    down_proj = (
        torch.randn(num_experts, hidden_size, intermediate, generator=g) / math.sqrt(intermediate)
    ).to(weight_dtype)
    return hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj


def per_token_reference(hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, activation):
    """Independent float64 reference: a plain loop over tokens and top-k slots.

    Returns ``(out, scale)``: the float64 output and, elementwise, the size that rounding errors
    of a low-precision computation scale with: ``sum_j |w| * |down[e]| @ ((|act(gate)| + |gate|) *
    |up|)`` (the magnitudes before any cancellation in the sums).
    """
    act = ACTIVATIONS[activation]
    intermediate = down_proj.shape[2]
    gu = gate_up_proj.double()
    dn = down_proj.double()
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    scale = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        h = hidden[t].double()
        for j in range(top_k_index.shape[1]):
            if not keep[t, j]:
                continue
            e = int(top_k_index[t, j])
            gate = gu[e, :intermediate] @ h
            up = gu[e, intermediate:] @ h
            term = float(top_k_weights[t, j]) * (dn[e] @ (act(gate) * up))
            out[t] += term
            scale[t] += abs(float(top_k_weights[t, j])) * (
                dn[e].abs() @ ((act(gate).abs() + gate.abs()) * up.abs())
            )
    return out, scale


case_shapes = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "tokens": st.sampled_from([0, 1, 2, 3, 5, 8, 13]),
        "hidden_size": st.integers(1, 24),
        "intermediate": st.integers(1, 16),
        "num_experts": st.integers(1, 8),
        "k_frac": st.floats(0.0, 1.0),
        "keep_mode": st.sampled_from(KEEP_MODES),
        "p_keep": st.floats(0.0, 1.0),
    }
)


def _shapes_to_kwargs(shapes: dict) -> dict:
    kwargs = dict(shapes)
    num_experts = kwargs["num_experts"]
    kwargs["top_k"] = 1 + int(kwargs.pop("k_frac") * (num_experts - 1))
    return kwargs


@settings(max_examples=200, deadline=None)
@given(
    shapes=case_shapes,
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    routing_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_matches_per_token_reference_fp32(shapes, activation, routing_dtype):
    args = make_case(**_shapes_to_kwargs(shapes), routing_dtype=routing_dtype)
    out = masked_experts(*args, activation)
    expected, _ = per_token_reference(*args, activation)
    assert out.dtype == torch.float32 and out.shape == args[0].shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(
    shapes=case_shapes,
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    hidden_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_matches_per_token_reference_bf16(shapes, activation, hidden_dtype):
    args = make_case(
        **_shapes_to_kwargs(shapes), weight_dtype=torch.bfloat16, hidden_dtype=hidden_dtype
    )
    out = masked_experts(*args, activation)
    # The reference sees the same bf16 inputs the op does (hidden cast to the weights' dtype).
    expected, scale = per_token_reference(args[0].to(torch.bfloat16), *args[1:], activation)
    assert out.dtype == hidden_dtype and out.shape == args[0].shape
    # bf16 rounds every intermediate (unit roundoff 2**-8 ~ 4e-3): bound the error by 2e-2 of
    # the magnitudes that went into each output (observed worst ~8e-3 over 4000 random cases).
    error = (out.double() - expected).abs()
    assert (error <= 1e-5 + 2e-2 * scale).all(), f"max error {error.max()} vs scale {scale.max()}"


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.sampled_from([1, 4, 9, 16]),
    num_experts=st.integers(1, 8),
    k_frac=st.floats(0.0, 1.0),
    activation=st.sampled_from(["silu", "gelu", "gelu_pytorch_tanh"]),
)
def test_all_kept_matches_transformers_experts(implementation, seed, tokens, num_experts, k_frac, activation):
    hidden_size, intermediate = 16, 8
    top_k = 1 + int(k_frac * (num_experts - 1))
    config = Qwen3MoeConfig(
        hidden_size=hidden_size,
        moe_intermediate_size=intermediate,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        hidden_act=activation,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
    )
    config._experts_implementation = implementation
    experts = Qwen3MoeExperts(config).eval()
    hidden, top_k_index, top_k_weights, _, gate_up_proj, down_proj = make_case(
        seed, tokens, hidden_size, intermediate, num_experts, top_k, "all_true"
    )
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up_proj)
        experts.down_proj.copy_(down_proj)
        expected = experts(hidden, top_k_index, top_k_weights)
    keep = torch.ones_like(top_k_index, dtype=torch.bool)
    out = masked_experts(hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, activation)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_skipped_pairs_and_inactive_experts_do_no_work(linear_calls):
    num_experts, hidden_size, intermediate = 6, 8, 4
    hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj = make_case(
        3, 12, hidden_size, intermediate, num_experts, 3, "random", p_keep=0.6
    )
    keep &= top_k_index != 0  # expert 0 is routed to, but none of its pairs are kept
    assert (top_k_index == 0).any() and keep.any() and not keep.all()
    # Expert 5's weights are NaN and all of its pairs are skipped: touching them would show.
    keep &= top_k_index != 5
    gate_up_proj[5] = float("nan")
    down_proj[5] = float("nan")

    linear_calls.clear()
    out = masked_experts(hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, "silu")
    calls = list(linear_calls)  # (weight address, rows multiplied)

    gate_up_ptr = {gate_up_proj[e].data_ptr(): e for e in range(num_experts)}
    down_ptr = {down_proj[e].data_ptr(): e for e in range(num_experts)}
    gate_up_rows = {gate_up_ptr[p]: n for p, n in calls if p in gate_up_ptr}
    down_rows = {down_ptr[p]: n for p, n in calls if p in down_ptr}
    assert len(calls) == len(gate_up_rows) + len(down_rows)  # one call per expert and matrix

    kept_experts = top_k_index[keep]
    expected_rows = {e: int((kept_experts == e).sum()) for e in kept_experts.unique().tolist()}
    assert gate_up_rows == expected_rows
    assert down_rows == expected_rows
    assert sum(gate_up_rows.values()) == int(keep.sum())
    assert 0 not in gate_up_rows and 5 not in gate_up_rows
    assert torch.isfinite(out).all()
    expected, _ = per_token_reference(
        hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, "silu"
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_no_renormalisation_and_zero_rows():
    hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj = make_case(
        7, 6, 8, 4, 4, 2, "random"
    )
    keep[0] = torch.tensor([True, False])
    keep[1] = False
    both = torch.ones_like(keep)
    out_kept = masked_experts(hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, "silu")
    first_only = torch.tensor([True, False]).expand_as(keep).contiguous()
    out_first = masked_experts(
        hidden, top_k_index, top_k_weights, first_only, gate_up_proj, down_proj, "silu"
    )
    out_second = masked_experts(
        hidden, top_k_index, top_k_weights, ~first_only, gate_up_proj, down_proj, "silu"
    )
    out_both = masked_experts(hidden, top_k_index, top_k_weights, both, gate_up_proj, down_proj, "silu")
    # row 0 keeps only its first pair with its original weight; row 1 keeps nothing
    torch.testing.assert_close(out_kept[0], out_first[0])
    assert torch.equal(out_kept[1], torch.zeros_like(out_kept[1]))
    assert out_first[0].abs().sum() > 0
    # dropping pairs is linear: the two halves add up to the full output
    torch.testing.assert_close(out_first + out_second, out_both, rtol=1e-5, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(0, 12),
    top_k=st.integers(1, 4),
    num_modalities=st.integers(1, 3),
    bump_modality=st.integers(1, 3),
    bump=st.floats(0.0, 1.0),
)
def test_keep_mask_properties(seed, tokens, top_k, num_modalities, bump_modality, bump):
    g = torch.Generator().manual_seed(seed)
    modality_ids = torch.randint(0, num_modalities + 1, (tokens,), generator=g)
    thresholds = torch.rand(num_modalities + 1, generator=g)
    thresholds[0] = -math.inf
    scores = torch.rand(tokens, top_k, generator=g)
    ties = torch.rand(tokens, top_k, generator=g) < 0.2  # score exactly at its threshold
    scores = torch.where(ties, thresholds[modality_ids][:, None].expand_as(scores), scores)
    scores[torch.rand(tokens, top_k, generator=g) < 0.1] = float("nan")

    keep = PiRule.keep_mask(scores, modality_ids, thresholds)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    for t in range(tokens):
        for j in range(top_k):
            s, thr = float(scores[t, j]), float(thresholds[modality_ids[t]])
            assert bool(keep[t, j]) == (math.isnan(s) or not s < thr)

    # a score equal to its threshold is kept; modality 0 (padding) and NaN scores are never skipped
    assert keep[ties].all()
    assert keep[modality_ids == 0].all()
    assert keep[scores.isnan()].all()

    # monotone: raising one modality's threshold only removes pairs
    modality = min(bump_modality, num_modalities)
    higher = thresholds.clone()
    higher[modality] += bump
    keep_higher = PiRule.keep_mask(scores, modality_ids, higher)
    assert not (keep_higher & ~keep).any()
    assert torch.equal(keep_higher[modality_ids != modality], keep[modality_ids != modality])

    # +inf skips every (non-NaN) pair of that modality
    infinite = thresholds.clone()
    infinite[modality] = math.inf
    keep_inf = PiRule.keep_mask(scores, modality_ids, infinite)
    rows = modality_ids == modality
    assert torch.equal(keep_inf[rows], scores[rows].isnan())


def test_compiled_inductor_dynamic_matches_eager():
    torch._dynamo.reset()
    num_experts, hidden_size, intermediate, top_k = 5, 12, 8, 2
    thresholds = torch.tensor([-math.inf, 0.3, 0.6])

    def fn(hidden, top_k_index, scores, modality_ids, thresholds, gate_up_proj, down_proj):
        keep = PiRule.keep_mask(scores, modality_ids, thresholds)
        out = masked_experts(hidden * 2.0, top_k_index, scores, keep, gate_up_proj, down_proj, "silu")
        return out + hidden

    compiled = torch.compile(fn, backend="inductor", dynamic=True, fullgraph=True)
    for i, tokens in enumerate([6, 11]):
        hidden, top_k_index, scores, _, gate_up_proj, down_proj = make_case(
            i, tokens, hidden_size, intermediate, num_experts, top_k, "random"
        )
        modality_ids = torch.arange(tokens) % 3
        args = (hidden, top_k_index, scores, modality_ids, thresholds, gate_up_proj, down_proj)
        expected = fn(*args)
        if i == 0:
            got = compiled(*args)
        else:  # a new token count must reuse the dynamic-shape graph
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled(*args)
        keep = PiRule.keep_mask(scores, modality_ids, thresholds)
        assert keep.any() and not keep.all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_opcheck():
    args = make_case(11, 7, 8, 4, 4, 2, "random")
    torch.library.opcheck(masked_experts, (*args, "silu"))


def _bad_args(**overrides):
    hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj = make_case(
        0, 5, 8, 4, 4, 2, "random"
    )
    args = dict(
        hidden=hidden,
        top_k_index=top_k_index,
        top_k_weights=top_k_weights,
        keep=keep,
        gate_up_proj=gate_up_proj,
        down_proj=down_proj,
        activation="silu",
    )
    args.update({k: v(args[k]) if callable(v) else v for k, v in overrides.items()})
    return args


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"keep": lambda k: k[:, :1]}, r"keep shape mismatch: keep\.shape\[1\] is 1"),
        ({"keep": lambda k: k[:4]}, r"keep shape mismatch: keep\.shape\[0\] is 4"),
        ({"top_k_weights": lambda w: w[:, :1]}, r"top_k_weights shape mismatch"),
        ({"hidden": lambda h: h[:4]}, r"token count mismatch"),
        ({"gate_up_proj": lambda w: w[:, :7]}, r"intermediate size mismatch: gate_up_proj\.shape\[1\]"),
        ({"down_proj": lambda w: w[:3]}, r"expert count mismatch"),
        ({"hidden": lambda h: h[:, :7]}, r"hidden size mismatch: gate_up_proj\.shape\[2\] is 8 but hidden"),
        ({"keep": lambda k: k.int()}, r"keep must be bool"),
        ({"top_k_index": lambda i: i.int()}, r"top_k_index must be int64"),
        ({"gate_up_proj": lambda w: w[0]}, r"gate_up_proj must be \[E, 2I, H\]"),
        ({"activation": "swishy"}, r"unknown activation 'swishy'"),
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, message):
    args = _bad_args(**overrides)
    with pytest.raises(ValueError, match=message):
        masked_experts(**args)
    # the fake implementation (what torch.compile traces) rejects the same inputs
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(ValueError, match=message):
            masked_experts(**fake)
