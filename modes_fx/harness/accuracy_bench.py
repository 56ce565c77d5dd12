"""``modes bench accuracy``: accuracy kept by MoDES and by every baseline at equal measured skip
ratios, on an embedded benchmark model (``bench_models``; the analogue of the paper's Table 1 /
Figure 1).

For each method of :data:`modes_fx.calib.baselines.METHODS` and each target skip ratio, the
method's knob is tuned on the calibration split until ``track()`` reads the target (± the
tuner's tolerance); the tuned schedule is then deployed on the same compiled model (same op
path as inference) and evaluated on the held-out test split, where the skip ratio is measured
again. Accuracy is the fraction of test questions answered correctly; retention is accuracy
divided by the dense model's accuracy (uncompiled, no skipping), in %.

Outputs: a markdown table on stdout (and in ``accuracy.md``), ``accuracy.json`` and
``accuracy.png`` (retention vs measured skip ratio, one line per method) in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import modes_fx
from modes_fx.calib.baselines import METHODS, BaselineTuner
from modes_fx.harness import ranking
from modes_fx.harness.bench_models import BenchmarkModel, benchmark_model

TARGETS = (0.5, 0.75, 0.83, 0.88)
W4A16_METHOD = "modes (W4A16)"  # row name of MoDES calibrated and deployed on the W4A16 model
QUICK = dict(targets=(0.88,), methods=("top_k", "uniform_threshold", "modes"), calib_limit=128, test_limit=256, grid_points=24,
             w4a16_targets=())
FULL = dict(targets=TARGETS, methods=METHODS, calib_limit=512, test_limit=None, grid_points=50, w4a16_targets=(0.88,))


@dataclass
class Row:
    """One method at one target skip ratio. Skip ratios are fractions of routed (token, expert)
    pairs; accuracies are fractions of questions; retention is % of the dense accuracy."""

    method: str
    target: float
    calib_skip: float
    calib_kl: float
    reached: bool
    skip: float
    skip_by_modality: dict[str, float]
    accuracy: float
    accuracy_by_modality: dict[str, float]
    accuracy_by_type: dict[str, float]
    retention: float
    knob: float
    tune_passes: int
    details: dict = field(default_factory=dict)  # the method's own choices (modes: the γ chosen among the γ tried)
    tune_seconds: float = 0.0  # wall time of tuning on the calibration split
    eval_seconds: float = 0.0  # wall time of the test-split evaluation


@dataclass
class Result:
    model: str  # the benchmark model's name (bench_models.BENCHMARK_MODELS)
    dense_accuracy: float
    dense_by_modality: dict[str, float]
    dense_by_type: dict[str, float]
    rows: list[Row] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    w4a16_accuracy: float | None = None  # the W4A16 model without skipping (None: not run)
    w4a16_by_modality: dict[str, float] = field(default_factory=dict)
    w4a16_logit_error: float | None = None  # ‖W4A16 − bf16‖ / ‖bf16‖ of the logits on the first test batch
    w4a16_skipped: str | None = None  # why the W4A16 rows were not run (the model cannot be quantized), if they were asked for
    # per model ("fp32", "W4A16") whose GMLG statistics were computed: modalities, KL [L][M] of
    # removing layer l's routed experts for modality m's tokens (nats), α [L][M]
    importance: dict[str, dict] = field(default_factory=dict)
    test_questions: int = 0
    # per target: does calibration KL order the fp32 methods' schedules as test accuracy does
    # (ranking.Agreement fields)
    agreement: list[dict] = field(default_factory=list)
    # per target and fp32 method: the default MoDES's accuracy minus that method's (points) and
    # the paired noise of the gap (ranking.paired_noise, points), on the same test questions
    comparisons: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def evaluate_deployed(bench: BenchmarkModel, tuner: BaselineTuner, schedule: modes_fx.Schedule, batches: list):
    """(accuracy, tracker) of ``schedule`` deployed on the tuner's compiled model, on ``batches``."""
    tuner.session.state.set_thresholds(schedule.thresholds(), type(schedule.rule))
    return tracked_accuracy(bench, tuner.session.model, batches, tuner.session.num_sites, "accuracy evaluation")


def tracked_accuracy(bench: BenchmarkModel, model, batches: list, sites: int, what: str):
    """(accuracy, tracker) of the attached, compiled ``model`` on ``batches``; raises
    ``RuntimeError`` (naming ``what``) unless every forward ran all ``sites`` MoE sites through
    the modes op."""
    with modes_fx.track() as stats:
        acc = bench.accuracy(model, batches)
    stats.require_calls(len(batches) * sites, what)
    return acc, stats


