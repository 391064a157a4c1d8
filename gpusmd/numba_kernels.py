"""The compiled CPU engine (numba): the calibration pass and the common-mode group
medians, with the same numbers as the NumPy path (gpusmd.calib.calibrate
calibrate_switch / split_switch, gpusmd.calib.common_mode group_correct), bit for bit.

Only imported when numba is (gpusmd.cpu_engine chooses). Every loop runs on numba's
threads (``prange``) over blocks of pixels or groups: a block's result does not depend
on the thread that computes it, so any thread count gives the same numbers. float32
arithmetic throughout, in the NumPy path's order (no fastmath: no fused multiply-add,
no reassociation). Compiled once per machine (``cache=True``)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

PIXEL_BLOCK = 1 << 14            # pixels per job of the pixel-wise passes
GROUP_JOBS = 64                  # jobs per frame of the group passes

# The loops index slices from 0: numba then knows the index is not negative (no
# wrap-around test per access) and LLVM vectorizes the dense loops. The gain-switched
# pixels (few) are a second, sparse loop over the same block while it is in the caches,
# as calibrate.switched does it with arrays.


@njit(cache=True, nogil=True, inline="always")
def _adc(r, adc_mask):
    """The ADC value of a raw word as float32 (adc_mask 0: the raw value itself)."""
    return np.float32(r & adc_mask) if adc_mask else np.float32(r)


@njit(cache=True, nogil=True, inline="always")
def _switch_state(r, state_mask):
    """The table row of a raw word's gain-switch bits (calibrate.switched): 0 for the
    words below 0x4000, the dense pass's row, which the sparse pass leaves alone."""
    u = np.int64(r) & 0xFFFF
    return (u >> 14) & state_mask if u >= 0x4000 else 0


@njit(parallel=True, cache=True, nogil=True)
def calibrate_switch(raw, ped, scale, adc_mask, out):
    """out = (adc - ped[state]) * scale[state] per pixel; raw (B, npix) uint16 or int16,
    ped / scale (nstate, npix) float32, adc_mask 0 for a detector without gain bits
    (its raw value is the ADC value), out (B, npix) float32."""
    nb, npix = raw.shape
    nblock = (npix + PIXEL_BLOCK - 1) // PIXEL_BLOCK
    for job in prange(nb * nblock):
        b, lo = job // nblock, (job % nblock) * PIXEL_BLOCK
        hi = min(lo + PIXEL_BLOCK, npix)
        r, o, p0, s0 = raw[b, lo:hi], out[b, lo:hi], ped[0, lo:hi], scale[0, lo:hi]
        for i in range(hi - lo):
            o[i] = (_adc(r[i], adc_mask) - p0[i]) * s0[i]
        if ped.shape[0] > 1:
            pt, st, state_mask = ped[:, lo:hi], scale[:, lo:hi], ped.shape[0] - 1
            for i in range(hi - lo):
                s = _switch_state(r[i], state_mask)
                if s:
                    o[i] = (_adc(r[i], adc_mask) - pt[s, i]) * st[s, i]
    return out


@njit(parallel=True, cache=True, nogil=True)
def split_switch(raw, ped, good, adc_mask, adu, voting):
    """adu = adc - ped[state], voting = good[state] per pixel (calibrate.split_switch;
    the factor is applied afterwards by apply_scale)."""
    nb, npix = raw.shape
    nblock = (npix + PIXEL_BLOCK - 1) // PIXEL_BLOCK
    for job in prange(nb * nblock):
        b, lo = job // nblock, (job % nblock) * PIXEL_BLOCK
        hi = min(lo + PIXEL_BLOCK, npix)
        r, a, v = raw[b, lo:hi], adu[b, lo:hi], voting[b, lo:hi]
        p0, g0 = ped[0, lo:hi], good[0, lo:hi]
        for i in range(hi - lo):
            a[i] = _adc(r[i], adc_mask) - p0[i]
            v[i] = g0[i]
        if ped.shape[0] > 1:
            pt, gt, state_mask = ped[:, lo:hi], good[:, lo:hi], ped.shape[0] - 1
            for i in range(hi - lo):
                s = _switch_state(r[i], state_mask)
                if s:
                    a[i] = _adc(r[i], adc_mask) - pt[s, i]
                    v[i] = gt[s, i]


