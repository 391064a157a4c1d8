"""A DAQ simulator / run replayer: sends a run (a raw HDF5 file, an XTC2 file or any
psana source) to the ingest node, event by event, at a given rate or as fast as the
chain takes them (its sends block when the ingest stops reading: that is the
backpressure)."""
from __future__ import annotations

import logging
import time

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
    """Send begin_run, the events and end; returns the number of events sent. A psana
    source sends the config's detectors (all it reads when the config names none)."""
    ctx = ctx or zmq.Context.instance()
    cfg = config.services
    with open_run(source, list(config.detectors) or None) as run:
        scalars = passthrough_names(config, run)
        info = RunInfo.from_run(run, scalars)
        sock = open_socket(ctx, zmq.PUSH, address or cfg.ingest_in, False, cfg)
        sock.linger = -1            # everything queued is delivered before close returns
        try:
            sock.send_multipart(encode(*info.to_message()))
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
                    sock.send_multipart(encode(header, {det: f[j]
                                                        for det, f in batch.frames.items()}),
                                        copy=False)
                    n += 1
            sock.send_multipart(encode({"kind": "end", "run": run.run}))
            seconds = time.perf_counter() - t0
        finally:
            sock.close()
    log.info("published %d events in %.2f s (%.1f events/s)", n, seconds,
             n / seconds if seconds else float("inf"))
    return n
