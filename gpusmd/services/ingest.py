"""The ingest node: receives events, batches them, hands batches to workers that ask for
work, and keeps every batch until the sink has acknowledged it (DESIGN §2-3).

Delivery: a worker that stops sending heartbeats for ``worker_timeout_s`` is dropped
and its unacknowledged batches go to another worker; the sink writes each event once.
A dropped worker that speaks again is asked to rejoin, and says again what it can take.
Backpressure: at most ``max_in_flight_batches`` batches are out with workers and not yet
acknowledged, and the ingest stops reading its source while ``max_pending_batches``
batches wait, so a slow chain slows the source (its sends block) and the memory held
here stays below (max_pending + max_in_flight + 1) batches.

Nothing a peer sends stops the ingest. Every field of a message is checked before it is
used (services/protocol.py); a malformed event is recorded (event id, reason) for the
sink's /errors (at most ``max_error_rows`` of a kind of problem per run, then one record
counts the others) and skipped, and logged at a bounded rate. A worker's messages must
come from its own socket; an ack must carry the token that only the sink can make
(protocol.batch_token) and is taken once: a batch's shared-memory slot is reused only
once the sink has its result. Each socket is read at most BURST
messages a turn, so heartbeats and credits are served while another socket floods.

A sink that starts says hello; the ingest then sends it the open run's begin_run (with
the key) again and every batch not acknowledged to the workers again, as it also does
when nothing was acknowledged for ``ack_timeout_s``. A heartbeat to the sink every
``heartbeat_s`` tells it that the run's ingest is alive.

End of run: the source's end says how many events it sent; the run ends once that many
messages have come from the source since begin_run (good or not), or
``end_timeout_s`` after the last one, the missing ones recorded. A begin_run may carry
an end_token (``gpusmd publish`` makes one for each run), which only its source knows
(no other peer reads what goes to the ingest, and it is passed on to no one): then an
end without it is refused, a forged end cannot cut the run short. An end of a run
without one (an older source, or forged) is taken as a lower bound: the run ends once
at least that many have come and the source has then been quiet for ``end_quiet_s``
(while the ingest reads it); of several ends, the highest count holds. Events of a run
that come after its end are said in the log (not silently dropped)."""
from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from ..config import Config
from .common import ErrorRecords, QuietLog, open_socket
from .metrics import Metrics
from .protocol import (MAX_NAME, ProtocolError, batch_token, decode, encode, end_token,
                       event_entry, is_int, pack, run_info, same_secret, short)
from .shm import Slot, SlotPool, host_key

log = logging.getLogger("gpusmd.ingest")
BURST = 64                   # messages read from one socket in one turn of the loop
ERRORS_PER_MESSAGE = 1000    # error records in one message to the sink


