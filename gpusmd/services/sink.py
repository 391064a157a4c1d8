"""The sink: gathers the workers' results, writes each event once, in event order, into
the output file of DESIGN §9, readable while it grows (SWMR).

A batch is acknowledged to the ingest node only once its rows are on disk: the file is
flushed every ``flush_s``, when half of ``max_in_flight_batches`` wait for their
acknowledgement, or when no message is waiting, and the acknowledgements of the batches
written since go out after the flush. A duplicate (a batch re-sent after its worker was
thought dead) is acknowledged again (after the next flush) and dropped. The file is closed
when the ingest's end-of-run message has come and every batch it counted is written; the
events that could not be reduced are in /errors with their reason. The file says whether
it is complete (gpusmd.io.output); one that exists is never replaced: a run published
again goes to ``<name>_1.h5`` (``_2``, ...). A file that cannot be written (a full disk)
stops the sink with one error line, its file closed as it was, nothing more acknowledged.

A sink killed and started again says hello to the ingest, which sends it the open run's
begin_run and every batch not acknowledged again; the sink takes up the run's file from
the checkpoint of its last flush (RunWriter), so the run ends as if never interrupted.
A run whose ingest is silent (no heartbeat) for ``ingest_timeout_s`` is closed
incomplete, with the ranges of batches that never came (RunWriter.abandon); a new ingest
of the same run writes to a new file (its key is not the one of the file).

Nothing a peer sends stops the sink, and only the run's own messages are written: a
result must carry its batch's token and the ingest's errors and end the run's key (see
protocol.batch_token), a begin_run while a run is open is refused, and a result that
cannot be written (its fields checked, services/protocol.py) is one /errors record of
its batch. What is refused is logged at a bounded rate."""
from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import h5py
import numpy as np
import zmq
from tqdm import tqdm

from ..backend import get_backend
from ..config import Config
from ..errors import GpusmdError
from ..features import unflatten_columns
from ..io.output import (RUN_FILE, SmallDataWriter, WriteError, column_rows, open_written,
                         rows_layout, run_output)
from ..replay import (build_processors, provenance, reduce_frames, write_run_end,
                      write_user_data_cfg)
from ..runinfo import RunInfo
from .common import QuietLog, open_socket
from .metrics import Metrics, RunProgress
from .preview import Preview
from .protocol import (Message, ProtocolError, batch_token, check_records, check_result, decode,
                       encode, file_token, is_int, result_layout, run_info, same_secret,
                       short)

log = logging.getLogger("gpusmd.sink")
DEFAULT_OUTPUT = RUN_FILE
CHECKPOINT = "sink_checkpoint"      # group of an open file: where the run is (RunWriter)


