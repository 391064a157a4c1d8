"""Per-run sum images (DESIGN §8 'sums'), written to /Sums/<det>_<key>.

calib: sum of calibrated frames; calib_square: sum of squares; calib_max: pixel-wise
maximum; calib_thresADU<N>: sum of values above N; calib_nhits<N>: number of events
with a value above N (N = 0 when omitted)."""
from __future__ import annotations

import numpy as np


def _threshold(key: str, prefix: str) -> float:
    return float(key[len(prefix):] or 0)


class RunSums:
    def __init__(self, keys, shape, backend):
        self.keys = list(keys)
        self.shape = tuple(shape)
        self.backend = backend
        self.acc = self._fresh()
        self._spare = None
        self.n_events = 0

    def _fresh(self) -> dict:
        xp = self.backend.xp
        return {key: xp.full(self.shape, -np.inf, dtype=xp.float32) if key == "calib_max"
                else xp.zeros(self.shape, dtype=xp.float64) for key in self.keys}

    def reset(self):
        self.n_events = 0
        for key, acc in self.acc.items():
            acc.fill(-np.inf if key == "calib_max" else 0)

    def take(self) -> dict[str, np.ndarray]:
        """The partial sums so far (host arrays, full precision), then start from zero:
        a service worker sends each batch's part with its results. The part stays valid
        until the next take (two sets of accumulators take turns: no allocation per batch)."""
        part = {key: self.backend.to_host(acc) for key, acc in self.acc.items()}
        spare = self._spare if self._spare is not None else self._fresh()
        self._spare, self.acc = self.acc, spare
        self.reset()
        return part

    def merge(self, part: dict[str, np.ndarray], n_events: int):
        """Add a part made by ``take`` (in batch order, this gives the same numbers as
        accumulating the batches here)."""
        xp = self.backend.xp
        self.n_events += n_events
        for key, acc in self.acc.items():
            value = xp.asarray(part[key])
            if key == "calib_max":
                xp.maximum(acc, value, out=acc)
            else:
                acc += value

    def update(self, calib):
        """Add a batch (B, *shape) of calibrated frames."""
        xp = self.backend.xp
        self.n_events += len(calib)
        for key, acc in self.acc.items():
            if key == "calib":
                acc += calib.sum(axis=0, dtype=xp.float64)
            elif key == "calib_square":
                acc += (calib.astype(xp.float64) ** 2).sum(axis=0)
            elif key == "calib_max":
                xp.maximum(acc, calib.max(axis=0), out=acc)
            elif key.startswith("calib_thresADU"):
                thr = _threshold(key, "calib_thresADU")
                acc += xp.where(calib > thr, calib, 0).sum(axis=0, dtype=xp.float64)
            elif key.startswith("calib_nhits"):
                acc += (calib > _threshold(key, "calib_nhits")).sum(axis=0)

    def result(self) -> dict[str, np.ndarray]:
        return {key: self.backend.to_host(acc).astype(np.float32) for key, acc in self.acc.items()}
