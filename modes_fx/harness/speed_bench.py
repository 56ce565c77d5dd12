"""``modes bench speed`` (also ``python -m modes_fx.harness.speed_bench speed``): what skipping buys in wall time.

One process, one randomly initialised Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``, built
by :func:`modes_fx.harness.testing.build`; the vision tower is never run). The prompt is text-only token
ids: BOS, ``image_tokens`` copies of the image token id (the modality hook maps them to the
``image`` modality, so the modality machinery runs) and ``text_tokens - 1`` ordinary text ids;
then a greedy decode of ``decode_tokens`` tokens at batch 1 (argmax over the ordinary text ids)
on a static KV cache (``transformers.StaticCache`` preallocated to prompt + decode positions,
written in place: every decode step has the same shapes, so each compiled variant runs one decode
graph, and no step re-copies the cache as the default DynamicCache's ``torch.cat`` does).
Decode is also timed at every batch size of ``cfg.batches`` above 1 (default 4; ``--batches
1,4,16`` adds 16; compiled variants only; ``batch_decode_tokens`` steps, as every step of a static
cache costs the same): the batch-1 prefill's K/V copied into every row of a static cache, each row
starting from a different text id (:meth:`Runner.batched`); each batch size's ratio to dense and
Amdahl bound (from the experts share of that batch's ``tau=0`` decode) are reported.
Variants, timed with interleaved repetitions:

- ``eager``: transformers eager, uncompiled;
- ``dense``: ``torch.compile`` with inductor (the baseline every ratio is taken against);
- ``modes tau=0``: ``backend="modes"`` keeping every pair (the passes' overhead);
- ``modes skip=S``: ``backend="modes"`` with one uniform threshold per phase, solved for so that
  ``modes_fx.track()`` reads the skip ratio S (± 1%) on the benchmark prefill and decode.

With ``--precision w4a16`` (or ``both``): the W4A16 rows, on the same model (rebuilt from the same seed) converted to bf16 and
quantized by :func:`modes_fx.quant.quantize.quantize_experts` (int4 experts and linears, bf16
activations): ``w4a16 dense`` (compiled as ``dense``; the baseline of these rows), ``w4a16
tau=0`` and ``w4a16 skip=88%``, with the weight memory of the fp32, bf16 and W4A16 models and the
W4A16 logits' relative error against bf16 on the benchmark prompt.

Both compiled variants live side by side on the same module (``modes_fx.compiled.set_compiled_forward``
switches between them); thresholds change through ``state.set_thresholds`` without recompiling.
Latencies are milliseconds; the decode latency is the total of the ``decode_tokens`` steps.
The decode roofline: ``stream_bandwidth`` measures this machine's streaming read bandwidth in the
same run (the faster of ``F.linear`` and the experts kernel's own fp32 mat-vec, which streams about
twice as fast on the CPUs of docs/benchmarks.md), ``decode_bytes`` what one decode step must read (every language-model weight but the
experts and the input embedding, plus one expert per kept pair: at batch 1 the kept pairs are
distinct experts, (1 − skip) · L · k of them), and each row shows its decode as a fraction of the
time those bytes take at that bandwidth ("of bw"; 100% is the memory-bandwidth limit).
The experts share is the fraction of the ``tau=0`` time spent in ``modes::masked_experts``
(``modes::masked_experts_int4`` for W4A16; torch.profiler); the Amdahl bound at skip ratio s is
``1 / ((1 - share) + share * (1 - s))``.
Peak memory is the largest resident-set growth (MiB) over the process's resident set before the
timed call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modes_fx.calib.baselines import bisect_knob
from modes_fx.compiled import set_compiled_forward
from modes_fx.kernels import cpp_decode

SKIP_TARGETS = (0.5, 0.75, 0.88)
W4A16_SKIP = 0.88  # the W4A16 rows: dense vs this skip ratio
SKIP_TOLERANCE = 0.01


@dataclass(frozen=True)
class BenchConfig:
    """Model shape (text model of Qwen3-VL-MoE), workload and repetitions of one benchmark run."""

    hidden_size: int
    num_layers: int
    num_experts: int
    top_k: int
    moe_intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    image_tokens: int
    text_tokens: int
    decode_tokens: int
    reps: int
    compiler: str  # inner compiler of both compiled variants: "inductor" or "eager"
    bandwidth_mib: int = 256  # size of the weight the bandwidth probe streams
    batches: tuple[int, ...] = (1, 4)  # decode batch sizes (1 first: the main table's decode)
    batch_decode_tokens: int = 16  # steps of a decode at batch > 1 (each step costs the same)

    def steps(self, batch: int) -> int:
        """Decode steps at ``batch`` rows: ``decode_tokens`` at batch 1, else ``batch_decode_tokens``."""
        return self.decode_tokens if batch == 1 else self.batch_decode_tokens


FULL = BenchConfig(1024, 8, 64, 8, 384, 16, 4, 64, 1024, 64, 64, 3, "inductor")
QUICK = BenchConfig(64, 2, 8, 2, 32, 4, 2, 16, 48, 8, 4, 1, "eager", 16, (1, 4), 3)


DECODE_ATTENTION = "sdpa_decode_gqa"  # the benchmark model's attention (registered below)


def sdpa_decode_gqa(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' ``sdpa`` attention, except that a one-token query with a mask attends to the
    K/V heads as they are cached: query ``[B, Hq, 1, d]`` viewed as ``[B, Hkv, Hq / Hkv, d]``
    against K/V ``[B, Hkv, L, d]`` (the mask ``[B, 1, 1, L]`` is shared by all heads). Uncompiled,
    transformers does the same (its ``pack_gqa``); under torch.compile it copies the whole cache
    into ``Hq`` heads (``repeat_kv``) at every step instead. Returns (``[B, 1, Hq, d]``, None)."""
    from torch.nn import functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    shared_mask = attention_mask is not None and attention_mask.shape[1] == 1
    if length != 1 or not shared_mask or key.shape[1] == heads or kwargs.get("dropout", 0.0):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    packed = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2), None


