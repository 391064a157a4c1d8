"""CsPad common mode, per 2x1 segment (DESIGN §6): mode 1 (the peak of the pixel
histogram, after psana's ``findCommonMode``) and mode 5 (the unbonded pixels, after
psana's ``applyCModeUnbond``).

Both work on adu (B, npix) float32, flat over the raw shape (B, nseg * 185 * 388), in
place, with the array module of ``ctx.xp`` (NumPy or CuPy). They are vectorised over
segments; the pixel passes of mode 1 loop over events with NumPy (reused buffers: a
batch's temporaries cost more in page faults than in arithmetic) and take the whole batch
at once on other backends. The histogram analysis is vectorised over events too. With
``ctx.engine`` "kernel" (CuPy) or "host" (its CPU build, tests) the per-(event, segment)
corrections come from kernels/cm_cspad.cu instead (same values, bit for bit against
NumPy) and are applied as below.

Decisions (where DESIGN §6 or psana left a choice):

mode 5
  - The unbonded pixels are (r, r) and (r, r + 194) for r = 10, 20, ..., 180: 36 per
    2x1, as DESIGN §6 and psana's ``applyCModeUnbond`` read them. ``model.unbond_pixels()``
    (the mask) also lists r = 0, the corner pixel psana skips; it is not used here.
  - The pixel mask is not consulted: the unbonded pixels are masked as bad by the
    geometry mask by design, yet they are what mode 5 reads.
  - The mean is taken in float64 and subtracted (as float32) from every pixel of the
    segment, good or bad, when |mean| <= maxcorr (inclusive, as psana); maxcorr is
    cmpars[1], 100 when absent. A non-finite mean is never applied.

mode 1, cmpars (1, mean_max, rms_max, thresh, fallback)
  - Histogram: the good pixels only, value rounded half away from zero (psana's
    ``int(v +- 0.5)``, computed exactly in float32 as floor + fraction), one bin per
    integer in [-1000, 2000); values outside, NaN included, are not counted.
  - Peak (psana's scan): from the lowest bin, the first bin with a count > thresh starts
    the peak; the scan keeps the running maximum (the first bin holding it is the peak)
    and stops at the first later bin whose count is <= peak // 2 (integer half, as psana),
    which is the right half-maximum bin (3000, past the end, if none). The left
    half-maximum bin is the last bin at or below the peak with count <= peak // 2 (-1 if
    none). sigma = (right - left) / 2.36. thresh <= 0 (or absent) means 100, as psana.
    No bin above thresh: the segment is not corrected by mode 1.
  - Refinement, twice: the mean and standard deviation of the good float values (not the
    rounded ones) with |value - mean| <= 2 sigma, the first window centred on the peak
    bin's value, the second on the refined mean, with the refined sigma.
    A window without a good value gives NaN: not corrected by mode 1. psana refines on
    its integer histogram, both windows centred on the peak bin with a half-width of
    int(2 sigma + 0.5) bins; a histogram refinement leaves a bias of a few hundredths of
    sigma wherever the peak bin or the bin edges sit off the true mean (measured here
    for a histogram variant at sigma 3: errors up to 0.16 ADU, rms 0.07), where the
    float window leaves the statistical error (measured: max 0.055 ADU, rms 0.018 with
    10% photons). Results differ from psana by about that bias.
  - Applied when |mean| <= mean_max and sigma <= rms_max (inclusive; psana's
    ``abs(mean) > pars[0] or sigma > pars[1]`` rejects), subtracted from every pixel of
    the segment. Absent parameters are those of smalldata's code 1, (1, 25, 40, 100, 0)
    (lcls1/DetObject.py CsPadObject.getData); code 10 is the same with the fallback.
  - Otherwise, with fallback (cmpars[4], 0 when absent) non-zero, mode 5 with
    maxcorr = mean_max on that segment, from the unbonded pixels of the uncorrected
    segment; without fallback the segment is left alone.
  - Stats: ``corrected`` counts segments corrected by mode 1 or by its fallback.
"""
from __future__ import annotations

import numpy as np

from .common_mode import ModeContext, tally

ROWS2X1, COLS2X1 = 185, 388
COLSHALF = COLS2X1 // 2
UNBOND_ROWS = np.arange(10, 181, 10)            # r = 10 .. 180 (psana skips the corner r = 0)
HIST_LOW, HIST_HIGH = -1000, 2000
NBINS = HIST_HIGH - HIST_LOW
FWHM_TO_SIGMA = 2.36


def _segments(ctx: ModeContext) -> tuple[int, int]:
    nseg, rows, cols = ctx.model.seg_shape
    if (rows, cols) != (ROWS2X1, COLS2X1):
        raise ValueError(f"CsPad common mode needs 185 x 388 segments, {ctx.model.type} has "
                         f"{rows} x {cols}")
    return nseg, rows * cols


def unbond_offsets() -> np.ndarray:
    """Flat offsets, within one 2x1, of the 36 unbonded pixels mode 5 reads."""
    r = UNBOND_ROWS
    return np.concatenate([r * COLS2X1 + r, r * COLS2X1 + r + COLSHALF]).astype(np.int64)


