"""Spectrum (DESIGN §8): per event, the histogram of the good pixels' values, as
smalldata_tools' spectrumFunc.

Bins, either key:

* ``bins: [lo, hi, n]`` with n an integer: n equal bins from lo to hi (n + 1 edges);
* ``bins: [lo, hi, step]`` with step a float (``1.0``, not ``1``): bins of width step from
  lo; the last edge is the first of lo + k step that is >= hi (so it may pass hi when
  step does not divide hi - lo);
* ``bins: [e0, e1, e2, e3, ...]`` (4 or more increasing numbers) or ``edges: [...]`` (2 or
  more): explicit edges. Three edges can only be given with ``edges`` (in ``bins`` three
  numbers always mean lo, hi and a count or a step).

Counting follows numpy.histogram: bins are [e_i, e_i+1), the last one includes its upper
edge; values outside, NaN and masked pixels are not counted. ``mask`` names the detector
mask (default cmask; applies to the detector's frames only, see projection.py). Field
``histogram``: int32 (B, nbins). /UserDataCfg gets the edges.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import Where, check_type
from ..cuda import SPECTRUM_MAX_BINS, spectrum_gpu
from . import Feature, register
from .projection import check_mask_name, input_mask

NUMBER = (int, float)


def parse_edges(params, where: Where) -> np.ndarray:
    """The bin edges (float64) from ``bins`` or ``edges``."""
    if ("bins" in params) == ("edges" in params):
        raise where.error("give either 'bins' or 'edges'" if "bins" in params
                          else "required key 'bins' (or 'edges') is missing")
    key = "bins" if "bins" in params else "edges"
    w = where / key
    value = check_type(params[key], (list, tuple), w, "a list of numbers")
    for i, v in enumerate(value):
        check_type(v, NUMBER, w / i, "a number")
    if key == "bins" and len(value) == 3:
        lo, hi, third = value
        if not hi > lo:
            raise w.error(f"high edge {hi} is not above low edge {lo}")
        if isinstance(third, int):
            if third < 1:
                raise (w / 2).error(f"the number of bins must be at least 1, got {third}")
            return np.linspace(float(lo), float(hi), third + 1)
        if not third > 0:
            raise (w / 2).error(f"the bin width must be positive, got {third}")
        n = max(1, math.ceil((hi - lo) / third - 1e-9))
        if n > 10_000_000:
            raise (w / 2).error(f"{n} bins is too many")
        return float(lo) + float(third) * np.arange(n + 1)
    if key == "bins" and len(value) < 4:
        raise w.error("expected [lo, hi, n], [lo, hi, step] or 4 or more edges "
                      "(use 'edges' for fewer)")
    if len(value) < 2:
        raise w.error("expected at least 2 edges")
    edges = np.asarray(value, np.float64)
    if not np.all(np.diff(edges) > 0):
        raise w.error("edges must increase")
    return edges


@register
class Spectrum(Feature):
    kind = "spectrum"
    name_prefix = "spectrum"
    PARAMS = ("bins", "edges", "mask")

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        parse_edges(params, where)
        check_mask_name(params, where)

    def __init__(self, name, params, model, masks, backend, where, input_shape=None):
        super().__init__(name, params, model, masks, backend, where, input_shape)
        xp = backend.xp
        self.edges = parse_edges(params, where)
        self.nbins = len(self.edges) - 1
        mask = input_mask(self, params, where)
        self.good = None if mask is None or mask.all() else xp.asarray(mask.reshape(-1) != 0)
        # the kernel reads the good pixels from the frames through this list (no copy)
        self.pixels = None if self.good is None else xp.flatnonzero(self.good).astype(xp.int64)
        self.mask_name = "none" if mask is None else params.get("mask", "cmask")
        self.d_edges = xp.asarray(self.edges)           # (counts_array's xp)
        width = np.diff(self.edges)
        self.uniform = bool(np.allclose(width, width[0], rtol=1e-9, atol=0))

    def process(self, calib):
        xp = self.backend.xp
        nb = len(calib)
        frames = calib.reshape(nb, -1)
        if self.backend.is_gpu and self.nbins <= SPECTRUM_MAX_BINS:
            # the kernel: private shared-memory bins per block
            return {"histogram": spectrum_gpu(frames, self.edges, self.pixels)}
        values = frames if self.good is None else frames[:, self.good]
        if not self.backend.is_gpu:          # NumPy's own histogram is the fast path here
            counts = [np.histogram(v, self.edges)[0] for v in values]
            return {"histogram": np.asarray(counts, np.int32).reshape(nb, self.nbins)}
        return {"histogram": self.counts_array(xp, values)}

    def counts_array(self, xp, values):
        """(B, nbins) int32 counts of (B, npix) values, vectorised (the GPU path)."""
        nb = len(values)
        if self.uniform:
            # arithmetic bin, then corrected against the edges (as numpy.histogram does)
            lo, hi = self.edges[0], self.edges[-1]
            pos = (values - lo) * (self.nbins / (hi - lo))
            pos = xp.where(xp.isfinite(pos), pos, -1.0)
            idx = xp.clip(xp.floor(pos), -1, self.nbins).astype(xp.int64)
            inner = xp.clip(idx, 0, self.nbins - 1)
            idx = idx - ((idx == inner) & (values < self.d_edges[inner]))
            idx = idx + ((idx == inner) & (values >= self.d_edges[inner + 1]))
            idx = idx - ((idx == self.nbins) & (values < hi))
        else:
            idx = xp.searchsorted(self.d_edges, values, side="right") - 1
        idx = xp.where(values == self.d_edges[-1], self.nbins - 1, idx)   # last bin is closed
        ok = (idx >= 0) & (idx < self.nbins)
        flat = idx + (xp.arange(nb) * self.nbins)[:, None]
        counts = xp.bincount(flat[ok], minlength=nb * self.nbins)
        return counts.reshape(nb, self.nbins).astype(xp.int32)

    def config_items(self):
        return {"edges": self.edges,
                "mask": self.mask_name}
