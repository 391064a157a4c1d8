"""A reduced-rate preview of the open run, published by the sink (``services.preview``,
a ZeroMQ PUB address; ``services.preview_hz`` messages a second at most).

One message (kind "preview", services/protocol.py) holds what a live monitor shows
(``gpusmd monitor``, gpusmd/monitor.py):

header   run, experiment, time, seq, n_events (written), n_errors, waiting_batches,
         refused, duplicates, rate (events/s over the last messages), state ("run": a run
         is open, "idle": the sink waits for one), the ingest's pending, in_flight and
         n_workers (its last heartbeat; -1 where not known), workers {name: {backend,
         host, pid, events, rate}} (from the results written), per detector {units, type,
         n_summed, n_recent, pixel_um, extent [left, right, bottom, top] in mm, azav
         names}; strips: the names of the strip charts
arrays   "<det>/mean": the run's mean calibrated image (the sink's /Sums/<det>_calib over
         its events), assembled from the pixel coordinates (gpusmd.geometry.assemble)
         and binned down to at most MAX_IMAGE pixels a side; "<det>/recent": the same of
         the events since the previous message; "<det>/<azav>/q", "/last" (the latest
         event's profile), "/mean" (the run's mean profile, phi bins weighted by their
         pixels); "strip/event_id" and "strip/<name>": the last STRIP_LEN values of each
         per-event scalar and one-value-per-event column (ROI sums, beam intensity,
         droplet counts, ...)

The socket never holds the sink back: a send high-water mark of PREVIEW_HWM, sends with
NOBLOCK, a message the link cannot take now is dropped and counted (``dropped``); with
no subscriber, PUB drops by itself. An address that cannot be bound turns the preview
off with one warning (the sink goes on)."""
from __future__ import annotations

import logging
import math
import time
from collections import deque

import numpy as np
import zmq

from ..geometry import detector_coords, image_index
from .common import curve_keys
from .protocol import encode, is_int
from .security import secure_server

log = logging.getLogger("gpusmd.preview")
PREVIEW_HWM = 2         # messages queued per subscriber; more are dropped
STRIP_LEN = 600         # values of each strip chart
MAX_STRIPS = 32         # strip charts of a run
MAX_IMAGE = 512         # pixels a side of a preview image (binned down to this)
MAX_WORKERS = 256       # workers shown
IDLE_EVERY_S = 1.0      # with no run open, a short "idle" message this often


def _pixel_pitch(x, y) -> float:
    step = np.hypot(np.diff(x, axis=-1), np.diff(y, axis=-1)).ravel()
    step = step[step > 0]
    return float(np.round(np.median(step), 3)) if step.size else 1.0


