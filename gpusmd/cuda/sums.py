"""Launcher of the per-run sum images, kernels/run_sums.cu: :func:`run_sums`, on a GPU or
through the host build.
"""
from __future__ import annotations

import numpy as np

from ._launch import _sm_count
from .compile import _cupy, get_function
from .host import host_module


# ---- per-run sum images (kernels/run_sums.cu) --------------------------------------------------
RUN_SUMS_MAX = 8         # kernels/run_sums.cu: sums added per launch
RUN_SUMS_BLOCK = 256


def run_sums(calib, sum_keys, acc, host: bool = False):
    """Add a batch (B, *shape) of calibrated frames to the accumulators ``acc``
    (gpusmd.features.sums.Accumulators, on the backend) in one read of the batch per
    RUN_SUMS_MAX sums, on the current CuPy device or (``host``) through the host build."""
    from ..features.sums import sum_kind
    xp = np if host else _cupy()
    flat = xp.ascontiguousarray(calib, dtype=xp.float32).reshape(len(calib), -1)
    nbatch, npix = flat.shape
    sums = acc.stack.reshape(len(sum_keys), npix)
    maxima = acc.maxima.reshape(npix) if acc.maxima is not None else xp.zeros(1, xp.float32)
    has_max = int(acc.maxima is not None)
    if npix == 0 or not (sum_keys or has_max):
        return
    kinds = [sum_kind(key) for key in sum_keys] or [(0, 0.0)]
    for k0 in range(0, max(1, len(sum_keys)), RUN_SUMS_MAX):
        chunk = kinds[k0:k0 + RUN_SUMS_MAX]
        nsums = min(len(sum_keys) - k0, RUN_SUMS_MAX)   # 0: only the maxima
        kind = xp.asarray([c[0] for c in chunk], dtype=xp.int32)
        thr = xp.asarray([c[1] for c in chunk], dtype=xp.float32)
        rows = sums[k0:k0 + nsums] if nsums else xp.zeros((1, npix), xp.float64)
        first_max = has_max if k0 == 0 else 0
        blocks = -(-npix // RUN_SUMS_BLOCK)
        if host:
            host_module("run_sums").launch("run_sums", blocks, RUN_SUMS_BLOCK, flat, nbatch,
                                           npix, nsums, kind, thr, rows, first_max, maxima)
        else:
            blocks = min(blocks, 32 * _sm_count(xp.cuda.Device().id))
            get_function("run_sums", "run_sums")(
                (blocks,), (RUN_SUMS_BLOCK,),
                (flat, np.int64(nbatch), np.int64(npix), np.int32(nsums), kind, thr, rows,
                 np.int32(first_max), maxima))
