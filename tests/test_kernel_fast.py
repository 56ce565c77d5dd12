"""Property tests of the fast masked experts kernel against the reference kernel."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_op_masked_experts import make_case, per_token_reference

from modes_fx.kernels import fast
from modes_fx.kernels.fast import DECODE_TOKENS, masked_experts_fast
from modes_fx.kernels.reference import masked_experts_reference
from modes_fx.rules import PiRule

ACTIVATIONS = ("silu", "gelu", "relu", "gelu_pytorch_tanh")
# token counts on both sides of the decode fast path, including T = 0 and 1
TOKENS = (0, 1, 2, DECODE_TOKENS, DECODE_TOKENS + 1, 9, 17)


def modality_keep(seed: int, top_k_weights: torch.Tensor, mix: tuple[int, ...], taus: list[float]) -> torch.Tensor:
    """Keep mask of a modality mix: token t gets modality id ``mix[t % len(mix)]`` (0 = none,
    never skipped), thresholds ``taus`` per modality column, compared with the routing weights."""
    tokens = top_k_weights.shape[0]
    order = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))
    modality_ids = torch.tensor([mix[i % len(mix)] for i in range(tokens)], dtype=torch.int64)[order]
    thresholds = torch.tensor([-math.inf, *taus], dtype=torch.float32)
    return PiRule.keep_mask(top_k_weights.float(), modality_ids, thresholds)


case = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "tokens": st.sampled_from(TOKENS),
        "hidden_size": st.integers(1, 24),
        "intermediate": st.integers(1, 16),
        "num_experts": st.integers(1, 10),
        "k_frac": st.floats(0.0, 1.0),
        "keep_mode": st.sampled_from(("random", "all_true", "all_false", "empty_rows", "drop_one_expert")),
        "p_keep": st.floats(0.0, 1.0),
    }
)
mixes = st.one_of(
    st.none(),  # use the keep_mode mask
    st.tuples(
        st.lists(st.integers(0, 3), min_size=1, max_size=4).map(tuple),
        st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    ),
)


def _args(shapes: dict, mix, **dtypes):
    kwargs = dict(shapes)
    kwargs["top_k"] = 1 + int(kwargs.pop("k_frac") * (kwargs["num_experts"] - 1))
    hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj = make_case(**kwargs, **dtypes)
    if mix is not None:
        keep = modality_keep(shapes["seed"], top_k_weights, *mix)
    return hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj


@settings(max_examples=300, deadline=None)
@given(shapes=case, mix=mixes, activation=st.sampled_from(ACTIVATIONS), routing_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fast_equals_reference_fp32(shapes, mix, activation, routing_dtype):
    args = _args(shapes, mix, routing_dtype=routing_dtype)
    got = masked_experts_fast(*args, activation)
    expected = masked_experts_reference(*args, activation)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(shapes=case, mix=mixes, activation=st.sampled_from(ACTIVATIONS), hidden_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fast_equals_reference_bf16(shapes, mix, activation, hidden_dtype):
    args = _args(shapes, mix, weight_dtype=torch.bfloat16, hidden_dtype=hidden_dtype)
    got = masked_experts_fast(*args, activation)
    expected = masked_experts_reference(*args, activation)
    assert got.dtype == expected.dtype == hidden_dtype and got.shape == expected.shape
    assert_close_bf16(got, expected, args, activation)


def assert_close_bf16(got: torch.Tensor, expected: torch.Tensor, args: tuple, activation: str) -> None:
    """bf16 rounds every intermediate, and the GEMMs block differently for different row counts:
    bound the difference by 1e-2 of the magnitudes that went into each output element (|expected|
    itself can be ~0 after cancellation, so a fixed atol/rtol is either too loose or flaky)."""
    _, scale = per_token_reference(args[0].to(torch.bfloat16), *args[1:], activation)
    error = (got.double() - expected.double()).abs()
    assert (error <= 1e-5 + 1e-2 * scale).all(), f"max error {error.max()} vs scale {scale.max()}"


@pytest.mark.parametrize("tokens", [1, DECODE_TOKENS, 12])
def test_skipped_pairs_and_inactive_experts_are_not_computed(linear_calls, tokens):
    """Every F.linear call multiplies the rows of one kept expert, once per matrix; NaN weights
    of a routed-but-skipped expert and of an unrouted expert never reach the output."""
    num_experts, hidden_size, intermediate, top_k = 8, 8, 4, 3
    hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj = make_case(
        5, tokens, hidden_size, intermediate, num_experts, top_k, "all_true"
    )
    skipped = int(top_k_index[0, 0])
    keep &= top_k_index != skipped
    keep[0, 1] = True  # token 0 keeps a pair of another expert
    unused = sorted(set(range(num_experts)) - set(top_k_index.flatten().tolist()))
    for e in [skipped, *unused]:
        gate_up_proj[e] = float("nan")
        down_proj[e] = float("nan")

    linear_calls.clear()
    out = masked_experts_fast(hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, "silu")
    calls = list(linear_calls)

    kept = top_k_index[keep]
    expected_rows = {e: int((kept == e).sum()) for e in kept.unique().tolist()}
    by_ptr = {gate_up_proj[e].data_ptr(): e for e in range(num_experts)}
    by_ptr.update({down_proj[e].data_ptr(): e for e in range(num_experts)})
    rows = {}
    for ptr, n in calls:
        rows.setdefault(by_ptr[ptr], []).append(n)
    assert rows == {e: [n, n] for e, n in expected_rows.items()}
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out, masked_experts_reference(hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, "silu")
    )


def test_decode_path_uses_no_sorting(monkeypatch):
    """At most DECODE_TOKENS tokens: no argsort/bincount kernels; more tokens: exactly one of each."""
    cases = [(make_case(1, tokens, 8, 4, 6, 2, "all_true"), expected)
             for tokens, expected in ((DECODE_TOKENS, []), (DECODE_TOKENS + 1, ["bincount", "argsort"]))]
    used = []
    for name in ("argsort", "bincount"):
        real = getattr(torch, name)
        monkeypatch.setattr(fast.torch, name, lambda *a, _real=real, _name=name, **kw: used.append(_name) or _real(*a, **kw))
    for args, expected in cases:
        used.clear()
        masked_experts_fast(*args, "silu")
        assert used == expected
