"""The speed benchmark's decode on a static KV cache (``speed_bench.Runner``): same greedy tokens
as transformers' DynamicCache decode (M-RoPE positions included), ``backend="modes"`` at τ = 0
writes the same K/V as compiled dense, every MoE site is rewritten, one decode graph serves every
step and threshold, and ``track()`` counts what the DynamicCache decode counts; the batched
decode's rows are different sequences, modes at τ = 0 decodes them as dense does, and one graph
serves every batch size above 1; the benchmark's decode attention equals transformers' sdpa."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

import modes_fx
from modes_fx.harness import speed_bench as bench

THRESHOLD = 0.3  # score units: skips a part of the quick model's pairs


def _dynamic_cache_decode(runner: bench.Runner) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The benchmark's greedy decode on transformers' default DynamicCache (the cache grows by
    concatenation, positions from its length): (tokens int64 [1, decode_tokens], every layer's
    K and V [1, kv_heads, prompt + decode_tokens, head_dim])."""
    out = runner.model(input_ids=runner.ids, use_cache=True, logits_to_keep=1)
    past, token, tokens = out.past_key_values, runner._next(out), []
    for _ in range(runner.cfg.decode_tokens):
        tokens.append(token)
        token = runner._next(runner.model(input_ids=token, past_key_values=past, use_cache=True))
    return torch.cat(tokens, 1), _kv(past)


def _graphs_compiled(fn) -> int:
    """Number of graphs Dynamo compiled while running ``fn()``."""
    before = counters["stats"]["unique_graphs"]
    fn()
    return counters["stats"]["unique_graphs"] - before


def _kv(cache) -> list[torch.Tensor]:
    """Copies of every layer's K and V up to the cache's length (a static cache holds more rows)."""
    n = int(cache.get_seq_length())
    return [t[:, :, :n].clone() for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.fixture(scope="module")
def runner():
    torch._dynamo.reset()
    r = bench.Runner(bench.build_model(bench.QUICK), bench.QUICK)
    yield r
    r.close()


@torch.no_grad()
def test_static_cache_decode_matches_dynamic_cache_and_dense(runner):
    runner.use("eager")
    reference_tokens, reference_kv = _dynamic_cache_decode(runner)
    for impl in ("eager", "modes", "dense"):  # modes before dense, as the benchmark warms up
        runner.use(impl)
        past, token = runner.prefill()
        assert torch.equal(runner.decode(past, token), reference_tokens), impl
        # every layer's K/V at every position: the positions (M-RoPE) and hidden states of
        # every step are the DynamicCache decode's, so modes at τ = 0 equals dense
        for kv, expected in zip(_kv(past), reference_kv, strict=True):
            torch.testing.assert_close(kv, expected, msg=impl)
        # one decode graph serves every step, a second decode and another threshold
        runner.use(impl, THRESHOLD)
        assert _graphs_compiled(lambda: runner.decode(past, token)) == 0, impl
    runner.check_every_site_rewritten()


@torch.no_grad()
def test_static_cache_decode_compiles_once(runner):
    torch._dynamo.reset()
    runner.use("modes")
    past, token = runner.prefill()
    assert _graphs_compiled(lambda: runner.decode(past, token)) == 1  # not one per step
    assert runner.cfg.decode_tokens > 1


@torch.no_grad()
def test_static_cache_decode_tracks_as_dynamic_cache(runner):
    runner.use("modes", THRESHOLD)
    with modes_fx.track() as dynamic:
        _dynamic_cache_decode(runner)
    past, token = runner.prefill()
    with modes_fx.track() as static:
        runner.decode(past, token)
    cfg = runner.cfg
    assert static.kept + static.skipped == cfg.decode_tokens * cfg.num_layers * cfg.top_k
    assert 0 < static.skipped < static.kept + static.skipped
    # the DynamicCache run also counts the prefill: compare the decode steps' part
    with modes_fx.track() as prefill:
        runner.prefill()
    assert (static.kept, static.skipped) == (dynamic.kept - prefill.kept, dynamic.skipped - prefill.skipped)


@torch.no_grad()
def test_batched_decode_rows_differ_and_modes_equals_dense(runner):
    batch, cfg = 4, runner.cfg
    decoded = {}
    for impl in ("modes", "dense"):
        runner.use(impl)
        past, token = runner.prefill()
        decoded[impl] = runner.decode(*runner.batched(past, token, batch))
        # one decode graph serves every batch size above 1
        assert _graphs_compiled(lambda: runner.decode(*runner.batched(past, token, batch + 3))) == 0, impl
    runner.check_every_site_rewritten()
    assert decoded["dense"].shape == (batch, cfg.steps(batch))
    assert torch.equal(decoded["modes"], decoded["dense"])
    assert len({tuple(row) for row in decoded["dense"].tolist()}) == batch  # different sequences
    runner.use("modes", THRESHOLD)
    with modes_fx.track() as stats:
        runner.decode(*runner.batched(past, token, batch))
    assert stats.kept + stats.skipped == batch * cfg.steps(batch) * cfg.num_layers * cfg.top_k


@pytest.mark.parametrize("batch,length,kv_length,mask_heads", [(1, 1, 30, 1), (3, 1, 17, 1), (2, 5, 17, 1), (2, 1, 17, 8)])
def test_decode_attention_equals_transformers_sdpa(batch, length, kv_length, mask_heads):
    """The benchmark's attention is transformers' sdpa attention; one-token queries attend to the
    cached K/V heads without repeat_kv (longer queries and per-head masks take transformers' own
    path)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    gen = torch.Generator().manual_seed(batch * 100 + length)
    q, k, v = (torch.randn(batch, heads, n, 16, generator=gen) for heads, n in ((8, length), (2, kv_length), (2, kv_length)))
    mask = torch.rand(batch, mask_heads, length, kv_length, generator=gen) < 0.7
    mask[..., 0] = True  # every query attends to something
    got, _ = bench.sdpa_decode_gqa(module, q, k, v, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert got.shape == expected.shape == (batch, length, 8, 16)
    torch.testing.assert_close(got, expected)
