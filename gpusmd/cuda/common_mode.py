"""Launchers of the common mode per group, kernels/common_mode.cu: :func:`group_correct_gpu`
on a GPU and :func:`group_correct_host` through the host build, with the checks of the
groups and of the rule that the fused calibration passes (:mod:`.calibrate`) share.
"""
from __future__ import annotations

import numpy as np

from ..errors import GpusmdError
from ._launch import _event_chunks
from .compile import _cupy, get_function
from .host import host_module


# ---- common mode per group (kernels/common_mode.cu) -------------------------------------------
CM_SORT_MAX = 1024       # kernels/common_mode.cu: groups up to this size are sorted in shared memory
CM_MAX_SIZE = 1 << 24    # kernels/common_mode.cu: largest group
CM_BLOCK = 256           # threads per block for large groups (radix select) ...
CM_BLOCK_HUGE = 1024     # ... and for groups over CM_HUGE pixels (whole frames): the
                         # kernel's __launch_bounds__ (CM_BLOCK_MAX)
CM_HUGE = 65536
CM_HOST_BLOCK = 64       # host build: fewer std::threads per block (results do not depend on it)
_CM_STATS = {"median": 0, "mean": 1}
_CM_APPLY = {"good": 0, "all": 1}
_cm_checked: dict = {}   # id(groups.starts) -> (starts, npix bound it was checked for)
_cm_device_starts: dict = {}