class RunWriter:
    """One run's output file and its bookkeeping. With each flush the file also holds a
    checkpoint (group CHECKPOINT): the batches its rows hold (all before ``next_batch``),
    its row counts and the run sums' accumulators as of those batches, under the run's
    file token (protocol.file_token). A sink started again and sent the same run by the
    same ingest takes the file up from there (``state``, see read_checkpoint): its sums
    go on from the same numbers, so the file ends as an uninterrupted run's. The
    checkpoint is removed when the file is closed."""

    def __init__(self, config: Config, info: RunInfo, path: Path, progress: bool, token: str,
                 state: dict | None = None, metrics: Metrics | None = None):
        self.info = info
        self.path = path
        # the sink's own processors (CPU) give UserDataCfg and merge the workers' sums
        self.procs = build_processors(config, info, get_backend("cpu"))
        layout = expected_layout(config, info, self.procs)
        self.results: dict[int, object] = {}
        self.next_batch = 0
        self.end: dict | None = None
        self.n_written = 0
        self.n_errors = 0
        self.to_ack: list[int] = []     # batches written (or re-sent) since the last flush
        self.backends: set[str] = set()
        self.announced: dict | None = None      # the ingest's last heartbeat
        self.sums_changed = False
        if state is None:
            self.writer = SmallDataWriter(path, config.compression, flush_s=None)  # the sink flushes
            try:
                write_user_data_cfg(self.writer, self.procs)
                self.make_checkpoint(token)
                self.writer.begin_swmr(layout)      # SWMR readers from now on
            except BaseException:
                self.writer.close()
                raise
        else:
            self.writer = SmallDataWriter.reopen(path, state["n_rows"], state["n_errors"],
                                                 config.compression, flush_s=None)
            self.writer.begin_swmr(layout)
            self.next_batch = state["next_batch"]
            self.n_written, self.n_errors = state["n_rows"], state["n_errors"]
            for det, proc in self.procs.items():
                for key, acc in proc.sums.acc.items():
                    acc[...] = state["sums"][det][key]
                proc.sums.n_events = state["sums"][det]["n_events"]
        # the progress bar, and the same numbers as the sink's gauges (RunProgress)
        self.bar = RunProgress(tqdm(total=info.n_events, unit="ev", disable=not progress,
                                    desc=path.name, initial=self.n_written),
                               metrics, info.run, info.n_events, self.n_written)

    def make_checkpoint(self, token: str):
        """The checkpoint's datasets, made before the file goes SWMR (then only written)."""
        w = self.writer
        with w.writing():
            g = w.f.create_group(CHECKPOINT)
            g.attrs.update({"token": token, "run": self.info.run,
                            "experiment": self.info.experiment or ""})
            g.create_dataset("progress", data=np.zeros(3, np.int64))
            for det, proc in self.procs.items():
                for key, acc in proc.sums.acc.items():
                    g.create_dataset(f"{det}/{key}", data=acc)
                g.create_dataset(f"{det}/n_events", data=np.zeros(1, np.int64))

    def checkpoint(self):
        """Where the run is, into the checkpoint (on disk with the next flush); the sums
        only when batches were merged since."""
        w = self.writer
        with w.writing():
            g = w.f[CHECKPOINT]
            for det, proc in self.procs.items():
                if self.sums_changed:
                    for key, acc in proc.sums.acc.items():
                        g[f"{det}/{key}"][...] = acc
                g[f"{det}/n_events"][0] = proc.sums.n_events
            g["progress"][...] = [self.next_batch, w.n_events, w.n_errors]
        self.sums_changed = False

    def add_result(self, msg) -> bool:
        """Keep a batch's result until its turn; False for a duplicate."""
        b = msg.header["batch"]
        if b < self.next_batch:         # written: acknowledged again after the next flush
            self.to_ack.append(b)
            return False
        if b in self.results:           # waiting: acknowledged once written
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
        for det, proc in self.procs.items():
            parts = {name: msg.arrays.get(f"sums/{det}/{name}") for name in proc.sums.keys}
            if parts and all(p is not None for p in parts.values()):
                proc.sums.merge(parts, h.get("n_sum_events", n))
                self.sums_changed = True
        self.add_errors(h.get("errors") or [])
        self.to_ack.append(h["batch"])
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

    def abandon(self, config: Config, reason: str):
        """Close the file of a run whose ingest is gone, incomplete: what came is written
        (in batch order, past the batches that never came), each range of missing batches
        is an /errors row of stage "missing", and ``incomplete_reason`` says why."""
        made = self.announced["n_batches"] if self.announced else 0
        made = max([made, self.next_batch, *(b + 1 for b in self.results)])
        missing = []
        for b in sorted(self.results):
            if b > self.next_batch:
                missing.append((self.next_batch, b - 1))
            self.write(self.results.pop(b))
            self.next_batch = b + 1
        if self.next_batch < made:
            missing.append((self.next_batch, made - 1))
        rows = [(-1, "missing", f"batches {a}-{b} never came ({reason})") for a, b in missing]
        announced = self.info.n_events      # the source's count, where it knew it
        if announced is not None and self.n_written < announced:
            # events the ingest never batched: past the last batch, only the count is known
            rows.append((-1, "missing", f"{self.n_written} of the {announced} events the "
                                        f"source announced were written ({reason})"))
        self.add_errors(rows)
        log.error("run %d closed incomplete: %s; batches missing: %s", self.info.run, reason,
                  ", ".join(f"{a}-{b}" for a, b in missing) or "none")
        self.finish(config, reason=reason)

    def finish(self, config: Config, reason: str | None = None):
        """The run items, then the file closed: marked complete unless a ``reason`` says
        why it is not (a run closed before its end: attribute incomplete_reason)."""
        self.bar.close()
        self.writer.end_swmr()
        with self.writer.writing():
            del self.writer.f[CHECKPOINT]
        attrs = provenance(config, "+".join(sorted(self.backends)) or "none", self.info.source,
                           self.info.experiment, self.info.run)
        if reason is not None:
            attrs["incomplete_reason"] = reason
        write_run_end(self.writer, self.procs, {**attrs, "n_errors": self.n_errors,
                                                "via": "services"})
        if reason is None:
            self.writer.finish()
        else:
            self.writer.close()
        log.info("run %d written to %s: %d events, %d errors%s", self.info.run, self.path,
                 self.n_written, self.n_errors, "" if reason is None else " (incomplete)")


