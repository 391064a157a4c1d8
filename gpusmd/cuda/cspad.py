"""Launchers of the CsPad common mode, modes 1 and 5, kernels/cm_cspad.cu:
:func:`cspad_common_mode_gpu` on a GPU and :func:`cspad_common_mode_host` through the
host build.
"""
from __future__ import annotations

import functools

import numpy as np

from ..errors import GpusmdError
from ._launch import _event_chunks
from .compile import _cupy, get_function
from .host import host_module


# ---- CsPad common mode, modes 1 and 5 (kernels/cm_cspad.cu) --------------------------------
CSPAD_SEG_SHAPE = (185, 388)  # kernels/cm_cspad.cu reads the unbonded pixels of a 2x1
CSPAD_BLOCK = 256             # threads per (segment, event) block, mode 1
CSPAD_HOST_BLOCK = 64         # host build: fewer std::threads (results do not depend on it)
CSPAD_MODE5_BLOCK = 32        # mode 5: one thread per segment
CSPAD_MAX_SLOTS = 2048        # kernels/cm_cspad.cu: leaves of the pairwise tree
CSPAD_INT_MAX = 2 ** 31 - 1


@functools.lru_cache(maxsize=None)
def pairwise_depth(n: int) -> int:
    """Depth of NumPy's pairwise-summation tree of n elements (leaves of <= 128)."""
    if n <= 128:
        return 0
    n2 = n // 2
    n2 -= n2 % 8
    return 1 + max(pairwise_depth(n2), pairwise_depth(n - n2))


def _cspad_args(xp, adu, good, nseg: int, mode: int):
    """Checked arguments: (adu contiguous float32 (B, npix), good uint8 or None, good
    event stride, segpix, depth)."""
    if mode not in (1, 5):
        raise GpusmdError(f"cspad common mode: mode must be 1 or 5, got {mode}")
    if not isinstance(adu, xp.ndarray) or adu.ndim != 2 or adu.dtype != np.float32:
        raise GpusmdError("cspad common mode: adu must be a (B, npix) float32 array, got "
                          f"{getattr(adu, 'dtype', type(adu).__name__)} "
                          f"{getattr(adu, 'shape', '')}")
    nseg = int(nseg)
    segpix = CSPAD_SEG_SHAPE[0] * CSPAD_SEG_SHAPE[1]
    if nseg < 1 or adu.shape[1] != nseg * segpix:
        raise GpusmdError(f"cspad common mode: {adu.shape[1]} pixels are not {nseg} segments "
                          f"of {CSPAD_SEG_SHAPE[0]} x {CSPAD_SEG_SHAPE[1]}")
    adu = xp.ascontiguousarray(adu)
    depth = pairwise_depth(segpix)
    if (1 << depth) > CSPAD_MAX_SLOTS:
        raise GpusmdError(f"cspad common mode: pairwise tree of depth {depth} is too deep")
    stride = 0
    if mode == 1:
        good = xp.asarray(good)
        if good.ndim == 1:
            good = good[None, :]
        if good.ndim != 2 or good.shape[1] != adu.shape[1] or good.shape[0] not in (1, adu.shape[0]):
            raise GpusmdError(f"cspad common mode: good {good.shape} does not match adu "
                              f"{adu.shape}")
        good = xp.ascontiguousarray(good.astype(bool, copy=False)).view(xp.uint8)
        stride = adu.shape[1] if good.shape[0] > 1 else 0
    else:
        good = None
    return adu, good, stride, segpix, depth


def _cspad_pars(mode, mean_max, rms_max, thresh, fallback):
    return (float(mean_max), float(rms_max), max(1, min(int(thresh), CSPAD_INT_MAX)),
            int(bool(fallback)))


def cspad_common_mode_gpu(adu, good, nseg: int, mode: int, mean_max: float,
                          rms_max: float = float("inf"), thresh: int = 100,
                          fallback: bool = True, block: int | None = None):
    """The CsPad common-mode kernels (kernels/cm_cspad.cu) on the current CuPy device.

    adu (B, nseg * 185 * 388) float32 (not modified); good (B, npix) or (npix,) bool /
    uint8 (mode 1 only). Mode 1: cmpars (1, mean_max, rms_max, thresh > 0, fallback);
    mode 5: mean_max is maxcorr. Returns (cm (B, nseg) float64, 0 where not applied;
    flag (B, nseg) uint8: 0 none, 1 the peak (mode 1), 2 the unbonded mean (mode 5 or
    the fallback)), as :mod:`gpusmd.calib.cm_cspad` computes them: subtract
    cm.astype(float32) from each segment."""
    cupy = _cupy()
    adu, good, stride, segpix, depth = _cspad_args(cupy, adu, good, nseg, mode)
    nbatch = adu.shape[0]
    cm = cupy.zeros((nbatch, nseg), dtype=cupy.float64)
    flag = cupy.zeros((nbatch, nseg), dtype=cupy.uint8)
    if nbatch == 0:
        return cm, flag
    mean_max, rms_max, thresh, fallback = _cspad_pars(mode, mean_max, rms_max, thresh, fallback)
    for b, count in _event_chunks(nbatch):
        if mode == 5:
            get_function("cm_cspad", "cspad_mode5")(
                (-(-nseg // CSPAD_MODE5_BLOCK), count), (CSPAD_MODE5_BLOCK,),
                (adu[b], np.int32(nseg), np.int32(segpix), np.float64(mean_max),
                 cm[b], flag[b]))
        else:
            g = good[b] if stride else good
            get_function("cm_cspad", "cspad_mode1")(
                (nseg, count), (int(block or CSPAD_BLOCK),),
                (adu[b], g, np.int64(stride), np.int32(nseg), np.int32(segpix),
                 np.float64(mean_max), np.float64(rms_max), np.int32(thresh),
                 np.int32(fallback), np.int32(depth), cm[b], flag[b]))
    return cm, flag


def cspad_common_mode_host(adu, good, nseg: int, mode: int, mean_max: float,
                           rms_max: float = float("inf"), thresh: int = 100,
                           fallback: bool = True, block: int | None = None):
    """The same CsPad kernels run on the CPU through the host build (tests); NumPy
    arrays, same contract and results as :func:`cspad_common_mode_gpu`."""
    adu, good, stride, segpix, depth = _cspad_args(np, adu, good, nseg, mode)
    nbatch = adu.shape[0]
    cm = np.zeros((nbatch, nseg), dtype=np.float64)
    flag = np.zeros((nbatch, nseg), dtype=np.uint8)
    if nbatch == 0:
        return cm, flag
    mean_max, rms_max, thresh, fallback = _cspad_pars(mode, mean_max, rms_max, thresh, fallback)
    module = host_module("cm_cspad")
    if mode == 5:
        module.launch("cspad_mode5", (-(-nseg // CSPAD_MODE5_BLOCK), nbatch), CSPAD_MODE5_BLOCK,
                      adu, nseg, segpix, mean_max, cm, flag)
    else:
        module.launch("cspad_mode1", (nseg, nbatch), int(block or CSPAD_HOST_BLOCK),
                      adu, good, stride, nseg, segpix, mean_max, rms_max, thresh, fallback,
                      depth, cm, flag)
    return cm, flag