def _cm_block(size: int) -> int:
    """Threads per block for a group size: half the padded sort for small groups (one
    compare-exchange per thread and step), at least a warp; CM_BLOCK for radix-select
    groups, CM_BLOCK_HUGE for whole frames (one block per group and event)."""
    if size > CM_HUGE:
        return CM_BLOCK_HUGE
    if size > CM_SORT_MAX:
        return CM_BLOCK
    n = 1 << max(0, int(size) - 1).bit_length()
    return max(32, min(CM_BLOCK, n // 2))


def _cm_starts_host(groups) -> np.ndarray:
    starts = groups.starts
    if not isinstance(starts, np.ndarray) and hasattr(starts, "get"):
        starts = starts.get()
    return np.ascontiguousarray(np.asarray(starts), dtype=np.int64)


def _cm_check_groups(groups, npix: int) -> tuple[int, int, int, int, int, int]:
    """(ngroups, size, n_outer, outer_stride, n_inner, inner_stride) after checking that
    every pixel of every group lies in [0, npix) (once per groups and npix)."""
    n_outer, n_inner = int(groups.n_outer), int(groups.n_inner)
    outer, inner = int(groups.outer_stride), int(groups.inner_stride)
    size = n_outer * n_inner
    if n_outer < 1 or n_inner < 1:
        raise GpusmdError(f"group_correct: empty groups ({n_outer} x {n_inner})")
    if size > CM_MAX_SIZE:
        raise GpusmdError(f"group_correct: groups of {size} pixels, the kernel takes at most "
                          f"{CM_MAX_SIZE}")
    starts = groups.starts
    ngroups = len(starts)
    if n_outer >= 1 << 31 or n_inner >= 1 << 31 or ngroups >= 1 << 31:
        raise GpusmdError("group_correct: group counts must fit 32 bits")
    key = id(starts)
    seen = _cm_checked.get(key)
    if seen is None or seen[0] is not starts or seen[1] != npix:
        host = _cm_starts_host(groups)
        if ngroups:
            lo = min(0, (n_outer - 1) * outer) + min(0, (n_inner - 1) * inner)
            hi = max(0, (n_outer - 1) * outer) + max(0, (n_inner - 1) * inner)
            if int(host.min()) + lo < 0 or int(host.max()) + hi >= npix:
                raise GpusmdError(f"group_correct: groups {groups.name!r} reach pixels outside "
                                  f"[0, {npix})")
        if len(_cm_checked) > 64:
            _cm_checked.clear()
        _cm_checked[key] = (starts, npix)
    return ngroups, size, n_outer, outer, n_inner, inner


def _cm_args(xp, adu, good, groups, rule):
    """Checked kernel arguments (arrays, then the scalars after ``starts``)."""
    if not isinstance(adu, xp.ndarray) or adu.ndim != 2 or adu.dtype != np.float32:
        raise GpusmdError("group_correct: adu must be a (B, npix) float32 array, got "
                          f"{getattr(adu, 'dtype', type(adu).__name__)} "
                          f"{getattr(adu, 'shape', '')}")
    if not adu.flags.c_contiguous:
        raise GpusmdError("group_correct: adu must be C-contiguous (it is corrected in place)")
    good = xp.asarray(good)
    if good.shape != adu.shape:
        raise GpusmdError(f"group_correct: good {good.shape} does not match adu {adu.shape}")
    if good.dtype == np.bool_:
        good = xp.ascontiguousarray(good).view(xp.uint8)
    elif good.dtype == np.uint8:
        good = xp.ascontiguousarray(good)
    else:
        raise GpusmdError(f"group_correct: good must be bool or uint8, got {good.dtype}")
    npix = int(adu.shape[1])
    ngroups, size, n_outer, outer, n_inner, inner = _cm_check_groups(groups, npix)
    stat, *rest = _cm_rule_scalars(rule, size)
    scalars = (n_outer, outer, n_inner, inner, npix, ngroups, stat, *rest)
    return good, ngroups, size, scalars


def _cm_rule_scalars(rule, size: int) -> tuple:
    """(stat, lo, hi, min_count, min_fraction, max_abs, inclusive, apply_all) of a Rule,
    checked, for groups of ``size`` pixels."""
    if rule.stat not in _CM_STATS:
        raise GpusmdError(f"group_correct: unknown statistic {rule.stat!r} (median, mean)")
    if rule.apply_to not in _CM_APPLY:
        raise GpusmdError(f"group_correct: unknown apply_to {rule.apply_to!r} (good, all)")
    min_count = max(1, min(int(rule.min_count), size + 1))
    return (_CM_STATS[rule.stat], float(rule.lo), float(rule.hi), min_count,
            float(rule.min_fraction), float(rule.max_abs), int(bool(rule.inclusive)),
            _CM_APPLY[rule.apply_to])


def _cm_starts_device(cupy, groups):
    key = (id(groups.starts), cupy.cuda.Device().id)
    hit = _cm_device_starts.get(key)
    if hit is None or hit[0] is not groups.starts:
        if len(_cm_device_starts) > 64:
            _cm_device_starts.clear()
        hit = (groups.starts, cupy.asarray(_cm_starts_host(groups)))
        _cm_device_starts[key] = hit
    return hit[1]


def group_correct_gpu(adu, good, groups, rule, block: int | None = None):
    """The common-mode kernel on the current CuPy device, same contract as
    :func:`gpusmd.calib.common_mode.group_correct`: corrects adu (B, npix) float32 in
    place, group by group (groups must not overlap); good (B, npix) bool or uint8.
    Returns (cm (B, ngroups) float32, 0 where skipped; applied (B, ngroups) bool)."""
    cupy = _cupy()
    good, ngroups, size, scalars = _cm_args(cupy, adu, good, groups, rule)
    nbatch = adu.shape[0]
    cm = cupy.zeros((nbatch, ngroups), dtype=cupy.float32)
    applied = cupy.zeros((nbatch, ngroups), dtype=cupy.uint8)
    if nbatch == 0 or ngroups == 0:
        return cm, applied.view(cupy.bool_)
    starts = _cm_starts_device(cupy, groups)
    (n_outer, outer, n_inner, inner, npix, _, stat, lo, hi, min_count, min_fraction, max_abs,
     inclusive, apply_all) = scalars
    kernel = get_function("common_mode", "group_correct")
    threads = int(block or _cm_block(size))
    for b, count in _event_chunks(nbatch):
        kernel((ngroups, count), (threads,),
               (adu[b], good[b], starts, np.int32(n_outer), np.int64(outer),
                np.int32(n_inner), np.int64(inner), np.int64(npix), np.int32(ngroups),
                np.int32(stat), np.float32(lo), np.float32(hi), np.int32(min_count),
                np.float64(min_fraction), np.float32(max_abs), np.int32(inclusive),
                np.int32(apply_all), cm[b], applied[b]))
    return cm, applied.view(cupy.bool_)


def group_correct_host(adu, good, groups, rule, block: int | None = None):
    """The same common-mode kernel run on the CPU through the host build (tests); NumPy
    arrays, same contract and results as :func:`group_correct_gpu`."""
    good, ngroups, size, scalars = _cm_args(np, adu, good, groups, rule)
    nbatch = adu.shape[0]
    cm = np.zeros((nbatch, ngroups), dtype=np.float32)
    applied = np.zeros((nbatch, ngroups), dtype=np.uint8)
    if nbatch and ngroups:
        starts = _cm_starts_host(groups)
        threads = int(block or min(CM_HOST_BLOCK, _cm_block(size)))
        host_module("common_mode").launch("group_correct", (ngroups, nbatch), threads,
                                          adu, good, starts,
                                          *scalars, cm, applied)
    return cm, applied.view(np.bool_)
