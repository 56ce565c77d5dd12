"""The ``modes`` command line: ``modes demo``, ``modes schedule show FILE``."""
from __future__ import annotations

import argparse
import logging
import sys


def _demo(args) -> int:
    from modes_fx import demo

    demo.run(quick=args.quick, inner=args.inner)
    return 0


def _schedule_show(args) -> int:
    from modes_fx.schedule import Schedule

    print(Schedule.load(args.file))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modes", description="MoDES dynamic expert skipping for MoE (multimodal) LLMs")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="attach, compile and run a tiny Qwen3-VL-MoE with skipping")
    d.add_argument("--quick", action="store_true", help="2 layers, eager inner compiler (seconds)")
    d.add_argument("--inner", choices=["inductor", "eager"], default="inductor", help="inner compiler after the modes passes")
    d.set_defaults(run=_demo)
    s = sub.add_parser("schedule", help="inspect schedules")
    s_sub = s.add_subparsers(dest="action", required=True)
    show = s_sub.add_parser("show", help="print α per layer and τ per modality")
    show.add_argument("file")
    show.set_defaults(run=_schedule_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