@njit(parallel=True, cache=True, nogil=True)
def apply_scale(raw, scale, adu, out):
    """out = adu * scale[state] per pixel (the gain after the common mode)."""
    nb, npix = raw.shape
    nblock = (npix + PIXEL_BLOCK - 1) // PIXEL_BLOCK
    for job in prange(nb * nblock):
        b, lo = job // nblock, (job % nblock) * PIXEL_BLOCK
        hi = min(lo + PIXEL_BLOCK, npix)
        r, a, o, s0 = raw[b, lo:hi], adu[b, lo:hi], out[b, lo:hi], scale[0, lo:hi]
        for i in range(hi - lo):
            o[i] = a[i] * s0[i]
        if scale.shape[0] > 1:
            st, state_mask = scale[:, lo:hi], scale.shape[0] - 1
            for i in range(hi - lo):
                s = _switch_state(r[i], state_mask)
                if s:
                    o[i] = a[i] * st[s, i]
    return out


# The group medians: the voters of each group gathered into a row of ``padded`` (B,
# ngroups, size), the others +inf, so that the row sorted (NumPy's sort: vectorized,
# faster than any selection loop here, whose branches on random data mispredict) holds
# the voters' order statistics first; then the median and its correction per group.
# Two layouts, each read in memory order: groups of contiguous runs of pixels (banks,
# rows, chunks: ``inner_stride`` 1), and columns (one pixel per outer step), whose
# adjacent groups are taken COLUMN_BLOCK at a time, row by row.

COLUMN_BLOCK = 16                # columns per job: one cache line of float32 per row