def run(quick: bool = False, out_dir: Path | None = None, echo=print, progress: bool = True, model_name: str = "digits", **overrides) -> Result:
    """Tune every method to every target on the calibration split of benchmark model
    ``model_name``, evaluate on its test split.

    ``quick``: 3 methods at 88% on a subset (for tests and a first look); ``overrides`` replace
    entries of :data:`FULL` / :data:`QUICK` (targets, methods, calib_limit, test_limit, grid_points,
    w4a16_targets: skip ratios of the ``modes (W4A16)`` rows, MoDES calibrated on the bf16 model
    quantized by :func:`modes_fx.quantize_experts`; empty: no W4A16 rows)."""
    start = time.perf_counter()
    cfg = {**(QUICK if quick else FULL), **overrides}
    bench = benchmark_model(model_name)
    model = bench.load()
    test = bench.split_batches("test", limit=cfg["test_limit"])
    calib = bench.calibration_data("calibration", limit=cfg["calib_limit"])
    dense = bench.accuracy(model, test)
    echo(f"model: {bench.description}")
    result = Result(bench.name, dense.overall, dense.by_modality, dense.by_type, config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                    test_questions=sum(dense.total.values()))
    echo(f"dense test accuracy {100 * dense.overall:.2f}% on {result.test_questions} questions "
         f"({len(calib)} calibration batches); tuning {len(cfg['methods'])} methods x {len(cfg['targets'])} skip ratios")
    w4a16 = None
    if cfg["w4a16_targets"]:  # quantized first, so that a model int4 cannot hold is reported before the long part
        try:
            w4a16, result.w4a16_logit_error = quantized_model(bench, test[0], echo)
        except ValueError as e:  # e.g. an expert width that torchao's CPU int4 kernel cannot group
            result.w4a16_skipped = str(e)
            echo(f"W4A16 rows skipped: {e}")
    hits: dict[tuple[str, float], list[bool]] = {}
    tune_and_evaluate(bench, result, model, calib, test, cfg["methods"], cfg["targets"], cfg["grid_points"], echo, progress, hits=hits)
    result.comparisons = compare_with_default(result, hits)
    if w4a16 is not None:
        torch._dynamo.reset()  # the fp32 session's graphs would count towards the W4A16 model's recompile limit
        plain = bench.accuracy(w4a16, test)
        result.w4a16_accuracy, result.w4a16_by_modality = plain.overall, plain.by_modality
        echo(f"W4A16 test accuracy without skipping {100 * plain.overall:.2f}% (retention {100 * plain.overall / dense.overall:.2f}%); "
             f"logits vs bf16: relative error {result.w4a16_logit_error:.4f}")
        tune_and_evaluate(bench, result, w4a16, calib, test, ("modes",), cfg["w4a16_targets"], cfg["grid_points"], echo, progress, W4A16_METHOD)
    result.agreement = [asdict(a) for a in rank_agreement(result)]
    result.seconds = time.perf_counter() - start
    if out_dir is not None:
        write(result, Path(out_dir), echo)
    echo(format_table(result))
    return result


def quantized_model(bench: BenchmarkModel, batch, echo=print) -> tuple[torch.nn.Module, float]:
    """The benchmark model in bf16, quantized by :func:`modes_fx.quantize_experts` (W4A16), and the
    relative error ‖W4A16 − bf16‖ / ‖bf16‖ of its logits (every position) on ``batch``."""
    model = bench.load().to(torch.bfloat16)
    with torch.no_grad():
        reference = model(**batch.inputs).logits.float()
        echo(str(modes_fx.quantize_experts(model)))
        logits = model(**batch.inputs).logits.float()
    return model, float((logits - reference).norm() / reference.norm())


