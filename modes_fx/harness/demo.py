"""``modes demo``: the whole MoDES flow on an embedded benchmark VLM (``bench_models``;
``DEMO_MODEL`` by default).

1. Load the committed trained ``Qwen3VLMoeForConditionalGeneration`` (``from_pretrained``).
2. Calibrate on the calibration split: GMLG layer importance α[l, m] and the frontier search for
   per-modality thresholds τ, tuned so that ``track()`` reads 88% skipped routed pairs.
3. Attach the schedule and compile with ``backend="modes"``; answer held-out test questions
   (images drawn as ASCII art), then print dense vs MoDES accuracy, the measured skip ratio and
   prefill / decode latency ratios against the dense model (same inner compiler).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

import modes_fx
from modes_fx.calib.baselines import BaselineTuner
from modes_fx.compiled import compiled_forward, set_compiled_forward
from modes_fx.harness.digits.evaluate import predict
from modes_fx.harness.accuracy_bench import FULL, evaluate_deployed, tracked_accuracy
from modes_fx.harness.bench_models import BenchmarkModel, benchmark_model

TARGET_SKIP = 0.88
DEMO_MODEL = "grids"  # the benchmark model the demo runs by default


@dataclass
class DemoResult:
    """What the demo measured: accuracies are fractions of test questions, skip ratios fractions
    of routed (token, expert) pairs, speedups dense latency / MoDES latency."""

    dense_accuracy: float
    modes_accuracy: float
    top1_accuracy: float
    skip_ratio: float
    skip_by_modality: dict[str, float]
    sites_rewritten: int
    prefill_speedup: float
    decode_speedup: float
    seconds: float


def show_examples(bench: BenchmarkModel, model, dense_model, batch, n: int, echo) -> None:
    """Print ``n`` vision questions of ``batch`` (image as ASCII art) with the dense and MoDES answers."""
    with modes_fx.running_dense(model):
        dense = predict(dense_model, batch)
    skipped = predict(model, batch)
    shown = 0
    for row, q in enumerate(batch.questions):
        picture = bench.picture(q)
        if picture is None or shown == n:
            continue
        shown += 1
        echo("\n" + picture)
        echo(f"Q: {' '.join(q.words)}   truth: {q.answer}   dense: {bench.vocab[int(dense[row])]}   MoDES: {bench.vocab[int(skipped[row])]}")


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def latency_ratios(model, batch, inner: str, reps: int, echo) -> tuple[float, float]:
    """(prefill, decode) speedups of the attached model compiled with ``backend="modes"`` over the
    same model compiled with ``inner`` alone (dense); per phase, ``reps`` runs of dense then of
    MoDES, median of each.
    Prefill: one forward of ``batch``; decode: 8 greedy steps with a KV cache at batch 1."""
    dense_impl = torch.compile(model._call_impl, backend=inner) if inner != "eager" else model._call_impl
    modes_impl = compiled_forward(model)
    row = batch.inputs["attention_mask"][0].bool()  # row 0 without its left padding, at batch 1
    one = {k: batch.inputs[k][:1, row] for k in ("input_ids", "mm_token_type_ids") if k in batch.inputs}
    if bool((one["input_ids"] == model.config.image_token_id).any()):  # row 0's image is the batch's first
        one["pixel_values"] = batch.inputs["pixel_values"][: int(batch.inputs["image_grid_thw"][0].prod())]
        one["image_grid_thw"] = batch.inputs["image_grid_thw"][:1]

    def prefill():
        model(**batch.inputs)

    def decode():
        out = model(**one, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(8):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def using(name: str):
        """Route the model's calls to the ``name`` variant (the dense one is dense on purpose)."""
        set_compiled_forward(model, dense_impl if name == "dense" else modes_impl)
        return modes_fx.running_dense(model) if name == "dense" else contextlib.nullcontext()

    timings = {}
    with torch.no_grad():
        for name in ("modes", "dense"):  # warm-up (compiles)
            with using(name):
                prefill(), decode()
        for phase, fn in (("prefill", prefill), ("decode", decode)):
            for name in ("dense", "modes"):
                with using(name):
                    timings[(phase, name)] = _median_ms(fn, reps)
    set_compiled_forward(model, modes_impl)
    for phase in ("prefill", "decode"):
        echo(f"{phase:<8s} dense ({inner}) {timings[(phase, 'dense')]:8.1f} ms   MoDES {timings[(phase, 'modes')]:8.1f} ms   "
             f"x{timings[(phase, 'dense')] / timings[(phase, 'modes')]:.2f}")
    return tuple(timings[(p, "dense")] / timings[(p, "modes")] for p in ("prefill", "decode"))


