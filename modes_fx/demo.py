"""``modes demo``: the whole online flow on an embedded tiny Qwen3-VL-MoE.

Builds a real ``Qwen3VLMoeForConditionalGeneration`` from a tiny config (random weights; a trained
benchmark model replaces it later), attaches a hand-set schedule, compiles with
``backend="modes"``, and compares with the dense model on an image + text prompt: agreement of
the greedy tokens, measured skip ratio per modality, and what the pass rewrote.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import modes_fx
from modes_fx import testing


@dataclass
class DemoResult:
    """What the demo measured. skip ratios are fractions of routed (token, expert) pairs."""

    skip_ratio: float
    skip_by_modality: dict[str, float]
    token_agreement: float
    sites_rewritten: int
    compile_seconds: float


def run(quick: bool = False, inner: str = "inductor", pi_text: float = 0.35, pi_image: float = 0.45, echo=print) -> DemoResult:
    """Run the demo; ``quick`` uses 2 layers and the eager inner compiler (seconds, for tests).

    The hand-set schedule has uniform α = 1/L, so τ = π_max / L skips the pairs whose routing
    weight π is below ``pi_text`` (text tokens) or ``pi_image`` (image tokens)."""
    layers = 2 if quick else 4
    inner = "eager" if quick else inner
    model = testing.build("qwen3_vl_moe", experts_implementation="grouped_mm", num_hidden_layers=layers)
    inputs = testing.image_inputs(model, batch=2, pad=True)
    new_tokens = 4 if quick else 8
    dense = testing.greedy_generate(model, inputs, max_new_tokens=new_tokens)

    schedule = modes_fx.Schedule.constant(model, tau={"text": pi_text / layers, "image": pi_image / layers})
    echo(f"model: {type(model).__name__}, {layers} MoE layers, {schedule.num_experts} experts, top-{schedule.top_k}")
    echo(schedule.table())
    modes_fx.attach(model, schedule)
    modes_fx.reset_report()
    model.compile(backend="modes", options={"inner": inner})
    try:
        start = time.perf_counter()
        testing.greedy_generate(model, inputs, max_new_tokens=1)  # compiles prefill
        compile_seconds = time.perf_counter() - start
        with modes_fx.track() as stats:
            skipped = testing.greedy_generate(model, inputs, max_new_tokens=new_tokens)
    finally:
        model._compiled_call_impl = None
        modes_fx.detach(model)

    prompt = inputs["input_ids"].shape[1]
    agreement = (skipped[:, prompt:] == dense[:, prompt:]).float().mean().item()
    report = modes_fx.last_report()
    echo(str(report))
    echo(f"\nmeasured skip ratio: {stats.skip_ratio:.3f} of routed pairs")
    for name, ratio in stats.by_modality.items():
        echo(f"  {name:<6s} {ratio:.3f}")
    echo(f"greedy tokens equal to the dense model: {agreement:.0%} (random weights: agreement is illustrative)")
    echo(f"first compiled call (includes compilation, inner={inner}): {compile_seconds:.1f} s")
    return DemoResult(stats.skip_ratio, stats.by_modality, agreement, len(report.rewrites), compile_seconds)
