"""The chain on one host, for one command: ``gpusmd up`` and ``replay --via-services``.

``gpusmd up`` shows the services' log lines and, below them, a progress bar of the open
run (events written / events the source announced), drawn from the sink's gauges
(metrics.RunProgress) over its /metrics endpoint on loopback: the services write their
logs to files, whose new lines ``up`` passes on above the bar (LogRelay, RunBar)."""
from __future__ import annotations

import logging
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import zmq
from tqdm import tqdm

from ..config import load_config
from ..errors import GpusmdError
from ..io.output import check_new_output, run_output
from ..io.source import open_run
from ..replay import ReplaySummary
from .local import LocalServices, free_port
from .metrics import parse_metrics
from .publish import publish

log = logging.getLogger("gpusmd.up")


def replay_via_services(source, config_path, output, n_workers: int = 2, backend: str = "auto",
                        max_events: int | None = None, timeout: float = 3600.0,
                        log_dir=None, force: bool = False) -> ReplaySummary:
    """publish -> ingest -> N workers -> sink, each a process on loopback; waits for the
    sink to close the file. ``output`` as replay takes it (a file, or a directory or None
    for <experiment>_Run<NNNN>.h5); an existing file is refused unless ``force``."""
    config = load_config(config_path)
    with open_run(source, list(config.detectors) or None) as run:   # a bad source first
        output = check_new_output(run_output(output, config.experiment or run.experiment,
                                             run.run), force)
    if output.exists():                     # --force: the sink never replaces a file
        output.unlink()
    t0 = time.perf_counter()
    with LocalServices(config_path, output, n_workers, backend, log_dir=log_dir) as chain:
        config.services.__dict__.update(chain.addresses)
        n = publish_watched(chain, source, config, max_events)
        chain.wait_sink(timeout)
    seconds = time.perf_counter() - t0
    return ReplaySummary(output, n, seconds, f"services x{n_workers} ({backend})")


def publish_watched(chain: LocalServices, source, config, max_events) -> int:
    """Publish the run into the chain from a thread while watching the services: when
    one the run needs fails (LocalServices.check), its error is raised, and terminating
    the context ends a publisher blocked by the chain that no longer reads."""
    ctx = zmq.Context()
    sent, errors = [], []

    def send():
        try:
            sent.append(publish(source, config, max_events=max_events, ctx=ctx))
        except zmq.ContextTerminated:
            pass
        except BaseException as e:
            errors.append(e)

    sender = threading.Thread(target=send, name="gpusmd-publish", daemon=True)
    sender.start()
    try:
        while sender.is_alive():
            chain.check()
            sender.join(0.1)
    finally:
        ctx.term()
    if errors:
        raise errors[0]
    return sent[0]


class LogRelay:
    """The new lines of the services' log files, written above the progress bars (with
    tqdm.write, which draws the bars again below them)."""

    def __init__(self, log_dir, file=None):
        self.log_dir = Path(log_dir)
        self.file = file
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}

    def poll(self, final: bool = False):
        for path in sorted(self.log_dir.glob("*.log")):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            self.offsets[path] = self.offsets.get(path, 0) + len(data)
            data = self.partial.pop(path, b"") + data
            lines = data.split(b"\n")
            if not final:
                rest = lines.pop()
                if rest:
                    self.partial[path] = rest
            for line in lines:
                if line:
                    tqdm.write(line.decode(errors="replace").rstrip("\r"),
                               file=self.file or sys.stderr)


class PlainBar:
    """The progress of a run as log-like lines, for a terminal that is not one (a pipe,
    a file): "run 2: 16/24 events written", at most every ``every_s`` and at the end."""

    def __init__(self, total, desc: str, file, every_s: float = 5.0):
        self.total, self.desc, self.file, self.every_s = total, desc, file, every_s
        self.n = 0
        self.said = None
        self.next_t = 0.0

    def update(self, n: int):
        self.n += n
        if n and time.monotonic() >= self.next_t:
            self.say()

    def say(self, end: str = ""):
        if self.said != (self.n, end):
            of = "" if self.total is None else f"/{self.total}"
            tqdm.write(f"{self.desc}: {self.n}{of} events written{end}", file=self.file)
            self.said = (self.n, end)
            self.next_t = time.monotonic() + self.every_s

    def close(self):
        self.say(" (file closed)")


