"""Calibration and common mode 7 written the way psana does it: per event, the gain
look-up with masked arrays, then per panel a loop over groups with np.median of the
good pixels. The reference the benchmarks measure gpusmd against (and a second,
independent implementation the tests compare mode 7 with)."""
from __future__ import annotations

import numpy as np

BANKS = {"epix10k": (176, 48), "jungfrau": (256, 64), "epix100": (352, 96)}


def calibrate_event(raw, gain_index, pedestal, gain, mask):
    """One event: (raw & 0x3fff) - pedestal[g], and the gain factor, per pixel."""
    g = np.where(gain_index < 0, 0, gain_index)
    adc = (raw & 0x3FFF).astype(np.float32)
    ped = np.take_along_axis(pedestal, g[None], 0)[0]
    gn = np.take_along_axis(gain, g[None], 0)[0]
    factor = np.where((gain_index >= 0) & (gn != 0) & (mask != 0), 1 / np.where(gn == 0, 1, gn), 0)
    return adc - ped, factor.astype(np.float32)


def cm_mode7_event(adu, good, family, bits, cormax, npix_min):
    """One event (nseg, rows, cols), corrected in place: banks, row segments, columns."""
    br, bc = BANKS[family]
    nseg, rows, cols = adu.shape

    def correct(block, ok):
        values = block[ok]
        if values.size > npix_min:
            cm = np.median(values)
            if abs(cm) < cormax:
                block[ok] -= cm

    for s in range(nseg):
        a, m = adu[s], good[s]
        if bits & 4:
            for r0 in range(0, rows, br):
                for c0 in range(0, cols, bc):
                    correct(a[r0:r0 + br, c0:c0 + bc], m[r0:r0 + br, c0:c0 + bc])
        if bits & 1:
            for r in range(rows):
                for c0 in range(0, cols, bc):
                    correct(a[r, c0:c0 + bc], m[r, c0:c0 + bc])
        if bits & 2:
            for r0 in range(0, rows, br):
                for c in range(cols):
                    correct(a[r0:r0 + br, c], m[r0:r0 + br, c])
    return adu
