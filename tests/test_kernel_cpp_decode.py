"""The C++ few-token path of the CPU masked experts kernel (kernels/decode_cpu.cpp): equal to
the Python path it replaces (bit for bit where both multiply with at::linear, to fp32 rounding
where it uses its own fp32 mat-vec), used where it applies and only there, and a failed build
falls back to the Python path with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils.cpp_extension
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernel_fast import case, mixes
from test_kernel_fast import _args as kernel_args
from test_op_masked_experts import make_case

from modes_fx.kernels import cpp_decode, fast
from modes_fx.kernels.fast import DECODE_TOKENS, masked_experts_fast
from modes_fx.kernels.reference import masked_experts_reference

decode_case = case.map(lambda shapes: {**shapes, "tokens": shapes["seed"] % (DECODE_TOKENS + 1)})  # 0..DECODE_TOKENS


@pytest.fixture(scope="module")
def op():
    built = cpp_decode.decode_op()
    assert built is not None, "the C++ decode kernel did not build on this machine"
    return built


def _python_path(*args):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpp_decode, "decode_op", lambda: None)
        return masked_experts_fast(*args, "silu")


@settings(max_examples=200, deadline=None)
@given(shapes=decode_case, mix=mixes, weight_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       routing_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_cpp_decode_equals_the_python_path(op, shapes, mix, weight_dtype, routing_dtype):
    args = kernel_args(shapes, mix, weight_dtype=weight_dtype, hidden_dtype=weight_dtype, routing_dtype=routing_dtype)
    got = masked_experts_fast(*args, "silu")
    expected = _python_path(*args)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if weight_dtype == torch.bfloat16:  # at::linear on both paths, same steps in the same order
        assert torch.equal(got, expected)
    else:  # few_rows_linear sums in another order than F.linear
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, masked_experts_reference(*args, "silu"), rtol=1e-5, atol=1e-5)


@settings(max_examples=150, deadline=None)
@given(rows=st.integers(1, DECODE_TOKENS), n=st.integers(1, 700), m=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       row_stride_pad=st.integers(0, 3), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_few_rows_linear_equals_f_linear(op, rows, n, m, seed, row_stride_pad, dtype):
    """The op's mat-vec: any row count, lengths on and off its 16-lane blocks, x rows with a
    stride (the op passes a column slice of the gate/up product), weights large enough to be
    split over threads; bf16 goes to at::linear."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n + row_stride_pad, generator=g).to(dtype)[:, :n]
    w = torch.randn(m, n, generator=g).to(dtype)
    got = torch.ops.modes_cpu.few_rows_linear(x, w)
    expected = torch.nn.functional.linear(x.double(), w.double())
    assert got.dtype == dtype and got.shape == (rows, m)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    # rounding scales with the magnitudes summed, not with the (possibly cancelled) result
    assert ((got.double() - expected).abs() <= tolerance * (x.double().abs() @ w.double().abs().T)).all()


def test_few_rows_linear_names_bad_shapes(op):
    with pytest.raises(RuntimeError, match=r"x \[rows, n\] and w \[m, n\] expected"):
        torch.ops.modes_cpu.few_rows_linear(torch.zeros(2, 3), torch.zeros(4, 5))


def _counting(monkeypatch, op):
    calls = []
    monkeypatch.setattr(cpp_decode, "decode_op", lambda: lambda *a: calls.append(a[1].shape[0]) or op(*a))
    return calls


def test_cpp_path_runs_exactly_where_it_applies(op, monkeypatch):
    """SiLU, plain weights, F.linear, at most DECODE_TOKENS tokens: the C++ op and no Python
    expert MLP; another activation, a custom linear or more tokens: the Python paths."""
    calls = _counting(monkeypatch, op)
    python_mlps = []
    real_mlp = fast._expert_mlp
    monkeypatch.setattr(fast, "_expert_mlp", lambda *a: python_mlps.append(a[0].shape[0]) or real_mlp(*a))
    for tokens in (1, DECODE_TOKENS):
        masked_experts_fast(*make_case(3, tokens, 8, 4, 6, 2, "all_true"), "silu")
    assert calls == [1, DECODE_TOKENS] and python_mlps == []
    for args, activation, linear in ((make_case(3, DECODE_TOKENS + 1, 8, 4, 6, 2, "all_true"), "silu", None),
                                     (make_case(3, 2, 8, 4, 6, 2, "all_true"), "gelu", None),
                                     (make_case(3, 2, 8, 4, 6, 2, "all_true"), "silu", lambda x, w: torch.nn.functional.linear(x, w))):
        python_mlps.clear()
        masked_experts_fast(*args, activation, linear=linear)
        assert len(python_mlps) > 0
    assert calls == [1, DECODE_TOKENS]