def _register_decode_attention() -> None:
    """Make :data:`DECODE_ATTENTION` a transformers attention implementation (sdpa's masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, sdpa_decode_gqa)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


def build_model(cfg: BenchConfig) -> torch.nn.Module:
    """The benchmark model (fp32, eval, seeded random weights, grouped_mm experts), its language
    model attending with :func:`sdpa_decode_gqa`."""
    from modes_fx.harness import testing

    half = cfg.head_dim // 2
    hw = half * 5 // 16  # mrope sections (t, h, w) summing to head_dim / 2, as Qwen3-VL's 24/20/20
    model = testing.build(
        "qwen3_vl_moe",
        experts_implementation="grouped_mm",
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate,
        intermediate_size=4 * cfg.moe_intermediate,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=2 * (cfg.image_tokens + cfg.text_tokens + cfg.decode_tokens),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [half - 2 * hw, hw, hw],
            "mrope_interleaved": True,
        },
    )
    _register_decode_attention()
    model.set_attn_implementation({"text_config": DECODE_ATTENTION})
    return model


def prompt_ids(cfg: BenchConfig) -> torch.Tensor:
    """int64 [1, image_tokens + text_tokens]: BOS, the image placeholders, then text ids."""
    from modes_fx.harness import testing

    g = torch.Generator().manual_seed(0)
    text = torch.randint(testing.TEXT_ID_LOW, testing.TEXT_ID_HIGH, (cfg.text_tokens - 1,), generator=g)
    image = torch.full((cfg.image_tokens,), testing.IMAGE_ID)
    return torch.cat([torch.tensor([testing.BOS_ID]), image, text])[None]


# ---------------------------------------------------------------------------------------------
# The roofline: what a decode step must read, and how fast this machine reads


def stream_bandwidths(mib: int, reps: int = 7) -> dict[str, float]:
    """Streaming read bandwidth of this machine in GB/s, per reader: the median over ``reps`` of
    one fp32 mat-vec ``x [1, 1024] @ w [N, 1024].T`` reading a ``mib`` MiB weight (each read once
    per call, so the time is memory-bound), after one warm-up call, with ``F.linear`` and, when
    the C++ decode kernel is available, with its ``few_rows_linear`` (what the experts op reads
    its fp32 weights with at decode)."""
    from torch.nn import functional as F

    readers = {"F.linear": F.linear}
    if cpp_decode.decode_op() is not None:
        readers["few_rows_linear"] = torch.ops.modes_cpu.few_rows_linear
    weight = torch.randn(mib * 2**20 // (4 * 1024), 1024)
    x = torch.randn(1, 1024)
    result = {}
    for name, linear in readers.items():
        linear(x, weight)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            linear(x, weight)
            times.append(time.perf_counter() - start)
        result[name] = weight.numel() * 4 / statistics.median(times) / 1e9
    return result


def stream_bandwidth(mib: int, reps: int = 7) -> float:
    """The machine's streaming read bandwidth in GB/s: the fastest reader of :func:`stream_bandwidths`."""
    return max(stream_bandwidths(mib, reps).values())