def expected_layout(config: Config, info: RunInfo, procs) -> dict:
    """The per-event datasets of a run's file, {path: (row shape, dtype)}, before any
    result: event_id, timestamp and the scalars, and the columns the run's processors
    (and user functions) make of one blank frame per detector; those that cannot be
    told (a processor that fails on a blank frame) are left to the first batch."""
    columns = {"event_id": np.zeros(1, np.int64), "timestamp": np.zeros(1, np.int64)}
    columns.update({name: np.zeros(1, dtype) for name, dtype in info.scalars.items()})
    try:
        frames = {det: np.zeros((1, *info.detectors[det].shape), info.detectors[det].dtype)
                  for det in procs}
        steps = {det: np.zeros(1, np.int64) for det in procs}
        columns.update(reduce_frames(procs, frames, steps, config.user_functions))
    except Exception as e:
        log.debug("run %d: the columns are made with its first batch (%s)", info.run, e)
    finally:
        for proc in procs.values():
            proc.sums.reset()
    return rows_layout(column_rows(columns))


def read_checkpoint(path: Path, info: RunInfo, token: str) -> dict | None:
    """The checkpoint of an incomplete file of this run written for this run's ingest
    (its file token), to take up (see RunWriter); None for any other file."""
    try:
        with open_written(path) as f:
            g = f.get(CHECKPOINT)
            if (int(f.attrs.get("complete", 0)) == 1 or not isinstance(g, h5py.Group)
                    or not same_secret(g.attrs.get("token"), token)
                    or g.attrs.get("run") != info.run
                    or g.attrs.get("experiment") != (info.experiment or "")):
                return None
            next_batch, n_rows, n_errors = (int(v) for v in g["progress"][()])
            sums = {det: {key: ds[()] for key, ds in g[det].items() if key != "n_events"}
                    | {"n_events": int(g[det]["n_events"][0])}
                    for det in g if det != "progress"}
    except (OSError, KeyError, ValueError) as e:
        log.warning("%s: its checkpoint cannot be read (%s): not taken up", path, e)
        return None
    return {"next_batch": next_batch, "n_rows": n_rows, "n_errors": n_errors, "sums": sums}


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
        self.unsent_acks: deque = deque()
        # the ingest sends an open run's begin_run and unacknowledged batches again
        self.acks.send_multipart(encode({"kind": "hello"}))
        self.metrics = Metrics("sink", self.cfg.log_every_s, metrics_port)
        self.current: RunWriter | None = None
        self.early: list = []                   # results and errors before their begin_run
        self.written: list[Path] = []
        self.closed_runs: set[int] = set()      # late duplicates of these are dropped
        # flush (and acknowledge) at the latest when this many batches wait for it
        self.ack_window = max(1, self.cfg.max_in_flight_batches // 2)
        self.quiet = QuietLog(log, self.cfg.log_every_s)
        self.key: str | None = None             # the open run's secret, from its ingest
        self.layout: dict | None = None         # its per-event arrays (result_layout)
        self.last_heard = 0.0                   # when the open run's last message came
        self.waiting = None                     # a begin_run refused while a run was open
        self.preview = Preview.from_config(self.cfg, self.ctx)     # None: off

    def output_path(self, info: RunInfo, token: str) -> tuple[Path, dict | None]:
        """The run's file, from the output template, and its checkpoint when it is this
        run's file left incomplete (a sink started again: it is taken up). Where that
        file exists otherwise (a run published again, or by another ingest), the first
        free <name>_1.h5, _2, ...: a file is never replaced."""
        path = run_output(self.output, info.experiment, info.run)
        free, n = path, 0
        while free.exists():
            state = read_checkpoint(free, info, token)
            if state is not None:
                return free, state
            n += 1
            free = path.with_name(f"{path.stem}_{n}{path.suffix}")
        if n:
            log.warning("run %d: %s exists (never replaced): writing %s", info.run, path, free)
        return free, None

    def on_message(self, frames) -> bool:
        """Handle one message; True when a run's file was closed."""
        try:
            msg = decode(frames)
        except ProtocolError as e:
            return self.refuse(f"bad message: {e}")
        kind, run = msg.kind, msg.header.get("run")
        if kind == "begin_run":
            return self.begin_run(msg)
        if kind not in ("result", "errors", "end", "heartbeat") or not is_int(run):
            return self.refuse(f"a {kind!r} message of run {short(run)}: refused")
        if run in self.closed_runs:
            self.quiet.info(f"dropped a late {kind} of run {run}, whose file is closed")
            self.metrics.inc("duplicates")
            return False
        if self.current is None or run != self.current.info.run:
            if kind != "heartbeat":
                self.keep_early(msg)
            return False
        msg = self.checked(msg)
        if msg is None:
            return False
        self.last_heard = time.monotonic()
        if kind == "result":
            if self.delay_s:
                time.sleep(self.delay_s)
            fresh = self.current.add_result(msg)      # acknowledged after the next flush
            self.metrics.inc("events" if fresh else "duplicates",
                             len(msg.header["events"]) if fresh else 1)
            if fresh and self.preview is not None:
                self.preview.result(self, msg)
        elif kind == "errors":
            self.current.add_errors(msg.header["errors"])
            self.metrics.inc("errors", len(msg.header["errors"]))
        elif kind == "end":
            self.current.end = msg.header
        elif kind == "heartbeat":
            self.current.announced = msg.header
        if self.current.complete:
            self.current.finish(self.config)
            self.written.append(self.current.path)
            self.closed_runs.add(self.current.info.run)
            self.current = None
            return True
        return False

    def refuse(self, message: str) -> bool:
        """A message not taken: logged (at a bounded rate) and counted."""
        self.metrics.inc("refused")
        self.quiet.warning(message)
        return False

    def keep_early(self, msg):
        """A result or errors message of a run not begun here (yet): kept for its
        begin_run, a bounded number of them."""
        if msg.kind == "end":
            return
        if len(self.early) >= max(64, 2 * self.cfg.max_in_flight_batches):
            self.refuse(f"a {msg.kind} of run {msg.header['run']}, not open here: dropped")
            return
        self.early.append(msg)

    def checked(self, msg):
        """The open run's message to take, or None when refused: an errors or end message
        must carry the run's key (only its ingest has it), a result its batch's token
        (only the ingest and the worker the batch went to have it). A result that cannot
        be written is taken as one error record of its batch (no rows)."""
        h, run = msg.header, self.current.info.run
        if msg.kind != "result":
            problem = None if same_secret(h.get("key"), self.key) else "not the run's key"
            if problem is None and msg.kind == "errors":
                problem = check_records(h.get("errors"))
            if (problem is None and msg.kind in ("end", "heartbeat")
                    and not is_int(h.get("n_batches"))):
                problem = f"n_batches {short(h.get('n_batches'))}"
            if problem:
                self.refuse(f"{msg.kind} message of run {run} refused: {problem}")
                return None
            return msg
        b = h.get("batch")
        if not is_int(b) or not same_secret(h.get("token"), batch_token(self.key, run, b)):
            self.refuse(f"result of batch {short(b)} of run {run} without its token: refused")
            return None
        sums = {f"sums/{det}/{key}": proc.sums.shape for det, proc in self.current.procs.items()
                for key in proc.sums.keys}
        problem = check_result(msg, self.current.info, sums)
        if problem is None and h["events"]:       # the same columns as the run's first batch
            layout = result_layout(msg)
            if self.layout is None:
                self.layout = layout
            if layout != self.layout:
                problem = f"columns {short(layout)}, the run has {short(self.layout)}"
        if problem is None:
            return msg
        self.quiet.warning(f"batch {b}: the result of worker {short(h.get('worker'))} cannot be "
                           f"written: {problem}")
        return Message({"kind": "result", "run": run, "batch": b,
                        "events": [], "timestamps": [], "n_sum_events": 0,
                        "scalars": {name: [] for name in self.current.info.scalars},
                        "errors": [[-1, "sink", f"batch {b}: a result that cannot be written "
                                                f"({problem})"]]}, {})

    def begin_run(self, msg) -> bool:
        """Open a run's file. Refused while a run is open, unless that run has been silent
        for end_timeout_s (its ingest is gone: it is closed incomplete)."""
        try:
            info = run_info(msg)
            if not isinstance(msg.header.get("key"), str):
                raise ProtocolError("begin_run without the ingest's key")
        except ProtocolError as e:
            return self.refuse(f"{e}: refused")
        if (self.current is not None and info.run == self.current.info.run
                and same_secret(msg.header["key"], self.key)):
            return False            # sent again (after a hello, or acks that stopped): open
        silent = time.monotonic() - self.last_heard
        if self.current is not None and silent < self.cfg.end_timeout_s:
            self.waiting = msg
            return self.refuse(f"begin_run of run {info.run} while run {self.current.info.run} "
                               f"is open: refused")
        try:
            if self.current is not None:
                log.error("run %d begins while run %d is open, silent for %.0f s: closing it "
                          "incomplete", info.run, self.current.info.run, silent)
                self.close_abandoned(f"run {info.run} began while it was open, silent for "
                                     f"{silent:.0f} s")
            token = file_token(msg.header["key"], info.run)
            path, state = self.output_path(info, token)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.current = RunWriter(self.config, info, path, self.progress, token, state,
                                     self.metrics)
            if state is not None:
                log.warning("run %d: taking up %s after batch %d (%d events)", info.run, path,
                            state["next_batch"], state["n_rows"])
            self.closed_runs.discard(info.run)      # published again: its results are taken
        except WriteError:                          # a full disk: the sink stops
            raise
        except GpusmdError as e:
            log.error("cannot write run %s: %s", msg.header.get("run"), e)
            return False
        log.info("run %d -> %s", info.run, path)
        self.key, self.layout, self.last_heard = msg.header["key"], None, time.monotonic()
        self.waiting = None
        early, self.early = self.early, []
        return any(self.on_message(m.frames) for m in early)

    def close_abandoned(self, reason: str):
        """Close the open run incomplete (see RunWriter.abandon)."""
        self.current.abandon(self.config, reason)
        self.written.append(self.current.path)
        self.closed_runs.add(self.current.info.run)
        self.current = None

    def check_ingest(self) -> bool:
        """The open run closed incomplete when nothing of it (not even the ingest's
        heartbeat) came for ingest_timeout_s: its ingest is gone; True when closed."""
        silent = time.monotonic() - self.last_heard
        if self.current is None or silent < self.cfg.ingest_timeout_s:
            return False
        self.close_abandoned(f"the ingest went silent for {silent:.0f} s")
        return True

    def begin_waiting(self) -> bool:
        """A begin_run refused while a run was open, taken when that run is over or silent
        for end_timeout_s and results of the waiting run have come (so that a begin_run
        sent ahead of the real one does not keep the real one out)."""
        w = self.waiting
        if w is None or not any(m.header["run"] == w.header["run"] for m in self.early):
            return False
        if self.current is not None and time.monotonic() - self.last_heard < self.cfg.end_timeout_s:
            return False
        self.waiting = None
        return self.begin_run(w)

    def ack(self, batch: int, token: str):
        self.unsent_acks.append(encode({"kind": "ack", "batch": batch, "token": token}))
        self.send_acks()

    def send_acks(self):
        """The acknowledgements not yet sent, as far as the link takes them now (never
        dropped: an ack lost would stall the ingest until its ack timeout)."""
        while self.unsent_acks:
            try:
                self.acks.send_multipart(self.unsent_acks[0], flags=zmq.NOBLOCK)
            except zmq.Again:       # the link is full or the ingest away: later
                return
            self.unsent_acks.popleft()

    def flush(self):
        """Put the open run's rows on disk, then acknowledge the batches they hold: the
        ingest lets go only of batches that a killed sink leaves in the file."""
        if self.current.to_ack:
            self.current.checkpoint()
        self.current.writer.flush()
        run = self.current.info.run
        for b in self.current.to_ack:
            self.ack(b, batch_token(self.key, run, b, ack=True))
        self.current.to_ack.clear()

    def run(self):
        last_flush = time.monotonic()
        try:
            while True:
                idle = not self.input.poll(100)
                if not idle:
                    if self.on_message(self.input.recv_multipart(copy=False)) and self.once:
                        return
                if (self.check_ingest() or self.begin_waiting()) and self.once:
                    return
                c = self.current
                if c is not None and (time.monotonic() - last_flush > self.cfg.flush_s
                                      or len(c.to_ack) >= self.ack_window
                                      or (idle and c.to_ack)):
                    self.flush()
                    last_flush = time.monotonic()
                self.send_acks()
                self.metrics.set("waiting_batches", len(self.current.results) if self.current else 0)
                self.metrics.tick()
                self.quiet.tick()
                if self.preview is not None:
                    self.preview.tick(self)
        finally:
            self.close()

    def close(self):
        if self.current is not None:      # stopped mid-run: what was flushed stays readable
            self.current.bar.close()
            self.current.writer.close()
        self.metrics.close()
        if self.preview is not None:
            self.preview.close()
        self.input.close()
        self.acks.close()
