"""A worker: asks the ingest node for batches (credits), reduces them with the same
per-detector processing as the in-process replay, and sends the results to the sink.

A second socket sends heartbeats from a thread, so a long batch does not make the
worker look dead; a killed worker stops them, and the ingest re-sends its batches."""
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
from ..replay import build_processors, reduce_frames
from ..runinfo import RunInfo
from .common import open_socket
from .metrics import Metrics
from .protocol import ProtocolError, decode, encode

log = logging.getLogger("gpusmd.worker")


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, config: Config, backend: Backend, name: str | None = None,
                 once: bool = False, metrics_port: int | None = None, delay_s: float = 0.0,
                 ctx: zmq.Context | None = None):
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
        self.metrics = Metrics("worker", self.cfg.log_every_s, metrics_port)
        self.runs: dict[int, dict] = {}           # run -> processors
        self.infos: dict[int, RunInfo] = {}
        self._stop = threading.Event()

    def heartbeat(self):
        hb = open_socket(self.ctx, zmq.DEALER, self.cfg.ingest_work, False, self.cfg,
                         identity=f"{self.name}/hb".encode())
        try:
            while not self._stop.wait(self.cfg.heartbeat_s):
                hb.send_multipart(encode({"kind": "heartbeat", "worker": self.name}))
        finally:
            hb.close(linger=0)

    def send_ready(self, credit: int):
        self.work.send_multipart(encode({"kind": "ready", "worker": self.name, "credit": credit}))

    def on_begin_run(self, msg):
        info = RunInfo.from_message(msg.header, msg.arrays)
        self.infos = {info.run: info}
        self.runs = {info.run: build_processors(self.config, info, self.backend)}
        log.info("run %d: processors for %s on backend %s", info.run,
                 ", ".join(self.runs[info.run]), self.backend.name)

    def on_batch(self, msg):
        h = msg.header
        run, batch = h["run"], h["batch"]
        events = h["events"]
        info, procs = self.infos.get(run), self.runs.get(run)
        ids = [e["event"] for e in events]
        errors = []
        columns, sums, good = {}, {}, list(range(len(events)))
        if procs is None:
            errors = [[i, "worker", f"no begin_run for run {run}"] for i in ids]
            good = []
        else:
            good, bad = self.check_frames(msg, events, info)
            errors += bad
            try:
                if good:
                    frames = {det: np.stack([msg.arrays[f"{i}/{det}"] for i in good])
                              for det in procs}
                    steps = {det: np.array([int(events[i]["steps"].get(det, 0)) for i in good])
                             for det in procs}
                    columns = reduce_frames(procs, frames, steps, self.config.user_functions)
                for det, proc in procs.items():
                    for key, part in proc.sums.take().items():
                        sums[f"sums/{det}/{key}"] = part
            except Exception as e:       # one bad batch must not stop the worker
                log.exception("batch %d failed", batch)
                errors += [[ids[i], "worker", f"processing failed: {type(e).__name__}: {e}"]
                           for i in good]
                good, columns, sums = [], {}, {}
                for proc in procs.values():
                    proc.sums.reset()
        header = {"kind": "result", "run": run, "batch": batch, "worker": self.name,
                  "backend": self.backend.name,
                  "events": [ids[i] for i in good],
                  "timestamps": [events[i]["timestamp"] for i in good],
                  "scalars": {n: [events[i]["scalars"][n] for i in good]
                              for n in (info.scalars if info else {})},
                  "n_sum_events": len(good), "errors": errors}
        self.sink.send_multipart(encode(header, {**flatten_columns(columns), **sums}), copy=False)
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
                bad.append([e["event"], "worker", problem])
            else:
                good.append(i)
        return good, bad

    def run(self):
        beat = threading.Thread(target=self.heartbeat, daemon=True)
        beat.start()
        self.send_ready(self.cfg.credits)
        try:
            while True:
                if not self.work.poll(200):
                    self.metrics.tick()
                    continue
                frames = self.work.recv_multipart(copy=False)
                try:
                    msg = decode(frames)
                except ProtocolError as e:
                    log.warning("bad message from the ingest: %s", e)
                    continue
                if msg.kind == "begin_run":
                    try:
                        self.on_begin_run(msg)
                    except GpusmdError as e:
                        log.error("cannot process run %s: %s", msg.header.get("run"), e)
                elif msg.kind == "batch":
                    time.sleep(self.delay_s)
                    self.on_batch(msg)
                    self.send_ready(1)
                elif msg.kind == "end":
                    log.info("run %s ended", msg.header.get("run"))
                    if self.once:
                        return
                self.metrics.tick()
        finally:
            self._stop.set()
            beat.join(timeout=2)
            self.close()

    def close(self):
        self.metrics.close()
        self.work.close()
        self.sink.close()