def decode_bytes(model: torch.nn.Module) -> dict[str, float]:
    """What one decode step of one token reads, from the stored weights (int4 counted as
    stored): ``fixed``, every language-model weight except the experts and the input embedding
    (one row of it per token: not counted; attention, norms, routers, shared experts and the
    lm_head are read whole every step; the vision tower never runs), and ``per_expert``, one
    routed expert's gate_up and down weights. Bytes."""
    from modes_fx.quant.quantize import stored_bytes
    from modes_fx.sites import find_moe_sites

    sites = find_moe_sites(model)
    experts = [model.get_submodule(site.experts_path) for site in sites]
    expert_weights = [getattr(e, name) for e in experts for name in ("gate_up_proj", "down_proj")]
    skipped = {id(t) for t in expert_weights} | {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:  # tied: the lm_head reads the whole matrix
        skipped.discard(id(model.get_output_embeddings().weight))
    fixed = [p for name, p in model.named_parameters() if id(p) not in skipped and ".visual." not in f".{name}"]
    total_experts = sum(site.num_experts for site in sites)
    return {"fixed": float(stored_bytes(fixed)), "per_expert": stored_bytes(expert_weights) / total_experts}


def _roofline(row: dict, step_bytes: dict[str, float], routed_pairs: int, steps: int, bandwidth: float) -> None:
    """Adds to ``row`` the decode bytes per token (MB), the bandwidth bound of its decode (ms:
    ``steps`` tokens at ``bandwidth`` GB/s) and the measured decode as a fraction of the bound.
    At batch 1 the kept pairs of a step are distinct experts: (1 − skip) · L · k of them."""
    skip = row["decode_skip"] if row["impl"] == "modes" else 0.0
    per_token = step_bytes["fixed"] + (1.0 - skip) * routed_pairs * step_bytes["per_expert"]
    row["decode_mb_per_token"] = per_token / 1e6
    row["decode_bound_ms"] = steps * per_token / (bandwidth * 1e9) * 1e3
    row["decode_of_bound"] = row["decode_bound_ms"] / row["decode_ms"]


# ---------------------------------------------------------------------------------------------
# Running and timing one phase


class Runner:
    """Runs the prefill / decode of the benchmark on one model under a chosen variant."""

    def __init__(self, model: torch.nn.Module, cfg: BenchConfig):
        import modes_fx
        from modes_fx import runtime
        from modes_fx.harness import testing

        self.model, self.cfg, self.ids = model, cfg, prompt_ids(cfg)
        modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
        modes_fx.reset_report()
        self.state = runtime.state_of(model)
        self.text_ids = slice(testing.TEXT_ID_LOW, testing.TEXT_ID_HIGH)
        self.impls = {
            "eager": None,
            "dense": torch.compile(model._call_impl, backend=cfg.compiler),
            "modes": torch.compile(model._call_impl, backend="modes", options={"inner": cfg.compiler}),
        }
        self._dense = contextlib.ExitStack()  # the eager / dense variants run dense on purpose

    def close(self) -> None:
        """Leave the dense baseline and detach the schedule from the model."""
        import modes_fx

        self._dense.close()
        modes_fx.detach(self.model)

    def check_every_site_rewritten(self) -> None:
        """Raise if a graph the modes backend compiled left an MoE site of the model unrewritten."""
        import modes_fx

        for graph in modes_fx.last_report().graphs:
            if len(graph.rewrites) != len(self.state.sites):
                raise RuntimeError(f"modes rewrote {len(graph.rewrites)} of {len(self.state.sites)} MoE sites in graph {graph.index}")

    def use(self, impl: str, threshold: float = 0.0) -> None:
        """Select the compiled callable and set every site's threshold (score units) to one value.
        The eager and dense variants are baselines that run the attached model dense on purpose
        (``modes_fx.running_dense``); every ``impl`` named ``modes...`` skips."""
        import modes_fx

        self._dense.close()
        if not impl.startswith("modes"):
            self._dense.enter_context(modes_fx.running_dense(self.model))
        set_compiled_forward(self.model, self.impls[impl])
        table = torch.full_like(self.state.thresholds, threshold)
        table[:, 0] = -torch.inf
        self.state.set_thresholds(table)

    def _next(self, out, generator: torch.Generator | None = None) -> torch.Tensor:
        """Each row's next token, int64 [B, 1]: the argmax over the ordinary text ids, or with
        ``generator`` a sample of their softmax (temperature 1)."""
        logits = out.logits[:, -1, self.text_ids]
        if generator is None:
            return logits.argmax(-1, keepdim=True) + self.text_ids.start
        return torch.multinomial(logits.float().softmax(-1), 1, generator=generator) + self.text_ids.start

    def static_cache(self, batch: int):
        """An empty ``transformers.StaticCache`` for ``batch`` rows of the prompt and the longest
        decode (the same length at every batch size: attention reads all of it), allocated before any forward (the model's dtype and device): decode writes
        each step's K/V into it in place, so every step has the same shapes and compiles once."""
        from transformers import StaticCache

        text = self.model.config.get_text_config(decoder=True)
        weight = self.model.get_input_embeddings().weight
        cache = StaticCache(config=self.model.config, max_cache_len=self.ids.shape[1] + max(map(self.cfg.steps, self.cfg.batches)))
        cache.early_initialization(batch, text.num_key_value_heads, text.head_dim, weight.dtype, weight.device)
        return cache

    def prefill(self):
        """(static KV cache holding the prompt, first generated token int64 [1, 1])."""
        cache = self.static_cache(1)
        out = self.model(input_ids=self.ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, self._next(out)

    def batched(self, past, token, batch: int):
        """(static cache, tokens int64 [batch, 1]) for a decode of ``batch`` rows after the batch-1
        prefill (``past``, ``token`` [1, 1]): the prompt's K/V copied into every row; row i
        continues from the i-th text id after ``token`` (cyclically; row 0 from ``token``), so the
        rows' tokens, and their routing, differ from the first step."""
        cache = self.static_cache(batch)
        for src, dst in zip(past.layers, cache.layers, strict=True):
            dst.keys.copy_(src.keys.expand_as(dst.keys))
            dst.values.copy_(src.values.expand_as(dst.values))
            dst.cumulative_length.copy_(src.cumulative_length)
        start, count = self.text_ids.start, self.text_ids.stop - self.text_ids.start
        rows = torch.arange(batch, device=token.device)[:, None]
        return cache, (token - start + rows) % count + start

    def decode(self, past, token) -> torch.Tensor:
        """Decode of ``cfg.steps(B)`` steps from the end of the prompt in the static cache ``past``
        (what earlier decodes wrote past the prompt is overwritten: one prefill serves several
        decodes); ``token`` int64 [B, 1]; returns int64 [B, steps]. Batch 1 is greedy; B > 1
        rows sample (seeded, so every decode of the same inputs reads the same
        tokens): greedy rows of this random model fall into the same repeated token, and rows
        that route alike would not be a batch of different requests."""
        for layer in past.layers:  # rewind to the prompt in place (the static address stays; StaticLayer.crop is 5.24+)
            layer.cumulative_length.fill_(self.ids.shape[1])
        generator = torch.Generator(token.device).manual_seed(0) if token.shape[0] > 1 else None
        tokens = []
        for _ in range(self.cfg.steps(token.shape[0])):
            tokens.append(token)
            token = self._next(self.model(input_ids=token, past_key_values=past, use_cache=True), generator)
        return torch.cat(tokens, 1)


class PeakRSS:
    """Context manager: largest resident-set growth (MiB) over the value at entry, sampled every 2 ms."""

    def __enter__(self):
        self._stop, self.peak = threading.Event(), 0.0
        self._base = _rss_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mib() - self._base)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib() - self._base)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(fn, *args):
    """(fn's result, wall milliseconds)."""
    start = time.perf_counter()
    result = fn(*args)
    return result, (time.perf_counter() - start) * 1e3


