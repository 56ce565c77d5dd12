"""The ``modes`` command line: ``modes demo``, ``modes calibrate``, ``modes evaluate``,
``modes schedule show FILE``, ``modes bench speed``, ``modes bench accuracy``.

Bad input (a missing file, a folder that is no model, an argument out of range, and the
ValueErrors the library raises for bad data or schedules) ends the command with one
``modes: error: ...`` line on stderr and exit status 2, without a traceback (``-v`` shows it);
any other exception is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

from modes_fx.harness.bench_models import BENCHMARK_MODELS
from modes_fx.harness.speed_bench import add_arguments as bench_arguments
from modes_fx.quiet import quiet_third_party

USAGE_ERROR = 2  # exit status of bad input, as argparse's own errors
_MAX_ERROR_LINES = 20  # longer messages are cut to their first line


class UsageError(Exception):
    """Bad command line input; ``main`` prints the message as ``modes: error: ...``, exit 2."""


def _demo(args) -> int:
    from modes_fx.harness import demo

    demo.run(quick=args.quick, inner=args.inner, model_name=args.model or demo.DEMO_MODEL)
    return 0


def _load_model(folder: str, experts_implementation: str):
    """A Hugging Face model from a local folder, by the architecture its config names."""
    import transformers

    _check_model_folder(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {folder}: cannot read config.json ({_first_line(e)})") from None
    name = (config.architectures or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise UsageError(f"--model {folder}: config.json names no transformers architecture I can load ({name!r})")
    return cls.from_pretrained(folder, experts_implementation=experts_implementation).eval()


def _load_processor(folder: str):
    """The processor saved in a local model folder (``AutoProcessor.from_pretrained``); UsageError
    when it cannot be loaded, or when AutoProcessor falls back to the bare tokenizer (it does when
    the folder's processor class is unknown to the installed transformers)."""
    import transformers

    from modes_fx.calib.samples import check_processor

    try:
        processor = transformers.AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"--model {folder}: cannot load its processor with AutoProcessor ({_first_line(e)})") from None
    try:
        check_processor(processor, [])
    except TypeError:
        try:
            with open(os.path.join(folder, "processor_config.json"), encoding="utf-8") as f:
                named = f"its processor class {json.load(f).get('processor_class')!r}"
        except (OSError, ValueError):
            named = "it has no processor_config.json, and its processor"
        raise UsageError(
            f"--model {folder}: AutoProcessor loaded only a {type(processor).__name__}, not a multimodal processor: "
            f"{named} cannot be loaded with the installed transformers"
        ) from None
    return processor


def _check_samples_file(samples: str) -> None:
    path = Path(samples)
    if path.suffix != ".jsonl":
        got = repr(path.suffix) if path.suffix else "no suffix"
        raise UsageError(f"--samples {samples}: samples must be a .jsonl file, got {got}")
    if not path.is_file():
        raise UsageError(f"--samples {samples}: no such file")


def _check_model_folder(folder: str) -> None:
    path = Path(folder)
    if not path.exists():
        raise UsageError(f"--model {folder}: no such folder")
    if not path.is_dir():
        raise UsageError(f"--model {folder} is not a model folder: not a folder")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {folder} is not a model folder: no config.json")


def _check_calibrate_args(args) -> None:
    """Everything about ``modes calibrate``'s arguments that can be checked before loading the model."""
    from modes_fx.calib.files import SUFFIXES
    from modes_fx.modality import check_columns

    for target in args.target_skip:
        if not (0.0 < target < 1.0):  # also refuses NaN
            raise UsageError(f"--target-skip must be in (0, 1) exclusive, got {target}")
    if len(set(args.target_skip)) != len(args.target_skip):
        raise UsageError(f"--target-skip values must be distinct, got {' '.join(map(str, args.target_skip))}")
    if args.points < 2:
        raise UsageError(f"--points must be at least 2, got {args.points}")
    if args.tau_max is not None and not (math.isfinite(args.tau_max) and args.tau_max > 0):
        raise UsageError(f"--tau-max must be a finite number > 0, got {args.tau_max}")
    if args.modalities is not None:
        try:
            check_columns(args.modalities)
        except ValueError as e:
            raise UsageError(f"--modalities: {e}") from None
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_model_folder(args.model)
    if args.samples is not None:
        _check_samples_file(args.samples)
    else:
        data = Path(args.data)
        if data.suffix not in SUFFIXES:
            got = repr(data.suffix) if data.suffix else "no suffix"
            raise UsageError(f"--data {args.data}: calibration data must be a {' or '.join(SUFFIXES)} file, got {got}")
        if not data.is_file():
            raise UsageError(f"--data {args.data}: no such file")
    out_dir = _out_file(args.out).parent
    if not out_dir.is_dir():
        raise UsageError(f"--out {args.out}: folder {out_dir} does not exist")