@dataclass
class Batch:
    id: int
    token: str
    header: dict
    event_ids: list
    nbytes: int
    frames: list | None = None     # the events' frames as received ...
    descriptors: list | None = None
    slot: Slot | None = None       # ... or in a shared-memory slot
    sent_at: float = 0.0           # when it last went to a worker

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
    events_sent: int = 0       # events of the batches sent to it (the log line's rates)
    events_logged: int = 0     # ... as of the last log line


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
        self.metrics = Metrics("ingest", s.log_every_s, metrics_port, extra=self.workers_line)
        self.workers: dict[str, Worker] = {}
        self.host = host_key() if s.shared_memory else None
        self.slots = SlotPool() if self.host else None
        self.slot: Slot | None = None              # the slot of the batch being filled
        self.quiet = QuietLog(log, s.log_every_s)
        self.last_hello = self.last_beat = 0.0
        self.sinks_seen = 0              # hellos: a sink after the first is a restart
        self.ended_run: int | None = None         # the last run ended (its late events said)
        self.unread_at = 0.0             # when the source was last left unread (backpressure)
        self.reset_run()

    # ---- run state ----------------------------------------------------------------
    def reset_run(self):
        self.info = None
        self.key: str | None = None                # the run's secret, shared with the sink
        self.run_frames: list | None = None        # begin_run message, for late workers
        self.sink_frames: list | None = None       # ... and with the key, for the sink
        self.last_ack = 0.0
        self.current: list = []         # (entry, message, bytes): the batch being filled
        self.current_since = 0.0
        self.pending: deque[Batch] = deque()       # batches waiting for a worker
        self.in_flight: dict[int, tuple[Batch, str]] = {}
        self.next_batch = 0
        self.last_event = None
        self.n_events = 0
        self.n_errors = 0
        self.n_received = 0          # messages from the source since begin_run, good or not
        self.last_received = 0.0
        self.announced: int | None = None          # the events the source's end says it sent
        self.end_token: str | None = None          # begin_run's: the end must echo it
        self.end_trusted = False         # the end carried the begin_run's end_token
        self.end_at = 0.0
        self.source_done = False
        self.records = ErrorRecords(self.cfg.max_error_rows)
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
            self.received()
            return self.reject(e.event, str(e))
        if msg.kind == "begin_run":
            return self.begin_run(msg)
        if msg.kind == "end":
            return self.on_end(msg)
        self.received()
        event = msg.header.get("event") if is_int(msg.header.get("event")) else None
        if msg.kind != "event":
            return self.reject(event, f"unexpected {msg.kind!r} message from a source")
        if self.info is None:
            if self.ended_run is not None and msg.header.get("run") == self.ended_run:
                self.metrics.inc("late_events")
                return self.reject(event, f"an event of run {self.ended_run} after the run "
                                          f"ended (an early end, forged?): not written")
            return self.reject(event, "event before begin_run")
        try:
            entry = event_entry(msg, self.info)
        except ProtocolError as e:
            return self.reject(e.event, str(e))
        if self.last_event is not None and entry["event"] <= self.last_event:
            return self.reject(entry["event"], f"event id {entry['event']} is not after "
                                               f"{self.last_event} (duplicate or out of order)")
        self.add_event(msg, entry)

    def received(self):
        if self.info is not None:
            self.n_received += 1
            self.last_received = time.monotonic()

    def begin_run(self, msg):
        try:
            info = run_info(msg)
            token = end_token(msg.header)
        except ProtocolError as e:
            return self.reject(None, str(e))
        if self.info is not None:
            return self.reject(None, f"begin_run of run {info.run} while run {self.info.run} "
                                     f"is open: refused")
        self.info = info
        self.end_token = token
        self.key = secrets.token_hex(16)
        header, arrays = info.to_message()         # the checked fields only
        self.run_frames = encode(header, arrays)
        self.sink_frames = encode({**header, "key": self.key}, arrays)
        self.sink.send_multipart(self.sink_frames)
        log.info("run %d begins: %s", info.run,
                 ", ".join(f"{n} ({m.type})" for n, m in info.detectors.items()))

    def on_end(self, msg):
        h = msg.header
        if self.info is None:
            return self.reject(None, "end of run without begin_run")
        if not is_int(h.get("run"), self.info.run, self.info.run):
            return self.reject(None, f"end of run {short(h.get('run'))}, but run "
                                     f"{self.info.run} is open")
        trusted = self.end_token is not None
        if trusted and not same_secret(h.get("end_token"), self.end_token):
            return self.refuse(f"an end of run {self.info.run} without its begin_run's "
                               f"end_token: refused")
        n = h.get("n_events")
        if n is not None and not is_int(n):
            return self.reject(None, f"end: n_events must be a count, got {short(n)}")
        if n is None:
            n = self.n_received
            if not trusted:
                self.quiet.warning(f"the end of run {self.info.run} does not say how many "
                                   f"events were sent (an older source): the run ends once "
                                   f"the source is quiet")
        if not trusted:     # anyone may have sent it: a count never lowered
            n = max(n, self.announced or 0)
        self.announced = n
        self.end_trusted = trusted
        self.end_at = time.monotonic()

    def check_end(self):
        """The source is done once its end has come and the events it announced too, or
        ``end_timeout_s`` after the last of them came: the missing ones are recorded. An end
        without the begin_run's end_token waits, besides, until the source has been quiet
        for ``end_quiet_s``."""
        if self.source_done or self.announced is None:
            return
        missing = self.announced - self.n_received
        since = time.monotonic() - max(self.end_at, self.last_received, self.unread_at)
        if missing > 0:
            timeout = self.cfg.end_timeout_s
            if since < timeout:
                return
            self.reject(None, f"{missing} of the {self.announced} events the source's end "
                              f"announced never came (waited {timeout:g} s)", missing)
        elif not self.end_trusted and since < self.cfg.end_quiet_s:
            return
        self.source_done = True
        self.close_batch()

    def add_event(self, msg, entry: dict):
        self.last_event = entry["event"]
        nbytes = sum(a.nbytes for a in msg.arrays.values())
        if (self.slots is not None and not self.current       # a new batch: a slot for it,
                and any(w.shared for w in self.workers.values())):  # when a worker can read it
            self.slot = self.take_slot()
        if self.slot is not None:      # into shared memory now, the message is let go
            self.slot.add(msg.arrays)
            msg = None
        self.current.append((entry, msg, nbytes))
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
        for i, (entry, msg, _) in enumerate(self.current):
            events.append(entry)
            if self.slot is None:
                for (name, a), frame in zip(msg.arrays.items(), msg.frames[1:]):
                    descriptors.append([f"{i}/{name}", a.dtype.str, list(a.shape)])
                    frames.append(frame)
        token = batch_token(self.key, self.info.run, self.next_batch)
        header = {"kind": "batch", "run": self.info.run, "batch": self.next_batch,
                  "token": token, "events": events}
        batch = Batch(self.next_batch, token, header, [e["event"] for e in events],
                      sum(e[2] for e in self.current), frames, descriptors, self.slot)
        self.slot = None
        self.pending.append(batch)
        self.n_events += len(events)
        self.next_batch += 1
        self.current = []

    def reject(self, event: int | None, reason: str, count: int = 1):
        """What the source sent, skipped (``count`` events): logged (at a bounded rate)
        and, in a run, recorded for the output's /errors."""
        self.metrics.inc("errors", count)
        self.quiet.warning(f"event {event} skipped: {reason}" if event is not None
                           else f"skipped: {reason}")
        if self.info is not None:
            self.n_errors += count
            self.records.add(-1 if event is None else event, "ingest", reason)

    def send_errors(self) -> bool:
        """The run's queued error records to the sink; False while some wait (the sink
        takes no more now: tried again next turn, the ingest does not block)."""
        while self.records.queue:
            records = self.records.take(ERRORS_PER_MESSAGE)
            try:
                self.sink.send_multipart(encode({"kind": "errors", "run": self.info.run,
                                                 "key": self.key, "errors": records}),
                                         flags=zmq.NOBLOCK)
            except zmq.Again:
                self.records.give_back(records)
                return False
        return True

    def refuse(self, message: str):
        """A forged or malformed control message: logged (at a bounded rate), not obeyed."""
        self.metrics.inc("refused")
        self.quiet.warning(message)

    # ---- workers ----------------------------------------------------------------------
    def on_worker(self, frames):
        identity, *rest = frames
        who = bytes(identity.buffer)
        try:
            msg = decode(rest)
        except ProtocolError as e:
            return self.refuse(f"bad message from worker {short(who)}: {e}")
        h, kind = msg.header, msg.kind
        name = h.get("worker")
        # a worker's own sockets: "<name>" (ready) and "<name>/hb" (heartbeats)
        if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME
                and who == (name if kind == "ready" else f"{name}/hb").encode()):
            return self.refuse(f"a {kind!r} message from {short(who)} in the name of worker "
                               f"{short(name)}: refused")
        credit = h.get("credit")
        if kind not in ("ready", "heartbeat") or (kind == "ready" and not is_int(credit, 1)):
            return self.refuse(f"worker {name}: {kind!r} message (credit {short(credit)}) "
                               f"refused")
        join = kind == "ready" and h.get("join") is True
        w = self.workers.get(name)
        if w is None:
            w = self.workers[name] = Worker(name)
            if join:
                self.quiet.info(f"worker {name} joined", kind=f"joined {name}")
            else:          # dropped while silent, it speaks again: it says what it can take
                self.quiet.info(f"worker {name} speaks again: asked to rejoin",
                                kind=f"rejoin {name}")
                self.send_worker(w, encode({"kind": "rejoin"}))
        w.last_seen = time.monotonic()
        if kind == "ready":
            # join: all it can take; else more, after a batch (a worker holds at most credits)
            w.credit = min(credit if join else w.credit + credit, self.cfg.credits)
            shared = self.host is not None and h.get("host") == self.host
            if shared != w.shared:
                log.info("worker %s: batches through %s", name,
                         "shared memory" if shared else "the link")
            w.shared = shared

    def workers_line(self, dt: float) -> str:
        """The log line's list of the workers served, each with the events per second
        sent to it since the last line: "served worker0 40.1 ev/s, worker1 39.8 ev/s"."""
        parts = []
        for name, w in sorted(self.workers.items()):
            rate = (w.events_sent - w.events_logged) / dt if dt > 0 else 0.0
            w.events_logged = w.events_sent
            parts.append(f"{name} {rate:.1f} ev/s")
        return "served " + ", ".join(parts) if parts else "no workers"

    def send_worker(self, w: Worker, frames: list) -> bool:
        try:
            self.work.send_multipart([w.name.encode(), *frames], copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:         # gone (unroutable) or full: not this one now
            self.quiet.warning(f"cannot send to worker {w.name} ({e})")
            return False

    def dispatch(self):
        while (self.pending and self.info is not None
               and len(self.in_flight) < self.cfg.max_in_flight_batches):
            ready = [w for w in self.workers.values() if w.credit > 0]
            if not ready:
                return
            w = max(ready, key=lambda w: w.credit)
            batch = self.pending[0]
            if w.run_sent != self.info.run:
                if not self.send_worker(w, self.run_frames):
                    w.credit = 0
                    continue
                w.run_sent = self.info.run
            if not self.send_worker(w, batch.message(w.shared)):
                w.credit = 0
                continue
            self.pending.popleft()
            w.credit -= 1
            w.batches.add(batch.id)
            w.events_sent += len(batch.event_ids)
            batch.sent_at = time.monotonic()
            self.in_flight[batch.id] = (batch, w.name)

    def check_workers(self):
        now = time.monotonic()
        for name, w in list(self.workers.items()):
            if now - w.last_seen > self.cfg.worker_timeout_s:
                del self.workers[name]
                lost = sorted(b for b in w.batches if b in self.in_flight)
                self.quiet.warning(f"worker {name} silent for {now - w.last_seen:.1f} s: "
                                   f"dropped; re-sending batches {lost}", kind=f"drop {name}")
                self.metrics.inc("resent_batches", len(lost))
                self.requeue([self.take_back(b) for b in lost])

    def on_ack(self, frames):
        try:
            msg = decode(frames)
        except ProtocolError as e:
            return self.refuse(f"bad ack: {e}")
        if msg.kind == "hello":
            return self.on_hello()
        b = msg.header.get("batch")
        if msg.kind != "ack" or not is_int(b):
            return self.refuse(f"bad ack (a {msg.kind!r} message of batch {short(b)}): refused")
        sent = self.in_flight.get(b)
        batch = sent[0] if sent else next((x for x in self.pending if x.id == b), None)
        if batch is None:       # acknowledged already (a re-sent batch is acked twice)
            return
        if not same_secret(msg.header.get("token"),
                           batch_token(self.key, self.info.run, b, ack=True)):
            return self.refuse(f"ack of batch {b} without the sink's token: refused")
        self.last_ack = time.monotonic()
        if sent:
            self.take_back(b)
        else:                   # its worker was dropped and the batch waits to be re-sent
            self.pending.remove(batch)
        self.let_go(batch)

    def on_hello(self):
        """A sink has started again: the open run goes to it again. The first sink's hello
        needs nothing (what the ingest sends waits on the link until a sink takes it);
        taken at most once every heartbeat_s (anyone may say hello; it costs batches
        processed again)."""
        self.sinks_seen += 1
        now = time.monotonic()
        if (self.sinks_seen == 1 or self.info is None
                or now - self.last_hello < self.cfg.heartbeat_s):
            return
        self.last_hello = now
        self.send_again("a sink started")

    def check_acks(self):
        """No acknowledgement for ack_timeout_s while the earliest batch out (the one the
        sink, writing in order, waits for) is out for longer: the sink may have missed it
        (it was restarted, its hello lost): the run goes to it again."""
        if not self.in_flight:
            return
        first = min(self.in_flight)
        if self.pending and self.pending[0].id < first:
            return      # the sink waits for a batch not sent yet: no ack is due
        timeout = self.cfg.ack_timeout
        now = time.monotonic()
        if now - self.last_ack > timeout and now - self.in_flight[first][0].sent_at > timeout:
            self.send_again(f"no acknowledgement for {timeout:g} s")

    def send_again(self, why: str):
        """The run's begin_run (with its key) to the sink again, which takes up the run's
        file, and every batch out and not acknowledged to the workers again (the sink
        keeps one result of a batch)."""
        try:
            self.sink.send_multipart(self.sink_frames, flags=zmq.NOBLOCK)
        except zmq.Again:           # the sink is not there: tried again at the next timeout
            pass
        lost = sorted(self.in_flight)
        self.quiet.warning(f"{why}: run {self.info.run} sent to the sink again, and the batches "
                           f"not acknowledged {lost} to the workers",
                           kind="send again")
        self.metrics.inc("resent_batches", len(lost))
        self.requeue([self.take_back(b) for b in lost])

    def take_back(self, b: int) -> Batch:
        """Batch ``b``, out with a worker, no longer counted as out (nor as that worker's)."""
        batch, name = self.in_flight.pop(b)
        w = self.workers.get(name)
        if w is not None:
            w.batches.discard(b)
        return batch

    def requeue(self, batches: list):
        """Batches to send again, among the waiting ones in batch order: the sink writes in
        order, so the earliest batch must go first (else later ones, sent again and again,
        hold it back)."""
        self.pending = deque(sorted([*self.pending, *batches], key=lambda b: b.id))

    def heartbeat(self):
        """The open run's heartbeat to the sink (it closes a run whose ingest is gone)."""
        now = time.monotonic()
        if now - self.last_beat < self.cfg.heartbeat_s:
            return
        self.last_beat = now
        try:
            self.sink.send_multipart(encode({"kind": "heartbeat", "run": self.info.run,
                                             "key": self.key, "n_batches": self.next_batch,
                                             "n_events": self.n_events,
                                             "pending": len(self.pending),
                                             "in_flight": len(self.in_flight),
                                             "n_workers": len(self.workers)}),
                                     flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def let_go(self, batch: Batch):
        """A batch the sink has: its slot takes the next batch."""
        if batch.slot is not None:
            self.slots.give(batch.slot)
            batch.slot = None

    def maybe_end_run(self) -> bool:
        if not (self.source_done and not self.current and not self.pending and not self.in_flight):
            return False
        self.records.close()
        if not self.send_errors():          # the run's errors go first
            return False
        end = {"kind": "end", "run": self.info.run, "n_batches": self.next_batch,
               "n_events": self.n_events, "n_errors": self.n_errors}
        self.sink.send_multipart(encode({**end, "key": self.key}))
        for w in self.workers.values():
            try:
                self.work.send_multipart([w.name.encode(), *encode(end)], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        log.info("run %d ends: %d events in %d batches, %d errors", self.info.run,
                 self.n_events, self.next_batch, self.n_errors)
        self.ended_run = self.info.run
        self.reset_run()
        return True

    # ---- loop ---------------------------------------------------------------------------
    def run(self):
        poller = zmq.Poller()
        poller.register(self.work, zmq.POLLIN)
        poller.register(self.acks, zmq.POLLIN)
        max_pending = self.cfg.max_pending_batches
        try:
            while True:
                # backpressure: leave the source unread while enough batches wait
                reading = len(self.pending) < max_pending
                if not reading:
                    self.unread_at = time.monotonic()
                poller.register(self.source, zmq.POLLIN if reading else 0)
                poller.poll(50)
                self.drain(self.acks, self.on_ack)
                self.drain(self.work, self.on_worker)
                if reading:
                    self.drain(self.source, self.on_source,
                               lambda: len(self.pending) < max_pending)
                if self.current and time.monotonic() - self.current_since > self.cfg.batch_timeout_s:
                    self.close_batch()
                if self.info is not None:
                    self.check_end()
                    self.send_errors()
                    self.heartbeat()
                    self.check_acks()
                self.check_workers()
                self.dispatch()
                self.metrics.set("pending", len(self.pending))
                self.metrics.set("in_flight", len(self.in_flight))
                self.metrics.set("workers", len(self.workers))
                self.metrics.set("held_bytes", self.held_bytes())
                self.metrics.tick()
                self.quiet.tick()
                if self.info is not None and self.maybe_end_run() and self.once:
                    return
        finally:
            self.close()

    def drain(self, sock: zmq.Socket, handle, more=lambda: True):
        """Handle up to BURST messages waiting on a socket (while ``more()``)."""
        for _ in range(BURST):
            if not more():
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception as e:     # a fault here, not the peer's: said, and on we go
                self.metrics.inc("faults")
                self.quiet.log(logging.ERROR, f"a message could not be handled: "
                                              f"{type(e).__name__}: {e}")

    def close(self):
        self.metrics.close()
        for s in (self.source, self.work, self.acks, self.sink):
            s.close()
        if self.slots is not None:
            self.slots.close()
