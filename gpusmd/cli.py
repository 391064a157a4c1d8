"""The ``gpusmd`` command."""
from __future__ import annotations

import argparse
import sys

from .backend import BACKEND_CHOICES
from .errors import GpusmdError


def cmd_simulate(args):
    from .simulate import simulate_run
    path = simulate_run(args.output, detector=args.detector, n_events=args.events,
                        dark=args.dark, seed=args.seed, shape=args.shape, run=args.run)
    print(f"wrote {path}")


def cmd_dark(args):
    from .calib.dark import process_dark
    consts = process_dark(args.dark, args.output, gain_path=args.gain, run_max=args.run_max)
    for det, c in consts.items():
        bad = int((c.status != 0).any(axis=0).sum())
        print(f"{det}: {c.model.type}, {c.model.ngain} gain range(s), "
              f"{bad} of {c.model.npix} pixels with status bits")
    print(f"wrote {args.output}")


def cmd_replay(args):
    from .backend import get_backend
    from .config import load_config
    from .replay import replay
    config = load_config(args.config)
    backend = get_backend(args.backend or config.backend)
    summary = replay(args.raw, config, args.output, backend, batch_size=args.batch_size,
                     progress=not args.quiet, max_events=args.max_events)
    print(f"{summary.n_events} events in {summary.seconds:.2f} s "
          f"({summary.events_per_s:.1f} events/s, backend {summary.backend}) -> {summary.output}")


def cmd_demo(args):
    from .demo import run_demo
    run_demo(args.outdir, detector=args.detector, n_events=args.events, backend=args.backend)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpusmd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="simulate a raw run (dark or data) with known truth")
    s.add_argument("--detector", default="epix10kquad")
    s.add_argument("--events", type=int, default=20)
    s.add_argument("--dark", action="store_true", help="a dark run (no X-rays; every gain)")
    s.add_argument("--seed", type=int, default=0, help="detector seed: darks and runs of one "
                                                       "seed share pedestals")
    s.add_argument("--shape", type=int, nargs=2, metavar=("ROWS", "COLS"),
                   help="frame shape (detector 'camera' only)")
    s.add_argument("--run", type=int, default=None)
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("dark", help="pedestals, noise and pixel status from a dark run")
    s.add_argument("dark")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--gain", help="HDF5 file with /<det>/gain (ngain, *shape); "
                                  "default: the detector's nominal gains")
    s.add_argument("--run-max", type=int, default=-1,
                   help="last run the constants are valid for (-1: every later run)")
    s.set_defaults(func=cmd_dark)

    s = sub.add_parser("replay", help="reduce a raw run into a small-data file")
    s.add_argument("raw")
    s.add_argument("--config", required=True)
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--backend", choices=BACKEND_CHOICES, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--max-events", type=int, default=None)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("demo", help="simulate a dark and a data run, reduce them, plot")
    s.add_argument("--outdir", default="demo_out")
    s.add_argument("--detector", default="epix10kquad")
    s.add_argument("--events", type=int, default=100)
    s.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GpusmdError as e:
        print(f"gpusmd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpusmd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