def test_cpp_path_takes_a_models_parameters(op, monkeypatch):
    """Expert weights reach the op as ``nn.Parameter``s: the C++ path takes them (and still
    leaves tensor subclasses, torchao's int4 weights, to the Python path)."""
    calls = _counting(monkeypatch, op)
    hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj = make_case(3, 2, 8, 4, 6, 2, "all_true")
    params = torch.nn.Parameter(gate_up_proj, requires_grad=False), torch.nn.Parameter(down_proj, requires_grad=False)
    with torch.no_grad():
        masked_experts_fast(hidden, top_k_index, top_k_weights, keep, *params, "silu")
    assert calls == [2]


@torch.no_grad()
def test_compiled_model_decodes_through_the_cpp_path(op, monkeypatch):
    """End to end: every decode step of a real Qwen3-VL-MoE compiled with backend="modes" runs
    each MoE layer's experts in the C++ op (the speed benchmark's quick model)."""
    from modes_fx.harness import speed_bench as bench

    torch._dynamo.reset()
    runner = bench.Runner(bench.build_model(bench.QUICK), bench.QUICK)
    try:
        runner.use("modes")
        past, token = runner.prefill()
        calls = _counting(monkeypatch, op)
        runner.decode(past, token)
        assert calls == [1] * (bench.QUICK.decode_tokens * bench.QUICK.num_layers)
    finally:
        runner.close()


def test_cpp_decode_never_reads_skipped_or_unrouted_experts(op):
    hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj = make_case(5, DECODE_TOKENS, 8, 4, 8, 3, "all_true")
    skipped = int(top_k_index[0, 0])
    keep &= top_k_index != skipped
    for e in [skipped, *sorted(set(range(8)) - set(top_k_index.flatten().tolist()))]:
        gate_up_proj[e] = float("nan")
        down_proj[e] = float("nan")
    out = masked_experts_fast(hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj, "silu")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _python_path(hidden, top_k_index, top_k_weights, keep, gate_up_proj, down_proj), rtol=1e-5, atol=1e-5)


def test_failed_build_warns_and_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'modes_fx_decode': no compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", broken)
    cpp_decode.decode_op.cache_clear()
    try:
        with pytest.warns(cpp_decode.SlowPathWarning, match="could not be built.*no compiler.*Python path"):
            assert cpp_decode.decode_op() is None
        args = make_case(2, 2, 8, 4, 6, 2, "all_true")
        torch.testing.assert_close(masked_experts_fast(*args, "silu"), masked_experts_reference(*args, "silu"))
    finally:
        cpp_decode.decode_op.cache_clear()


def test_switch_off_selects_the_python_path_without_building(monkeypatch):
    monkeypatch.setenv(cpp_decode.ENV_SWITCH, "0")
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", lambda *a, **k: pytest.fail("built although switched off"))
    cpp_decode.decode_op.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpp_decode.decode_op() is None
    finally:
        cpp_decode.decode_op.cache_clear()


def test_fast_module_uses_the_cpp_path_by_default(op):
    assert fast.cpp_decode.decode_op() is op


def test_ab_bench_times_each_path_and_restores_the_kernel(op, monkeypatch):
    from modes_fx.harness import cpp_decode_bench

    calls = _counting(monkeypatch, op)
    counting = cpp_decode.decode_op
    args = make_case(4, 1, 8, 4, 6, 2, "all_true")
    assert cpp_decode_bench.time_call(args, use_cpp=False, calls=3) > 0 and calls == []
    assert cpp_decode.decode_op is counting
    cpp_decode_bench.time_call(args, use_cpp=True, calls=3)
    assert calls == [1, 1, 1] and cpp_decode.decode_op is counting
