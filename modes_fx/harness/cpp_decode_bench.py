"""A/B of the CPU masked experts kernel's few-token path: C++ (kernels/decode_cpu.cpp) vs Python.

    python -m modes_fx.harness.cpp_decode_bench [--threads N] [--calls N] [--rounds N]

At the speed benchmark's expert shape (hidden 1024, moe_intermediate 384, 64 experts, top-8,
fp32), one process, the two paths alternating in blocks of ``--calls`` calls for ``--rounds``
rounds; prints the median µs per ``masked_experts_fast`` call of each path and the saving, for
1 and 4 tokens and 8 or 1 kept pairs per token (τ = 0 and ~88% skipped).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from modes_fx.harness.speed_bench import FULL
from modes_fx.kernels import cpp_decode, fast


def time_call(args: tuple, use_cpp: bool, calls: int) -> float:
    """Mean µs per ``masked_experts_fast(*args, "silu")`` over ``calls`` calls on one path."""
    op = cpp_decode.decode_op() if use_cpp else None
    real = cpp_decode.decode_op
    cpp_decode.decode_op = lambda: op
    try:
        start = time.perf_counter()
        for _ in range(calls):
            fast.masked_experts_fast(*args, "silu")
        return (time.perf_counter() - start) / calls * 1e6
    finally:
        cpp_decode.decode_op = real


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m modes_fx.harness.cpp_decode_bench", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=8)
    a = p.parse_args(argv)
    if cpp_decode.decode_op() is None:
        raise SystemExit("the C++ decode kernel is not available here (see the SlowPathWarning above)")
    torch.set_num_threads(a.threads)
    experts, hidden, intermediate, k = FULL.num_experts, FULL.hidden_size, FULL.moe_intermediate, FULL.top_k
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(experts, 2 * intermediate, hidden, generator=g) * 0.02
    down = torch.randn(experts, hidden, intermediate, generator=g) * 0.02
    print(f"{torch.get_num_threads()} threads; experts {experts} x (hidden {hidden}, intermediate {intermediate}), top-{k}, fp32")
    for tokens in (1, 4):
        for kept in (k, 1):
            x = torch.randn(tokens, hidden, generator=g)
            index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
            keep = torch.zeros(tokens, k, dtype=torch.bool)
            keep[:, :kept] = True
            args = (x, index, torch.rand(tokens, k, generator=g), keep, gate_up, down)
            times = {True: [], False: []}
            for _ in range(a.rounds):
                for use_cpp in (True, False):
                    times[use_cpp].append(time_call(args, use_cpp, a.calls))
            cpp, py = statistics.median(times[True]), statistics.median(times[False])
            print(f"T={tokens} kept pairs/token={kept}: C++ {cpp:.0f} us, Python {py:.0f} us per call, "
                  f"saving {py - cpp:.0f} us ({(py - cpp) / py:.0%}); {py / cpp:.2f}x")


if __name__ == "__main__":
    main()
