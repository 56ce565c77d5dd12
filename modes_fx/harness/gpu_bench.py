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

``--device cpu --quick`` runs the same code on the tiny CPU config (what the test suite does, so
the script cannot rot); its figures mean nothing.
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


def run(cfg: speed_bench.BenchConfig, device: torch.device, dtype: torch.dtype, echo=print) -> dict:
    """Time dense / modes τ=0 / modes at SKIP on ``device``; returns the rows (ms, ratios to dense)."""
    import modes_fx

    torch._dynamo.reset()
    model = speed_bench.build_model(cfg).to(device=device, dtype=dtype)
    runner = speed_bench.Runner(model, cfg)
    runner.ids = runner.ids.to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    echo(f"device: {name}; {cfg}")
    variants = [speed_bench.Variant("dense", "dense"), speed_bench.Variant("modes tau=0", "modes")]
    with torch.no_grad():
        for v in variants:
            runner.use(v.impl)
            _, ms = _timed_ms(lambda: runner.decode(*runner.prefill()), device)
            echo(f"  warm-up {v.name}: {ms / 1e3:.1f} s (includes compilation)")
        runner.check_every_site_rewritten()
        variants.append(speed_bench.calibrate(runner, SKIP, echo))
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
            v.prefill_skip = stats.skip_ratio if v.impl == "modes" else 0.0
            runner.use(v.impl, v.decode_threshold)
            with modes_fx.track() as stats:
                runner.decode(past, token)
            v.decode_skip = stats.skip_ratio if v.impl == "modes" else 0.0
    runner.close()
    dense = variants[0]
    rows = [
        {**asdict(v), "prefill_x_dense": dense.prefill_ms / v.prefill_ms, "decode_x_dense": dense.decode_ms / v.decode_ms}
        for v in variants
    ]
    echo(f"{'variant':<16}{'skip p/d':>14}{'prefill ms':>12}{'x dense':>9}{'decode ms':>11}{'x dense':>9}")
    for r in rows:
        echo(f"{r['name']:<16}{r['prefill_skip']:>7.3f}/{r['decode_skip']:<6.3f}{r['prefill_ms']:>12.2f}"
             f"{r['prefill_x_dense']:>9.2f}{r['decode_ms']:>11.2f}{r['decode_x_dense']:>9.2f}")
    return {"device": name, "dtype": str(dtype), "config": asdict(cfg), "torch": torch.__version__, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modes_fx.harness.gpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-out"), help="directory for gpu.json")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: a smoke test)")
    p.add_argument("--quick", action="store_true", help="the tiny CPU config of `modes bench speed --quick`, fp32")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; run it where one is (or --device cpu --quick)", file=sys.stderr)
        return 2
    cfg = speed_bench.QUICK if args.quick else GPU_30B
    if args.layers is not None:
        cfg = replace(cfg, num_layers=args.layers)
    result = run(cfg, device, torch.float32 if args.quick else torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
