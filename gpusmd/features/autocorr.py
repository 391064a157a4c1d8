"""Autocorrelation (DESIGN §8): the masked spatial intensity autocorrelation of a 2-D
region, as smalldata_tools' autocorrFunc, for speckle contrast / size.

Parameters: ``roi`` (half-open [lo, hi) per axis of the input, as the ROI's bounds; for a
segmented detector the segment range must hold one segment; default: the whole input when
it is 2-D), ``mask`` (a mask name, default cmask; the detector's frames only),
``thresADU`` (lo or [lo, hi]: values outside count as 0, as in the ROI), ``save_range``
([r, c] half-widths of the central region kept, default [50, 50]).

Normalisation (symmetric, as in XPCS; Schaetzel): with A = I m (the thresholded image
times the mask m) and N the zero-padded FFT (no wrap-around),

    g2(d) = S_AA(d) S_mm(d) / (S_Am(d) S_mA(d)),
    S_AA(d) = sum_r A(r) A(r+d),  S_mm(d) = sum_r m(r) m(r+d),
    S_Am(d) = sum_r A(r) m(r+d),  S_mA(d) = sum_r m(r) A(r+d) = S_Am(-d),

i.e. <I(r) I(r+d)> / (<I(r)> <I(r+d)>) with each mean over the pixel pairs that exist at
lag d. g2(0) = <I^2> / <I>^2 = 1 + contrast^2 (2 for fully developed speckle), g2 -> 1 at
lags past the speckle size. A lag with no pixel pair, or an event with no intensity, gives
NaN. Field ``autocorr``: float32 (B, 2 r + 1, 2 c + 1), lag 0 in the centre (fftshift
order: row index i is lag i - r); ``cr``: the mean intensity over good pixels (B,).
The FFTs are xp.fft (cuFFT on the GPU), real-to-complex, batched over events.
"""
from __future__ import annotations

import numpy as np

from ..config import Where, check_type
from . import Feature, register
from .projection import apply_thresholds, check_mask_name, input_mask
from .roi import parse_thresholds

DEFAULT_SAVE_RANGE = (50, 50)


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (FFT-friendly)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _check_int_pairs(value, where: Where, what: str, length=None):
    check_type(value, (list,), where, what)
    if length is not None and len(value) != length:
        raise where.error(f"expected {what}, got {value!r}")
    for i, v in enumerate(value):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise (where / i).error(f"expected a non-negative integer, got {v!r}")


@register
class Autocorrelation(Feature):
    kind = "autocorr"
    name_prefix = "autocorr"
    PARAMS = ("roi", "mask", "thresADU", "save_range")

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        if "roi" in params:
            roi = check_type(params["roi"], (list,), where / "roi", "a list of [lo, hi] ranges")
            for i, pair in enumerate(roi):
                ok = (isinstance(pair, list) and len(pair) == 2
                      and all(isinstance(v, int) and not isinstance(v, bool) for v in pair))
                if not ok:
                    raise (where / "roi" / i).error(f"expected [lo, hi] integers, got {pair!r}")
        if "save_range" in params:
            _check_int_pairs(params["save_range"], where / "save_range", "[rows, cols]", 2)
        parse_thresholds(params.get("thresADU"), where / "thresADU")
        check_mask_name(params, where)

    def __init__(self, name, params, model, masks, backend, where, input_shape=None):
        super().__init__(name, params, model, masks, backend, where, input_shape)
        from .roi import check_bounds
        xp = backend.xp
        shape = self.input_shape
        if "roi" in params:
            bounds = check_bounds(params["roi"], shape, where / "roi")
        elif len(shape) == 2:
            bounds = tuple((0, s) for s in shape)
        else:
            raise (where / "roi").error(f"required for a {len(shape)}-D input (shape {shape}): "
                                        f"give one segment and a 2-D region")
        extra = bounds[:-2]
        if any(hi - lo != 1 for lo, hi in extra):
            raise (where / "roi").error(f"the region must be 2-D: give one segment "
                                        f"([s, s+1]) on axis 0, got {list(map(list, bounds))}")
        self.bounds = bounds
        self.slices = tuple(slice(lo, hi) for lo, hi in bounds)
        self.region = tuple(hi - lo for lo, hi in bounds[-2:])
        self.lo, self.hi = parse_thresholds(params.get("thresADU"), where / "thresADU")
        sr = tuple(params.get("save_range", DEFAULT_SAVE_RANGE))
        for axis, (s, n) in enumerate(zip(sr, self.region)):
            if s > n - 1:
                raise (where / "save_range").error(
                    f"half-width {s} on axis {axis} needs a region of more than {s} pixels; "
                    f"the region has {n} (shape {self.region})")
        self.save_range = sr
        mask = input_mask(self, params, where)
        self.mask_name = "none" if mask is None else params.get("mask", "cmask")
        if mask is None:
            mask = np.ones(self.region, np.float32)
        else:
            mask = mask[self.slices].reshape(self.region).astype(np.float32)
        self.npix_good = float(mask.sum())
        self.pad = tuple(_fast_len(n + s) for n, s in zip(self.region, sr))
        # lags -s..s of each axis in the (unshifted) correlation array
        self.lag_rows = np.arange(-sr[0], sr[0] + 1) % self.pad[0]
        self.lag_cols = np.arange(-sr[1], sr[1] + 1) % self.pad[1]
        fm = np.fft.rfft2(mask, s=self.pad)
        smm = np.fft.irfft2(np.abs(fm) ** 2, s=self.pad)[np.ix_(self.lag_rows, self.lag_cols)]
        smm = np.rint(smm)                                   # pair counts are integers
        self.mask = xp.asarray(mask)
        self.fm = xp.asarray(fm.astype(np.complex64))
        self.smm = xp.asarray(smm)
        self.d_lag_rows, self.d_lag_cols = xp.asarray(self.lag_rows), xp.asarray(self.lag_cols)

    def process(self, calib):
        xp = self.backend.xp
        nb = len(calib)
        data = calib[(slice(None), *self.slices)].reshape(nb, *self.region)
        data = apply_thresholds(xp, data, self.lo, self.hi)
        a = data * self.mask
        total = a.sum(axis=(1, 2), dtype=xp.float64)
        fa = xp.fft.rfft2(a, s=self.pad, axes=(1, 2))
        saa = xp.fft.irfft2(fa * xp.conj(fa), s=self.pad, axes=(1, 2))
        sam = xp.fft.irfft2(xp.conj(fa) * self.fm, s=self.pad, axes=(1, 2))
        pick = (slice(None), self.d_lag_rows[:, None], self.d_lag_cols[None, :])
        saa, sam = saa[pick], sam[pick]
        sma = sam[:, ::-1, ::-1]                       # S_mA(d) = S_Am(-d)
        with np.errstate(invalid="ignore", divide="ignore"):
            g2 = saa * self.smm / (sam * sma)
            g2 = xp.where(self.smm > 0, g2, xp.nan)
            cr = total / self.npix_good if self.npix_good else xp.full_like(total, xp.nan)
        return {"autocorr": g2.astype(xp.float32), "cr": cr}

    def config_items(self):
        return {"roi": np.array(self.bounds, np.int64),
                "save_range": np.array(self.save_range, np.int64),
                "thresADU": np.array([np.nan if v is None else v for v in (self.lo, self.hi)]),
                "mask": self.mask_name,
                "pad": np.array(self.pad, np.int64)}
