"""Launchers of the calibration kernels: kernels/calibrate.cu (:func:`calibrate_gpu`,
:func:`calibrate_host`) and the passes of kernels/calibrate_cm.cu that fuse it with the
common mode (:func:`calibrate_rows`, :func:`columns_gain`, :func:`apply_gain`).
"""
from __future__ import annotations

import numpy as np

from ..errors import GpusmdError
from ._launch import _event_chunks, _sm_count
from .common_mode import _CM_STATS, CM_BLOCK, CM_HOST_BLOCK, _cm_rule_scalars
from .compile import _cupy, get_function
from .host import host_module

CALIBRATE_BLOCK = 256


def _calibrate_args(xp, raw_flat, control_bits, lut, family: int):
    """Checked, contiguous kernel arguments: (raw uint16, cb uint8, lut float32, B, npix,
    signed_raw)."""
    raw = xp.asarray(raw_flat)
    if raw.ndim == 1:
        raw = raw[None, :]
    if raw.ndim != 2:
        raise GpusmdError(f"calibrate: raw must be (B, npix), got shape {raw.shape}")
    if raw.dtype == np.int16:
        signed_raw = 1
    elif raw.dtype == np.uint16:
        signed_raw = 0
    else:
        raise GpusmdError(f"calibrate: raw must be uint16 or int16, got {raw.dtype}")
    raw = xp.ascontiguousarray(raw).view(xp.uint16)
    nbatch, npix = raw.shape
    lut = xp.ascontiguousarray(xp.asarray(lut, dtype=xp.float32))
    if (lut.data.ptr if xp is not np else lut.ctypes.data) % 8:
        lut = lut.copy()    # the kernel reads float2 pairs
    if lut.shape[-1] != 2 or npix == 0 or lut.size % (2 * npix):
        raise GpusmdError(f"calibrate: lut shape {lut.shape} does not fit {npix} pixels "
                          "(expected (rows, npix, 2))")
    family = int(family)
    if family not in (0, 1, 2):
        raise GpusmdError(f"calibrate: unknown detector family code {family}")
    rows = lut.size // (2 * npix)
    need = {0: 1, 1: 3, 2: 8}[family]       # gain ranges (+ the epix10k's no-range row)
    if rows != need:
        raise GpusmdError(f"calibrate: lut has {rows} rows, family {family} needs {need}")
    if control_bits is None:
        if family == 2:
            raise GpusmdError("calibrate: epix10k needs the pixel control bits")
        cb = xp.zeros(1, dtype=xp.uint8)
    else:
        cb = xp.ascontiguousarray(xp.asarray(control_bits).reshape(-1)).astype(xp.uint8, copy=False)
        if family == 2 and cb.size != npix:
            raise GpusmdError(f"calibrate: {cb.size} control bits for {npix} pixels")
    return raw, cb, lut, nbatch, npix, signed_raw, family


