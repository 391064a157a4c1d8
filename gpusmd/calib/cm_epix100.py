"""Common-mode modes of the epix100 (DESIGN §6): psana mode 4 and "cm_epix" (psana mode 6,
smalldata codes 45, 46, 47).

Both are built on :func:`~gpusmd.calib.common_mode.group_correct` over regular pixel
patterns (:class:`~gpusmd.calib.common_mode.Groups`), so the CUDA kernel implements the
same steps. adu is (B, npix) float32, flat over the raw (704, 768) shape, corrected in
place; good is (B, npix) bool. Written with ``ctx.xp`` so it runs on NumPy and CuPy.

Decisions (where psana / smalldata_tools leave room or differ from each other):

Mode 4 -- cmpars (4, bits, half_range, maxcorr), psana ``medianInRegionV3``:
  * passes in the order bit 1 (each 352 x 96 bank), bit 2 (each 96-pixel bank row),
    bit 4 (each 352-pixel bank column); each pass sees the output of the previous one.
  * voters: good pixels with -half_range <= value <= half_range (inclusive, as psana);
    at least 10 must vote; the median of an even count is the mean of the two middle
    values (psana ``median<T>``, not the upper middle of ``medianEpix100V1``).
  * skipped if |cm| > maxcorr (|cm| == maxcorr is applied); maxcorr == 0 means no limit
    (psana tests ``maxcorr && fabs(cm) > maxcorr``). Missing cmpars default to
    (4, 6, 30, 10) (smalldata code 4). This is psana1's reading of cmpars (4, ...): with
    the psana2 convention (the default, see common_mode.psana2_cmpars) an explicit
    [4, bits, cormax, npix_min] runs mode 7 on the epix100's banks instead; smalldata's
    codes 4 and 34 are psana1 recipes and always run this.
  * the correction is subtracted from all pixels of the group, bad ones included.

Mode 6 -- cmpars (6, variant, maxCorr, histoRange, nsigma), smalldata ``cm_epix``:
  * flags are computed ONCE per frame, on the input adu (as psana / smalldata compute
    ``imgThres`` once on the frame they get), and reused unchanged by every pass,
    including the variant pre-step. A pixel is flagged when
    - value >= nsigma * rms, or it is one of the 4 neighbours (up / down / left / right,
      within the 704 x 768 frame, across bank boundaries) of such a pixel (smalldata
      ``cm_epix``: ``imgThres[img >= rms * 10] = 1`` then ``neighborImg``, np.roll with
      the wrapped edge zeroed). As there, a dead pixel (rms 0) is flagged whenever its
      value is >= 0, and so are its neighbours; with ``ctx.rules == "gpusmd"`` an rms of
      0 is "unknown" and flags nothing. Skipped entirely when ``ctx.rms`` is None;
    - |value| > histoRange (the pixel alone, no neighbours);
    - not good (the pixel alone).
  * variant 1 (code 46): subtract from every pixel the mean of the unflagged pixels of
    the frame (smalldata ``normAll``; smalldata's masked in-place subtraction leaves the
    flagged pixels unchanged, here all pixels are shifted, as DESIGN says).
    variant 2 (code 47): subtract from every pixel of each bank the median of the
    bank's unflagged pixels (smalldata takes the median of all bank pixels and computes
    its flags afterwards; here the flags are the input's, so a bank offset beyond
    histoRange flags the whole bank and is left alone). Neither pre-step has a maxCorr
    or minimum-fraction limit (smalldata has none); a frame / bank with no unflagged
    pixel is left alone.
  * then each 352-pixel half column, then each 96-pixel bank row: median of the
    unflagged pixels (mean of the two middle values for an even count); the group gets
    0 when |median| > maxCorr or more than 75 % of its pixels are flagged (i.e. it is
    applied when at least 25 % voted and |median| <= maxCorr); subtracted from all its
    pixels.
  * defaults for missing cmpars: variant 0, maxCorr 30, histoRange 30, nsigma 10.

Both return per-event statistics summed over the passes run (pre-steps included) with
:func:`~gpusmd.calib.common_mode.tally`: "corrected" and "skipped" group counts.
"""
from __future__ import annotations

import numpy as np

from .common_mode import (INF, Groups, ModeContext, Rule, bank_rows, banks, half_columns, tally)


def _par(cmpars, i, default):
    return cmpars[i] if len(cmpars) > i else default


# ---- mode 4 ---------------------------------------------------------------------------------