def tune_and_evaluate(bench: BenchmarkModel, result: Result, model, calib, test, methods, targets, grid_points: int, echo, progress: bool,
                      label: str | None = None, hits: dict | None = None) -> None:
    """Append to ``result`` one :class:`Row` per method and target: tuned on ``calib`` with one
    :class:`BaselineTuner` over ``model``, evaluated on ``test`` (retention against
    ``result.dense_accuracy``). ``label``: row name instead of the method's (one method only);
    ``hits``: filled with each (method, target)'s per-question answers (correct or not)."""
    with BaselineTuner(model, calib, grid_points=grid_points, progress=progress) as tuner:
        for method in methods:
            for target in targets:
                started = time.perf_counter()
                tuned = tuner.tune(method, target)
                tuned_at = time.perf_counter()
                acc, stats = evaluate_deployed(bench, tuner, tuned.schedule, test)
                row = Row(
                    label or method, target, tuned.skip, tuned.kl, tuned.reached, stats.skip_ratio, stats.by_modality,
                    acc.overall, acc.by_modality, acc.by_type, 100 * acc.overall / result.dense_accuracy, tuned.knob, tuned.passes,
                    {k: tuned.schedule.calibration[k] for k in ("gamma", "gammas", "layers") if k in tuned.schedule.calibration},
                    tuned_at - started, time.perf_counter() - tuned_at,
                )
                result.rows.append(row)
                if hits is not None:
                    hits[(row.method, target)] = acc.hits
                chose = f", γ {row.details['gamma']:g}" if "gamma" in row.details else ""
                echo(f"  {row.method:<19s} target {target:.2f}: test skip {row.skip:.3f}, accuracy {100 * row.accuracy:.2f}% "
                     f"(retention {row.retention:.2f}%{chose}; tuned in {row.tune_seconds:.0f} s, {row.tune_passes} passes, "
                     f"evaluated in {row.eval_seconds:.0f} s)" + ("" if tuned.reached else "  [target not reached on calibration]"))
        if "importance_kls" in vars(tuner):  # computed (cached) by a GMLG method
            result.importance["W4A16" if label == W4A16_METHOD else "fp32"] = {
                "modalities": tuner.session.modalities, "kl": tuner.importance_kls, "alpha": tuner.gmlg_alpha}


def rank_agreement(result: Result) -> list[ranking.Agreement]:
    """Per target with at least two fp32 methods: calibration KL against test accuracy
    (:func:`ranking.agreement`, noise from the dense accuracy and the test questions)."""
    noise = ranking.sampling_noise(result.dense_accuracy, result.test_questions)
    out = []
    for target in sorted({r.target for r in result.rows}):
        rows = [r for r in result.rows if r.target == target and r.method != W4A16_METHOD]
        if len(rows) > 1:
            out.append(ranking.agreement(target, [r.calib_kl for r in rows], [r.accuracy for r in rows], noise))
    return out


def compare_with_default(result: Result, hits: dict[tuple[str, float], list[bool]]) -> list[dict]:
    """Per target where the default ``modes`` ran: its accuracy minus every other method's (points,
    same test questions) with the gap's paired noise (points, :func:`ranking.paired_noise`) and
    whether the gap exceeds it."""
    out = []
    for row in result.rows:
        default = hits.get(("modes", row.target))
        if row.method == "modes" or (row.method, row.target) not in hits or default is None:
            continue
        gap = 100 * (sum(default) - sum(hits[(row.method, row.target)])) / len(default)
        noise = 100 * ranking.paired_noise(default, hits[(row.method, row.target)])
        out.append(dict(target=row.target, method=row.method, gap=gap, noise=noise, beyond_noise=gap > noise))
    return out


