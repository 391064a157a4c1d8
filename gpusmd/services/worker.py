"""A worker: asks the ingest node for batches (credits), reduces them with the same
per-detector processing as the in-process replay, and sends the results to the sink.

A second socket sends heartbeats from a thread, so a long batch does not make the
worker look dead; a killed worker stops them, and the ingest re-sends its batches.

On the GPU, a batch's raw frames (their own dtype, never floats) are written straight
from the received message into a pinned host buffer and their host -> device copy is
started at once (``GpuStager``); when the next batch is already waiting on the socket,
it is received and its copy started before the current batch is processed, so that the
copy of batch k + 1 overlaps the compute of batch k.

A worker the ingest dropped (silent too long: stopped, or cut off) is asked to rejoin
when it speaks again, and says again how many batches it can take. A batch it still
held went to another worker meanwhile: the sink keeps the first result of a batch."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import numpy as np
import zmq

from ..backend import Backend
from ..config import Config
from ..errors import GpusmdError
from ..features import flatten_columns
from ..gpu_pipeline import CupyDevice, DeviceBatches
from ..replay import build_processors, reduce_frames
from ..runinfo import RunInfo
from .common import open_socket
from .metrics import Metrics
from .protocol import ProtocolError, check_batch, decode, encode, run_info
from .shm import SlotReader, host_key, remove_stale

log = logging.getLogger("gpusmd.worker")


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def worker_label(name: str, backend: str) -> str:
    """Who a worker's log lines are about: ``worker host-1234 (cpu)`` for a worker of the
    default name, ``worker w0 (cpu, host-1234)`` for one named otherwise."""
    here = default_name()
    return f"worker {name} ({backend})" if name == here else f"worker {name} ({backend}, {here})"


class WorkerLog(logging.LoggerAdapter):
    """The worker's logger: every line starts with the worker's label (worker_label)."""

    def process(self, msg, kwargs):
        return f"{self.extra['label']}: {msg}", kwargs


def good_frames(msg, det: str, good: list):
    """A detector's frames of a batch's good events: the batch's own array when it came
    through shared memory whole (no copy), else the frames one by one."""
    if msg.stacked is not None and len(good) == len(msg.stacked[det]):
        return msg.stacked[det]
    return [msg.arrays[f"{i}/{det}"] for i in good]


# ---- the GPU path: frames into pinned buffers, copies started ahead ------------------------

class GpuStager:
    """One DeviceBatches per detector; batch numbers k = 0, 1, ... in the order staged.

    ``stage(frames)`` ({det: [frame, ...]}, the same events for every detector) starts
    every detector's host -> device copy and returns k; ``get(k)`` gives {det: device
    array (n, *shape)} on the compute stream (valid until batch k + 2 is staged);
    ``release(k)`` after batch k's processing. At most two batches are staged and not
    released at once. ``device``: injectable (CupyDevice by default), as for
    gpu_pipeline.stream_batches."""

    def __init__(self, capacity: int, device=None):
        self.capacity = max(1, int(capacity))
        self.device = device if device is not None else CupyDevice()
        self.slots: dict[str, DeviceBatches] = {}
        self.next_k = 0
        self._synced = False
        self._dets: dict[int, list] = {}      # batch -> its detectors (the last two)

    def stage(self, frames: dict) -> int:
        if not self._synced:                # constants uploaded on other streams are in place
            self.device.synchronize()
            self._synced = True
        k = self.next_k
        for det, fs in frames.items():
            if det not in self.slots:
                self.slots[det] = DeviceBatches(self.capacity, self.device)
            self.slots[det].put(k, fs)
        self._dets[k] = list(frames)
        self._dets.pop(k - 2, None)
        self.next_k += 1
        return k

    def get(self, k: int) -> dict:
        return {det: self.slots[det].get(k) for det in self._dets[k]}

    def release(self, k: int) -> None:
        for det in self._dets.get(k, ()):
            self.slots[det].release(k)

    def new_run(self):
        """Processors were rebuilt (their constants uploaded): synchronise before the
        next copy."""
        self._synced = False

    def close(self):
        for s in self.slots.values():
            s.close()
        self.slots = {}


class Staged:
    """A batch message received ahead, with what the GPU path made of it: the good
    events' indices, their error records and the stager's batch number (None when no
    frame was staged)."""

    def __init__(self, good, bad, k=None):
        self.good, self.bad, self.k = good, bad, k


class Worker:
    def __init__(self, config: Config, backend: Backend, name: str | None = None,
                 once: bool = False, metrics_port: int | None = None, delay_s: float = 0.0,
                 ctx: zmq.Context | None = None, device=None):
        """device: a CupyDevice stand-in for the GPU path (tests: a fake one forces the
        path on any backend); by default the GPU path is taken on a GPU backend."""
        self.config = config
        self.cfg = config.services
        self.backend = backend
        self.name = name or default_name()
        self.once = once
        self.delay_s = delay_s                  # a deliberately slow worker, for tests
        self.ctx = ctx or zmq.Context.instance()
        self.work = open_socket(self.ctx, zmq.DEALER, self.cfg.ingest_work, False, self.cfg,
                                identity=self.name.encode())
        self.sink = open_socket(self.ctx, zmq.PUSH, self.cfg.sink_in, False, self.cfg)
        self.label = worker_label(self.name, backend.name)
        self.process = {"host": socket.gethostname(), "pid": os.getpid()}   # in its results
        self.log = WorkerLog(log, {"label": self.label})
        self.metrics = Metrics("worker", self.cfg.log_every_s, metrics_port, logger=log,
                               label=self.label)
        self.runs: dict[int, dict] = {}           # run -> processors
        self.infos: dict[int, RunInfo] = {}
        self._stop = threading.Event()
        self.stager = (GpuStager(config.batch_size, device)
                       if device is not None or backend.is_gpu else None)
        self.host = host_key() if self.cfg.shared_memory else None
        self.shared = SlotReader() if self.host else None

    def heartbeat(self):
        hb = open_socket(self.ctx, zmq.DEALER, self.cfg.ingest_work, False, self.cfg,
                         identity=f"{self.name}/hb".encode())
        try:
            while not self._stop.wait(self.cfg.heartbeat_s):
                hb.send_multipart(encode({"kind": "heartbeat", "worker": self.name}))
        finally:
            hb.close(linger=0)

    def send_ready(self, credit: int, join: bool = False):
        """credit: batches it can take more; join: all it can take (it holds none)."""
        self.work.send_multipart(encode({"kind": "ready", "worker": self.name, "credit": credit,
                                         "host": self.host, "join": join}))

    def on_begin_run(self, msg):
        info = run_info(msg)
        self.infos = {info.run: info}
        self.runs = {info.run: build_processors(self.config, info, self.backend)}
        if self.stager is not None:
            self.stager.new_run()
        self.log.info("run %d: processors for %s on backend %s", info.run,
                 ", ".join(self.runs[info.run]), self.backend.name)

    def prepare(self, msg) -> Staged | None:
        """A batch message's good events and error records; on the GPU path, the good
        events' frames are also written into pinned buffers and their copy to the device
        started. None when the batch's run has no processors."""
        run = msg.header["run"]
        info, procs = self.infos.get(run), self.runs.get(run)
        if procs is None:
            return None
        events = msg.header["events"]
        good, bad = self.check_frames(msg, events, info)
        staged = Staged(good, bad)
        if self.stager is not None and good:
            try:
                staged.k = self.stager.stage({det: good_frames(msg, det, good) for det in procs})
            except Exception:            # processed from the host instead
                self.log.exception("batch %s: staging on the device failed", msg.header["batch"])
        return staged

    def on_batch(self, msg, staged: Staged | None = None):
        h = msg.header
        run, batch = h["run"], h["batch"]
        events = h["events"]
        info, procs = self.infos.get(run), self.runs.get(run)
        ids = [e["event"] for e in events]
        errors = []
        columns, sums, good = {}, {}, list(range(len(events)))
        if staged is None:
            staged = self.prepare(msg)
        if procs is None or staged is None:
            errors = [[i, "worker", f"no begin_run for run {run}"] for i in ids]
            good = []
        else:
            good = staged.good
            errors += staged.bad
            try:
                if good:
                    if staged.k is not None:       # on the device, copied ahead
                        frames = self.stager.get(staged.k)
                    else:
                        frames = {det: good_frames(msg, det, good) for det in procs}
                        frames = {det: f if isinstance(f, np.ndarray) else np.stack(f)
                                  for det, f in frames.items()}
                    steps = {det: np.array([int(events[i]["steps"].get(det, 0)) for i in good])
                             for det in procs}
                    columns = reduce_frames(procs, frames, steps, self.config.user_functions)
                    del frames
                for det, proc in procs.items():
                    for key, part in proc.sums.take().items():
                        sums[f"sums/{det}/{key}"] = part
            except Exception as e:       # one bad batch must not stop the worker
                self.log.exception("batch %d failed", batch)
                errors += [[ids[i], "worker", f"processing failed: {type(e).__name__}: {e}"]
                           for i in good]
                good, columns, sums = [], {}, {}
                for proc in procs.values():
                    proc.sums.reset()
            finally:
                if staged.k is not None:
                    self.stager.release(staged.k)
        header = {"kind": "result", "run": run, "batch": batch, "token": h["token"],
                  "worker": self.name, "backend": self.backend.name,
                  **self.process,
                  "events": [ids[i] for i in good],
                  "timestamps": [events[i]["timestamp"] for i in good],
                  "scalars": {n: [events[i]["scalars"][n] for i in good]
                              for n in (info.scalars if info else {})},
                  "n_sum_events": len(good), "errors": errors}
        self.sink.send_multipart(encode(header, {**flatten_columns(columns), **sums}))
        self.metrics.inc("events", len(good))
        self.metrics.inc("errors", len(errors))

    @staticmethod
    def check_frames(msg, events, info):
        """Indices of the events whose every frame fits its detector, and error records
        for the others (the ingest checks this too; a worker trusts no one)."""
        good, bad = [], []
        for i, e in enumerate(events):
            problem = None
            for det, model in info.detectors.items():
                a = msg.arrays.get(f"{i}/{det}")
                if a is None or a.shape != model.shape or a.dtype != np.dtype(model.dtype):
                    problem = f"{det}: missing frame or wrong shape / dtype"
                    break
            if problem:
                bad.append([e["event"], "worker", msg.problem or problem])
            else:
                good.append(i)
        return good, bad

    def receive(self):
        """The next message from the ingest, as (message, Staged of a batch on the GPU
        path, see prepare), or None when it cannot be decoded."""
        frames = self.work.recv_multipart(copy=False)
        try:
            msg = decode(frames)
            if msg.kind == "batch":
                check_batch(msg.header, self.infos)
        except ProtocolError as e:
            self.log.warning("bad message from the ingest: %s", e)
            return None
        if msg.kind == "batch" and "shm" in msg.header:
            self.read_shared(msg)
        staged = None
        if msg.kind == "batch" and self.stager is not None:
            staged = self.prepare(msg)
        return msg, staged

    def read_shared(self, msg):
        """A batch whose frames lie in the ingest's shared memory: its arrays, as views."""
        try:
            if self.shared is None:
                raise ProtocolError("a shared-memory batch, but this worker has none")
            msg.stacked = self.shared.arrays(msg.header["shm"])
        except ProtocolError as e:
            self.log.error("batch %s: %s", msg.header.get("batch"), e)
            msg.problem = str(e)
            return
        msg.arrays = {f"{i}/{det}": frames[i] for det, frames in msg.stacked.items()
                      for i in range(len(frames))}
        self.metrics.inc("shared_batches")

    def run(self):
        beat = threading.Thread(target=self.heartbeat, daemon=True)
        beat.start()
        self.send_ready(self.cfg.credits, join=True)
        ahead = None                    # a message received before the current batch ran
        last_way = None                 # how the last batch's frames came
        try:
            while True:
                if ahead is not None:
                    item, ahead = ahead, None
                else:
                    if not self.work.poll(200):
                        self.metrics.tick()
                        continue
                    item = self.receive()
                    if item is None:
                        continue
                msg, staged = item
                if msg.kind == "begin_run":
                    try:
                        self.on_begin_run(msg)
                    except (GpusmdError, ProtocolError) as e:
                        self.log.error("cannot process run %s: %s", msg.header.get("run"), e)
                elif msg.kind == "batch":
                    way = "from shared memory" if msg.stacked is not None else "over the link"
                    if way != last_way:        # said once, and again when it changes
                        self.log.info("batch %s: frames %s", msg.header.get("batch"), way)
                        last_way = way
                    time.sleep(self.delay_s)
                    # GPU: the next batch, when already here, starts across the bus now
                    while self.stager is not None and ahead is None and self.work.poll(0):
                        ahead = self.receive()
                    self.on_batch(msg, staged)
                    self.send_ready(1)
                elif msg.kind == "rejoin":       # every batch before it is done
                    self.log.warning("the ingest had dropped this worker: joining again")
                    self.send_ready(self.cfg.credits, join=True)
                elif msg.kind == "end":
                    self.log.info("run %s ended", msg.header.get("run"))
                    if self.once:
                        return
                self.metrics.tick()
        finally:
            self._stop.set()
            beat.join(timeout=2)
            self.close()

    def close(self):
        if self.stager is not None:
            self.stager.close()
        if self.shared is not None:
            self.shared.close()
            remove_stale()          # the slot files of an ingest that was killed
        self.metrics.close()
        self.work.close()
        self.sink.close()
