"""Launchers of the projection kernel, kernels/projection.cu: :func:`project_gpu` on a GPU
and :func:`project_host` through the host build.
"""
from __future__ import annotations

import numpy as np

from ..errors import GpusmdError
from ._launch import _sm_count
from .compile import _cupy, get_function
from .host import host_module


# ---- projection (kernels/projection.cu) ---------------------------------------------------
PROJECT_BLOCK = 256
PJ_LO, PJ_HI, PJ_SINGLE, PJ_MEAN, PJ_MASK = 1, 2, 4, 8, 16


def _project_args(xp, data, axis: int, mask, inv_count, lo, hi, single_photon, mean):
    """(data, mask, inv_count, out shape, (nbatch, outer, len, inner), lo, hi, flags)."""
    data = xp.ascontiguousarray(xp.asarray(data, dtype=xp.float32))
    if data.ndim < 2:
        raise GpusmdError(f"project: data must be (B, ...), got shape {data.shape}")
    shape = data.shape[1:]
    if not 0 <= axis < len(shape):
        raise GpusmdError(f"project: axis {axis} is not an axis of {shape}")
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    out_shape = (data.shape[0], *shape[:axis], *shape[axis + 1:])
    has_mask = mask is not None
    if has_mask:
        mask = xp.ascontiguousarray(xp.asarray(mask, dtype=xp.float32))
        if mask.shape != shape:
            raise GpusmdError(f"project: mask shape {mask.shape} is not the input's {shape}")
    else:
        mask = xp.zeros(1, xp.float32)          # not read: no PJ_MASK flag
    if mean:
        inv_count = xp.ascontiguousarray(xp.asarray(inv_count, dtype=xp.float64))
        if inv_count.size != outer * inner:
            raise GpusmdError(f"project: inv_count has {inv_count.size} elements, "
                              f"the output {outer * inner}")
    else:
        inv_count = xp.zeros(1, xp.float64)
    flags = ((PJ_LO if lo is not None else 0) | (PJ_HI if hi is not None else 0)
             | (PJ_SINGLE if single_photon else 0) | (PJ_MEAN if mean else 0)
             | (PJ_MASK if has_mask else 0))
    lo = 0.0 if lo is None else float(lo)
    hi = 0.0 if hi is None else float(hi)
    dims = (data.shape[0], outer, shape[axis], inner)
    return data, mask, inv_count, out_shape, dims, lo, hi, flags


def project_gpu(data, axis: int, mask=None, inv_count=None, lo=None, hi=None,
                single_photon=False, mean=False):
    """The projection kernel on the current CuPy device: data (B, *shape) float32 summed
    (mean: times inv_count, (shape without axis) float64) over ``axis`` of one event's
    shape, after thresholds / single photon / mask (shape float32 or None). Returns
    (B, *shape without axis) float32."""
    cupy = _cupy()
    data, mask, inv_count, out_shape, dims, lo, hi, flags = _project_args(
        cupy, data, axis, mask, inv_count, lo, hi, single_photon, mean)
    out = cupy.empty(out_shape, dtype=cupy.float32)
    n = dims[0] * dims[1] * dims[3]
    if n:
        blocks = min(-(-n // PROJECT_BLOCK), 32 * _sm_count(cupy.cuda.Device().id))
        get_function("projection", "project")(
            (blocks,), (PROJECT_BLOCK,),
            (data, mask, inv_count, out, *(np.int64(d) for d in dims),
             np.float32(lo), np.float32(hi), np.int32(flags)))
    return out


def project_host(data, axis: int, mask=None, inv_count=None, lo=None, hi=None,
                 single_photon=False, mean=False, blocks: int | None = None):
    """The same projection kernel run on the CPU through the host build (tests)."""
    data, mask, inv_count, out_shape, dims, lo, hi, flags = _project_args(
        np, data, axis, mask, inv_count, lo, hi, single_photon, mean)
    out = np.empty(out_shape, dtype=np.float32)
    n = dims[0] * dims[1] * dims[3]
    if n:
        blocks = blocks or -(-n // PROJECT_BLOCK)
        host_module("projection").launch("project", blocks, PROJECT_BLOCK, data, mask,
                                         inv_count, out, *dims, lo, hi, flags)
    return out
