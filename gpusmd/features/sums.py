"""Per-run sum images (DESIGN §8 'sums'), written to /Sums/<det>_<key>.

calib: sum of calibrated frames; calib_square: sum of squares; calib_max: pixel-wise
maximum; calib_thresADU<N>: sum of values above N; calib_nhits<N>: number of events
with a value above N (N = 0 when omitted)."""
from __future__ import annotations

import numpy as np


def _threshold(key: str, prefix: str) -> float:
    return float(key[len(prefix):] or 0)


# the kinds of kernels/run_sums.cu, by key prefix (calib_max is kept apart)
SUM_KINDS = (("calib_square", 1), ("calib_thresADU", 2), ("calib_nhits", 3), ("calib", 0))


def sum_kind(key: str) -> tuple[int, float]:
    """(kind, threshold) of a sum key for kernels/run_sums.cu."""
    for prefix, kind in SUM_KINDS:
        if key == prefix or (kind in (2, 3) and key.startswith(prefix)):
            return kind, _threshold(key, prefix)
    raise KeyError(key)


class Accumulators:
    """One set of run-sum accumulators: the sums as rows of one (nsums, *shape) float64
    array ``stack`` (one kernel adds them all), calib_max apart in float32 (``maxima``);
    ``views`` by key."""

    def __init__(self, keys, sum_keys, shape, xp):
        self.stack = xp.zeros((len(sum_keys), *shape), dtype=xp.float64)
        self.maxima = (xp.full(shape, -np.inf, dtype=xp.float32) if "calib_max" in keys
                       else None)
        rows = {key: self.stack[k] for k, key in enumerate(sum_keys)}
        self.views = {key: self.maxima if key == "calib_max" else rows[key] for key in keys}

    def reset(self):
        self.stack.fill(0)
        if self.maxima is not None:
            self.maxima.fill(-np.inf)


class RunSums:
    def __init__(self, keys, shape, backend):
        self.keys = list(keys)
        self.shape = tuple(shape)
        self.backend = backend
        self.sum_keys = [k for k in self.keys if k != "calib_max"]
        self.current = self._fresh()
        self._spare = None
        self.n_events = 0

    def _fresh(self) -> Accumulators:
        return Accumulators(self.keys, self.sum_keys, self.shape, self.backend.xp)

    @property
    def acc(self) -> dict:
        return self.current.views

    def reset(self):
        self.n_events = 0
        self.current.reset()

    def take(self) -> dict[str, np.ndarray]:
        """The partial sums so far (host arrays, full precision), then start from zero:
        a service worker sends each batch's part with its results. The part stays valid
        until the next take (two sets of accumulators take turns: no allocation per batch)."""
        part = {key: self.backend.to_host(acc) for key, acc in self.acc.items()}
        spare = self._spare if self._spare is not None else self._fresh()
        self._spare, self.current = self.current, spare
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
        """Add a batch (B, *shape) of calibrated frames: on a GPU every image in one read
        of the batch (kernels/run_sums.cu), here with array operations (its reference)."""
        if self.backend.is_gpu and self.keys:
            from ..cuda import run_sums
            self.n_events += len(calib)
            run_sums(calib, self.sum_keys, self.current)
            return
        self.update_reference(calib)

    def update_reference(self, calib):
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