def run(quick: bool = False, inner: str = "eager", echo=print, model_name: str = DEMO_MODEL) -> DemoResult:
    """Run the demo. ``quick``: a subset of the splits, a coarse grid and the eager inner compiler
    (for tests); the full demo uses the whole test split. ``inner`` is the compiler after the
    modes passes for the MoDES model and the dense baseline (eager by default: an inductor compile
    of this model takes minutes on a 2-core CPU; the modes ops are the same either way)."""
    start = time.perf_counter()
    inner = "eager" if quick else inner
    bench = benchmark_model(model_name)
    model = bench.load()
    test = bench.split_batches("test", limit=64 if quick else None)
    # the full demo calibrates as `modes bench accuracy` does, so its MoDES row is the benchmark's
    calib = bench.calibration_data("calibration", limit=64 if quick else FULL["calib_limit"])
    echo(f"model: {bench.name}, a {type(model).__name__} ({bench.description}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
         f"{len(test)} test batches")
    dense = bench.accuracy(model, test)
    per_kind = ", ".join(f"{kind} {100 * value:.2f}%" for kind, value in dense.by_modality.items())  # a --quick slice may hold one kind
    echo(f"dense accuracy: {100 * dense.overall:.2f}%  ({per_kind})")

    echo(f"calibrating for {TARGET_SKIP:.0%} skipped routed pairs (GMLG + frontier search) ...")
    # the graphs compiled for calibration are the ones deployment reuses (Dynamo's cache is per
    # code object and the thresholds are read at run time), so the report starts here
    modes_fx.reset_report()
    with BaselineTuner(model, calib, grid_points=10 if quick else FULL["grid_points"], progress=not quick) as tuner:
        tuned = tuner.tune("modes", TARGET_SKIP)
        top1 = tuner.tune("top_k", TARGET_SKIP)
        top1_acc, _ = evaluate_deployed(bench, tuner, top1.schedule, test)
    schedule = tuned.schedule
    echo(schedule.table())

    modes_fx.attach(model, schedule)
    model.compile(backend="modes", options={"inner": inner})
    try:
        skipped, stats = tracked_accuracy(bench, model, test, len(schedule.site_paths), "MoDES evaluation")
        report = modes_fx.last_report()
        echo(str(report))
        rewrites = len(report.rewrites)  # the report is live: the latency graphs below add to it
        show_examples(bench, model, model._call_impl, test[0], 3 if quick else 5, echo)
        prefill_x, decode_x = latency_ratios(model, test[0], inner, 3 if quick else 10, echo)
    finally:
        set_compiled_forward(model, None)
        modes_fx.detach(model)

    echo("\n| | accuracy | retention | skipped pairs |\n|---|---|---|---|")
    echo(f"| dense | {100 * dense.overall:.2f}% | 100% | 0 |")
    echo(f"| top-1 routing (top_k at 88%) | {100 * top1_acc.overall:.2f}% | {100 * top1_acc.overall / dense.overall:.2f}% | {top1.skip:.3f} (calibration) |")
    echo(f"| MoDES | {100 * skipped.overall:.2f}% | {100 * skipped.overall / dense.overall:.2f}% | {stats.skip_ratio:.3f} "
         f"(text {stats.by_modality.get('text', 0):.3f}, vision {stats.by_modality.get('vision', 0):.3f}) |")
    seconds = time.perf_counter() - start
    echo(f"\ndone in {seconds:.0f} s; the full comparison with every baseline: modes bench accuracy --model {bench.name}")
    return DemoResult(dense.overall, skipped.overall, top1_acc.overall, stats.skip_ratio, stats.by_modality,
                      rewrites, prefill_x, decode_x, seconds)