class RunBar:
    """A progress bar of the sink's open run, drawn from its gauges (run, run_done,
    run_total, run_open: metrics.RunProgress) read from ``url`` (its /metrics) at each
    ``poll``; a run that closed between two polls gets its bar too, complete. Where
    ``file`` is not a terminal, the bar is plain lines (PlainBar), which leave the logs
    around them readable."""

    PREFIX = "gpusmd_sink_"

    def __init__(self, url: str, file=None, plain: bool | None = None):
        self.url = url
        self.file = file
        out = file or sys.stderr
        self.plain = (not (hasattr(out, "isatty") and out.isatty())) if plain is None else plain
        self.bar: tqdm | None = None
        self.run: int | None = None         # the run of the bar shown, or of the last one
        self.closed = True

    def read(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url, timeout=1.0) as r:
                values = parse_metrics(r.read().decode())
        except (OSError, ValueError):
            return None
        p = self.PREFIX
        if f"{p}run" not in values:
            return None
        return {"run": int(values[f"{p}run"]), "done": int(values.get(f"{p}run_done", 0)),
                "total": int(values.get(f"{p}run_total", -1)),
                "open": values.get(f"{p}run_open", 0) == 1}

    def poll(self):
        state = self.read()
        if state is None:
            return
        run, done, is_open = state["run"], state["done"], state["open"]
        if self.bar is not None and run != self.run:
            self.close()
        if self.bar is None and (is_open or run != self.run):
            total = state["total"] if state["total"] >= 0 else None
            out = self.file or sys.stderr
            self.bar = (PlainBar(total, f"run {run}", out) if self.plain else
                        tqdm(total=total, desc=f"run {run}", unit="ev", file=out,
                             dynamic_ncols=True, leave=True))
            self.run = run
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if not is_open:
                self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def serve_locally(config_path, output, n_workers: int, backend: str, progress: bool = True,
                  poll_s: float = 0.3, monitor_port: int | None = None):
    """Run the chain until interrupted; sources send to the configured ingest address.
    ``progress``: the services' logs are passed on by this process, above a progress
    bar of the open run (RunBar); else the services write to the terminal themselves.
    ``monitor_port``: the monitor page of the sink's preview on that port, beside them."""
    config = load_config(config_path)
    monitor = None
    if monitor_port is not None:
        from ..monitor import Monitor
        if not config.services.preview:
            raise GpusmdError(f"{config_path}: services.preview is off: nothing to monitor")
        try:
            monitor = Monitor(config.services.preview, monitor_port, cfg=config.services)
        except OSError as e:        # before any service starts: nothing to stop
            raise GpusmdError(f"cannot serve the monitor on port {monitor_port} "
                              f"({e.strerror})") from None
    addresses = {k: getattr(config.services, k) for k in ("ingest_in", "ingest_work",
                                                          "ingest_ack", "sink_in")}
    logs = tempfile.TemporaryDirectory(prefix="gpusmd-up-") if progress else None
    port = free_port()
    chain = LocalServices(config_path, output, n_workers, backend, once=False,
                          addresses=addresses, quiet=False,
                          sink_args=["--metrics-port", str(port)] if progress else (),
                          log_dir=logs.name if logs else None).start()
    print(f"gpusmd up: ingest at {addresses['ingest_in']}, {n_workers} workers, sink -> {output}"
          f" (Ctrl-C to stop)", flush=True)
    if monitor is not None:
        monitor.start()
        print(f"gpusmd up: the live monitor at {monitor.url}", flush=True)
    relay = LogRelay(logs.name) if logs else None
    bar = RunBar(f"http://127.0.0.1:{port}/metrics") if progress else None
    try:
        while all(p.poll() is None for p in chain.processes):
            if relay is not None:
                relay.poll()
                bar.poll()
            time.sleep(poll_s)
        raise GpusmdError("\n".join(chain.exit_report(p) for p in chain.processes
                                     if p.poll() is not None))
    finally:
        try:
            if bar is not None:
                bar.poll()
            chain.stop()
            if relay is not None:
                relay.poll(final=True)
        finally:
            if monitor is not None:
                monitor.stop()
            if bar is not None:
                bar.close()
            if logs is not None:
                logs.cleanup()
