"""``replay --mpi`` with 1, 2 and 4 ranks (CPU backend), beside the one-process replay.

    python bench/mpi_scaling.py [--detector jungfrau05M] [--events 256] [--rounds 3]

Each set-up replays the same simulated run, timed from launch to exit (so the ranks'
start-up, the run file's writing and the virtual datasets are in it: what a user waits
for); the set-ups run interleaved, one of each per round, and each one's events/s over
the one-process replay of the same round is taken, the median over the rounds reported.
The bytes of the run file and its parts are set beside those of the one-process file
(the parts' overhead: the per-part metadata and chunks, the run file's virtual-dataset
mappings)."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, prepare_run, print_table, write_results  # noqa: E402

FUNCTIONS = """\
- {kind: roi, bounds: [[0, 1], [10, 300], [20, 600]]}
- {kind: azav, center: [0.0, 0.0], dis_to_sam: 100.0, eBeam: 9.5, qbin: 0.02, phiBins: 2}
- {kind: droplet, threshold: 5}
"""
RANKS = (1, 2, 4)


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def size_of(path: Path) -> int:
    parts = path.with_name(f"{path.stem}_parts")
    return path.stat().st_size + sum(p.stat().st_size for p in parts.glob("*.h5"))


def run_once(workdir: Path, raw: Path, ranks: int | None) -> tuple[float, int]:
    """(seconds, bytes) of one replay: in one process (ranks None) or over MPI ranks."""
    out = workdir / f"out_{ranks or 'one'}.h5"
    out.unlink(missing_ok=True)
    shutil.rmtree(out.with_name(f"{out.stem}_parts"), ignore_errors=True)
    cmd = [sys.executable, "-m", "gpusmd", "replay", str(raw), "--config", "run.yaml",
           "-o", str(out), "-q", "--backend", "cpu"]
    if ranks is not None:
        cmd = [mpiexec(), "-n", str(ranks), *cmd, "--mpi"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr}")
    return seconds, size_of(out)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", default="jungfrau05M")
    p.add_argument("--events", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpusmd-bench-mpi-"))
    t_start = time.monotonic()
    raw = prepare_run(workdir, args.detector, args.events, FUNCTIONS,
                      sums="[calib, calib_square, calib_max]", batch_size=args.batch_size)
    setups = [None, *RANKS]
    times = {s: [] for s in setups}
    sizes = {}
    for r in range(args.rounds):
        k = r % len(setups)
        for s in setups[k:] + setups[:k]:
            seconds, nbytes = run_once(workdir, raw, s)
            times[s].append(seconds)
            sizes[s] = nbytes
            print(f"round {r}: {s or 'one process'}: {seconds:.2f} s, {nbytes} bytes",
                  flush=True)
    rows, ratios = [], {}
    for s in setups:
        rate = [args.events / t for t in times[s]]
        ratio = [one / t for one, t in zip(times[None], times[s])]
        ratios[s or "one process"] = float(np.median(ratio))
        rows.append([f"{s} ranks" if s else "one process (no MPI)",
                     f"{np.median(rate):.1f}", " ".join(f"{v:.1f}" for v in rate),
                     f"{np.median(ratio):.2f}", f"{sizes[s]}",
                     f"{sizes[s] - sizes[None]:+d}"])
    columns = ["set-up", "events/s (median)", "events/s per round",
               "speed-up over one process (median)", "bytes (run file + parts)",
               "bytes over one process"]
    print_table(columns, rows)
    m = machine()
    cmd = (f"python bench/mpi_scaling.py --detector {args.detector} --events {args.events} "
           f"--rounds {args.rounds} --batch-size {args.batch_size}")
    notes = (f"`{cmd}` on {m['platform']}, {m['cpus']} CPUs ({m.get('cpu', '?')}); "
             f"{time.monotonic() - t_start:.0f} s in all. {args.events} events of "
             f"{args.detector} (ROI, azav, droplets; sums calib, calib_square, calib_max; "
             f"batches of {args.batch_size}), CPU backend, timed from launch to exit "
             "(start-up of every rank, reading, reducing, the part files, the run file "
             "with its virtual datasets). Set-ups interleaved per round; the speed-up is "
             "the one-process time over the set-up's in the same round, median over "
             f"the rounds. With {m['cpus']} CPUs, ranks beyond {m['cpus']} only share them.")
    md = write_results("mpi-scaling-cpu", "replay --mpi: events/s with 1, 2 and 4 ranks "
                       "(CPU backend)", columns, rows, notes=notes,
                       extra={"command": cmd, "times_s": {str(k): v for k, v in times.items()},
                              "bytes": {str(k): v for k, v in sizes.items()},
                              "speed_up": ratios})
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
