"""A DAQ simulator / raw-file replayer: sends a raw run to the ingest node, event by
event, at a given rate or as fast as the chain takes them (its sends block when the
ingest stops reading: that is the backpressure)."""
from __future__ import annotations

import logging
import time

import zmq

from ..config import Config
from ..io.raw import RawRun
from ..replay import passthrough_names
from ..runinfo import RunInfo
from .common import open_socket
from .protocol import encode

log = logging.getLogger("gpusmd.publish")
READ_EVENTS = 16           # events read from the file at a time


def publish(raw_path, config: Config, rate: float = 0.0, max_events: int | None = None,
            address: str | None = None, ctx: zmq.Context | None = None) -> int:
    """Send begin_run, the events and end; returns the number of events sent."""
    ctx = ctx or zmq.Context.instance()
    cfg = config.services
    sock = open_socket(ctx, zmq.PUSH, address or cfg.ingest_in, False, cfg)
    sock.linger = -1            # everything queued is delivered before close returns
    try:
        with RawRun(raw_path) as run:
            scalars = passthrough_names(config, run)
            info = RunInfo.from_raw(run, scalars)
            sock.send_multipart(encode(*info.to_message()))
            n = run.n_events if max_events is None else min(max_events, run.n_events)
            steps = {det: run.steps(det) for det in run.detectors}
            t0 = time.perf_counter()
            for start in range(0, n, READ_EVENTS):
                stop = min(n, start + READ_EVENTS)
                frames = {det: run.read(det, start, stop) for det in run.detectors}
                for i in range(start, stop):
                    if rate > 0:
                        delay = t0 + i / rate - time.perf_counter()
                        if delay > 0:
                            time.sleep(delay)
                    header = {"kind": "event", "run": run.run, "event": int(run.event_id[i]),
                              "timestamp": int(run.timestamp[i]),
                              "scalars": {s: run.scalars[s][i].item() for s in scalars},
                              "steps": {det: int(steps[det][i]) for det in run.detectors}}
                    sock.send_multipart(encode(header, {det: f[i - start]
                                                        for det, f in frames.items()}),
                                        copy=False)
            sock.send_multipart(encode({"kind": "end", "run": run.run}))
            seconds = time.perf_counter() - t0
        log.info("published %d events in %.2f s (%.1f events/s)", n, seconds,
                 n / seconds if seconds else float("inf"))
        return n
    finally:
        sock.close()