# ---------------------------------------------------------------------------------------------
# Thresholds for a target skip ratio


def _skip_ratio(run) -> float:
    import modes_fx

    with modes_fx.track() as stats:
        run()
    return stats.skip_ratio


def solve_threshold(measure, target: float, steps: int = 12) -> tuple[float, float]:
    """Threshold t in [0, 1] (score units) with ``measure(t)`` within SKIP_TOLERANCE of
    ``target``; ``measure`` is a skip ratio, non-decreasing in t, 1 at t = 1 (π ≤ 1). The
    baselines' bisection (``calib.baselines.bisect_knob``); returns (t, measured ratio) of the
    closest reading after at most ``steps`` measurements."""
    t, measured = bisect_knob(measure, 0.0, 1.0, target, SKIP_TOLERANCE, steps)
    return t, measured[t]


@dataclass
class Variant:
    """One row of the table: what to run and what was measured (ms, MiB, fractions)."""

    name: str
    impl: str
    prefill_threshold: float = 0.0
    decode_threshold: float = 0.0
    prefill_skip: float = float("nan")
    decode_skip: float = float("nan")
    prefill_ms: float = float("nan")
    decode_ms: float = float("nan")
    prefill_peak_mib: float = 0.0
    decode_peak_mib: float = 0.0
    batched_decode_ms: dict[int, float] = field(default_factory=dict)  # batch > 1 -> decode ms
    batched_decode_skip: dict[int, float] = field(default_factory=dict)
    decode_rounds_ms: list[float] = field(default_factory=list)  # batch-1 decode of every timed round


def calibrate(runner: Runner, target: float, echo, prefix: str = "modes") -> Variant:
    """The modes variant (named ``f"{prefix} skip=S"``) whose prefill and decode thresholds read
    ``target`` skip on the benchmark."""

    def prefill_skip(t):
        runner.use("modes", t)
        return _skip_ratio(runner.prefill)

    tp, _ = solve_threshold(prefill_skip, target)
    runner.use("modes", tp)
    past, token = runner.prefill()

    def decode_skip(t):
        runner.use("modes", t)
        return _skip_ratio(lambda: runner.decode(past, token))

    td, _ = solve_threshold(decode_skip, target)
    echo(f"  {prefix} skip {target:.0%}: prefill threshold {tp:.4f}, decode threshold {td:.4f}")
    return Variant(f"{prefix} skip={target:.0%}", "modes", tp, td)


# ---------------------------------------------------------------------------------------------
# The benchmark


def experts_share(runner: Runner, op: str = "modes::masked_experts") -> dict:
    """Fraction of the ``modes tau=0`` time spent in the masked experts ``op``
    (``modes::masked_experts_int4`` for int4 weights): ``prefill``, ``decode`` (batch 1) and
    ``decode_batched`` (batch size > 1 of ``cfg.batches`` -> fraction)."""
    runner.use("modes", 0.0)
    past, token = runner.prefill()
    shares = {"prefill": _op_share(runner.prefill, op), "decode": _op_share(lambda: runner.decode(past, token), op)}
    batched = {b: runner.batched(past, token, b) for b in _batches(runner.cfg)}
    shares["decode_batched"] = {b: _op_share(lambda b=b: runner.decode(*batched[b]), op) for b in batched}
    return shares


