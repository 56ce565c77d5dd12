"""Serving an attached, compiled Qwen3-VL-MoE with varied shapes: every MoE call goes through the
modes op, or the library says why (ModesFallbackWarning) and track() refuses a partial ratio."""
import warnings

import pytest
import torch

import modes_fx
from modes_fx import runtime
from modes_fx.harness.testing import build, greedy_generate, image_inputs, text_config, text_inputs
from modes_fx.tracking import IncompleteTrackingError
from modes_fx.compiled import set_compiled_forward

NAME = "qwen3_vl_moe"


def _requests() -> list[tuple[str, dict]]:
    """≥ 20 requests of distinct shapes: image sizes, batch 1–4 with left padding, prompt
    lengths, and generate() with a KV cache."""
    model = build(NAME)
    grids = [(1, 2, 2), (1, 2, 4), (1, 4, 4), (1, 4, 6), (1, 6, 6), (1, 2, 6), (1, 6, 4), (1, 4, 8)]
    requests = [("forward", image_inputs(model, batch=1 + i % 2, pad=i % 2 == 1, grid_thw=g, seed=i)) for i, g in enumerate(grids)]
    requests += [("forward", image_inputs(model, batch=b, pad=True, seed=10 + b)) for b in (3, 4)]
    requests += [("forward", text_inputs(model, batch=b, seq=s, pad=b > 1, seed=s)) for b, s in [(1, 3), (1, 9), (2, 5), (3, 11), (4, 6), (2, 13)]]
    requests += [("generate", image_inputs(model, batch=1, grid_thw=(1, 2, 4), seed=30))]
    requests += [("generate", image_inputs(model, batch=2, pad=True, grid_thw=(1, 4, 4), seed=31))]
    requests += [("generate", text_inputs(model, batch=3, seq=8, seed=32)), ("generate", text_inputs(model, batch=1, seq=4, pad=False, seed=33))]
    shapes = {(kind, tuple(x["input_ids"].shape), tuple(x.get("pixel_values", torch.empty(0)).shape)) for kind, x in requests}
    assert len(shapes) == len(requests) >= 20
    return requests


NEW_TOKENS = 3


def _run(model, kind: str, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        if kind == "generate":
            return greedy_generate(model, inputs, max_new_tokens=NEW_TOKENS)
        return model(**inputs).logits


def _routed_tokens(kind: str, inputs: dict) -> int:
    """Non-padding tokens the MoE layers route: the prompt, plus one per row per decode step."""
    prompt = int(inputs["attention_mask"].sum())
    return prompt + (inputs["input_ids"].shape[0] * (NEW_TOKENS - 1) if kind == "generate" else 0)


def test_varied_shapes_all_go_through_the_modes_op_at_the_default_recompile_limit():
    requests = _requests()
    reference = build(NAME)
    expected = [_run(reference, kind, inputs) for kind, inputs in requests]
    model = build(NAME)
    tcfg = text_config(model)
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    torch._dynamo.reset()
    model.compile(backend="modes", options={"inner": "eager"})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", modes_fx.ModesFallbackWarning)  # no call may run dense
            for (kind, inputs), want in zip(requests, expected):
                with modes_fx.track() as stats:
                    got = _run(model, kind, inputs)
                assert stats.complete, (kind, tuple(inputs["input_ids"].shape), stats)
                pairs = tcfg.num_hidden_layers * tcfg.num_experts_per_tok * _routed_tokens(kind, inputs)
                assert (stats.kept, stats.skipped) == (pairs, 0)
                if kind == "generate":
                    assert torch.equal(got, want)
                else:
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        state = runtime.state_of(model)
        assert state.bypassed_forwards == 0 and state.forwards == sum(1 if k == "forward" else NEW_TOKENS for k, _ in requests)
    finally:
        set_compiled_forward(model, None)
        modes_fx.detach(model)
        torch._dynamo.reset()


def test_recompile_limit_of_one_warns_and_track_refuses_a_partial_ratio():
    requests = [r for r in _requests() if r[0] == "forward"][:4]
    model = build(NAME)
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    torch._dynamo.reset()
    model.compile(backend="modes", options={"inner": "eager"})
    try:
        with torch._dynamo.config.patch(recompile_limit=1), modes_fx.track() as stats:
            with pytest.warns(modes_fx.ModesFallbackWarning, match="recompile_limit"):
                for kind, inputs in requests:
                    _run(model, kind, inputs)
        assert not stats.complete and stats.calls < stats.expected_calls
        with pytest.raises(IncompleteTrackingError, match=r"only \d+ of \d+ MoE site calls"):
            stats.skip_ratio
        with pytest.raises(IncompleteTrackingError):
            stats.by_modality
        assert str(stats).startswith("incomplete:")
        assert runtime.state_of(model).bypassed_forwards > 0
    finally:
        set_compiled_forward(model, None)
        modes_fx.detach(model)
        torch._dynamo.reset()


def test_attach_without_compiling_warns_once_and_counts_nothing():
    model = build("qwen3_moe")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    try:
        with modes_fx.track() as stats, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for seed in range(3):
                _run(model, "forward", text_inputs(model, seed=seed))
        fallbacks = [w for w in caught if issubclass(w.category, modes_fx.ModesFallbackWarning)]
        assert len(fallbacks) == 1 and "not compiled in place" in str(fallbacks[0].message)
        assert (stats.calls, stats.expected_calls) == (0, 3 * 2)
        with pytest.raises(IncompleteTrackingError):
            stats.skip_ratio
    finally:
        modes_fx.detach(model)


def test_generate_on_the_torch_compile_wrapper_warns():
    model = build("qwen3_moe")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    torch._dynamo.reset()
    wrapper = torch.compile(model, backend="modes", options={"inner": "eager"})
    inputs = text_inputs(model)
    try:
        with modes_fx.track() as direct:
            with torch.no_grad():
                wrapper(**inputs)
        assert direct.complete and direct.calls == 2
        with pytest.warns(modes_fx.ModesFallbackWarning, match="torch.compile\\(model\\) wrapper"):
            greedy_generate(wrapper, inputs, max_new_tokens=2)
    finally:
        modes_fx.detach(model)
        torch._dynamo.reset()


def test_compiling_without_attach_warns_that_routers_stay_dense():
    model = build("qwen3_moe")
    torch._dynamo.reset()
    modes_fx.reset_report()
    model.compile(backend="modes", options={"inner": "eager"})
    try:
        with pytest.warns(modes_fx.ModesFallbackWarning, match="MoE router\\(s\\) dense: router weight belongs to no attached model"):
            _run(model, "forward", text_inputs(model))
    finally:
        set_compiled_forward(model, None)
        torch._dynamo.reset()


def test_running_dense_on_purpose_neither_warns_nor_is_expected():
    model = build("qwen3_moe")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    try:
        with modes_fx.track() as stats, warnings.catch_warnings():
            warnings.simplefilter("error", modes_fx.ModesFallbackWarning)
            with modes_fx.running_dense(model):
                _run(model, "forward", text_inputs(model))
        assert stats.complete and stats.expected_calls == 0
        assert runtime.state_of(model).bypassed_forwards == 0
        with pytest.warns(modes_fx.ModesFallbackWarning):  # outside the block it is reported again
            _run(model, "forward", text_inputs(model))
    finally:
        modes_fx.detach(model)
    with pytest.raises(ValueError, match="no schedule is attached"):
        with modes_fx.running_dense(model):
            pass