def _out_file(out: str) -> Path:
    """``--out``: the schedule file, or a folder (the model's) to write SCHEDULE_FILE into."""
    from modes_fx.schedule import SCHEDULE_FILE

    path = Path(out)
    return path / SCHEDULE_FILE if path.is_dir() else path


def _calibration_data(args) -> list[dict]:
    """Calibration items from ``--data`` or, through the model folder's processor, ``--samples``."""
    from modes_fx.calib import from_samples, read_samples
    from modes_fx.calib.files import load_data

    if args.samples is None:
        return load_data(args.data)
    return from_samples(_load_processor(args.model), read_samples(args.samples), batch_size=args.batch_size)


def _calibrate(args) -> int:
    from modes_fx.calib import GridSpec, calibrate
    from modes_fx.modality import COLUMN_NAMES

    _check_calibrate_args(args)
    data = _calibration_data(args)
    model = _load_model(args.model, args.experts_implementation)
    grid = GridSpec(points=args.points, mapping=args.mapping)
    if args.tau_max is not None:
        grid = GridSpec(points=args.points, mapping="linear", tau_max={c: args.tau_max for c in COLUMN_NAMES})
    targets = args.target_skip if len(args.target_skip) > 1 else args.target_skip[0]
    schedule = calibrate(
        model, data, target_skip=targets, modalities=args.modalities, grid=grid,
        cache_dir=args.cache_dir, inner=args.inner, method=args.method,
    )
    out = _out_file(args.out)
    schedule.save(out)
    print(schedule)
    print(
        f"saved {out}: KL {schedule.calibration['kl']:.4g} nats/answer token at skip {schedule.measured_skip:.3f} "
        f"(method {schedule.calibration['method']}, α ∝ KL^γ with γ = {schedule.calibration['gamma']:g})"
    )
    return 0


def _evaluate(args) -> int:
    import dataclasses
    import json

    from modes_fx.calib import evaluate_samples, read_samples

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_model_folder(args.model)
    _check_samples_file(args.samples)
    if args.schedule is not None and not Path(args.schedule).is_file():
        raise UsageError(f"--schedule {args.schedule}: no such file")
    if args.json is not None and not Path(args.json).parent.is_dir():
        raise UsageError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    samples = read_samples(args.samples)
    processor = _load_processor(args.model)
    model = _load_model(args.model, args.experts_implementation)
    result = evaluate_samples(
        model, processor, samples, schedule=args.schedule, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, inner=args.inner, progress=True,
    )
    print(f"{result.samples} samples, schedule {result.schedule}")
    print(result.table())
    if args.json is not None:
        numbers = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in dataclasses.asdict(result).items()}
        Path(args.json).write_text(json.dumps(numbers, indent=2, allow_nan=False) + "\n")  # retention NaN → null
        print(f"saved {args.json}")
    return 0


def _schedule_show(args) -> int:
    from modes_fx.schedule import Schedule

    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    print(Schedule.load(args.file))
    return 0


def _bench_speed(args) -> int:
    from modes_fx.harness import speed_bench as bench

    return bench.speed(args)


