"""A DAQ simulator / run replayer: sends a run (a raw HDF5 file, an XTC2 file or any
psana source) to the ingest node, event by event, at a given rate or as fast as the
chain takes them (its sends block when the ingest stops reading: that is the
backpressure). Its begin_run carries a random end_token that its end echoes: no other
peer sees it, so no one else can end the run early (services/ingest.py)."""
from __future__ import annotations

import logging
import secrets
import time
from contextlib import contextmanager

import zmq

from ..config import Config
from ..io.source import open_run
from ..replay import passthrough_names
from ..runinfo import RunInfo
from .common import open_socket
from .protocol import encode

log = logging.getLogger("gpusmd.publish")
READ_EVENTS = 16           # events read from the file at a time


def publish(source, config: Config, rate: float = 0.0, max_events: int | None = None,
            address: str | None = None, ctx: zmq.Context | None = None) -> int:
    """Send begin_run, the events and end; returns the number of events sent, once they
    have left this process. A psana source sends the config's detectors (all it reads
    when the config names none).

    Without ``ctx``, publish makes a zmq context of its own and terminates it at the end;
    its socket lingers without limit: ``term()`` returns when every message has gone out.
    With ``ctx``, publish waits until zmq has let go of the ``end``, the last message (a
    tracked frame, see :class:`zmq.MessageTracker`), so that all it sent has left the
    socket's queue, then closes the socket, which lingers ``common.LINGER_MS``, and leaves
    the context to the caller: ``ctx.term()`` from another thread ends a publish blocked
    by a reader that no longer reads (zmq.ContextTerminated). Stopped by an error,
    publish drops what is still queued."""
    own = ctx is None
    ctx = zmq.Context() if own else ctx
    cfg = config.services
    with _terminated(ctx, own), open_run(source, list(config.detectors) or None) as run:
        scalars = passthrough_names(config, run)
        info = RunInfo.from_run(run, scalars, experiment=config.experiment)
        sock = open_socket(ctx, zmq.PUSH, address or cfg.ingest_in, False, cfg)
        if own:
            sock.linger = -1
        try:
            header, arrays = info.to_message()
            token = secrets.token_hex(16)
            sock.send_multipart(encode({**header, "end_token": token}, arrays))
            t0 = time.perf_counter()
            n = 0
            for batch in run.batches(READ_EVENTS, max_events):
                for event_id, stage, reason in batch.errors:
                    log.warning("event %d not sent (%s): %s", event_id, stage, reason)
                for j in range(len(batch)):
                    if rate > 0:
                        delay = t0 + n / rate - time.perf_counter()
                        if delay > 0:
                            time.sleep(delay)
                    header = {"kind": "event", "run": run.run, "event": int(batch.event_id[j]),
                              "timestamp": int(batch.timestamp[j]),
                              "scalars": {s: batch.scalars[s][j].item() for s in scalars},
                              "steps": {det: int(st[j]) for det, st in batch.steps.items()}}
                    # zero-copy: zmq holds a reference to each array until it has sent it
                    sock.send_multipart(encode(header, {det: f[j]
                                                        for det, f in batch.frames.items()}),
                                        copy=False)
                    n += 1
            sent = sock.send_multipart(tracked(encode({"kind": "end", "run": run.run,
                                                       "n_events": n, "end_token": token})))
            while not (own or sent.done):
                sock.poll(10)       # raises ContextTerminated once ctx.term() is called
            seconds = time.perf_counter() - t0
        except BaseException:
            sock.close(linger=0)    # stopped midway: what is still queued is dropped
            raise
        finally:
            sock.close()
    log.info("published %d events in %.2f s (%.1f events/s)", n, seconds,
             n / seconds if seconds else float("inf"))
    return n


def tracked(frames: list) -> list:
    """The frames as zmq.Frames that zmq takes without copying and whose tracker says
    when it has let go of them."""
    return [zmq.Frame(f, copy=False, track=True) for f in frames]


@contextmanager
def _terminated(ctx: zmq.Context, own: bool):
    """Terminate a context of our own on leaving: term() waits until every socket's
    queue has gone out (each socket's linger)."""
    try:
        yield
    finally:
        if own:
            ctx.term()
