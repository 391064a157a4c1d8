"""The ingest node: receives events, batches them, hands batches to workers that ask for
work, and keeps every batch until the sink has acknowledged it (DESIGN §2-3).

Delivery: a worker that stops sending heartbeats for ``worker_timeout_s`` is dropped
and its unacknowledged batches go to another worker; the sink writes each event once.
Backpressure: at most ``max_in_flight_batches`` batches are out with workers and not yet
acknowledged, and the ingest stops reading its source while ``max_pending_batches``
batches wait, so a slow chain slows the source (its sends block) and the memory held
here stays below (max_pending + max_in_flight + 1) batches. Malformed events are recorded (event id, reason), sent to the
sink's error log and skipped."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from ..config import Config
from ..errors import GpusmdError
from ..runinfo import RunInfo
from .common import open_socket
from .metrics import Metrics
from .protocol import ProtocolError, decode, encode, pack
from .shm import Slot, SlotPool, host_key

log = logging.getLogger("gpusmd.ingest")


@dataclass
class Batch:
    id: int
    header: dict
    event_ids: list
    nbytes: int
    frames: list | None = None     # the events' frames as received ...
    descriptors: list | None = None
    slot: Slot | None = None       # ... or in a shared-memory slot

    def message(self, shared: bool) -> list:
        """The message to a worker: the frames, or (``shared``) where the slot is."""
        if self.slot is None:
            return pack(self.header, self.descriptors, self.frames)
        if shared:
            return pack({**self.header, "shm": self.slot.describe()}, [], [])
        descriptors, frames = [], []
        for i in range(self.slot.n):
            for det, frame in self.slot.event_frames(i).items():
                descriptors.append([f"{i}/{det}", frame.dtype.str, list(frame.shape)])
                frames.append(memoryview(frame).cast("B"))
        return pack(self.header, descriptors, frames)


@dataclass
class Worker:
    name: str
    credit: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    run_sent: int | None = None
    batches: set = field(default_factory=set)
    shared: bool = False       # sees the ingest's shared memory


class Ingest:
    def __init__(self, config: Config, once: bool = False, metrics_port: int | None = None,
                 ctx: zmq.Context | None = None):
        self.cfg = config.services
        self.batch_size = config.batch_size
        self.once = once
        self.ctx = ctx or zmq.Context.instance()
        s = self.cfg
        self.source = open_socket(self.ctx, zmq.PULL, s.ingest_in, True, s)
        self.work = open_socket(self.ctx, zmq.ROUTER, s.ingest_work, True, s)
        self.work.router_mandatory = True
        self.acks = open_socket(self.ctx, zmq.PULL, s.ingest_ack, True, s)
        self.sink = open_socket(self.ctx, zmq.PUSH, s.sink_in, False, s)
        self.metrics = Metrics("ingest", s.log_every_s, metrics_port)
        self.workers: dict[str, Worker] = {}
        self.host = host_key() if s.shared_memory else None
        self.slots = SlotPool() if self.host else None
        self.slot: Slot | None = None              # the slot of the batch being filled
        self.reset_run()

    # ---- run state ----------------------------------------------------------------
    def reset_run(self):
        self.info: RunInfo | None = None
        self.run_frames: list | None = None        # begin_run message, for late workers
        self.current: list = []                    # events of the batch being filled
        self.current_since = 0.0
        self.pending: deque[Batch] = deque()       # batches waiting for a worker
        self.in_flight: dict[int, tuple[Batch, str]] = {}
        self.next_batch = 0
        self.last_event = None
        self.n_events = 0
        self.n_errors = 0
        self.source_done = False
        for w in self.workers.values():
            w.run_sent = None

    def held_bytes(self) -> int:
        return (sum(b.nbytes for b in self.pending)
                + sum(b.nbytes for b, _ in self.in_flight.values())
                + sum(e[2] for e in self.current))

    # ---- source ---------------------------------------------------------------------
    def on_source(self, frames):
        try:
            msg = decode(frames)
        except ProtocolError as e:
            return self.reject(e.event, str(e))
        kind = msg.kind
        if kind == "begin_run":
            return self.begin_run(msg)
        if kind == "end":
            if self.info is None:
                return self.reject(None, "end of run without begin_run")
            self.source_done = True
            self.close_batch()
            return
        if kind != "event":
            return self.reject(msg.header.get("event"), f"unexpected {kind!r} message from a source")
        problem = self.check_event(msg)
        if problem:
            return self.reject(msg.header.get("event"), problem)
        self.add_event(msg)

    def begin_run(self, msg):
        if self.info is not None:
            return self.reject(None, f"begin_run of run {msg.header.get('run')} while run "
                                     f"{self.info.run} is open")
        try:
            self.info = RunInfo.from_message(msg.header, msg.arrays)
        except GpusmdError as e:
            return self.reject(None, str(e))
        self.run_frames = msg.frames
        self.sink.send_multipart(msg.frames, copy=False)
        log.info("run %d begins: %s", self.info.run,
                 ", ".join(f"{n} ({m.type})" for n, m in self.info.detectors.items()))

    def check_event(self, msg) -> str | None:
        h = msg.header
        if self.info is None:
            return "event before begin_run"
        if h.get("run") != self.info.run:
            return f"event of run {h.get('run')!r}, but run {self.info.run} is open"
        event, ts = h.get("event"), h.get("timestamp")
        if not isinstance(event, int) or not isinstance(ts, int):
            return "event id and timestamp must be integers"
        if self.last_event is not None and event <= self.last_event:
            return f"event id {event} is not after {self.last_event} (duplicate or out of order)"
        unknown = set(msg.arrays) - set(self.info.detectors)
        if unknown:
            return f"unknown detector(s) {sorted(unknown)}"
        for det, model in self.info.detectors.items():
            a = msg.arrays.get(det)
            if a is None:
                return f"no frame of detector {det!r}"
            if a.shape != model.shape or a.dtype != np.dtype(model.dtype):
                return (f"{det}: frame {a.dtype} {a.shape}, a {model.type} sends "
                        f"{model.dtype} {model.shape}")
        scalars = h.get("scalars") or {}
        if not isinstance(scalars, dict):
            return "scalars must be a map"
        missing = set(self.info.scalars) - set(scalars)
        if missing:
            return f"missing scalar(s) {sorted(missing)}"
        if any(not isinstance(scalars[n], (int, float)) for n in self.info.scalars):
            return "scalars must be numbers"
        return None

    def add_event(self, msg):
        h = msg.header
        self.last_event = h["event"]
        nbytes = sum(a.nbytes for a in msg.arrays.values())
        if (self.slots is not None and not self.current       # a new batch: a slot for it,
                and any(w.shared for w in self.workers.values())):  # when a worker can read it
            self.slot = self.take_slot()
        if self.slot is not None:      # into shared memory now, the message is let go
            self.slot.add(msg.arrays)
            msg = type(msg)(msg.header, {})
        self.current.append((msg, h["event"], nbytes))
        self.metrics.inc("events")
        self.metrics.inc("bytes_in", nbytes)
        if len(self.current) == 1:
            self.current_since = time.monotonic()
        if len(self.current) >= self.batch_size:
            self.close_batch()

    def take_slot(self) -> Slot | None:
        """A shared-memory slot for the next batch; None (the batch goes over the link)
        when /dev/shm has no room for it."""
        layout = {det: (m.dtype, m.shape) for det, m in self.info.detectors.items()}
        try:
            return self.slots.take(layout, self.batch_size)
        except OSError as e:
            self.metrics.inc("shm_full")
            (log.debug if self.metrics.get("shm_full") > 1 else log.warning)(
                "no room in shared memory for batch %d (%s): it goes over the link (so will "
                "others, counted in shm_full)", self.next_batch, e)
            return None

    def close_batch(self):
        if not self.current:
            return
        events, descriptors, frames = [], [], []
        for i, (msg, event, _) in enumerate(self.current):
            h = msg.header
            events.append({"event": event, "timestamp": h["timestamp"],
                           "scalars": {n: h["scalars"][n] for n in self.info.scalars},
                           "steps": h.get("steps") or {}})
            if self.slot is None:
                for (name, dtype, shape), frame in zip(h["arrays"], msg.frames[1:]):
                    descriptors.append([f"{i}/{name}", dtype, shape])
                    frames.append(frame)
        header = {"kind": "batch", "run": self.info.run, "batch": self.next_batch, "events": events}
        batch = Batch(self.next_batch, header, [e["event"] for e in events],
                      sum(e[2] for e in self.current), frames, descriptors, self.slot)
        self.slot = None
        self.pending.append(batch)
        self.n_events += len(events)
        self.next_batch += 1
        self.current = []

    def reject(self, event, reason: str):
        self.n_errors += 1
        self.metrics.inc("errors")
        log.warning("event %s skipped: %s", event, reason)
        run = self.info.run if self.info else None
        self.sink.send_multipart(encode({"kind": "errors", "run": run,
                                         "errors": [[event if event is not None else -1,
                                                     "ingest", reason]]}))

    # ---- workers ----------------------------------------------------------------------
    def on_worker(self, frames):
        identity, *rest = frames
        try:
            msg = decode(rest)
        except ProtocolError as e:
            log.warning("bad message from worker %r: %s", bytes(identity), e)
            return
        name = msg.header.get("worker")
        if not isinstance(name, str):
            return
        w = self.workers.get(name)
        if w is None:
            w = self.workers[name] = Worker(name)
            log.info("worker %s joined", name)
        w.last_seen = time.monotonic()
        if msg.kind == "ready":
            w.credit += int(msg.header.get("credit", 1))
            shared = self.host is not None and msg.header.get("host") == self.host
            if shared != w.shared:
                log.info("worker %s: batches through %s", name,
                         "shared memory" if shared else "the link")
            w.shared = shared

    def dispatch(self):
        while (self.pending and self.info is not None
               and len(self.in_flight) < self.cfg.max_in_flight_batches):
            ready = [w for w in self.workers.values() if w.credit > 0]
            if not ready:
                return
            w = max(ready, key=lambda w: w.credit)
            batch = self.pending[0]
            try:
                if w.run_sent != self.info.run:
                    self.work.send_multipart([w.name.encode(), *self.run_frames],
                                             copy=False, flags=zmq.NOBLOCK)
                    w.run_sent = self.info.run
                self.work.send_multipart([w.name.encode(), *batch.message(w.shared)],
                                         copy=False, flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:         # gone (unroutable) or full: not this one now
                log.warning("cannot send to worker %s (%s)", w.name, e)
                w.credit = 0
                continue
            self.pending.popleft()
            w.credit -= 1
            w.batches.add(batch.id)
            self.in_flight[batch.id] = (batch, w.name)

    def check_workers(self):
        now = time.monotonic()
        for name, w in list(self.workers.items()):
            if now - w.last_seen > self.cfg.worker_timeout_s:
                del self.workers[name]
                lost = sorted(b for b in w.batches if b in self.in_flight)
                log.warning("worker %s silent for %.1f s: dropped; re-sending batches %s",
                            name, now - w.last_seen, lost)
                self.metrics.inc("resent_batches", len(lost))
                for b in reversed(lost):
                    self.pending.appendleft(self.in_flight.pop(b)[0])

    def on_ack(self, frames):
        try:
            msg = decode(frames)
        except ProtocolError as e:
            log.warning("bad ack: %s", e)
            return
        b = msg.header.get("batch")
        done = self.in_flight.pop(b, None)
        if done is not None:
            w = self.workers.get(done[1])
            if w is not None:
                w.batches.discard(b)
            self.let_go(done[0])
        else:       # acknowledged by the sink after a re-send was queued: drop it
            for x in [x for x in self.pending if x.id == b]:
                self.let_go(x)
            self.pending = deque(x for x in self.pending if x.id != b)

    def let_go(self, batch: Batch):
        """A batch the sink has: its slot takes the next batch."""
        if batch.slot is not None:
            self.slots.give(batch.slot)
            batch.slot = None

    def maybe_end_run(self) -> bool:
        if not (self.source_done and not self.current and not self.pending and not self.in_flight):
            return False
        end = encode({"kind": "end", "run": self.info.run, "n_batches": self.next_batch,
                      "n_events": self.n_events, "n_errors": self.n_errors})
        self.sink.send_multipart(end)
        for w in self.workers.values():
            try:
                self.work.send_multipart([w.name.encode(), *end], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        log.info("run %d ends: %d events in %d batches, %d errors", self.info.run,
                 self.n_events, self.next_batch, self.n_errors)
        self.reset_run()
        return True

    # ---- loop ---------------------------------------------------------------------------
    def run(self):
        poller = zmq.Poller()
        poller.register(self.work, zmq.POLLIN)
        poller.register(self.acks, zmq.POLLIN)
        try:
            while True:
                # backpressure: leave the source unread while enough batches wait
                reading = len(self.pending) < self.cfg.max_pending_batches
                poller.register(self.source, zmq.POLLIN if reading else 0)
                events = dict(poller.poll(50))
                if self.acks in events:
                    while self.acks.poll(0):
                        self.on_ack(self.acks.recv_multipart(copy=False))
                if self.work in events:
                    while self.work.poll(0):
                        self.on_worker(self.work.recv_multipart(copy=False))
                if reading and self.source in events:
                    for _ in range(self.batch_size):
                        if len(self.pending) >= self.cfg.max_pending_batches or not self.source.poll(0):
                            break
                        self.on_source(self.source.recv_multipart(copy=False))
                if self.current and time.monotonic() - self.current_since > self.cfg.batch_timeout_s:
                    self.close_batch()
                self.check_workers()
                self.dispatch()
                self.metrics.set("pending", len(self.pending))
                self.metrics.set("in_flight", len(self.in_flight))
                self.metrics.set("workers", len(self.workers))
                self.metrics.set("held_bytes", self.held_bytes())
                self.metrics.tick()
                if self.info is not None and self.maybe_end_run() and self.once:
                    return
        finally:
            self.close()

    def close(self):
        self.metrics.close()
        for s in (self.source, self.work, self.acks, self.sink):
            s.close()
        if self.slots is not None:
            self.slots.close()
