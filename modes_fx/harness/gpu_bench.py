"""The GPU check of issue 16 (item 5), prepared for a session that is lent a CUDA device:
``python -m modes_fx.harness.gpu_bench --out gpu-out``.

A Qwen3-VL-30B-A3B-shaped text stack (hidden 2048, 128 experts, top-8, moe_intermediate 768,
``--layers`` decoder layers, 32 heads / 4 KV heads of 128) in bf16 on ``cuda``, random weights
(``speed_bench.build_model``); prefill of 1536 image + 512 text tokens and a 64-token greedy
decode at batch 1, timed with ``torch.cuda.synchronize`` around each call (medians of
interleaved repetitions): inductor dense, ``backend="modes"`` at τ = 0, and at 88% skipped (one
uniform threshold per phase solved so that ``track()`` reads 88%). On CUDA the op runs the
device-side kernel (``kernels/grouped.py``: no host sync in the dispatch). Prints the table with
the card's name and writes ``gpu.json``.

Before the model it checks the kernel the op runs on the device against the reference kernel
(:func:`check_kernel`: random routings at the 30B shapes and small ones, every keep fraction)
and times it against the fast kernel, whose per-call host sync it replaces
(:func:`time_kernels`); both go into ``gpu.json``.

``--device cpu --quick`` runs the same code on the tiny CPU config (what the test suite does, so
the script cannot rot); its figures mean nothing. ``--quick`` computes in fp32 on CPU and bf16 on
CUDA (``torch._grouped_mm``'s fast path is bf16).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from modes_fx.harness import speed_bench
from modes_fx.kernels.fast import masked_experts_fast
from modes_fx.kernels.grouped import masked_experts_grouped, supports
from modes_fx.kernels.reference import masked_experts_reference

GPU_30B = speed_bench.BenchConfig(2048, 4, 128, 8, 768, 32, 4, 128, 1536, 512, 64, 5, "inductor")
SKIP = 0.88


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn, device: torch.device, *args):
    """(fn's result, wall milliseconds with the device synchronised before and after)."""
    _sync(device)
    start = time.perf_counter()
    result = fn(*args)
    _sync(device)
    return result, (time.perf_counter() - start) * 1e3


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _experts(cfg: speed_bench.BenchConfig, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random expert weights gate_up ``[E, 2I, H]`` and down ``[E, H, I]`` at ``cfg``'s shapes."""
    g = torch.Generator(device).manual_seed(0)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate
    gate_up = torch.randn(e, 2 * i, h, generator=g, device=device) / h**0.5
    down = torch.randn(e, h, i, generator=g, device=device) / i**0.5
    return gate_up.to(dtype), down.to(dtype)


def _routing(tokens: int, cfg: speed_bench.BenchConfig, keep_fraction: float, experts, seed: int) -> list:
    """Arguments of the masked experts op for ``tokens`` random tokens routed over ``experts``
    (softmax top-k), a random keep mask with ``keep_fraction`` of the pairs kept."""
    gate_up, down = experts
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, cfg.hidden_size, generator=g)
    weights, index = torch.randn(tokens, cfg.num_experts, generator=g).softmax(-1).topk(cfg.top_k, dim=-1)
    keep = torch.rand(tokens, cfg.top_k, generator=g) < keep_fraction
    routing = [t.to(gate_up.device) for t in (hidden.to(gate_up.dtype), index, weights, keep)]
    return [*routing, gate_up, down]


def check_kernel(cfg: speed_bench.BenchConfig, device: torch.device, dtype: torch.dtype, echo=print) -> list[dict]:
    """The device-side kernel against the reference kernel on ``device``: max |difference| over
    max |reference| for T in {1, 4, 33, 512} tokens and keep fractions 0, 0.12, 0.5, 1; raises
    when a case is off by more than the dtype's tolerance (1e-5 fp32, 2e-2 bf16)."""
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    rows, experts = [], _experts(cfg, device, dtype)
    for tokens in (1, 4, 33, 512):
        for fraction in (0.0, 0.12, 0.5, 1.0):
            args = _routing(tokens, cfg, fraction, experts, seed=tokens * 100 + int(fraction * 100))
            if not supports(args[0], args[4], args[5]):
                raise RuntimeError(f"the grouped kernel does not support {dtype} at H={cfg.hidden_size}, I={cfg.moe_intermediate}")
            got = masked_experts_grouped(*args, "silu").float()
            expected = masked_experts_reference(*args, "silu").float()
            scale = max(expected.abs().max().item(), 1e-6)
            error = (got - expected).abs().max().item() / scale
            rows.append({"tokens": tokens, "keep": fraction, "relative_error": error, "finite": bool(torch.isfinite(got).all())})
            if error > tolerance or not rows[-1]["finite"]:
                raise RuntimeError(f"grouped kernel off the reference: {rows[-1]}")
    echo(f"kernel check ({dtype}, {len(rows)} cases): grouped = reference within {tolerance:g} "
         f"(worst {max(r['relative_error'] for r in rows):.2e} of the output's scale)")
    return rows


def time_kernels(cfg: speed_bench.BenchConfig, device: torch.device, dtype: torch.dtype, echo=print, reps: int = 20) -> list[dict]:
    """Milliseconds per call (median of ``reps`` after warm-up, device synchronised) of the
    grouped kernel and the fast kernel (its per-call host sync included) for T in {1, 16, 2048}
    tokens with every pair or 12% of them kept."""
    rows, experts = [], _experts(cfg, device, dtype)
    for tokens in (1, 16, 2048):
        for fraction in (1.0, 0.12):
            args = _routing(tokens, cfg, fraction, experts, seed=tokens)
            row = {"tokens": tokens, "keep": fraction}
            for name, kernel in (("grouped_ms", masked_experts_grouped), ("fast_ms", masked_experts_fast)):
                for _ in range(3):
                    kernel(*args, "silu")
                row[name] = statistics.median(_timed_ms(kernel, device, *args, "silu")[1] for _ in range(reps))
            rows.append(row)
            echo(f"  kernel T={tokens:<5} keep {fraction:.2f}: grouped {row['grouped_ms']:.3f} ms, fast {row['fast_ms']:.3f} ms")
    return rows


def _profile_decodes(runner, variants, device: torch.device, out_dir: Path) -> None:
    """One torch.profiler table (top 30 ops by self device time, else self CPU time) per
    variant's decode, written to ``out_dir/profile-<variant>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for v in variants:
        runner.use(v.impl, v.prefill_threshold)
        past, token = runner.prefill()
        runner.use(v.impl, v.decode_threshold)
        _sync(device)
        with profile(activities=activities) as prof:
            runner.decode(past, token)
            _sync(device)
        name = "".join(c if c.isalnum() else "-" for c in v.name)
        (out_dir / f"profile-{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))


def run(cfg: speed_bench.BenchConfig, device: torch.device, dtype: torch.dtype, echo=print,
        profile_dir: Path | None = None, cudagraphs: bool = False) -> dict:
    """Time dense / modes τ=0 / modes at SKIP on ``device``, the modes rows with the backend's
    default dispatch and with ``dispatch="op"``, and with ``cudagraphs`` dense and modes under
    ``mode="reduce-overhead"`` (CUDA graphs; the modes ops run between them); returns the rows
    (ms, ratios to dense). A CUDA-graph variant that fails to compile or run is reported and
    left out."""
    import modes_fx

    torch._dynamo.reset()
    model = speed_bench.build_model(cfg).to(device=device, dtype=dtype)
    runner = speed_bench.Runner(model, cfg)
    runner.ids = runner.ids.to(device)
    name = _device_name(device)
    echo(f"device: {name}; {cfg}")
    # "modes": the backend's default dispatch (on CUDA the device-side kernel inlined into the
    # graph); "modes_op": the opaque op, whose kernel runs eagerly at every call
    runner.impls["modes_op"] = torch.compile(model._call_impl, backend="modes", options={"inner": cfg.compiler, "dispatch": "op"})
    variants = [speed_bench.Variant("dense", "dense"), speed_bench.Variant("modes tau=0", "modes"), speed_bench.Variant("modes tau=0 (op)", "modes_op")]
    if cudagraphs:
        runner.impls["dense_cg"] = torch.compile(model._call_impl, mode="reduce-overhead")
        runner.impls["modes_cg"] = torch.compile(model._call_impl, backend="modes", mode="reduce-overhead")
        variants += [speed_bench.Variant("dense (cudagraphs)", "dense_cg"), speed_bench.Variant("modes tau=0 (cudagraphs)", "modes_cg")]
    with torch.no_grad():
        for v in list(variants):
            runner.use(v.impl)
            try:  # CUDA graph trees record on a later call than the first
                seconds = [_timed_ms(lambda: runner.decode(*runner.prefill()), device)[1] / 1e3 for _ in range(3 if v.impl.endswith("_cg") else 1)]
            except Exception as error:  # noqa: BLE001  (only the optional CUDA-graph variants)
                if not v.impl.endswith("_cg"):
                    raise
                echo(f"  {v.name}: left out, {type(error).__name__}: {str(error)[:300]}")
                variants.remove(v)
                continue
            echo(f"  warm-up {v.name}: {' / '.join(f'{t:.1f}' for t in seconds)} s (the first includes compilation)")
        runner.check_every_site_rewritten()
        skipping = speed_bench.calibrate(runner, SKIP, echo)
        variants += [skipping, replace(skipping, name=f"{skipping.name} (op)", impl="modes_op")]
        if any(v.impl == "modes_cg" for v in variants):
            variants.append(replace(skipping, name=f"{skipping.name} (cudagraphs)", impl="modes_cg"))
        samples = {v.name: {"prefill": [], "decode": []} for v in variants}
        for _ in range(cfg.reps):
            for v in variants:
                runner.use(v.impl, v.prefill_threshold)
                (past, token), ms = _timed_ms(runner.prefill, device)
                samples[v.name]["prefill"].append(ms)
                runner.use(v.impl, v.decode_threshold)
                _, ms = _timed_ms(runner.decode, device, past, token)
                samples[v.name]["decode"].append(ms)
        for v in variants:
            v.prefill_ms = statistics.median(samples[v.name]["prefill"])
            v.decode_ms = statistics.median(samples[v.name]["decode"])
            runner.use(v.impl, v.prefill_threshold)
            with modes_fx.track() as stats:
                past, token = runner.prefill()
            v.prefill_skip = stats.skip_ratio if v.impl.startswith("modes") else 0.0
            runner.use(v.impl, v.decode_threshold)
            with modes_fx.track() as stats:
                runner.decode(past, token)
            v.decode_skip = stats.skip_ratio if v.impl.startswith("modes") else 0.0
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            _profile_decodes(runner, variants, device, profile_dir)
    runner.close()
    dense = variants[0]
    rows = [
        {**asdict(v), "prefill_x_dense": dense.prefill_ms / v.prefill_ms, "decode_x_dense": dense.decode_ms / v.decode_ms}
        for v in variants
    ]
    echo(f"{'variant':<30}{'skip p/d':>14}{'prefill ms':>12}{'x dense':>9}{'decode ms':>11}{'x dense':>9}")
    for r in rows:
        echo(f"{r['name']:<30}{r['prefill_skip']:>7.3f}/{r['decode_skip']:<6.3f}{r['prefill_ms']:>12.2f}"
             f"{r['prefill_x_dense']:>9.2f}{r['decode_ms']:>11.2f}{r['decode_x_dense']:>9.2f}")
    return {"device": name, "dtype": str(dtype), "config": asdict(cfg), "torch": torch.__version__, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modes_fx.harness.gpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-out"), help="directory for gpu.json")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: a smoke test)")
    p.add_argument("--quick", action="store_true", help="the tiny CPU config of `modes bench speed --quick`, fp32")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4)")
    p.add_argument("--profile", action="store_true", help="also write a torch.profiler table of each variant's decode into --out")
    p.add_argument("--cudagraphs", action="store_true", help="also dense and modes under mode='reduce-overhead' (CUDA only)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; run it where one is (or --device cpu --quick)", file=sys.stderr)
        return 2
    cfg = speed_bench.QUICK if args.quick else GPU_30B
    if args.layers is not None:
        cfg = replace(cfg, num_layers=args.layers)
    dtype = torch.float32 if args.quick and device.type == "cpu" else torch.bfloat16
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {_device_name(device)}, {dtype}")
    kernel = {"check": check_kernel(cfg, device, dtype), "timings": time_kernels(cfg, device, dtype)}
    profile_dir = args.out if args.profile else None
    result = {**run(cfg, device, dtype, profile_dir=profile_dir, cudagraphs=args.cudagraphs), "kernel": kernel}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
