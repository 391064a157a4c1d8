"""What every service shares: sockets (high-water marks, optional CurveZMQ), logging
(what peers send is logged at a bounded rate) and the error records of a run."""
from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import zmq

from ..config import ServicesConfig
from ..errors import GpusmdError
from .protocol import REASON_CHARS
from .security import CurveKeys, generate_keys, secure_client, secure_server

LINGER_MS = 2000      # what is queued at exit still goes out (results, acks)


def curve_keys(cfg: ServicesConfig, server: bool) -> CurveKeys | None:
    """The keys of a binding (server) or connecting (client) socket, from the keys
    directory made by ``gpusmd keys``; None without CurveZMQ."""
    d = cfg.curve_keys
    if d is None:
        return None
    if server:
        return CurveKeys(d / "server.key_secret", authorized_dir=d / "authorized")
    return CurveKeys(d / "client.key_secret", server_public_file=d / "server.key")


def make_keys(directory) -> Path:
    """A keys directory for every link: server and client certs, and the client's public
    cert authorised by the servers. Copy it to every host of the chain."""
    directory = Path(directory)
    generate_keys(directory)
    (directory / "authorized").mkdir(exist_ok=True)
    shutil.copy(directory / "client.key", directory / "authorized" / "client.key")
    return directory


def open_socket(ctx: zmq.Context, kind: int, address: str, bind: bool,
                cfg: ServicesConfig, identity: bytes | None = None) -> zmq.Socket:
    s = ctx.socket(kind)
    if identity is not None:
        s.identity = identity
    s.linger = LINGER_MS
    s.sndhwm = cfg.hwm
    s.rcvhwm = cfg.hwm
    keys = curve_keys(cfg, server=bind)
    if keys is not None:
        (secure_server if bind else secure_client)(s, keys)
    try:
        if bind:
            s.bind(address)
        else:
            s.connect(address)
    except zmq.ZMQError as e:
        s.close(linger=0)
        hint = "; is another service running there?" if e.errno == zmq.EADDRINUSE else ""
        raise GpusmdError(f"{address}: cannot {'bind' if bind else 'connect'} ({e.strerror})"
                          f"{hint}") from None
    return s


def setup_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


MAX_KINDS = 50         # kinds of problem told apart (per run, per log); the rest are "other"


def problem_kind(reason: str) -> str:
    """What problems of one kind share: the reason with its numbers left out."""
    return re.sub(r"\d+", "#", reason)[:80]


class QuietLog:
    """Log lines about what peers send, at a bounded rate: a line of a kind (by default
    the message with its numbers left out) goes out at once; the others of that kind in
    the next ``every_s`` are counted, and one line then says how many there were."""

    def __init__(self, logger: logging.Logger, every_s: float):
        self.logger = logger
        self.every_s = every_s
        self.kinds: dict[str, list] = {}       # kind -> [time of the next line, left out]

    def warning(self, message: str, kind: str | None = None):
        self.log(logging.WARNING, message, kind)

    def info(self, message: str, kind: str | None = None):
        self.log(logging.INFO, message, kind)

    def log(self, level: int, message: str, kind: str | None = None):
        message = message[:2 * REASON_CHARS]
        kind = problem_kind(message) if kind is None else kind
        now = self.tick()
        if kind not in self.kinds and len(self.kinds) >= MAX_KINDS:
            kind = "other"
        state = self.kinds.setdefault(kind, [0.0, 0])
        if now < state[0]:
            state[1] += 1
        else:
            self.logger.log(level, "%s", message)
            state[0] = now + self.every_s

    def tick(self) -> float:
        """Say how many lines of the kinds whose interval is over were left out, and
        forget those kinds (call it now and then); the time now."""
        now = time.monotonic()
        for kind, (next_t, left_out) in list(self.kinds.items()):
            if now >= next_t:
                if left_out:
                    self.logger.warning("%d more like: %s", left_out, kind)
                del self.kinds[kind]
        return now


class ErrorRecords:
    """A run's error records [event, stage, reason] on their way to /errors: at most
    ``keep`` of each kind of problem (see problem_kind); the others are counted, and
    ``close`` adds one record per such kind: [-1, stage, "N more like: <reason>"]."""

    def __init__(self, keep: int):
        self.keep = keep
        self.queue: list = []
        self.counts: dict[str, int] = {}
        self.more: dict[str, list] = {}       # kind -> [stage, a reason, count]
        self.closed = False

    def add(self, event: int, stage: str, reason: str):
        reason = reason[:REASON_CHARS]
        kind = problem_kind(reason)
        if kind not in self.counts and len(self.counts) >= MAX_KINDS:
            kind = "other"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= self.keep:
            self.queue.append([event, stage, reason])
        else:
            self.more.setdefault(kind, [stage, reason, 0])[2] += 1

    def take(self, n: int) -> list:
        records, self.queue = self.queue[:n], self.queue[n:]
        return records

    def give_back(self, records: list):
        self.queue[:0] = records

    def close(self):
        """The run is over: the counts of the records not kept join the queue."""
        if not self.closed:
            self.closed = True
            self.queue += [[-1, stage, f"{n} more like: {reason}"[:REASON_CHARS]]
                           for stage, reason, n in self.more.values()]
