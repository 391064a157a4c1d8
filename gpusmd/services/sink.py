"""The sink: gathers the workers' results, writes each event once, in event order, into
the output file of DESIGN §9, readable while it grows (SWMR, flushed every ``flush_s``).

Results are acknowledged to the ingest node as they arrive; a duplicate (a batch re-sent
after its worker was thought dead) is acknowledged again and dropped. The file is closed
when the ingest's end-of-run message has come and every batch it counted is written; the
events that could not be reduced are in /errors with their reason."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import zmq
from tqdm import tqdm

from ..backend import get_backend
from ..config import Config
from ..errors import GpusmdError
from ..features import unflatten_columns
from ..io.output import SmallDataWriter
from ..replay import build_processors, provenance, write_run_end, write_user_data_cfg
from ..runinfo import RunInfo
from .common import open_socket
from .metrics import Metrics
from .protocol import ProtocolError, decode, encode

log = logging.getLogger("gpusmd.sink")
DEFAULT_OUTPUT = "{experiment}_Run{run:04d}.h5"


class RunWriter:
    """One run's output file and its bookkeeping."""

    def __init__(self, config: Config, info: RunInfo, path: Path, progress: bool):
        self.info = info
        self.path = path
        # the sink's own processors (CPU) give UserDataCfg and merge the workers' sums
        self.procs = build_processors(config, info, get_backend("cpu"))
        self.writer = SmallDataWriter(path, config.compression)
        write_user_data_cfg(self.writer, self.procs)
        self.results: dict[int, object] = {}
        self.next_batch = 0
        self.end: dict | None = None
        self.n_written = 0
        self.n_errors = 0
        self.swmr = False
        self.backends: set[str] = set()
        self.bar = tqdm(total=info.n_events, unit="ev", disable=not progress, desc=path.name)

    def add_result(self, msg) -> bool:
        """Keep a batch's result until its turn; False for a duplicate."""
        b = msg.header["batch"]
        if b < self.next_batch or b in self.results:
            return False
        self.results[b] = msg
        while self.next_batch in self.results:
            self.write(self.results.pop(self.next_batch))
            self.next_batch += 1
        return True

    def write(self, msg):
        h = msg.header
        n = len(h["events"])
        if n:
            columns = {"event_id": np.asarray(h["events"], np.int64),
                       "timestamp": np.asarray(h["timestamps"], np.int64)}
            for name, dtype in self.info.scalars.items():
                columns[name] = np.asarray(h["scalars"][name], dtype=dtype)
            columns.update(unflatten_columns({k: v for k, v in msg.arrays.items()
                                              if not k.startswith("sums/")}))
            self.writer.append(columns)
            if not self.swmr:
                self.writer.start_swmr()
                self.swmr = True
        for det, proc in self.procs.items():
            parts = {name: msg.arrays.get(f"sums/{det}/{name}") for name in proc.sums.keys}
            if parts and all(p is not None for p in parts.values()):
                proc.sums.merge(parts, h.get("n_sum_events", n))
        self.add_errors(h.get("errors") or [])
        self.n_written += n
        self.backends.add(h.get("backend", "?"))
        self.bar.update(n + len(h.get("errors") or []))

    def add_errors(self, records):
        if records:
            self.writer.add_errors([(int(e), str(s), str(r)) for e, s, r in records])
            self.n_errors += len(records)

    @property
    def complete(self) -> bool:
        return self.end is not None and self.next_batch >= self.end["n_batches"]

    def finish(self, config: Config):
        self.bar.close()
        self.writer.end_swmr()
        attrs = provenance(config, "+".join(sorted(self.backends)) or "none", self.info.source,
                           self.info.experiment, self.info.run)
        write_run_end(self.writer, self.procs, {**attrs, "n_errors": self.n_errors,
                                                "via": "services"})
        self.writer.close()
        log.info("run %d written to %s: %d events, %d errors", self.info.run, self.path,
                 self.n_written, self.n_errors)