def _segment_view(adu, nseg, segpix):
    """adu as (B, nseg, segpix), a view when adu is C-contiguous."""
    return adu.reshape(len(adu), nseg, segpix)


def _subtract(adu, view, cm):
    """Subtract cm (B, nseg) float32 from every pixel of each segment of adu, in place."""
    view -= cm[..., None]
    if not adu.flags.c_contiguous:            # reshape copied: write back
        adu[...] = view.reshape(adu.shape)


def _unbond_mean(view, xp):
    """(B, nseg) float64 mean of the 36 unbonded pixels of each segment."""
    return view[:, :, xp.asarray(unbond_offsets())].astype(xp.float64).mean(axis=-1)


def _kernel_cm(ctx: ModeContext, adu, good, nseg, mode, *pars):
    """(cm (B, nseg) float64, flag (B, nseg) uint8) from kernels/cm_cspad.cu: the CUDA
    kernel ("kernel" engine) or its host build ("host"); same values as the array path."""
    from .. import cuda
    run = cuda.cspad_common_mode_gpu if ctx.engine == "kernel" else cuda.cspad_common_mode_host
    return run(adu, good, nseg, mode, *pars)


def mode5(adu, good, cmpars, ctx: ModeContext) -> dict:
    """Mean of the 36 unbonded pixels (r, r), (r, r + 194), r = 10..180, of each 2x1,
    subtracted from the whole segment when |mean| <= cmpars[1] (100 when absent).
    ``good`` is not used (the unbonded pixels are masked as bad by design)."""
    xp = ctx.xp
    nseg, segpix = _segments(ctx)
    maxcorr = float(cmpars[1]) if len(cmpars) > 1 else 100.0
    view = _segment_view(adu, nseg, segpix)
    if ctx.engine in ("kernel", "host"):
        mean, flag = _kernel_cm(ctx, adu, None, nseg, 5, maxcorr)
        applied = flag != 0
    else:
        mean = _unbond_mean(view, xp)
        applied = xp.isfinite(mean) & (xp.abs(mean) <= maxcorr)
    _subtract(adu, view, xp.where(applied, mean, 0).astype(xp.float32))
    stats: dict = {}
    tally(stats, applied)
    return stats


def _cummax(h, xp):
    """Running maximum along the last axis (log-step scan, NumPy and CuPy alike)."""
    n = h.shape[-1]
    k = 1
    while k < n:
        h = xp.concatenate([h[..., :k], xp.maximum(h[..., k:], h[..., :-k])], axis=-1)
        k *= 2
    return h


def histograms(view, good, xp):
    """(B, nseg, NBINS) int64 counts of the good values of each segment, rounded half away
    from zero, over [HIST_LOW, HIST_HIGH).

    NumPy works one event at a time in reused buffers (the temporaries of a whole batch
    cost more in page faults than in arithmetic); other backends take the whole batch."""
    B, nseg, segpix = view.shape
    step = 1 if xp is np else max(B, 1)
    dump = step * nseg * NBINS                          # the bin of values not counted
    base = (xp.arange(step * nseg, dtype=xp.float32) * NBINS - HIST_LOW).reshape(step, nseg, 1)
    shape = (step, nseg, segpix)
    fl = xp.empty(shape, xp.float32)
    frac = xp.empty(shape, xp.float32)
    up = xp.empty(shape, bool)
    tmp = xp.empty(shape, bool)
    idx = xp.empty(shape, xp.int64)
    out = xp.empty((B, nseg, NBINS), xp.int64)
    for b0 in range(0, B, step):
        n = min(step, B - b0)
        v, g = view[b0:b0 + n], good[b0:b0 + n]
        with np.errstate(invalid="ignore"):            # inf - inf: NaN, not counted
            _fill(xp, v, g, base[:n], dump, fl[:n], frac[:n], up[:n], tmp[:n], idx[:n])
        counts = xp.bincount(idx[:n].ravel(), minlength=dump + 1)[:n * nseg * NBINS]
        out[b0:b0 + n] = counts.reshape(n, nseg, NBINS)
    return out


def _fill(xp, v, g, base, dump, f, fr, u, t, ix):
    """Bin index of each value of v into ix (``dump`` where not counted)."""
    xp.floor(v, out=f)
    xp.subtract(v, f, out=fr)                      # exact in float32
    xp.greater(fr, 0.5, out=u)
    xp.equal(fr, 0.5, out=t)                       # ties: away from zero
    t &= v >= 0
    u |= t
    f += u                                         # the rounded value
    ok = xp.greater_equal(f, HIST_LOW, out=t)
    ok &= f < HIST_HIGH
    ok &= g
    f += base                                      # bin over the chunk's segments (< 2**24)
    xp.copyto(f, xp.float32(dump), where=~ok)
    ix[...] = f