MODE4_PASSES = ((1, "bank", banks), (2, "row", bank_rows), (4, "column", half_columns))


def mode4(adu, good, cmpars, ctx: ModeContext) -> dict:
    """psana mode 4 for the epix100: median of the good pixels within +-half_range of each
    bank (bit 1), each 96-pixel bank row (bit 2), each 352-pixel bank column (bit 4), in
    that order; applied to all pixels of the group when at least 10 voted and
    |median| <= maxcorr (maxcorr 0: no limit)."""
    bits = int(_par(cmpars, 1, 6))
    half_range = float(_par(cmpars, 2, 30))
    maxcorr = float(_par(cmpars, 3, 10))
    # inclusive +-half_range with the strict lo < v < hi of Rule: the next float32 outwards
    hr = np.float32(half_range)
    lo = float(np.nextafter(-hr, np.float32(-np.inf)))
    hi = float(np.nextafter(hr, np.float32(np.inf)))
    rule = Rule("median", lo=lo, hi=hi, min_count=10,
                max_abs=maxcorr if maxcorr else INF, inclusive=True, apply_to="all")
    stats: dict = {}
    for bit, key, make in MODE4_PASSES:
        if bits & bit:
            groups = ctx.groups(key, lambda make=make: make(ctx.model))
            _, applied = ctx.correct(adu, good, groups, rule)
            tally(stats, applied)
    return stats


# ---- mode 6 ("cm_epix") ---------------------------------------------------------------------

def frames(model) -> Groups:
    """One group per segment: the whole frame of the epix100."""
    nseg, rows, cols = model.seg_shape
    return Groups.on_lattice("frame", ((nseg, rows * cols),), 1, 0, rows * cols, 1)


def neighbours4(mask, model, xp=np):
    """mask (B, npix) bool OR its 4-neighbour shifts, within each segment's frame."""
    nseg, rows, cols = model.seg_shape
    m = mask.reshape(len(mask), nseg, rows, cols)
    out = m.copy()
    out[..., 1:, :] |= m[..., :-1, :]
    out[..., :-1, :] |= m[..., 1:, :]
    out[..., :, 1:] |= m[..., :, :-1]
    out[..., :, :-1] |= m[..., :, 1:]
    return out.reshape(mask.shape)


def cm_epix_flags(adu, good, ctx: ModeContext, hist_range: float, nsigma: float):
    """(B, npix) bool: the pixels that do not vote in mode 6 (see the module notes)."""
    xp = ctx.xp
    flags = ~good | (xp.abs(adu) > xp.float32(hist_range))
    if ctx.rms is not None:
        rms = ctx.rms.reshape(1, -1)
        bright = adu >= xp.float32(nsigma) * rms
        if ctx.rules != "psana":
            bright &= rms > 0
        flags |= neighbours4(bright, ctx.model, xp)
    return flags


def mode6(adu, good, cmpars, ctx: ModeContext) -> dict:
    """psana "cm_epix" / smalldata 45 (variant 0), 46 (1: frame mean first), 47 (2: bank
    medians first); then median of the unflagged pixels per 352-pixel half column, then
    per 96-pixel bank row, 0 when |median| > maxCorr or > 75 % of the group is flagged,
    subtracted from all pixels. Flags are computed once, on the input."""
    variant = int(_par(cmpars, 1, 0))
    max_corr = float(_par(cmpars, 2, 30))
    hist_range = float(_par(cmpars, 3, 30))
    nsigma = float(_par(cmpars, 4, 10))
    if variant not in (0, 1, 2):
        raise ValueError(f"mode 6 variant {variant} is not 0 (45), 1 (46) or 2 (47)")
    vote = ~cm_epix_flags(adu, good, ctx, hist_range, nsigma)
    stats: dict = {}
    if variant == 1:
        groups = ctx.groups("frame", lambda: frames(ctx.model))
        _, applied = ctx.correct(adu, vote, groups, Rule("mean", apply_to="all"))
        tally(stats, applied)
    elif variant == 2:
        groups = ctx.groups("bank", lambda: banks(ctx.model))
        _, applied = ctx.correct(adu, vote, groups, Rule("median", apply_to="all"))
        tally(stats, applied)
    rule = Rule("median", min_fraction=0.25, max_abs=max_corr, inclusive=True, apply_to="all")
    for key, make in (("column", half_columns), ("row", bank_rows)):
        groups = ctx.groups(key, lambda make=make: make(ctx.model))
        _, applied = ctx.correct(adu, vote, groups, rule)
        tally(stats, applied)
    return stats