class Sink:
    def __init__(self, config: Config, output: str = DEFAULT_OUTPUT, once: bool = False,
                 metrics_port: int | None = None, progress: bool = True, delay_s: float = 0.0,
                 ctx: zmq.Context | None = None):
        self.config = config
        self.cfg = config.services
        self.output = output
        self.once = once
        self.progress = progress
        self.delay_s = delay_s                  # a deliberately slow sink, for tests
        self.ctx = ctx or zmq.Context.instance()
        self.input = open_socket(self.ctx, zmq.PULL, self.cfg.sink_in, True, self.cfg)
        self.acks = open_socket(self.ctx, zmq.PUSH, self.cfg.ingest_ack, False, self.cfg)
        self.metrics = Metrics("sink", self.cfg.log_every_s, metrics_port)
        self.current: RunWriter | None = None
        self.early: list = []                   # results and errors before their begin_run
        self.written: list[Path] = []
        self.closed_runs: set[int] = set()      # late duplicates of these are dropped

    def output_path(self, info: RunInfo) -> Path:
        return Path(self.output.format(run=info.run, experiment=info.experiment or "run"))

    def on_message(self, frames) -> bool:
        """Handle one message; True when a run's file was closed."""
        try:
            msg = decode(frames)
        except ProtocolError as e:
            log.warning("bad message: %s", e)
            self.metrics.inc("errors")
            return False
        kind, run = msg.kind, msg.header.get("run")
        if kind == "begin_run":
            return self.begin_run(msg)
        if run in self.closed_runs and kind in ("result", "errors", "end"):
            log.info("dropped a late %s of run %s, whose file is closed", kind, run)
            self.metrics.inc("duplicates")
            return False
        if self.current is None or run != self.current.info.run:
            if kind in ("result", "errors"):
                self.early.append(msg)
            return False
        if kind == "result":
            if self.delay_s:
                time.sleep(self.delay_s)
            fresh = self.current.add_result(msg)
            self.ack(msg.header["batch"])
            self.metrics.inc("events" if fresh else "duplicates",
                             len(msg.header["events"]) if fresh else 1)
        elif kind == "errors":
            self.current.add_errors(msg.header["errors"])
            self.metrics.inc("errors", len(msg.header["errors"]))
        elif kind == "end":
            self.current.end = msg.header
        if self.current.complete:
            self.current.finish(self.config)
            self.written.append(self.current.path)
            self.closed_runs.add(self.current.info.run)
            self.current = None
            return True
        return False

    def begin_run(self, msg) -> bool:
        try:
            info = RunInfo.from_message(msg.header, msg.arrays)
            if self.current is not None:
                log.error("run %d begins while run %d is open: closing it incomplete",
                          info.run, self.current.info.run)
                self.current.finish(self.config)
            path = self.output_path(info)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.current = RunWriter(self.config, info, path, self.progress)
        except GpusmdError as e:
            log.error("cannot write run %s: %s", msg.header.get("run"), e)
            return False
        log.info("run %d -> %s", info.run, path)
        early, self.early = self.early, []
        return any(self.on_message(m.frames) for m in early)

    def ack(self, batch: int):
        try:
            self.acks.send_multipart(encode({"kind": "ack", "batch": batch}), flags=zmq.NOBLOCK)
        except zmq.Again:       # the ingest will re-send; the duplicate is dropped here
            log.warning("ack of batch %d not sent (ingest not reachable)", batch)

    def run(self):
        last_flush = time.monotonic()
        try:
            while True:
                if self.input.poll(100):
                    if self.on_message(self.input.recv_multipart(copy=False)) and self.once:
                        return
                if self.current is not None and time.monotonic() - last_flush > self.cfg.flush_s:
                    self.current.writer.flush()
                    last_flush = time.monotonic()
                self.metrics.set("waiting_batches", len(self.current.results) if self.current else 0)
                self.metrics.tick()
        finally:
            self.close()

    def close(self):
        if self.current is not None:      # stopped mid-run: what was flushed stays readable
            self.current.bar.close()
            self.current.writer.close()
        self.metrics.close()
        self.input.close()
        self.acks.close()
