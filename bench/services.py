"""Service throughput against the in-process replay of the same run (CPU backend).

    python bench/services.py [--detectors epix10kquad jungfrau1M] [--events 400] [--repeat 4]

For each detector (frames of 1 MB and more): the in-process replay, then the chain
publish -> ingest -> N workers -> sink on loopback, timed from the first event sent to
the closed file (the processes are started and joined before the clock starts).

Each is timed on the first events/4 and on all events of the run: "end to end" is the
rate of the whole run, "steady" the rate of the difference, (N - N/4) / (t_N - t_N/4),
which leaves out what a run costs once (loading constants, building tables, writing
/UserDataCfg). The ratio compares the services with the in-process replay.

These machines are shared and noisy (the same replay can take 1x or 3x its time from one
minute to the next): every repeat times all the modes one after the other, so that a
slow minute hits them alike, and the best time of each mode over the repeats is kept."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import prepare_run, print_table, write_results  # noqa: E402

from gpusmd.backend import get_backend  # noqa: E402
from gpusmd.config import load_config  # noqa: E402
from gpusmd.replay import replay  # noqa: E402
from gpusmd.services.local import LocalServices, free_port, ipc_addresses  # noqa: E402
from gpusmd.services.publish import publish  # noqa: E402

FUNCTIONS = """\
- {kind: roi, name: ROI_0, bounds: %s, thresADU: [3.0, null]}
- {kind: roi, name: ROI_1, bounds: %s}
"""


def roi_bounds(model):
    nseg, rows, cols = model.seg_shape
    seg = [[0, 1]] if model.segmented else []
    return (seg + [[0, rows // 2], [0, cols // 2]], seg + [[rows // 4, rows], [cols // 4, cols]])


def workers_joined(port: int, n: int, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read()
            for line in text.decode().splitlines():
                if line.startswith("gpusmd_ingest_workers ") and float(line.split()[1]) >= n:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("workers did not join")


def time_services(workdir: Path, raw: Path, n_workers: int, out: Path, n_events: int,
                  affinity=None, transport: str = "tcp") -> float:
    port = free_port()
    addresses = ipc_addresses(tempfile.mkdtemp(prefix="gpusmd-ipc-")) if transport == "ipc" else None
    with LocalServices(workdir / "run.yaml", out, n_workers, "cpu", affinity=affinity,
                       addresses=addresses,
                       ingest_args=["--metrics-port", str(port)]) as chain:
        workers_joined(port, n_workers)
        cfg = load_config(workdir / "run.yaml")
        cfg.services.__dict__.update(chain.addresses)
        t0 = time.perf_counter()
        sender = threading.Thread(target=publish, args=(raw, cfg), kwargs={"max_events": n_events})
        sender.start()
        if chain.wait_sink(600) != 0:
            raise RuntimeError("sink failed")
        seconds = time.perf_counter() - t0
        sender.join()
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detectors", nargs="+", default=["epix10kquad", "jungfrau1M"])
    p.add_argument("--events", type=int, default=400)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    from gpusmd.detectors import get_detector
    base = args.workdir or Path(tempfile.mkdtemp(prefix="gpusmd-bench-"))
    columns = ["detector", "frame MB", "mode", "events/s end to end", "events/s steady",
               "steady vs the in-process row above"]
    rows = []
    n_all, n_part = args.events, args.events // 4
    for det in args.detectors:
        model = get_detector(det)
        workdir = base / det
        raw = prepare_run(workdir, det, args.events, FUNCTIONS % roi_bounds(model),
                          sums="[calib, calib_max]", batch_size=args.batch_size)
        config = load_config(workdir / "run.yaml")

        def in_process(n):
            return _timed(lambda: replay(raw, config, workdir / "inproc.h5", get_backend("cpu"),
                                         progress=False, max_events=n))

        modes = [("in-process", in_process, True)]
        for w in args.workers:
            for transport in ("tcp", "ipc"):
                modes.append((f"services, {w} worker(s), {transport}",
                              lambda n, w=w, t=transport: time_services(
                                  workdir, raw, w, workdir / f"svc{w}.h5", n, transport=t),
                              False))
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            # the cost on the worker's core: the worker alone on one CPU, the other services
            # and the publisher on the others, against the in-process replay on that CPU
            work, rest = {cpus[-1]}, set(cpus[:-1])
            modes.append((f"in-process, on CPU {cpus[-1]}", pinned(in_process, work), True))
            modes.append((f"services, 1 worker on CPU {cpus[-1]}, the rest on the others",
                          pinned(lambda n: time_services(
                              workdir, raw, 1, workdir / "svc_pinned.h5", n,
                              {"worker": work, "ingest": rest, "sink": rest}), rest), False))
        mb = model.raw_nbytes / 1e6
        best = {}
        for _ in range(args.repeat):
            for name, timer, _ in modes:
                for n in (n_part, n_all):
                    best[name, n] = min(best.get((name, n), float("inf")), timer(n))
        reference = None
        for name, _, is_reference in modes:
            t_all, t_part = best[name, n_all], best[name, n_part]
            steady = (n_all - n_part) / max(1e-9, t_all - t_part)
            reference = steady if is_reference else reference
            rows.append([det, f"{mb:.2f}", name, f"{n_all / t_all:.1f}", f"{steady:.1f}",
                         f"{steady / reference:.2f}"])
        print_table(columns, rows)
    md = write_results("services-cpu", "Service throughput vs in-process replay (CPU backend)",
                       columns, rows, notes=f"`python bench/services.py --events {args.events} "
                       f"--batch-size {args.batch_size} --repeat {args.repeat}`: best of "
                       f"{args.repeat} repeats, each timing every mode in turn. The services are "
                       "timed from the first event sent to the closed file, the in-process "
                       "replay from its call to its return; 'steady' leaves out the once-per-run "
                       "costs (see the script's docstring).")
    print(f"wrote {md}")


def pinned(timer, cpus):
    """The timer, run with this process on the given CPUs."""
    def run(n):
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)
        try:
            return timer(n)
        finally:
            os.sched_setaffinity(0, before)
    return run


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
