"""Service throughput against the in-process replay of the same run (CPU backend).

    python bench/services.py [--detectors epix10kquad jungfrau1M] [--events 1200] [--repeat 3]

For each detector (frames of 1 MB and more): the in-process replay, then the chain
publish -> ingest -> N workers -> sink on loopback, timed from the first event sent to
the closed file (the processes are started and joined before the clock starts).

Each mode runs N events and N/4 events, each timed from the first event sent (or the
replay's call) to the closed file. "End to end" is the rate of the run of N; "steady"
the rate of the difference, (N - N/4) / (t_N - t_N/4), which leaves out what a run costs
once (starting, loading constants, building tables, filling and draining the chain).
The ratio compares the services with the in-process replay. Beside the rates, the CPU
time per event, by the same difference, of the processes that do the work: the workers
(from /proc), or the in-process replay itself; where each worker has its own core, that
is what sets the rate.

Modes: the workers of the ingest's host take their batches through shared memory (the
default), or, with ``shared_memory: false``, over the link as workers on other hosts do
(tcp or ipc).

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

import numpy as np

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_services(config_path: Path, raw: Path, n_workers: int, out: Path, n_events: int,
                  affinity=None, transport: str = "tcp") -> tuple[float, float]:
    """(seconds, the workers' CPU seconds) of one run through the services, from the first
    event sent to the closed file."""
    port = free_port()
    addresses = ipc_addresses(tempfile.mkdtemp(prefix="gpusmd-ipc-")) if transport == "ipc" else None
    out.unlink(missing_ok=True)        # the sink never replaces a file: a new one each run
    with LocalServices(config_path, out, n_workers, "cpu", affinity=affinity,
                       addresses=addresses, ingest_args=["--metrics-port", str(port)]) as chain:
        workers_joined(port, n_workers)
        cfg = load_config(config_path)
        cfg.services.__dict__.update(chain.addresses)
        cpu0 = sum(cpu_seconds(w.pid) for w in chain.workers)
        t0 = time.perf_counter()
        sender = threading.Thread(target=publish, args=(raw, cfg), kwargs={"max_events": n_events})
        sender.start()
        if chain.wait_sink(600) != 0:
            raise RuntimeError("sink failed")
        seconds = time.perf_counter() - t0
        cpu = sum(cpu_seconds(w.pid) for w in chain.workers) - cpu0
        sender.join()
    return seconds, cpu


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detectors", nargs="+", default=["epix10kquad", "jungfrau1M"])
    p.add_argument("--events", type=int, default=1200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    from gpusmd.detectors import get_detector
    base = args.workdir or Path(tempfile.mkdtemp(prefix="gpusmd-bench-"))
    columns = ["detector", "frame MB", "mode", "events/s end to end", "end to end vs in-process",
               "events/s steady", "steady vs in-process", "CPU ms/event (worker)",
               "CPU vs in-process"]
    rows = []
    n_all, n_part = args.events, args.events // 4
    for det in args.detectors:
        model = get_detector(det)
        workdir = base / det
        raw = prepare_run(workdir, det, args.events, FUNCTIONS % roi_bounds(model),
                          sums="[calib, calib_max]", batch_size=args.batch_size)
        shared = workdir / "run.yaml"
        link = workdir / "run-link.yaml"
        link.write_text(shared.read_text() + "services: {shared_memory: false}\n")
        config = load_config(shared)

        def in_process(n):
            cpu0, t0 = time.process_time(), time.perf_counter()
            replay(raw, config, workdir / "inproc.h5", get_backend("cpu"), progress=False,
                   max_events=n, force=True)
            return time.perf_counter() - t0, time.process_time() - cpu0

        def services(path, workers, transport="tcp", affinity=None):
            return lambda n: time_services(path, raw, workers, workdir / "svc.h5", n,
                                           affinity, transport)

        modes = [("in-process", in_process, True),
                 ("services, 1 worker, shared memory", services(shared, 1), False),
                 ("services, 2 workers, shared memory", services(shared, 2), False),
                 ("services, 1 worker, frames over tcp", services(link, 1), False),
                 ("services, 1 worker, frames over ipc", services(link, 1, "ipc"), False)]
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            # the worker alone on one CPU, the other services and the publisher on the
            # others, against the in-process replay on that CPU
            work, rest = {cpus[-1]}, set(cpus[:-1])
            modes.append((f"in-process, on CPU {cpus[-1]}", pinned(in_process, work), True))
            modes.append((f"services, 1 worker on CPU {cpus[-1]}, the rest on the others",
                          pinned(services(shared, 1, affinity={"worker": work, "ingest": rest,
                                                               "sink": rest}), rest), False))
        mb = model.raw_nbytes / 1e6
        best = {}
        for _ in range(args.repeat):
            for name, timer, _ in modes:
                for n in (n_part, n_all):
                    best[name, n] = np.minimum(best.get((name, n), np.inf), timer(n))
        reference = None
        for name, _, is_reference in modes:
            (t_all, c_all), (t_part, c_part) = best[name, n_all], best[name, n_part]
            steady = (n_all - n_part) / max(1e-9, t_all - t_part)
            cpu_ms = 1e3 * (c_all - c_part) / (n_all - n_part)
            if is_reference:
                reference = (t_all, steady, cpu_ms)
            rows.append([det, f"{mb:.2f}", name, f"{n_all / t_all:.1f}",
                         f"{reference[0] / t_all:.2f}", f"{steady:.1f}",
                         f"{steady / reference[1]:.2f}", f"{cpu_ms:.2f}",
                         f"{cpu_ms / reference[2]:.2f}"])
        print_table(columns, rows)
    md = write_results("services-cpu", "Service throughput vs in-process replay (CPU backend)",
                       columns, rows, notes=f"`python bench/services.py --events {args.events} "
                       f"--batch-size {args.batch_size} --repeat {args.repeat}`: best of "
                       f"{args.repeat} repeats, each timing every mode in turn. The services are "
                       "timed from the first event sent to the closed file, the in-process "
                       "replay from its call to its return; 'steady' leaves out the once-per-run "
                       "costs, the CPU columns are the working process's CPU time per event "
                       "(steady); the ratios compare with the in-process row above (see the "
                       "script's docstring).")
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


if __name__ == "__main__":
    main()