def _bench_accuracy(args) -> int:
    from modes_fx.harness import accuracy_bench

    return accuracy_bench.accuracy_command(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modes", description="MoDES dynamic expert skipping for MoE (multimodal) LLMs")
    p.add_argument("-v", "--verbose", action="store_true", help="more output; tracebacks for input errors too")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="calibrate, compile and evaluate MoDES at 88%% skip on an embedded VLM")
    d.add_argument("--model", default=None, choices=sorted(BENCHMARK_MODELS), help="embedded benchmark model (default: the demo's, printed first)")
    d.add_argument("--quick", action="store_true", help="subsets of the splits, eager inner compiler (for tests)")
    d.add_argument("--inner", choices=["inductor", "eager"], default="eager",
                   help="inner compiler after the modes passes (eager by default: inductor compiles of this model take minutes on 2 CPU cores)")
    d.set_defaults(run=_demo)
    c = sub.add_parser("calibrate", help="calibrate a schedule (GMLG + frontier search) for a local model folder")
    c.add_argument("--model", required=True, help="folder loadable by transformers from_pretrained")
    source = c.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="calibration data: .pt (torch.save list of dicts) or .jsonl of token ids")
    source.add_argument("--samples", help="JSONL of {image, question, answer} samples, encoded by the model folder's processor")
    c.add_argument("--batch-size", type=int, default=4, help="samples per calibration batch (with --samples)")
    c.add_argument(
        "--target-skip", type=float, nargs="+", default=[0.88], metavar="RATIO",
        help="fraction of routed pairs to skip, in (0, 1); several values: one operating point each (the first "
             "active, switch with modes_fx.use)",
    )
    c.add_argument("--out", required=True, help="schedule JSON to write, or a folder (e.g. the model's) to write modes_schedule.json into")
    c.add_argument(
        "--modalities", nargs="+", default=None, metavar="COLUMN",
        help="schedule columns, e.g. text image video audio (default: text, plus vision / audio when the data has them)",
    )
    c.add_argument("--points", type=int, default=100, help="grid points per modality (D)")
    c.add_argument(
        "--mapping", choices=["scores", "exp", "linear"], default="scores",
        help="τ grid: scores (default) follows the data's scores α·π up to skipping every pair, so any target is "
             "reachable; exp is the paper's grid (x_max 0.71 text, 0.6 visual: too narrow for models with few MoE "
             "layers); linear spans the paper's range evenly",
    )
    c.add_argument("--tau-max", type=float, default=None, help="use a linear grid [0, TAU_MAX] for every modality")
    c.add_argument(
        "--method", choices=["modes", "paper"], default="modes",
        help="modes (default): the tempering γ of the layer importance α ∝ KL^γ (0, 0.5, 1) with the lowest "
             "calibration KL; paper: the paper's α (γ = 1) only, a third of the search passes",
    )
    c.add_argument("--cache-dir", default=".modes-cache", help="resumable cache folder")
    c.add_argument("--inner", choices=["inductor", "eager"], default="eager", help="inner compiler for calibration passes")
    c.add_argument("--experts-implementation", default="grouped_mm", help="transformers experts implementation")
    c.set_defaults(run=_calibrate)
    e = sub.add_parser("evaluate", help="exact-match accuracy, skip ratio and latency of greedy answers, dense and with a schedule")
    e.add_argument("--model", required=True, help="folder loadable by transformers from_pretrained, with its processor")
    e.add_argument("--samples", required=True, help="JSONL of {image, question, answer} samples")
    e.add_argument("--schedule", default=None, help="schedule JSON (default: modes_schedule.json in the model folder)")
    e.add_argument("--json", default=None, help="also write the numbers and answers to this JSON file")
    e.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per answer at most")
    e.add_argument("--batch-size", type=int, default=4, help="samples per generate() batch (left-padded)")
    e.add_argument("--inner", choices=["inductor", "eager"], default="inductor", help="inner compiler after the modes passes")
    e.add_argument("--experts-implementation", default="grouped_mm", help="transformers experts implementation")
    e.set_defaults(run=_evaluate)
    s = sub.add_parser("schedule", help="inspect schedules")
    s_sub = s.add_subparsers(dest="action", required=True)
    show = s_sub.add_parser("show", help="print α per layer and τ per modality")
    show.add_argument("file")
    show.set_defaults(run=_schedule_show)
    b = sub.add_parser("bench", help="benchmarks")
    b_sub = b.add_subparsers(dest="action", required=True)
    speed = b_sub.add_parser("speed", help="latency of eager, inductor and modes at several skip ratios")
    bench_arguments(speed)
    speed.set_defaults(run=_bench_speed)
    accuracy = b_sub.add_parser("accuracy", help="accuracy retained by MoDES and every baseline at equal skip ratios (an embedded VLM)")
    accuracy.add_argument("--model", default="digits", choices=sorted(BENCHMARK_MODELS), help="embedded benchmark model (default: digits)")
    accuracy.add_argument("--quick", action="store_true", help="3 methods at 88%% on subsets of the splits")
    accuracy.add_argument("--out", default="bench-out", help="folder for accuracy.json / .md / .png")
    accuracy.set_defaults(run=_bench_accuracy)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        with quiet_third_party(args.verbose):  # torchao / Dynamo / transformers chatter only with -v
            return args.run(args)
    except (UsageError, ValueError) as e:  # bad input: the library's ValueErrors name the problem
        if args.verbose:
            traceback.print_exc()
        _fail(e)


def _fail(error: BaseException) -> None:
    """Print ``modes: error: <message>`` (its first line only when it is long) and exit 2."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    if len(lines) > _MAX_ERROR_LINES:
        lines = [lines[0]]
    print(f"modes: error: {lines[0]}", *lines[1:], sep="\n", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
