"""The ``gpusmd`` command."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from .backend import BACKEND_CHOICES, BackendFallbackWarning
from .errors import GpusmdError

BACKEND_HELP = ("where to run (default: $GPUSMD_BACKEND, else the config's backend, else auto: "
                "the GPU when CuPy can run a kernel there)")
ENGINE_HELP = ("the CPU engine (default: $GPUSMD_CPU_ENGINE, else auto: numba where it is "
               "installed, else NumPy; the same numbers)")
THREADS_HELP = ("threads of this process on the CPU engine (default: $GPUSMD_THREADS, else "
                "every core; each worker of `up` / --via-services and each MPI rank of a "
                "host an equal share)")
SOURCE_HELP = ("raw HDF5 file, XTC2 file or directory, or psana source "
               "(exp=EXP:run=N[:dir=DIR], shmem=NAME)")


def cmd_simulate(args):
    from .io.output import check_new_output
    from .simulate import simulate_run
    check_new_output(args.output, args.force)
    path = simulate_run(args.output, detector=args.detector, n_events=args.events,
                        dark=args.dark, seed=args.seed, shape=args.shape, run=args.run)
    print(f"wrote {path}")


def cmd_convert(args):
    from .io.output import check_new_output
    from .io.xtc2 import write_xtc2
    check_new_output(args.output, args.force)
    print(f"wrote {write_xtc2(args.raw, args.output)}")


def cmd_dark(args):
    from .calib.dark import process_dark
    from .mpi import rank_share, ranked
    share = rank_share(args.mpi)
    with ranked(share, "dark"):
        consts = process_dark(args.dark, args.output, gain_path=args.gain,
                              run_max=args.run_max, force=args.force, share=share)
    if share is not None and share.rank != 0:
        return
    for det, c in consts.items():
        bad = int((c.status != 0).any(axis=0).sum())
        print(f"{det}: {c.model.type}, {c.model.ngain} gain range(s), "
              f"{bad} of {c.model.npix} pixels with status bits")
    print(f"wrote {args.output}")


def cmd_replay(args):
    from .backend import get_backend
    from .config import load_config
    config = load_config(args.config)
    if args.mpi:
        from .mpi_replay import replay_mpi
        summary = replay_mpi(args.raw, config, args.output, args.backend,
                             batch_size=args.batch_size, max_events=args.max_events,
                             force=args.force)
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_rank() != 0:
            return
    elif args.via_services:
        from .backend import backend_name
        from .services.run import replay_via_services
        summary = replay_via_services(args.raw, args.config, args.output, args.workers,
                                      backend_name(args.backend, config.backend),
                                      max_events=args.max_events, force=args.force)
    else:
        from .replay import replay
        backend = get_backend(args.backend, config=config.backend)
        summary = replay(args.raw, config, args.output, backend, batch_size=args.batch_size,
                         progress=not args.quiet, max_events=args.max_events, force=args.force)
    print(f"{summary.n_events} events in {summary.seconds:.2f} s "
          f"({summary.events_per_s:.1f} events/s, backend {summary.backend}) -> {summary.output}")


def service_config(args):
    """The config with the addresses given on the command line."""
    from .config import ADDRESS_KEYS, load_config
    from .services.common import setup_logging
    setup_logging()
    config = load_config(args.config)
    for key in ADDRESS_KEYS:
        value = getattr(args, key)
        if value:
            setattr(config.services, key, value)
    if getattr(args, "no_shared_memory", False):
        config.services.shared_memory = False
    if getattr(args, "metrics_host", None):
        from .services.metrics import Metrics
        Metrics.default_host = args.metrics_host
    return config


def cmd_ingest(args):
    from .services.ingest import Ingest
    Ingest(service_config(args), once=args.once, metrics_port=args.metrics_port).run()


def cmd_worker(args):
    from .backend import get_backend
    from .services.worker import Worker
    config = service_config(args)
    Worker(config, get_backend(args.backend, config=config.backend), name=args.name,
           once=args.once, metrics_port=args.metrics_port, delay_s=args.delay_ms / 1000).run()


def cmd_sink(args):
    from .services.sink import Sink
    Sink(service_config(args), output=args.output, once=args.once,
         metrics_port=args.metrics_port, progress=not args.no_progress,
         delay_s=args.delay_ms / 1000).run()


def cmd_publish(args):
    from .services.publish import publish
    n = publish(args.raw, service_config(args), rate=args.rate, max_events=args.max_events)
    print(f"published {n} events")


def cmd_up(args):
    from .backend import backend_name
    from .config import load_config
    from .services.run import serve_locally
    serve_locally(args.config, args.output, args.workers,
                  backend_name(args.backend, load_config(args.config).backend),
                  monitor_port=args.monitor)


def cmd_monitor(args):
    from .monitor import main
    main(args)


def cmd_keys(args):
    from .services.common import make_keys
    d = make_keys(args.directory)
    print(f"wrote CurveZMQ keys to {d}: set `services: {{curve_keys: {d}}}` in the config "
          f"and copy the folder to every host of the chain")


def cmd_memory(args):
    from .gpu_pipeline import cmd_memory as run
    run(args)


def cmd_demo(args):
    from .demo import run_demo
    run_demo(args.outdir, detector=args.detector, n_events=args.events, backend=args.backend)


def cmd_constants(args):
    from .calib import psana_constants as pc
    from .calib.constants import Constants
    from .io.output import check_new_output
    if args.action == "to-psana":
        det = pc.detector_in(args.constants, args.detector)
        consts = Constants.load(args.constants, det)
        calibconst = pc.to_psana(consts, args.psana_detector or det, args.experiment, args.run)
        files = pc.write_psana_dir(calibconst, args.output, fmt=args.format, force=args.force)
        folded = consts.model.family in pc.PSANA_OFFSET_FAMILIES
        print(f"{det}: {consts.model.type} -> psana {', '.join(calibconst)}"
              + (" (offset folded into pedestals)" if folded else ""))
        for cmd in pc.sidecar_of(args.output).get("cdb_add", []):
            print(f"  {cmd}")
        print(f"wrote {len(files)} files to {args.output}")
        return
    out = check_new_output(args.output, args.force)
    if args.action == "from-psana":
        det, consts = pc.from_psana_dir(args.source, args.type)
        det = args.detector or det
        if not det:
            raise GpusmdError(f"{args.source}: names no detector; give --detector")
    else:
        det = args.detector
        consts = pc.from_run(args.source, det, args.type)
    pc.save_constants(consts, out, det, force=args.force)
    print(f"{det}: {consts.model.type}, {consts.model.ngain} gain range(s) from {consts.source}")
    print(f"wrote {out}")


def add_service_args(s, service: bool = True):
    from .config import ADDRESS_KEYS
    s.add_argument("--config", required=True)
    for key in ADDRESS_KEYS:
        s.add_argument(f"--{key.replace('_', '-')}", dest=key, help="address (overrides the config)")
    if service:
        s.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics on this port (0: any free port)")
        s.add_argument("--metrics-host", default="127.0.0.1",
                       help="address the metrics endpoint listens on (default 127.0.0.1: "
                            "this host only; 0.0.0.0: every interface, open to the network)")
        s.add_argument("--once", action="store_true", help="exit after one run")
        s.add_argument("--no-shared-memory", action="store_true",
                       help="batches over the link even on the ingest's host")


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
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("convert", help="write a raw run as an LCLS-II XTC2 file (psana's writer)")
    s.add_argument("raw", help="raw HDF5 run file")
    s.add_argument("-o", "--output", required=True, help="XTC2 file")
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("dark", help="pedestals, noise and pixel status from a dark run")
    s.add_argument("dark", help=SOURCE_HELP)
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--gain", help="HDF5 file with /<det>/gain (ngain, *shape); "
                                  "default: the detector's nominal gains")
    s.add_argument("--run-max", type=int, default=-1,
                   help="last run the constants are valid for (-1: every later run)")
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.add_argument("--mpi", action="store_true",
                   help="one rank of an MPI job: the ranks share the run's events, rank 0 "
                        "writes the constants")
    add_cpu_args(s)
    s.set_defaults(func=cmd_dark)

    s = sub.add_parser("replay", help="reduce a run into a small-data file")
    s.add_argument("raw", help=SOURCE_HELP)
    s.add_argument("--config", required=True)
    s.add_argument("-o", "--output", default=None,
                   help="output file, or a directory for <experiment>_Run<NNNN>.h5 (the "
                        "config's experiment, else the run's; default: that name here)")
    s.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help=BACKEND_HELP)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--max-events", type=int, default=None)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.add_argument("--via-services", action="store_true",
                   help="through ingest, workers and sink processes on this host")
    s.add_argument("--workers", type=int, default=2, help="workers, with --via-services")
    s.add_argument("--mpi", action="store_true",
                   help="one rank of an MPI job (mpiexec -n N, srun): the ranks share the "
                        "run's events and rank 0 writes the run file over their parts")
    s.add_argument("--force", action="store_true", help="replace an existing output")
    add_cpu_args(s)
    s.set_defaults(func=cmd_replay)

    for name, func, text in [("ingest", cmd_ingest, "the ingest node"),
                             ("worker", cmd_worker, "a worker"),
                             ("sink", cmd_sink, "the sink, writing the output file")]:
        s = sub.add_parser(name, help=f"run {text}")
        add_service_args(s)
        s.set_defaults(func=func)
        if name == "worker":
            s.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help=BACKEND_HELP)
            s.add_argument("--name", help="worker name (default host-pid)")
            s.add_argument("--delay-ms", type=float, default=0.0,
                           help="sleep this long per batch (to test re-sends)")
            add_cpu_args(s)
        if name == "sink":
            s.add_argument("-o", "--output", default="{experiment}_Run{run:04d}.h5",
                           help="output file; {run} and {experiment} are filled in")
            s.add_argument("--no-progress", action="store_true")
            s.add_argument("--delay-ms", type=float, default=0.0,
                           help="sleep this long per result (to test backpressure)")

    s = sub.add_parser("publish", help="send a run to the ingest node")
    s.add_argument("raw", help=SOURCE_HELP)
    add_service_args(s, service=False)
    s.add_argument("--rate", type=float, default=0.0, help="events/s (0: as fast as possible)")
    s.add_argument("--max-events", type=int, default=None)
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("up", help="start ingest, workers and sink on this host")
    s.add_argument("--config", required=True)
    s.add_argument("-o", "--output", default="{experiment}_Run{run:04d}.h5")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help=BACKEND_HELP)
    s.add_argument("--monitor", type=int, nargs="?", const=8080, default=None, metavar="PORT",
                   help="also serve the live monitor page (default port 8080)")
    add_cpu_args(s)
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("monitor", help="a web page of the sink's live preview")
    s.add_argument("--config", help="the services' config (its services.preview, keys)")
    s.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    s.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this "
                                                       "host only)")
    s.add_argument("--preview", help="the sink's preview address (overrides the config)")
    s.set_defaults(func=cmd_monitor)

    s = sub.add_parser("keys", help="generate CurveZMQ keys for the links between services")
    s.add_argument("directory")
    s.set_defaults(func=cmd_keys)

    from .gpu_pipeline import add_memory_arguments
    s = sub.add_parser("memory", help="the GPU memory a detector needs at a batch size")
    add_memory_arguments(s)
    s.set_defaults(func=cmd_memory)

    s = sub.add_parser("demo", help="simulate a dark and a data run, reduce them, plot")
    s.add_argument("--outdir", default="demo_out")
    s.add_argument("--detector", default="epix10kquad")
    s.add_argument("--events", type=int, default=100)
    s.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help=BACKEND_HELP)
    add_cpu_args(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("constants", help="convert calibration constants to and from psana's")
    cs = s.add_subparsers(dest="action", required=True)
    c = cs.add_parser("to-psana", help="psana's constants files (for cdb add) and a JSON sidecar")
    c.add_argument("constants", help="gpusmd constants file")
    c.add_argument("--detector", help="detector in the file (default: its only one)")
    c.add_argument("-o", "--output", required=True, help="directory for the files")
    c.add_argument("--psana-detector", help="the detector's name in psana (default --detector)")
    c.add_argument("--experiment", default="")
    c.add_argument("--run", type=int, default=None, help="first valid run (default run_min)")
    c.add_argument("--format", choices=("data", "npy"), default="data",
                   help="psana's NDArrIO text (.data) or NumPy (.npy)")
    c.add_argument("--force", action="store_true", help="replace constants files there")
    c.set_defaults(func=cmd_constants)
    for name, text, src in [("from-psana", "a gpusmd constants file from psana's files",
                             "directory of psana constants files"),
                            ("from-db", "a gpusmd constants file from psana's database",
                             "XTC2 file or directory, or exp=EXP:run=N[:dir=DIR]")]:
        c = cs.add_parser(name, help=text)
        c.add_argument("source", help=src)
        c.add_argument("-o", "--output", required=True, help="gpusmd constants file")
        c.add_argument("--detector", required=name == "from-db",
                       help="detector name" + (" in the run" if name == "from-db" else
                                               " (default: the sidecar's)"))
        c.add_argument("--type", help="gpusmd detector type (default: from the shapes)")
        c.add_argument("--force", action="store_true", help="replace an existing output")
        c.set_defaults(func=cmd_constants)

    from .beamtime.commands import add_commands
    add_commands(sub)           # avimage, beamcenter, mask, cube
    return p


def add_cpu_args(s):
    """--cpu-engine and --threads, for the commands that calibrate on the CPU."""
    from .cpu_engine import ENGINES
    s.add_argument("--cpu-engine", choices=ENGINES, default=None, help=ENGINE_HELP)
    s.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def take_cpu_args(args):
    """--cpu-engine and --threads as the environment variables they stand for: this
    process and those it starts (services, MPI ranks of mpiexec) read them there."""
    from .cpu_engine import ENV_VAR, THREADS_VAR, thread_count
    if getattr(args, "cpu_engine", None):
        os.environ[ENV_VAR] = args.cpu_engine
    if getattr(args, "threads", None) is not None:
        os.environ[THREADS_VAR] = str(thread_count(args.threads))


_format_other_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None):
    """A backend that falls back to the CPU says so in one line, like the errors."""
    from .cpu_engine import EngineFallbackWarning
    if issubclass(category, (BackendFallbackWarning, EngineFallbackWarning)):
        return f"gpusmd: warning: {message}\n"
    return _format_other_warning(message, category, filename, lineno, line)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (docker stop, the local launcher) unwinds like Ctrl-C: sockets and files close
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # and SIGINT is Ctrl-C even in a process started in the background by a shell, which
    # starts it ignored (a launcher's or a test's SIGINT would do nothing)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    warnings.formatwarning = _format_warning
    try:
        take_cpu_args(args)
        args.func(args)
    except GpusmdError as e:
        if str(e):              # an MPI rank other than 0 leaves the saying to rank 0
            print(f"gpusmd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpusmd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
