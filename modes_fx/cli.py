"""The ``modes`` command line: ``modes demo``, ``modes calibrate``, ``modes schedule show FILE``,
``modes bench speed``, ``modes bench accuracy``."""
from __future__ import annotations

import argparse
import logging
import sys

from modes_fx.bench import add_arguments as bench_arguments


def _demo(args) -> int:
    from modes_fx import demo

    demo.run(quick=args.quick, inner=args.inner)
    return 0


def _load_model(folder: str, experts_implementation: str):
    """A Hugging Face model from a local folder, by the architecture its config names."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    name = (config.architectures or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise SystemExit(f"modes: {folder}/config.json names no transformers architecture I can load ({name!r})")
    return cls.from_pretrained(folder, experts_implementation=experts_implementation).eval()


def _calibrate(args) -> int:
    from modes_fx.calib import GridSpec, calibrate
    from modes_fx.calib.files import load_data
    from modes_fx.modality import COLUMN_NAMES

    model = _load_model(args.model, args.experts_implementation)
    grid = GridSpec(points=args.points, mapping=args.mapping)
    if args.tau_max is not None:
        grid = GridSpec(points=args.points, mapping="linear", tau_max={c: args.tau_max for c in COLUMN_NAMES})
    schedule = calibrate(
        model, load_data(args.data), target_skip=args.target_skip, modalities=args.modalities, grid=grid,
        cache_dir=args.cache_dir, inner=args.inner,
    )
    schedule.save(args.out)
    print(schedule)
    print(f"saved {args.out}: KL {schedule.calibration['kl']:.4g} nats/answer token at skip {schedule.measured_skip:.3f}")
    return 0


def _schedule_show(args) -> int:
    from modes_fx.schedule import Schedule

    print(Schedule.load(args.file))
    return 0


def _bench_speed(args) -> int:
    from modes_fx import bench

    return bench.speed(args)


def _bench_accuracy(args) -> int:
    from modes_fx.digits import benchmark

    return benchmark.accuracy_command(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modes", description="MoDES dynamic expert skipping for MoE (multimodal) LLMs")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="calibrate, compile and evaluate MoDES at 88%% skip on the embedded digits VLM")
    d.add_argument("--quick", action="store_true", help="subsets of the splits, eager inner compiler (for tests)")
    d.add_argument("--inner", choices=["inductor", "eager"], default="eager",
                   help="inner compiler after the modes passes (eager by default: inductor compiles of this model take minutes on 2 CPU cores)")
    d.set_defaults(run=_demo)
    c = sub.add_parser("calibrate", help="calibrate a schedule (GMLG + frontier search) for a local model folder")
    c.add_argument("--model", required=True, help="folder loadable by transformers from_pretrained")
    c.add_argument("--data", required=True, help="calibration data: .pt (torch.save list of dicts) or .jsonl")
    c.add_argument("--target-skip", type=float, default=0.88, help="fraction of routed pairs to skip, in (0, 1)")
    c.add_argument("--out", required=True, help="schedule JSON to write")
    c.add_argument(
        "--modalities", nargs="+", default=None, metavar="COLUMN",
        help="schedule columns, e.g. text image video audio (default: text, plus vision / audio when the data has them)",
    )
    c.add_argument("--points", type=int, default=100, help="grid points per modality (D)")
    c.add_argument("--mapping", choices=["exp", "linear"], default="exp", help="τ grid mapping (paper: exp)")
    c.add_argument("--tau-max", type=float, default=None, help="use a linear grid [0, TAU_MAX] for every modality")
    c.add_argument("--cache-dir", default=".modes-cache", help="resumable cache folder")
    c.add_argument("--inner", choices=["inductor", "eager"], default="eager", help="inner compiler for calibration passes")
    c.add_argument("--experts-implementation", default="grouped_mm", help="transformers experts implementation")
    c.set_defaults(run=_calibrate)
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
    accuracy = b_sub.add_parser("accuracy", help="accuracy retained by MoDES and every baseline at equal skip ratios (digits VLM)")
    accuracy.add_argument("--quick", action="store_true", help="3 methods at 88%% on subsets of the splits")
    accuracy.add_argument("--out", default="bench-out", help="folder for accuracy.json / .md / .png")
    accuracy.set_defaults(run=_bench_accuracy)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