def calibrate_gpu(raw_flat, control_bits, lut, family: int):
    """The calibration kernel on the current CuPy device.

    raw_flat: (B, npix) uint16 or int16; control_bits: (npix,) uint8 or None; lut:
    (lut_rows, npix, 2) float32 (calibrate.build_lut); family: FAMILY_* code. Returns
    (B, npix) float32."""
    cupy = _cupy()
    raw, cb, lut, nbatch, npix, signed_raw, family = _calibrate_args(
        cupy, raw_flat, control_bits, lut, family)
    out = cupy.empty((nbatch, npix), dtype=cupy.float32)
    n = nbatch * npix
    if n == 0:
        return out
    blocks = min(-(-n // CALIBRATE_BLOCK), 32 * _sm_count(cupy.cuda.Device().id))
    get_function("calibrate", "calibrate")(
        (blocks,), (CALIBRATE_BLOCK,),
        (raw, cb, lut, out, np.int64(npix), np.int64(n), np.int32(family), np.int32(signed_raw)))
    return out


def calibrate_host(raw_flat, control_bits, lut, family: int, blocks: int | None = None):
    """The same calibration kernel, run on the CPU through the host build (tests)."""
    raw, cb, lut, nbatch, npix, signed_raw, family = _calibrate_args(
        np, raw_flat, control_bits, lut, family)
    out = np.empty((nbatch, npix), dtype=np.float32)
    n = nbatch * npix
    if n:
        blocks = blocks or -(-n // CALIBRATE_BLOCK)
        host_module("calibrate").launch("calibrate", blocks, CALIBRATE_BLOCK,
                                        raw, cb, lut, out, npix, n, family, signed_raw)
    return out


# ---- calibration fused with the common mode (kernels/calibrate_cm.cu) ------------------------
CM_SEGMENT_MAX = 256     # kernels/calibrate_cm.cu: longest row segment


def _median_rule_scalars(rule, size: int, kernel: str) -> tuple:
    """_cm_rule_scalars without the statistic, for the fused passes (median only)."""
    stat, *scalars = _cm_rule_scalars(rule, size)
    if stat != _CM_STATS["median"]:
        raise GpusmdError(f"{kernel}: the fused pass takes the median only")
    return tuple(scalars)


def _segment_block(seg_len: int) -> int:
    """Threads per (segment, event) block: one compare-exchange each per sort step."""
    n = 1 << max(0, int(seg_len) - 1).bit_length()
    return max(32, min(CM_BLOCK, n // 2))


def _rows_args(xp, raw_flat, control_bits, lut, family: int, seg_len: int, rule):
    raw, cb, lut, nbatch, npix, signed_raw, family = _calibrate_args(
        xp, raw_flat, control_bits, lut, family)
    seg_len = int(seg_len)
    if not 1 <= seg_len <= CM_SEGMENT_MAX or npix % seg_len:
        raise GpusmdError(f"calibrate_rows: segments of {seg_len} pixels do not tile a frame of "
                          f"{npix} (at most {CM_SEGMENT_MAX} pixels each)")
    scalars = _median_rule_scalars(rule, seg_len, "calibrate_rows")
    return raw, cb, lut, nbatch, npix, signed_raw, family, npix // seg_len, scalars


def calibrate_rows(raw_flat, control_bits, lut, family: int, seg_len: int, vote_ranges: int,
                   rule, correct: bool, finish: bool, host: bool = False, vote_mask=None):
    """Decode + pedestal (+ the median of each run of ``seg_len`` pixels, with ``correct``)
    (+ mask / gain, with ``finish``) in one pass over the raw frames (B, npix), on the
    current CuPy device or (``host``) through the host build. vote_mask (npix,): the
    unmasked pixels, which vote whatever their gain (None: the pixels whose mask / gain
    is not 0). Returns (out (B, npix) float32, calibrated with finish else ADU; good
    (B, npix) bool voting flags, None with finish; cm (B, nseg) float32; applied (B, nseg)
    bool)."""
    xp = np if host else _cupy()
    raw, cb, lut, nbatch, npix, signed_raw, family, nseg, scalars = _rows_args(
        xp, raw_flat, control_bits, lut, family, seg_len, rule)
    use_vote_mask = vote_mask is not None
    if use_vote_mask:
        vote_mask = xp.ascontiguousarray(xp.asarray(vote_mask).reshape(-1) != 0).view(xp.uint8)
        if vote_mask.size != npix:
            raise GpusmdError(f"calibrate_rows: vote_mask of {vote_mask.size} pixels, frames "
                              f"of {npix}")
    else:
        vote_mask = xp.zeros(1, xp.uint8)
    out = xp.empty((nbatch, npix), dtype=xp.float32)
    good = xp.empty((nbatch, npix) if not finish else (1,), dtype=xp.uint8)
    cm = xp.zeros((nbatch, nseg), dtype=xp.float32)
    applied = xp.zeros((nbatch, nseg), dtype=xp.uint8)
    lo, hi, min_count, min_fraction, max_abs, inclusive, apply_all = scalars
    if nbatch:
        threads = _segment_block(seg_len)
        if host:
            host_module("calibrate_cm").launch(
                "calibrate_rows", (nseg, nbatch), min(CM_HOST_BLOCK, threads), raw, cb, lut,
                npix, int(seg_len), nseg, family, signed_raw, int(vote_ranges), vote_mask,
                int(use_vote_mask), int(correct),
                *scalars, int(finish), out, good, cm, applied)
        else:
            kernel = get_function("calibrate_cm", "calibrate_rows")
            for b, count in _event_chunks(nbatch):
                kernel((nseg, count), (threads,),
                       (raw[b], cb, lut, np.int64(npix), np.int32(seg_len), np.int32(nseg),
                        np.int32(family), np.int32(signed_raw), np.int32(vote_ranges),
                        vote_mask, np.int32(use_vote_mask), np.int32(bool(correct)), np.float32(lo), np.float32(hi),
                        np.int32(min_count), np.float64(min_fraction), np.float32(max_abs),
                        np.int32(inclusive), np.int32(apply_all), np.int32(bool(finish)),
                        out[b], good if finish else good[b], cm[b], applied[b]))
    return (out, None if finish else good.view(xp.bool_), cm, applied.view(xp.bool_))


CM_TILE = 16             # kernels/calibrate_cm.cu: adjacent columns per columns_gain block
CM_COLUMN_MAX = 512      # kernels/calibrate_cm.cu: longest half-panel column
COLUMNS_BLOCK = 256


def columns_fit(seg_shape) -> bool:
    """Whether columns_gain takes a detector of this (nseg, rows, cols) shape."""
    _, rows, cols = seg_shape
    return rows % 2 == 0 and 1 <= rows // 2 <= CM_COLUMN_MAX and cols % CM_TILE == 0


def columns_gain(adu, good, raw_flat, control_bits, lut, family: int, seg_shape, rule,
                 host: bool = False):
    """The half-panel column pass of mode 7 fused with the gain (kernels/calibrate_cm.cu):
    adu (B, npix) float32 ADU -> calibrated, in place; good (B, npix) voting flags. Same
    contract as group_correct over half_columns followed by apply_gain; returns (cm, applied)
    (B, nseg * 2 * cols)."""
    xp = np if host else _cupy()
    raw, cb, lut, nbatch, npix, _, family = _calibrate_args(xp, raw_flat, control_bits, lut,
                                                           family)
    nseg, rows, cols = (int(v) for v in seg_shape)
    if not columns_fit(seg_shape) or nseg * rows * cols != npix:
        raise GpusmdError(f"columns_gain: segments {tuple(seg_shape)} do not fit {npix} pixels "
                          f"(even rows, half columns of at most {CM_COLUMN_MAX}, columns a "
                          f"multiple of {CM_TILE})")
    if adu.shape != raw.shape or adu.dtype != np.float32 or not adu.flags.c_contiguous:
        raise GpusmdError(f"columns_gain: adu must be C-contiguous float32 {raw.shape}")
    good = xp.ascontiguousarray(good).view(xp.uint8)
    if good.shape != raw.shape:
        raise GpusmdError(f"columns_gain: good {good.shape} does not match {raw.shape}")
    scalars = _median_rule_scalars(rule, rows // 2, "columns_gain")
    ngroups = nseg * 2 * cols
    cm = xp.zeros((nbatch, ngroups), dtype=xp.float32)
    applied = xp.zeros((nbatch, ngroups), dtype=xp.uint8)
    tiles = nseg * 2 * (cols // CM_TILE)
    if nbatch:
        args = (nseg, rows, cols, family, *scalars)
        if host:
            host_module("calibrate_cm").launch("columns_gain", (tiles, nbatch),
                                               min(CM_HOST_BLOCK, COLUMNS_BLOCK), adu, good,
                                               raw, cb, lut, *args, cm, applied)
        else:
            lo, hi, min_count, min_fraction, max_abs, inclusive, apply_all = scalars
            kernel = get_function("calibrate_cm", "columns_gain")
            for b, count in _event_chunks(nbatch):
                kernel((tiles, count), (COLUMNS_BLOCK,),
                       (adu[b], good[b], raw[b], cb, lut, np.int32(nseg),
                        np.int32(rows), np.int32(cols), np.int32(family), np.float32(lo),
                        np.float32(hi), np.int32(min_count), np.float64(min_fraction),
                        np.float32(max_abs), np.int32(inclusive), np.int32(apply_all),
                        cm[b], applied[b]))
    return cm, applied.view(xp.bool_)


def apply_gain(raw_flat, control_bits, lut, family: int, data, host: bool = False):
    """data (B, npix) float32 ADU *= mask / gain of each pixel's gain range (decoded from
    the raw frames again), in place, on the device or (``host``) through the host build."""
    xp = np if host else _cupy()
    raw, cb, lut, nbatch, npix, _, family = _calibrate_args(xp, raw_flat, control_bits, lut,
                                                           family)
    if data.shape != raw.shape or data.dtype != np.float32 or not data.flags.c_contiguous:
        raise GpusmdError(f"apply_gain: data must be C-contiguous float32 {raw.shape}")
    n = nbatch * npix
    if n == 0:
        return data
    if host:
        host_module("calibrate_cm").launch("apply_gain", -(-n // CALIBRATE_BLOCK),
                                           CALIBRATE_BLOCK, raw, cb, lut, data, npix, n, family)
    else:
        blocks = min(-(-n // CALIBRATE_BLOCK), 32 * _sm_count(xp.cuda.Device().id))
        get_function("calibrate_cm", "apply_gain")(
            (blocks,), (CALIBRATE_BLOCK,),
            (raw, cb, lut, data, np.int64(npix), np.int64(n), np.int32(family)))
    return data
