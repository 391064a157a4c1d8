"""What the live preview and a monitor cost the services' throughput (CPU backend).

    python bench/monitor_overhead.py [--detector jungfrau05M] [--events 600] [--rounds 3]

One simulated run through the chain publish -> ingest -> N workers -> sink on loopback
(LocalServices), timed from the first event sent to the closed file (the processes are
started and the workers joined before the clock starts), in four set-ups:

no monitor      ``services.preview: null``: the sink makes no preview at all
reader          the preview on, read by a subscriber in this process (gpusmd.monitor's
                Monitor: every message taken and checked; its page is not fetched)
viewer          the preview on, ``gpusmd monitor`` in its own process subscribed to it,
                and its page polled as the page's script does (the page and plotly.js
                once, /state.json every second, /data.json each time the preview's seq
                changes; the browser's drawing is on the viewer's own machine)
never reads     the preview on, a SUB connected to it that never reads (its queue and the
                PUB's fill; the sink drops what the link cannot take)

The set-ups run interleaved, one of each per round (in a rotated order), so that a slow
minute of this shared machine hits them alike; each set-up's ratio to the no-monitor run
of the same round is taken, and the median over the rounds is reported."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, prepare_run, print_table, write_results  # noqa: E402
from services import cpu_seconds, workers_joined  # noqa: E402

from gpusmd.config import load_config  # noqa: E402
from gpusmd.monitor import Monitor  # noqa: E402
from gpusmd.services.local import RUN_CLI, LocalServices, free_port  # noqa: E402
from gpusmd.services.publish import publish  # noqa: E402

FUNCTIONS = """\
- {kind: roi, name: ROI_0, bounds: [[0, 1], [10, 300], [20, 600]]}
- {kind: azav, center: [0.0, 0.0], dis_to_sam: 100.0, eBeam: 9.5, qbin: 0.02, phiBins: 2}
"""
SETUPS = ("no monitor", "reader", "viewer", "never reads")


def get(url, timeout=5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Viewer:
    """``gpusmd monitor`` as a process, its page polled from a thread like a browser."""

    def __init__(self, preview: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUN_CLI, "monitor", "--preview", preview,
             "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.stopping = threading.Event()
        self.n_states = self.n_data = self.n_live = 0
        self.thread = None

    def state(self) -> dict:
        return json.loads(get(f"{self.url}/state.json"))

    def wait_subscribed(self, timeout=30.0):
        """Until the monitor has had a message of the sink (its idle ones, once a second)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.state()["messages"] > 0:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the monitor never had a preview message")

    def poll(self):
        shown = None
        get(f"{self.url}/")
        get(f"{self.url}/plotly.min.js")
        while not self.stopping.wait(1.0):
            try:
                s = self.state()
                self.n_states += 1
                key = s.get("seq") if s["status"] == "live" else None
                if key is not None:
                    self.n_live += 1
                if key is not None and key != shown:
                    shown = key
                    get(f"{self.url}/data.json?seq={key}")
                    self.n_data += 1
            except OSError:
                pass

    def start(self):
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        """Stop it; its CPU seconds."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(10)
        cpu = cpu_seconds(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(10)
        return cpu


def time_run(config_path: Path, raw: Path, out: Path, n_workers: int, setup: str,
             preview: str | None) -> dict:
    """One run through the services in the set-up: its seconds and what the viewer did."""
    port = free_port()
    out.unlink(missing_ok=True)        # the sink never replaces a file: a new one each run
    ctx = zmq.Context()
    viewer = sub = reader = None
    extra = {}
    try:
        with LocalServices(config_path, out, n_workers, "cpu",
                           ingest_args=["--metrics-port", str(port)]) as chain:
            if setup == "viewer":
                viewer = Viewer(preview)
                viewer.wait_subscribed()
            elif setup == "reader":
                reader = Monitor(preview, port=0, ctx=ctx).start()
            elif setup == "never reads":
                sub = ctx.socket(zmq.SUB)
                sub.rcvhwm = 1
                sub.linger = 0
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.connect(preview)
            workers_joined(port, n_workers)
            time.sleep(0.5)            # the subscription reaches the sink's PUB
            cfg = load_config(config_path)
            cfg.services.__dict__.update(chain.addresses)
            if viewer is not None:
                viewer.start()
            t0 = time.perf_counter()
            sender = threading.Thread(target=publish, args=(raw, cfg))
            sender.start()
            if chain.wait_sink(600) != 0:
                raise RuntimeError("sink failed")
            seconds = time.perf_counter() - t0
            sender.join()
            if viewer is not None:
                extra = {"monitor_cpu_s": viewer.stop(), "states": viewer.n_states,
                         "live_states": viewer.n_live, "data": viewer.n_data}
                viewer = None
            if reader is not None:
                extra = {"messages": reader.state.n_messages, "refused": reader.state.n_bad}
    finally:
        if reader is not None:
            reader.stop()
        if viewer is not None:
            viewer.stop()
        if sub is not None:
            sub.close(linger=0)
        ctx.term()
    return {"seconds": seconds, **extra}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", default="jungfrau05M")
    p.add_argument("--events", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--preview-hz", type=float, default=2.0)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the simulated run is made (reused when there)")
    args = p.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpusmd-bench-monitor-"))
    t_start = time.monotonic()
    raw = prepare_run(workdir, args.detector, args.events, FUNCTIONS,
                      batch_size=args.batch_size, extra="experiment: xpp00123\n")
    base = (workdir / "run.yaml").read_text()
    preview = f"tcp://127.0.0.1:{free_port()}"
    off = workdir / "run-off.yaml"
    off.write_text(base + "services: {preview: null}\n")
    on = workdir / "run-on.yaml"
    on.write_text(base + f"services: {{preview: '{preview}', preview_hz: {args.preview_hz}}}\n")
    print(f"simulated run ready ({time.monotonic() - t_start:.0f} s): {args.events} events "
          f"of {args.detector}", flush=True)

    runs = {s: [] for s in SETUPS}
    for r in range(args.rounds):
        k = r % len(SETUPS)
        order = SETUPS[k:] + SETUPS[:k]
        for setup in order:
            res = time_run(off if setup == "no monitor" else on, raw, workdir / "out.h5",
                           args.workers, setup, preview)
            res["round"] = r
            res["events_per_s"] = args.events / res["seconds"]
            runs[setup].append(res)
            print(f"round {r}: {setup:12s} {res['seconds']:6.2f} s "
                  f"{res['events_per_s']:7.1f} events/s "
                  + " ".join(f"{k} {v:.3g}" for k, v in res.items()
                             if k not in ("seconds", "round", "events_per_s")), flush=True)

    columns = ["set-up", "events/s (median)", "events/s per round", "ratio to no monitor "
               "(median)", "ratio per round", "monitor CPU s (median)"]
    rows, ratios = [], {}
    for setup in SETUPS:
        rates = [x["events_per_s"] for x in runs[setup]]
        per_round = [x["events_per_s"] / ref["events_per_s"]
                     for x, ref in zip(runs[setup], runs["no monitor"])]
        ratios[setup] = float(np.median(per_round))
        cpu = [x["monitor_cpu_s"] for x in runs[setup] if "monitor_cpu_s" in x]
        rows.append([setup, f"{np.median(rates):.1f}", " ".join(f"{x:.1f}" for x in rates),
                     f"{ratios[setup]:.3f}", " ".join(f"{x:.3f}" for x in per_round),
                     f"{np.median(cpu):.1f}" if cpu else "-"])
    print_table(columns, rows)
    m = machine()
    within = {s: bool(round(ratios[s], 3) >= 0.95) for s in SETUPS if s != "no monitor"}
    total = time.monotonic() - t_start
    cmd = (f"python bench/monitor_overhead.py --detector {args.detector} --events {args.events} "
           f"--rounds {args.rounds} --workers {args.workers} --batch-size {args.batch_size} "
           f"--preview-hz {args.preview_hz:g}")
    notes = (f"`{cmd}` on {m['platform']}, {m['cpus']} CPUs ({m.get('cpu', '?')}); "
             f"{total:.0f} s in all. One run of {args.events} events of {args.detector} "
             f"(ROI + azav, calib sum; batches of {args.batch_size}), {args.workers} workers, "
             "through the services on loopback, timed from the first event sent to the closed "
             "file. Set-ups interleaved, one of each per round in a rotated order; each ratio is "
             "the set-up's rate over the no-monitor rate of the same round, the median over "
             f"{args.rounds} rounds. 'reader': a Monitor in the bench's process reading and "
             "checking every preview message (no page fetched); 'viewer': `gpusmd monitor` "
             "in its own process, its page polled as the page's script does (the page and "
             "plotly.js once, the state each second, the data when the preview changes; "
             "the pictures are drawn by the browser, on the viewer's machine); 'never "
             "reads': a SUB connected to the preview that never reads. The monitor's "
             "process shares this machine's CPUs with the workers (its CPU seconds in the "
             "last column). Within 5% of no monitor (median ratio >= 0.95): "
             + ", ".join(f"{s} {'yes' if ok else 'no'}" for s, ok in within.items()) + ".")
    md = write_results("monitor-overhead-cpu", "Monitor overhead on the services' throughput "
                       "(CPU backend)", columns, rows, notes=notes,
                       extra={"command": cmd, "ratios": ratios, "within_5_percent": within,
                              "runs": runs, "events": args.events, "detector": args.detector})
    print(f"ratios to no monitor (median of {args.rounds} rounds): "
          + ", ".join(f"{s} {ratios[s]:.3f}" for s in SETUPS))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