def find_peak(hist, thresh: int, xp):
    """psana's peak search on (..., NBINS) histograms: (found, peak bin, sigma from the
    FWHM), each (...,)."""
    hist = hist.astype(xp.int64)
    i = xp.arange(NBINS)
    above = hist > thresh
    found = above.any(axis=-1)
    i0 = xp.argmax(above, axis=-1)[..., None]                       # first bin > thresh
    run = _cummax(xp.where(i >= i0, hist, 0), xp)                   # running max from i0
    prev = xp.concatenate([xp.zeros_like(run[..., :1]), run[..., :-1]], axis=-1)
    drop = (i > i0) & (hist <= prev // 2)
    right = xp.where(drop.any(axis=-1), xp.argmax(drop, axis=-1), NBINS)
    peak_count = xp.take_along_axis(run, (right - 1)[..., None], axis=-1)   # (..., 1)
    peak = xp.argmax(run >= xp.maximum(peak_count, 1), axis=-1)     # first bin holding it
    left = xp.where((i <= peak[..., None]) & (hist <= peak_count // 2), i, -1).max(axis=-1)
    sigma = (right - left) / FWHM_TO_SIGMA
    return found, peak, sigma


def refine(view, good, mean, sigma, xp, passes: int = 2):
    """Mean and standard deviation of the good values within 2 sigma of the current mean
    (|value - mean| <= 2 sigma), ``passes`` times, per segment: mean, sigma (B, nseg)
    float64 in ADU; NaN where a window holds no good value. NumPy works one event at a
    time in reused buffers, other backends on the whole batch. Sums are float32 pairwise
    (tree) reductions, exact enough here (~1e-6 ADU)."""
    B, nseg, segpix = view.shape
    step = 1 if xp is np else max(B, 1)
    mean = xp.array(mean, dtype=xp.float64)
    sigma = xp.array(sigma, dtype=xp.float64)
    d = xp.empty((step, nseg, segpix), xp.float32)
    w = xp.empty((step, nseg, segpix), bool)
    with np.errstate(all="ignore"):                  # NaN, inf values: see below
        for _ in range(passes):
            for b0 in range(0, B, step):
                n = min(step, B - b0)
                sl = slice(b0, b0 + n)
                centre = mean[sl].astype(xp.float32)
                half = (2 * sigma[sl]).astype(xp.float32)[..., None]
                dd, ww = d[:n], w[:n]
                xp.subtract(view[sl], centre[..., None], out=dd)
                xp.less_equal(xp.abs(dd), half, out=ww)      # False for NaN
                ww &= good[sl]
                s0 = ww.sum(axis=-1, dtype=xp.int32)
                dd *= ww                                     # 0 outside the window ...
                s1 = dd.sum(axis=-1)
                if not bool(xp.isfinite(s1).all()):          # ... but NaN, inf * 0 is NaN
                    xp.subtract(view[sl], centre[..., None], out=dd)
                    xp.copyto(dd, xp.float32(0), where=~ww)
                    s1 = dd.sum(axis=-1)
                dd *= dd
                s2 = dd.sum(axis=-1)
                shift = s1.astype(xp.float64) / s0
                mean[sl] = centre + shift
                var = s2.astype(xp.float64) / s0 - shift * shift
                sigma[sl] = xp.sqrt(xp.maximum(var, 0))
    return mean, sigma


def mode1(adu, good, cmpars, ctx: ModeContext) -> dict:
    """Peak of the histogram of each 2x1's good pixels (psana ``findCommonMode``), with
    mode 5 as fallback; see the module docstring for every detail."""
    xp = ctx.xp
    nseg, segpix = _segments(ctx)
    mean_max = float(cmpars[1]) if len(cmpars) > 1 else 25.0
    rms_max = float(cmpars[2]) if len(cmpars) > 2 else 40.0
    thresh = int(cmpars[3]) if len(cmpars) > 3 else 100
    thresh = thresh if thresh > 0 else 100
    fallback = bool(cmpars[4]) if len(cmpars) > 4 else False

    view = _segment_view(adu, nseg, segpix)
    if ctx.engine in ("kernel", "host"):
        cm, flag = _kernel_cm(ctx, adu, good, nseg, 1, mean_max, rms_max, thresh, fallback)
        _subtract(adu, view, cm.astype(xp.float32))
        stats: dict = {}
        tally(stats, flag != 0)
        return stats
    g = xp.broadcast_to(xp.asarray(good, dtype=bool), adu.shape).reshape(view.shape)
    hist = histograms(view, g, xp)
    found, peak, sigma = find_peak(hist, thresh, xp)
    mean, sigma = refine(view, g, peak + HIST_LOW, sigma, xp)
    ok = found & xp.isfinite(mean) & (xp.abs(mean) <= mean_max) & (sigma <= rms_max)
    cm = xp.where(ok, mean, 0.0)
    applied = ok
    if fallback:
        unbond = _unbond_mean(view, xp)
        use5 = ~ok & xp.isfinite(unbond) & (xp.abs(unbond) <= mean_max)
        cm = xp.where(use5, unbond, cm)
        applied = ok | use5
    _subtract(adu, view, cm.astype(xp.float32))
    stats: dict = {}
    tally(stats, applied)
    return stats