class DetectorView:
    """One detector of the open run: its placement and azav axes (made once per run)."""

    def __init__(self, name: str, proc):
        self.name = name
        self.proc = proc
        x, y, _ = detector_coords(proc.model)
        self.pixel_um = _pixel_pitch(x, y)
        self.x, self.y = x, y
        rows, cols = image_index(np.asarray(x), np.asarray(y), self.pixel_um)
        self.image_shape = (int(rows.max()) + 1, int(cols.max()) + 1)
        # each pixel's bin of the preview image (placed as by assemble, binned by k)
        k = max(1, math.ceil(max(self.image_shape) / MAX_IMAGE))
        self.binned_shape = (math.ceil(self.image_shape[0] / k), math.ceil(self.image_shape[1] / k))
        self.bins = ((rows.ravel() // k) * self.binned_shape[1] + cols.ravel() // k).astype(np.intp)
        self.n_bins = self.binned_shape[0] * self.binned_shape[1]
        self.counts = np.bincount(self.bins, minlength=self.n_bins)
        pm = self.pixel_um / 1e3
        xmin, ymin = float(np.min(x)) / 1e3, float(np.min(y)) / 1e3
        self.extent = [ymin - pm / 2, ymin + (self.image_shape[1] - 0.5) * pm,
                       xmin + (self.image_shape[0] - 0.5) * pm, xmin - pm / 2]
        self.azavs = {}                 # name -> {q, npix}
        for f in proc.features:
            if f.kind == "azav":
                items = f.config_items()
                if "q" in items:
                    self.azavs[f.name] = {"q": np.asarray(items["q"], np.float64),
                                          "npix": items.get("npix")}
        self.azav_last: dict[str, np.ndarray] = {}
        self.azav_sum: dict[str, np.ndarray] = {}
        self.azav_n: dict[str, np.ndarray] = {}
        self.previous: tuple[np.ndarray, int] | None = None     # calib sum, n at last send

    def add_azav(self, name: str, values: np.ndarray):
        """A batch's azav column (n, [nphi,] nq): its profiles into the latest and mean."""
        if len(values) == 0:
            return
        nq = values.shape[-1]
        v = np.asarray(values, np.float64).reshape(len(values), -1, nq)
        npix = self.azavs[name]["npix"]
        w = (np.ones(v.shape[1:]) if npix is None or np.size(npix) != v[0].size
             else np.asarray(npix, np.float64).reshape(v.shape[1:]))
        w = np.where(np.isfinite(v), w, 0.0)
        weight = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            prof = np.where(weight > 0, np.nansum(np.where(w > 0, v, 0) * w, axis=1) / weight,
                            np.nan)
        self.azav_last[name] = prof[-1]
        good = np.isfinite(prof)
        if name not in self.azav_sum or self.azav_sum[name].shape != (nq,):
            self.azav_sum[name], self.azav_n[name] = np.zeros(nq), np.zeros(nq)
        self.azav_sum[name] += np.where(good, prof, 0).sum(axis=0)
        self.azav_n[name] += good.sum(axis=0)

    def image(self, values) -> np.ndarray:
        """A raw-shaped image placed by the pixel coordinates (gpusmd.geometry.assemble,
        its index made once per run), binned down."""
        v = np.asarray(values, np.float64).ravel()
        bins, counts = self.bins, self.counts
        finite = np.isfinite(v)
        if not finite.all():
            bins, v = bins[finite], v[finite]
            counts = np.bincount(bins, minlength=self.n_bins)
        total = np.bincount(bins, weights=v, minlength=self.n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            img = np.where(counts > 0, total / counts, np.nan)
        return img.astype(np.float32).reshape(self.binned_shape)

    def snapshot(self, header: dict, arrays: dict):
        """This detector's part of a message (the images from the run sums)."""
        sums = self.proc.sums
        d = {"units": self.proc.units, "type": self.proc.model.type, "pixel_um": self.pixel_um,
             "extent": self.extent, "n_summed": int(sums.n_events), "n_recent": 0,
             "azav": list(self.azavs)}
        if "calib" in sums.acc:
            total, n = np.asarray(sums.acc["calib"], np.float64), int(sums.n_events)
            if n:
                arrays[f"{self.name}/mean"] = self.image(total / n)
            if self.previous is not None and n > self.previous[1]:
                d["n_recent"] = n - self.previous[1]
                arrays[f"{self.name}/recent"] = self.image((total - self.previous[0])
                                                           / (n - self.previous[1]))
            if self.previous is None or n > self.previous[1]:
                self.previous = (total.copy(), n)
        for name, az in self.azavs.items():
            if name in self.azav_last:
                arrays[f"{self.name}/{name}/q"] = az["q"]
                arrays[f"{self.name}/{name}/last"] = self.azav_last[name]
                with np.errstate(invalid="ignore", divide="ignore"):
                    arrays[f"{self.name}/{name}/mean"] = np.where(
                        self.azav_n[name] > 0, self.azav_sum[name] / self.azav_n[name], np.nan)
        header["detectors"][self.name] = d


class RunView:
    """What the preview keeps of the open run between messages."""

    def __init__(self, writer):
        self.writer = writer
        self.run = writer.info.run
        self.detectors = {det: DetectorView(det, proc) for det, proc in writer.procs.items()}
        self.strips: dict[str, deque] = {}
        self.event_ids: deque = deque(maxlen=STRIP_LEN)
        self.workers: dict[str, dict] = {}      # name -> backend, host, pid, events written

    def add(self, msg):
        h = msg.header
        n = len(h["events"])
        self.count_worker(h, n)
        if not n:
            return
        self.event_ids.extend(h["events"])
        columns = {name: h["scalars"][name] for name in self.writer.info.scalars}
        columns.update({name: a for name, a in msg.arrays.items()
                        if a.ndim == 1 and len(a) == n and not name.startswith("sums/")
                        and "#" not in name})
        for name, values in columns.items():
            strip = self.strips.get(name)
            if strip is None:
                if len(self.strips) >= MAX_STRIPS:
                    continue
                strip = self.strips[name] = deque([math.nan] * (len(self.event_ids) - n),
                                                  maxlen=STRIP_LEN)
            strip.extend(float(v) for v in np.asarray(values, np.float64))
        for det, view in self.detectors.items():
            for name in view.azavs:
                a = msg.arrays.get(f"{det}/{name}_azav")
                if a is not None and a.ndim >= 2 and len(a) == n:
                    view.add_azav(name, a)

    def count_worker(self, h: dict, n: int):
        """The events of a result to the worker that made it (what it says of itself is
        shown only when it is a short string or an int)."""
        name = h.get("worker")
        if not (isinstance(name, str) and 0 < len(name) <= 64):
            return
        w = self.workers.get(name)
        if w is None:
            if len(self.workers) >= MAX_WORKERS:
                return
            w = self.workers[name] = {"events": 0}
        for key in ("backend", "host"):
            if isinstance(h.get(key), str) and len(h[key]) <= 64:
                w[key] = h[key]
        if is_int(h.get("pid")):
            w["pid"] = h["pid"]
        w["events"] += n


class Preview:
    """The sink's preview publisher; ``result`` with every result taken, ``tick`` in the
    sink's loop."""

    def __init__(self, ctx: zmq.Context, address: str, hz: float, cfg=None):
        self.address = address
        self.period = 1.0 / hz
        self.last_sent = -math.inf
        self.seq = 0
        self.dropped = 0
        self.sent = 0
        self.dirty = False
        self.view: RunView | None = None
        self.rates: deque = deque(maxlen=8)     # (time, events written, per worker)
        self.socket = ctx.socket(zmq.PUB)
        self.socket.sndhwm = PREVIEW_HWM
        self.socket.linger = 0
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)    # a full link: Again, counted
        keys = curve_keys(cfg, server=True) if cfg is not None else None
        if keys is not None:
            secure_server(self.socket, keys)
        try:
            self.socket.bind(address)
        except zmq.ZMQError as e:
            log.warning("preview off: cannot bind %s (%s)", address, e.strerror)
            self.socket.close(linger=0)
            self.socket = None

    @classmethod
    def from_config(cls, cfg, ctx: zmq.Context) -> "Preview | None":
        """The preview of ``services.preview``; None when it is off (null or empty)."""
        if not getattr(cfg, "preview", None):
            return None
        return cls(ctx, cfg.preview, cfg.preview_hz, cfg)

    def result(self, sink, msg):
        """A result the sink took (fresh, checked): into the view; a message when due."""
        try:
            c = sink.current
            if c is None:
                return
            if self.view is None or self.view.writer is not c:
                self.view = RunView(c)
                self.rates.clear()
            self.view.add(msg)
            self.dirty = True
            self._tick(sink)
        except Exception as e:          # the preview never stops the sink
            log.warning("preview: %s: %s", type(e).__name__, e)

    def tick(self, sink):
        """Send a message if one is due: at most one per period, an idle one every
        IDLE_EVERY_S while no run is open."""
        try:
            self._tick(sink)
        except Exception as e:          # the preview never stops the sink
            log.warning("preview: %s: %s", type(e).__name__, e)

    def _tick(self, sink):
        now = time.monotonic()
        if self.socket is None or now - self.last_sent < self.period:
            return
        c = sink.current
        if c is None or self.view is None or self.view.writer is not c:
            if now - self.last_sent < IDLE_EVERY_S:
                return
            header, arrays = self.health(sink, now, None), {}
        elif not self.dirty and now - self.last_sent < IDLE_EVERY_S:
            return
        else:
            header, arrays = self.snapshot(sink, now)
        self.last_sent = now
        self.dirty = False
        self.send(header, arrays)

    def health(self, sink, now: float, c) -> dict:
        m = sink.metrics
        info = c.info if c is not None else None
        n = c.n_written if c is not None else 0
        workers = self.view.workers if c is not None and self.view is not None else {}
        self.rates.append((now, n, {k: w["events"] for k, w in workers.items()}))
        t0, n0, w0 = self.rates[0]
        dt = now - t0
        ingest = getattr(c, "announced", None) or {}
        return {"kind": "preview", "seq": self.seq, "time": time.time(),
                "state": "run" if c is not None else "idle",
                "run": info.run if info else -1,
                "experiment": (info.experiment or "") if info else "",
                "n_events": n, "n_errors": c.n_errors if c is not None else 0,
                "n_announced": (info.n_events or 0) if info else 0,
                "waiting_batches": len(c.results) if c is not None else 0,
                "refused": int(m.get("refused")), "duplicates": int(m.get("duplicates")),
                "dropped": self.dropped,
                "rate": (n - n0) / dt if dt > 0 else 0.0,
                # the ingest's last heartbeat: its queue (-1: not known)
                **{key: ingest.get(key) if is_int(ingest.get(key)) else -1
                   for key in ("pending", "in_flight", "n_workers")},
                "workers": {k: {**w, "rate": (w["events"] - w0.get(k, 0)) / dt if dt > 0 else 0.0}
                            for k, w in workers.items()},
                "detectors": {}, "strips": []}

    def snapshot(self, sink, now: float) -> tuple[dict, dict]:
        view = self.view
        header = self.health(sink, now, sink.current)
        arrays: dict = {}
        for d in view.detectors.values():
            d.snapshot(header, arrays)
        if view.event_ids:
            arrays["strip/event_id"] = np.asarray(view.event_ids, np.int64)
            for name, strip in view.strips.items():
                arrays[f"strip/{name}"] = np.asarray(strip, np.float64)
            header["strips"] = list(view.strips)
        return header, arrays

    def send(self, header: dict, arrays: dict) -> bool:
        """One message, never waiting: False (counted in ``dropped``) when the link
        cannot take it now."""
        header["seq"] = self.seq
        self.seq += 1
        try:
            self.socket.send_multipart(encode(header, arrays), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self):
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