def _op_share(fn, op: str) -> float:
    """Fraction of the wall time of one ``fn()`` spent in ``op`` (torch.profiler, CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall_us = (time.perf_counter() - start) * 1e6
    return sum(e.cpu_time_total for e in prof.key_averages() if e.key == op) / wall_us


def _batches(cfg: BenchConfig) -> tuple[int, ...]:
    """The batched decode's batch sizes (those of ``cfg.batches`` above 1)."""
    return tuple(b for b in cfg.batches if b > 1)


PRECISIONS = ("fp32", "w4a16", "both")


def run(cfg: BenchConfig, out_dir: Path, precision: str = "fp32", echo=print) -> dict:
    """Run the benchmark: the fp32 rows, the W4A16 rows or ``both``; write ``speed.json`` and
    ``speed.png`` into ``out_dir``; return the result (``variants`` / ``w4a16`` present for the
    precisions run)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    torch.set_num_threads(os.cpu_count() or 1)
    torch._inductor.config.compile_threads = 1
    torch._dynamo.config.recompile_limit = 64
    start = time.perf_counter()
    echo(f"config: {asdict(cfg)}; {torch.get_num_threads()} torch threads")
    # built (or loaded from torch's extension cache) here, before any timing
    decode_kernel = "C++ (kernels/decode_cpu.cpp)" if cpp_decode.decode_op() is not None else "Python (kernels/fast.py)"
    echo(f"few-token (decode) path of the CPU experts kernel: {decode_kernel}")
    readers = stream_bandwidths(cfg.bandwidth_mib)
    bandwidth = max(readers.values())
    echo(f"streaming bandwidth: {bandwidth:.1f} GB/s (the fastest fp32 mat-vec over {cfg.bandwidth_mib} MiB: "
         + ", ".join(f"{name} {gbs:.1f}" for name, gbs in readers.items()) + ")")
    result = {"config": asdict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(), "bandwidth_gbs": bandwidth,
              "bandwidth_readers_gbs": readers, "decode_kernel": decode_kernel}
    if precision in ("fp32", "both"):
        result.update(run_fp32(cfg, echo, bandwidth))
    if precision in ("w4a16", "both"):
        result["w4a16"] = run_w4a16(cfg, echo, bandwidth)
    result["seconds"] = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "speed.json").write_text(json.dumps(result, indent=2))
    echo(format_table(result))
    plotted = plot(result, out_dir / "speed.png")
    echo(f"wrote {out_dir / 'speed.json'}" + (f" and {plotted}" if plotted else " (no plot: pip install modes-fx[bench])"))
    return result


def run_fp32(cfg: BenchConfig, echo, bandwidth: float, targets=SKIP_TARGETS, eager: bool = True, each_round=None) -> dict:
    """The fp32 rows: eager (unless ``eager`` is false), dense (the baseline), modes tau=0 and
    modes at ``targets`` (default :data:`SKIP_TARGETS`); returns ``experts_share`` and
    ``variants`` (table rows). ``each_round`` as in :func:`measure`."""
    torch._dynamo.reset()
    model = build_model(cfg)
    runner = Runner(model, cfg)
    variants = [Variant("eager", "eager")] if eager else []
    variants += [Variant("dense", "dense"), Variant("modes tau=0", "modes")]
    with torch.no_grad():
        variants, share = measure(runner, variants, targets, "modes", echo, each_round=each_round)
    runner.close()
    rows = _rows(variants, "dense", share, _decode_roofline(model, cfg, bandwidth), cfg)
    return {"experts_share": share, "variants": rows}


def run_w4a16(cfg: BenchConfig, echo, bandwidth: float, each_round=None) -> dict:
    """The W4A16 rows: the benchmark model converted to bf16 and quantized by
    :func:`modes_fx.quant.quantize.quantize_experts` (int4 experts and linears), timed as ``w4a16
    dense`` (torch.compile with ``cfg.compiler``, the baseline of these rows), ``w4a16 tau=0``
    and ``w4a16 skip=88%``. Also measures the weight memory (MiB) of the fp32, bf16 and W4A16
    models and the W4A16 logits' relative error ‖W4A16 − bf16‖ / ‖bf16‖ on the benchmark prompt
    (eager, every position). ``each_round`` as in :func:`measure`."""
    from modes_fx.quant.quantize import model_weight_bytes, quantize_experts

    torch._dynamo.reset()  # fresh automatic-dynamic state: these graphs compile as the fp32 ones did
    model = build_model(cfg)
    mib = {"fp32": model_weight_bytes(model) / 2**20}
    model.to(torch.bfloat16)
    mib["bf16"] = model_weight_bytes(model) / 2**20
    with torch.no_grad():
        reference = model(input_ids=prompt_ids(cfg), use_cache=False).logits.float()
        report = quantize_experts(model)
        logits = model(input_ids=prompt_ids(cfg), use_cache=False).logits.float()
    mib["w4a16"] = model_weight_bytes(model) / 2**20
    echo(f"  {report}".replace("\n", "\n  "))
    runner = Runner(model, cfg)
    variants = [Variant("w4a16 dense", "dense"), Variant("w4a16 tau=0", "modes")]
    with torch.no_grad():
        variants, share = measure(runner, variants, (W4A16_SKIP,), "w4a16", echo, op="modes::masked_experts_int4", each_round=each_round)
    runner.close()
    return {
        "group_size": report.group_size,
        "experts_share": share,
        "variants": _rows(variants, "w4a16 dense", share, _decode_roofline(model, cfg, bandwidth), cfg),
        "weight_mib": mib,
        "expert_weight_mib": {"bf16": report.expert_bytes_before / 2**20, "w4a16": report.expert_bytes_after / 2**20},
        "expert_memory_ratio": report.expert_memory_ratio,
        "logits_vs_bf16": {"relative_error": float((logits - reference).norm() / reference.norm())},
    }


def measure(runner: Runner, variants: list[Variant], targets, prefix: str, echo, op: str = "modes::masked_experts", each_round=None):
    """Warm up ``variants``, add a ``f"{prefix} skip=S"`` variant per target skip ratio, time all
    of them interleaved (``cfg.reps`` rounds; medians) and measure their memory; returns
    (variants, experts share of ``op`` in the tau=0 time). Call under ``no_grad``.
    ``each_round()``, when given, runs after the variants of every timed round (the llama.cpp
    side-by-side times its own rows there, interleaved with these)."""
    # Warm-up compiles the prefill and decode graphs, modes first (both callables share
    # Dynamo's automatic-dynamic state; compiling modes first keeps its prefill graph
    # static-shaped, as in the measured table), then checks every MoE site was rewritten.
    for v in sorted(variants, key=lambda v: ("eager", "modes", "dense").index(v.impl)):
        runner.use(v.impl)
        _, ms = _timed(lambda: _decode_every_batch(runner, v.impl, *runner.prefill()))
        echo(f"  warm-up {v.name}: {ms / 1e3:.1f} s (includes compilation)")
    runner.check_every_site_rewritten()
    variants = variants + [calibrate(runner, s, echo, prefix) for s in targets]
    samples = {v.name: {"prefill": [], "decode": [], "batched": {}} for v in variants}
    for _ in range(runner.cfg.reps):
        for v in variants:
            _measure_once(runner, v, samples[v.name])
        if each_round is not None:
            each_round()
    for v in variants:
        v.prefill_ms = statistics.median(samples[v.name]["prefill"])
        v.decode_ms = statistics.median(samples[v.name]["decode"])
        v.decode_rounds_ms = list(samples[v.name]["decode"])
        v.batched_decode_ms = {b: statistics.median(ms) for b, ms in samples[v.name]["batched"].items()}
        _measure_untimed(runner, v)
    return variants, experts_share(runner, op)


def _decode_every_batch(runner: Runner, impl: str, past, token) -> None:
    """Untimed: decode after the prefill (``past``, ``token``) at batch 1 and, unless ``impl`` is
    eager (not a baseline of any ratio; uncompiled batched decode would only add minutes), at
    every batched size."""
    runner.decode(past, token)
    for b in _batches(runner.cfg) if impl != "eager" else ():
        runner.decode(*runner.batched(past, token, b))


def _measure_once(runner: Runner, v: Variant, samples: dict) -> None:
    """One timed prefill and one timed decode per batch size of variant ``v`` (batch > 1 not for
    eager). Nothing is tracked while timing (``track()`` is a diagnostic with its own per-call
    cost, absent from the dense baseline); :func:`_measure_untimed` reads the skip ratios of the
    same deterministic inputs."""
    runner.use(v.impl, v.prefill_threshold)
    (past, token), ms = _timed(runner.prefill)
    samples["prefill"].append(ms)
    runner.use(v.impl, v.decode_threshold)
    _, ms = _timed(runner.decode, past, token)
    samples["decode"].append(ms)
    for b in _batches(runner.cfg) if v.impl != "eager" else ():
        batched = runner.batched(past, token, b)
        _, ms = _timed(runner.decode, *batched)
        samples["batched"].setdefault(b, []).append(ms)


def _measure_untimed(runner: Runner, v: Variant) -> None:
    """Skip ratios (``track()``) of one untimed prefill and decode per batch size of ``v``, and
    the peak resident-set growth of the prefill and the batch-1 decode (not during timing: the
    sampling thread would compete for the interpreter)."""
    import modes_fx

    runner.use(v.impl, v.prefill_threshold)
    with PeakRSS() as mem, modes_fx.track() as stats:
        past, token = runner.prefill()
    v.prefill_peak_mib, v.prefill_skip = mem.peak, stats.skip_ratio
    runner.use(v.impl, v.decode_threshold)
    with PeakRSS() as mem, modes_fx.track() as stats:
        runner.decode(past, token)
    v.decode_peak_mib, v.decode_skip = mem.peak, stats.skip_ratio
    for b in v.batched_decode_ms:
        batched = runner.batched(past, token, b)
        with modes_fx.track() as stats:
            runner.decode(*batched)
        v.batched_decode_skip[b] = stats.skip_ratio


def _amdahl(share: float, skip: float) -> float:
    return 1.0 / ((1.0 - share) + share * (1.0 - skip))


def _decode_roofline(model: torch.nn.Module, cfg: BenchConfig, bandwidth: float):
    """``_roofline`` for the rows of ``model`` (its bytes per step read once)."""
    step_bytes = decode_bytes(model)
    return lambda row: _roofline(row, step_bytes, cfg.num_layers * cfg.top_k, cfg.decode_tokens, bandwidth)


def _rows(variants: list[Variant], baseline: str, share: dict, roofline, cfg: BenchConfig) -> list[dict]:
    """The table rows: each variant with its speedups over the ``baseline`` row, the lowest and
    highest batch-1 decode speedup of a single timed round (``decode_speedup_range``), its Amdahl
    bound, (``roofline(row)``) its decode bandwidth bound and ``decode_by_batch`` (batch ->
    ms per token (``cfg.steps(batch)`` steps), speedup over the baseline at that batch, skip ratio,
    Amdahl bound; batch 1 is the row's decode)."""
    base = next(v for v in variants if v.name == baseline)
    rows = []
    for v in variants:
        row = asdict(v)
        for phase in ("prefill", "decode"):
            row[f"{phase}_speedup_vs_dense"] = getattr(base, f"{phase}_ms") / getattr(v, f"{phase}_ms")
            skip = getattr(v, f"{phase}_skip")
            row[f"{phase}_amdahl_bound"] = _amdahl(share[phase], skip) if skip == skip else None
        # the same ratio per timed round (the rounds interleave the variants): how much it moves within the run
        per_round = [b / m for b, m in zip(base.decode_rounds_ms, v.decode_rounds_ms)]
        row["decode_speedup_range"] = (min(per_round), max(per_round))
        roofline(row)
        row["decode_by_batch"] = _by_batch(v, base, share, cfg)
        rows.append(row)
    return rows


def _by_batch(v: Variant, base: Variant, share: dict, cfg: BenchConfig) -> dict[int, dict]:
    """Batch -> decode ms per token (``cfg.steps(batch)`` steps), speedup over ``base`` at that batch, skip
    ratio and Amdahl bound (from that batch's experts share) of variant ``v``."""
    ms = {1: v.decode_ms, **v.batched_decode_ms}
    skips = {1: v.decode_skip, **v.batched_decode_skip}
    base_ms = {1: base.decode_ms, **base.batched_decode_ms}
    shares = _decode_shares(share)
    return {
        b: {
            "ms_per_token": ms[b] / cfg.steps(b),
            "speedup_vs_dense": base_ms[b] / ms[b],
            "skip": skips[b],
            "amdahl_bound": _amdahl(shares[b], skips[b]) if skips[b] == skips[b] else None,
        }
        for b in ms
    }


def _decode_shares(share: dict) -> dict[int, float]:
    """Batch -> experts share of the ``modes tau=0`` decode (batch 1 and ``decode_batched``)."""
    return {1: share["decode"], **share["decode_batched"]}


def format_table(result: dict) -> str:
    """The result as fixed-width text tables (ms, ratios to each table's compiled dense row)."""
    lines = [f"decode bandwidth bound: the bytes a decode step must read (MB/tok) at the measured {result['bandwidth_gbs']:.1f} GB/s"]
    if "variants" in result:
        lines += _table(result["variants"], result["experts_share"])
    if "w4a16" in result:
        w4 = result["w4a16"]
        mib, expert_mib, logits = w4["weight_mib"], w4["expert_weight_mib"], w4["logits_vs_bf16"]
        lines += [
            "",
            f"W4A16: int4 experts and linears (group size {w4['group_size']}), bf16 activations; x dense = vs w4a16 dense",
            *_table(w4["variants"], w4["experts_share"]),
            f"weights: fp32 {mib['fp32']:.1f} MiB, bf16 {mib['bf16']:.1f} MiB, W4A16 {mib['w4a16']:.1f} MiB; "
            f"experts bf16 {expert_mib['bf16']:.1f} MiB → W4A16 {expert_mib['w4a16']:.1f} MiB ({w4['expert_memory_ratio']:.2f}x smaller)",
            f"W4A16 vs bf16 logits on the benchmark prompt (eager, every position): relative error {logits['relative_error']:.4f}",
        ]
    return "\n".join(lines)


def _table(rows: list[dict], share: dict[str, float]) -> list[str]:
    head = (
        f"{'variant':<16}{'skip p/d':>12}{'prefill ms':>12}{'x dense':>9}{'bound':>7}"
        f"{'decode ms':>11}{'x dense':>9}{'rounds':>12}{'bound':>7}{'MB/tok':>8}{'of bw':>7}{'peak MiB p/d':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        skip = "-" if r["impl"] != "modes" else f"{r['prefill_skip']:.3f}/{r['decode_skip']:.3f}"
        bound = lambda b: "-" if b is None else f"{b:.2f}"  # noqa: E731
        low, high = r["decode_speedup_range"]
        lines.append(
            f"{r['name']:<16}{skip:>12}{r['prefill_ms']:>12.1f}{r['prefill_speedup_vs_dense']:>9.2f}"
            f"{bound(r['prefill_amdahl_bound']):>7}{r['decode_ms']:>11.1f}{r['decode_speedup_vs_dense']:>9.2f}"
            f"{f'{low:.2f}-{high:.2f}':>12}{bound(r['decode_amdahl_bound']):>7}{r['decode_mb_per_token']:>8.1f}{r['decode_of_bound']:>7.0%}"
            f"{r['prefill_peak_mib']:>8.0f}/{r['decode_peak_mib']:<6.0f}"
        )
    lines.append(f"experts share of dense (modes tau=0) time: prefill {share['prefill']:.1%}, decode {share['decode']:.1%}")
    lines.append("rounds: lowest-highest decode x dense of a single timed round (the rounds interleave the rows); "
                 "a difference inside that range is run-to-run noise")
    return lines + _batch_table(rows, share)


def _batch_table(rows: list[dict], share: dict) -> list[str]:
    """Decode per batch size: ms per token, x dense and Amdahl bound at that batch, skip ratio."""
    batches = sorted({b for r in rows for b in r["decode_by_batch"]})
    head = f"{'decode by batch':<16}" + "".join(f"{f'b={b} ms/tok':>13}{'x dense':>8}{'bound':>7}{'skip':>7}" for b in batches)
    lines = ["", head, "-" * len(head)]
    for r in rows:
        cells = []
        for b in batches:
            d = r["decode_by_batch"].get(b)
            if d is None:
                cells.append(f"{'-':>13}{'':>22}")
                continue
            bound = "-" if d["amdahl_bound"] is None else f"{d['amdahl_bound']:.2f}"
            skip = "-" if r["impl"] != "modes" else f"{d['skip']:.3f}"
            cells.append(f"{d['ms_per_token']:>13.1f}{d['speedup_vs_dense']:>8.2f}{bound:>7}{skip:>7}")
        lines.append(f"{r['name']:<16}" + "".join(cells))
    shares = _decode_shares(share)
    lines.append("experts share of modes tau=0 decode by batch: " + ", ".join(f"b={b} {shares[b]:.1%}" for b in batches))
    return lines


def plot(result: dict, path: Path) -> Path | None:
    """Latency vs skip ratio (prefill and decode; modes rows as lines, fp32 in blue, W4A16 in
    orange; eager and dense as horizontal lines) as PNG, or None when matplotlib (the ``bench``
    extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, phase in zip(axes, ("prefill", "decode")):
        tables = (("variants" in result and result["variants"], "fp32", "C0"), ("w4a16" in result and result["w4a16"]["variants"], "W4A16", "C1"))
        for rows, label, color in ((rows, label, color) for rows, label, color in tables if rows):
            modes = sorted((r[f"{phase}_skip"], r[f"{phase}_ms"]) for r in rows if r["impl"] == "modes")
            ax.plot([s for s, _ in modes], [ms for _, ms in modes], "o-", color=color, label=f"{label} backend=modes")
            for r, style in zip((r for r in rows if r["impl"] != "modes"), ("--", ":")):
                ax.axhline(r[f"{phase}_ms"], linestyle=style, color=color, label=r["name"])
        ax.set(title=phase, xlabel="measured skip ratio", ylabel="latency (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``bench speed`` (shared by ``modes bench speed`` and ``python -m``)."""
    p.add_argument("--quick", action="store_true", help="tiny config, eager inner compiler (< 1 minute)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for speed.json and speed.png")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default: 3, quick 1)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 8, quick 2)")
    p.add_argument("--batches", type=_batch_sizes, default=None,
                   help="decode batch sizes, comma-separated, starting with 1 (default 1,4; 1,4,16 adds about a minute)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 rows (default), W4A16 rows (int4 experts, bf16 activations) or both (about +5 minutes)")


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``--batches``: "1,4,16" -> (1, 4, 16); batch 1 first (the main table's decode)."""
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or sizes[0] != 1 or any(b < 1 for b in sizes) or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"expected distinct positive batch sizes starting with 1, like 1,4,16; got {text!r}")
    return sizes


def speed(args: argparse.Namespace) -> int:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    cfg = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("reps", args.reps), ("num_layers", args.layers), ("batches", args.batches)) if v is not None}
    cfg = BenchConfig(**{**asdict(cfg), **overrides})
    run(cfg, args.out, args.precision)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modes_fx.harness.speed_bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    add_arguments(sub.add_parser("speed", help="latency of eager, inductor and modes at several skip ratios"))
    return speed(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