@njit(cache=True, nogil=True, inline="always")
def _median_rule(row, n, size, min_count, min_fraction, max_abs, inclusive):
    """(correction, applied) of one group from its sorted row and voter count n: the
    middle value, or the mean of the two middle ones, in float32 (masked_median)."""
    if n > 0:
        stat = (row[(n - 1) // 2] + row[n // 2]) / np.float32(2)
    else:
        stat = np.float32(np.nan)
    big = abs(stat) > max_abs if inclusive else abs(stat) >= max_abs
    ok = n >= max(min_count, 1) and n >= min_fraction * size and not big and np.isfinite(stat)
    return (stat if ok else np.float32(0)), ok


@njit(parallel=True, cache=True, nogil=True)
def gather_runs(adu, good, starts, n_outer, outer_stride, n_inner, lo, hi, padded, count):
    """padded[b, g] = the group's values where good and lo < value < hi, else +inf;
    count[b, g] = how many voted. Groups of n_outer runs of n_inner pixels."""
    nb, ngroups = count.shape
    per_job = (ngroups + GROUP_JOBS - 1) // GROUP_JOBS
    inf = np.float32(np.inf)
    for job in prange(nb * GROUP_JOBS):
        b, g0 = job // GROUP_JOBS, (job % GROUP_JOBS) * per_job
        for g in range(g0, min(g0 + per_job, ngroups)):
            n = 0
            for o in range(n_outer):
                base = starts[g] + o * outer_stride
                v, gd = adu[b, base:base + n_inner], good[b, base:base + n_inner]
                dst = padded[b, g, o * n_inner:(o + 1) * n_inner]
                for i in range(n_inner):
                    vote = gd[i] & (v[i] > lo) & (v[i] < hi)
                    dst[i] = v[i] if vote else inf
                    n += vote
            count[b, g] = n


@njit(parallel=True, cache=True, nogil=True)
def apply_runs(adu, good, starts, n_outer, outer_stride, n_inner, ordered, count,
               min_count, min_fraction, max_abs, inclusive, all_pixels, cm, applied):
    """From the sorted rows: each group's median, applied by the rule (_median_rule) and
    subtracted from the good pixels, or from all (all_pixels), as NumPy does it:
    value - cm x (1 or 0), the sign of a zero kept as there."""
    nb, ngroups = count.shape
    per_job = (ngroups + GROUP_JOBS - 1) // GROUP_JOBS
    for job in prange(nb * GROUP_JOBS):
        b, g0 = job // GROUP_JOBS, (job % GROUP_JOBS) * per_job
        for g in range(g0, min(g0 + per_job, ngroups)):
            c, ok = _median_rule(ordered[b, g], count[b, g], n_outer * n_inner, min_count,
                                 min_fraction, max_abs, inclusive)
            cm[b, g], applied[b, g] = c, ok
            for o in range(n_outer):
                base = starts[g] + o * outer_stride
                v, gd = adu[b, base:base + n_inner], good[b, base:base + n_inner]
                for i in range(n_inner):
                    t = np.float32(1) if (all_pixels or gd[i]) else np.float32(0)
                    v[i] = v[i] - c * t


@njit(parallel=True, cache=True, nogil=True)
def gather_columns(adu, good, starts, n_outer, outer_stride, run, lo, hi, padded, count):
    """gather_runs for columns: groups of n_outer pixels outer_stride apart, in runs of
    ``run`` adjacent groups (starts[g + 1] = starts[g] + 1 within a run)."""
    nb, ngroups = count.shape
    per_run = (run + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    njobs = ngroups // run * per_run
    inf = np.float32(np.inf)
    for job in prange(nb * njobs):
        b, k = job // njobs, job % njobs
        g0 = k // per_run * run + k % per_run * COLUMN_BLOCK
        width = min(COLUMN_BLOCK, (k // per_run + 1) * run - g0)
        n = np.zeros(COLUMN_BLOCK, np.int64)
        block = np.empty((n_outer, COLUMN_BLOCK), np.float32)    # rows read in order
        for o in range(n_outer):
            base = starts[g0] + o * outer_stride
            v, gd, dst = adu[b, base:base + width], good[b, base:base + width], block[o]
            for j in range(width):
                vote = gd[j] & (v[j] > lo) & (v[j] < hi)
                dst[j] = v[j] if vote else inf
                n[j] += vote
        for j in range(width):                                   # then one group a row
            row = padded[b, g0 + j]
            for o in range(n_outer):
                row[o] = block[o, j]
            count[b, g0 + j] = n[j]


@njit(parallel=True, cache=True, nogil=True)
def apply_columns(adu, good, starts, n_outer, outer_stride, run, ordered, count, min_count,
                  min_fraction, max_abs, inclusive, all_pixels, cm, applied):
    """apply_runs for columns (see gather_columns)."""
    nb, ngroups = count.shape
    per_run = (run + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    njobs = ngroups // run * per_run
    for job in prange(nb * njobs):
        b, k = job // njobs, job % njobs
        g0 = k // per_run * run + k % per_run * COLUMN_BLOCK
        width = min(COLUMN_BLOCK, (k // per_run + 1) * run - g0)
        c = np.zeros(COLUMN_BLOCK, np.float32)
        for j in range(width):
            c[j], ok = _median_rule(ordered[b, g0 + j], count[b, g0 + j], n_outer, min_count,
                                    min_fraction, max_abs, inclusive)
            cm[b, g0 + j], applied[b, g0 + j] = c[j], ok
        for o in range(n_outer):
            base = starts[g0] + o * outer_stride
            v, gd = adu[b, base:base + width], good[b, base:base + width]
            for j in range(width):
                t = np.float32(1) if (all_pixels or gd[j]) else np.float32(0)
                v[j] = v[j] - c[j] * t


@njit(parallel=True, cache=True, nogil=True)
def histogram(data, weight, slice_of_pixel, bin_of_slice, lo, hi, flags, out):
    """cuda.histogram.histogram_numpy, bit for bit: per event, each counted pixel's
    float32 value (0 below lo with flags & 1, above hi with flags & 2) x its weight added
    in float64 to its slice in pixel order (as np.bincount adds), then the slices to
    their bins in slice order. The events in parallel (a slice's pixels lie all over the
    frame: splitting the pixels would change the order of its sum)."""
    nb, npix = data.shape
    nslices = bin_of_slice.shape[0]
    for b in prange(nb):
        partial = np.zeros(nslices + 1)
        d = data[b]
        for p in range(npix):
            v = d[p]
            if (flags & 1) and v < lo:
                v = np.float32(0)
            if (flags & 2) and v > hi:
                v = np.float32(0)
            partial[slice_of_pixel[p]] += np.float64(v * weight[p])
        o = out[b]
        o[:] = 0.0
        for s in range(nslices):
            o[bin_of_slice[s]] += partial[s]