def format_table(result: Result) -> str:
    """Markdown: retention (and accuracy) per method and target, measured test skip in each cell,
    then the per-modality (vision / text question) retention."""
    targets = sorted({r.target for r in result.rows})
    methods = list(dict.fromkeys(r.method for r in result.rows))
    cell = {(r.method, r.target): r for r in result.rows}
    head = ["| method | " + " | ".join(f"{100 * t:.0f}% skip" for t in targets) + " |", "|---" * (len(targets) + 1) + "|"]

    def table(text) -> list[str]:
        """One row per method, ``text(row)`` in each target's cell ("-" where not run)."""
        return head + [
            f"| {m} | " + " | ".join("-" if (m, t) not in cell else text(cell[(m, t)]) for t in targets) + " |" for m in methods
        ]

    def overall(r: Row) -> str:
        return f"**{r.retention:.2f}** [{100 * r.accuracy:.1f}, {r.skip:.3f}]" + ("" if r.reached else " †")

    def by_modality(r: Row) -> str:
        kinds = [k for k in ("vision", "text") if k in r.accuracy_by_modality]
        return " / ".join(f"{100 * r.accuracy_by_modality[k] / result.dense_by_modality[k]:.1f}" for k in kinds)

    lines = [f"Model: {result.model}.", f"Dense accuracy: {100 * result.dense_accuracy:.2f}% (vision {100 * result.dense_by_modality.get('vision', float('nan')):.2f}%, "
             f"text {100 * result.dense_by_modality.get('text', float('nan')):.2f}%).",
             *([] if result.w4a16_accuracy is None else [
                 f"W4A16 model (int4 experts and linears, bf16 activations) without skipping: {100 * result.w4a16_accuracy:.2f}% "
                 f"(retention {100 * result.w4a16_accuracy / result.dense_accuracy:.2f}%; logits' relative error vs the bf16 model "
                 f"{result.w4a16_logit_error:.4f} on the first test batch); the `{W4A16_METHOD}` row is MoDES "
                 "calibrated and deployed on that model, retention against the fp32 dense model."]),
             *([] if result.w4a16_skipped is None else [f"W4A16 rows not run: {result.w4a16_skipped}."]),
             "", "Retention (% of dense accuracy) [accuracy %, measured test skip]:", "", *table(overall),
             "", "Retention on vision / text questions (% of dense on the same questions):", "", *table(by_modality)]
    for method in methods:
        chosen = [(r.target, r.details["gamma"], r.details["gammas"]) for r in result.rows if r.method == method and "gamma" in r.details]
        if chosen:
            tried = ", ".join(f"{g:g}" for g in chosen[0][2])
            lines += ["", f"γ chosen by `{method}` (α ∝ KL^γ, lowest calibration KL at the target skip among γ ∈ {{{tried}}}): "
                          + ", ".join(f"{100 * t:.0f}% → {g:g}" for t, g, _ in chosen) + "."]
    for name, stats in result.importance.items():
        lines += ["", f"GMLG on the {name} model: KL of removing a layer's routed experts for one modality's tokens (nats) → α:", ""]
        lines += [f"- {m}: " + ", ".join(f"layer {l} {kl[i]:.3g} → {a[i]:.3f}" for l, (kl, a) in enumerate(zip(stats["kl"], stats["alpha"])))
                  for i, m in enumerate(stats["modalities"])]
    if result.agreement:
        noise = result.agreement[0]["noise"]
        lines += ["", f"Calibration KL vs test accuracy, per target (Kendall τ-b of −KL and accuracy; pairs ordered differently, "
                      f"and of those the ones whose accuracy gap exceeds the test noise {100 * noise:.2f} points: two standard "
                      f"errors over {result.test_questions} questions):", "",
                  "| target | schedules | Kendall τ-b | discordant / pairs | beyond noise |", "|---|---|---|---|---|"]
        lines += [f"| {100 * a['target']:.0f}% | {a['schedules']} | {a['kendall_tau']:.2f} | {a['discordant']} / {a['pairs']} | {a['decisive']} |"
                  for a in result.agreement]
    if result.comparisons:
        lines += ["", "Default MoDES minus each method, same test questions (accuracy points; paired noise: two standard errors "
                      "of the per-question difference; ahead: gap > noise):", "",
                  "| target | method | gap | paired noise | ahead |", "|---|---|---|---|---|"]
        lines += [f"| {100 * c['target']:.0f}% | {c['method']} | {c['gap']:+.2f} | {c['noise']:.2f} | {'yes' if c['beyond_noise'] else 'no'} |"
                  for c in result.comparisons]
    if any(not r.reached for r in result.rows):
        lines += ["", "† the method could not reach the target skip ratio on the calibration split (closest value shown)."]
    return "\n".join(lines)


def write(result: Result, out_dir: Path, echo=print) -> None:
    """``accuracy.json``, ``accuracy.md`` and (with matplotlib) ``accuracy.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "accuracy.json").write_text(json.dumps(asdict(result), indent=2))
    (out_dir / "accuracy.md").write_text(format_table(result) + "\n")
    plotted = plot(result, out_dir / "accuracy.png")
    echo(f"wrote {out_dir / 'accuracy.json'}, accuracy.md" + (" and accuracy.png" if plotted else " (no plot: pip install modes-fx[bench])"))


def plot(result: Result, path: Path) -> Path | None:
    """Retention vs measured test skip ratio, one line per method; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in dict.fromkeys(r.method for r in result.rows):
        rows = sorted((r for r in result.rows if r.method == method), key=lambda r: r.skip)
        ax.plot([100 * r.skip for r in rows], [r.retention for r in rows], marker="o", label=method, linewidth=2.5 if method == "modes" else 1.2)
    ax.set_xlabel("experts skipped (% of routed pairs, measured on the test split)")
    ax.set_ylabel("accuracy retained (% of dense)")
    ax.set_title(f"{result.model} VLM (Qwen3-VL-MoE class): retention vs skip ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_command(args: argparse.Namespace) -> int:
    run(quick=args.quick, out_dir=Path(args.out), model_name=args.model)
    return 0
