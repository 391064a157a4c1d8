"""The per-event weighted histogram of kernels/histogram.cu: its summation plan
(:class:`HistPlan`, :func:`hist_plan`), the NumPy path equal to it bit for bit
(:func:`histogram_numpy`) and the launchers (:func:`histogram_gpu`, :func:`histogram_host`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import GpusmdError
from ._launch import _sm_count
from .compile import _cupy, get_function
from .host import host_module


# ---- weighted histogram (kernels/histogram.cu) ----------------------------------------------
HIST_BLOCK = 256
HIST_LO, HIST_HI = 1, 2
HIST_LANES = 32                    # slices interleaved over a chunk of a bin's entries ...
HIST_SLICE = 32                    # ... each of up to this many entries
HIST_MAX_GRID_Y = 65535            # events per launch


@dataclass(frozen=True)
class HistPlan:
    """The fixed summation order of a per-event weighted histogram (kernels/histogram.cu):
    the counted pixels sorted by bin (pixels ascending within a bin), each bin's entries
    cut into chunks of lanes x slice_len, a chunk into ``lanes`` interleaved slices
    (entries start, start + lanes, ... below stop). Arrays on the host (NumPy);
    :meth:`to` copies the kernels' to another array module."""
    npix: int
    nbins: int
    lanes: int
    perm: object            # (nent,) int32: pixel of each entry
    wsorted: object         # (nent,) float32: its weight
    slice_start: object     # (nslices,) int32: first entry of each slice
    slice_stop: object      # (nslices,) int32: end of its chunk
    bin_slices: object      # (nbins + 1,) int32: first slice of each bin
    weight: object          # (npix,) float32, 0 where not counted
    slice_of_pixel: object  # (npix,) int64, nslices where not counted
    bin_of_slice: object    # (nslices,) int64

    @property
    def nslices(self) -> int:
        return len(self.bin_of_slice)

    def to(self, xp) -> "HistPlan":
        """The plan for the kernels with their arrays in module ``xp`` (8 bytes per counted
        pixel; the NumPy path's per-pixel arrays are left out)."""
        return HistPlan(self.npix, self.nbins, self.lanes, *(xp.asarray(a) for a in (
            self.perm, self.wsorted, self.slice_start, self.slice_stop, self.bin_slices)),
            None, None, self.bin_of_slice)


def hist_plan(bins, weight, nbins: int, slice_len: int = HIST_SLICE,
              lanes: int = HIST_LANES) -> HistPlan:
    """The plan for bins (*shape) int (-1 or >= nbins: not counted) and weight (*shape)."""
    bins = np.asarray(bins).ravel().astype(np.int64)
    weight = np.asarray(weight, dtype=np.float32).ravel()
    if bins.size != weight.size:
        raise GpusmdError(f"histogram: bins ({bins.size}) and weight ({weight.size}) must have "
                          f"one value per pixel")
    nbins = int(nbins)
    counted = np.flatnonzero((bins >= 0) & (bins < nbins))
    perm = counted[np.argsort(bins[counted], kind="stable")]
    size = lanes * slice_len
    if len(perm) > 2 ** 31 - 1 - size:          # int32 entry indices in the kernel
        raise GpusmdError(f"histogram: {len(perm)} pixels are too many")
    per_bin = np.bincount(bins[perm], minlength=nbins)
    first_entry = np.concatenate([[0], np.cumsum(per_bin)])
    chunks_per_bin = -(-per_bin // size)
    chunk_bin = np.repeat(np.arange(nbins), chunks_per_bin)
    chunk_rank = np.arange(len(chunk_bin)) - np.repeat(np.cumsum(chunks_per_bin) - chunks_per_bin,
                                                       chunks_per_bin)
    chunk_base = first_entry[chunk_bin] + chunk_rank * size
    chunk_end = np.minimum(chunk_base + size, first_entry[chunk_bin + 1])
    slice_start = (chunk_base[:, None] + np.arange(lanes)[None, :]).ravel()
    chunk_of_entry = np.repeat(np.arange(len(chunk_bin)), chunk_end - chunk_base)
    slice_of_pixel = np.full(bins.size, len(chunk_bin) * lanes, np.int64)
    slice_of_pixel[perm] = (chunk_of_entry * lanes
                            + (np.arange(len(perm)) - chunk_base[chunk_of_entry]) % lanes)
    counted_weight = np.zeros_like(weight)
    counted_weight[perm] = weight[perm]
    return HistPlan(int(bins.size), nbins, int(lanes), perm.astype(np.int32), weight[perm],
                    slice_start.astype(np.int32), np.repeat(chunk_end, lanes).astype(np.int32),
                    np.concatenate([[0], np.cumsum(chunks_per_bin * lanes)]).astype(np.int32),
                    counted_weight, slice_of_pixel, np.repeat(chunk_bin, lanes).astype(np.int64))


def histogram_numpy(data, plan: HistPlan, lo=None, hi=None):
    """The kernels' sums with NumPy, bit for bit: the same float32 products added in the
    same order (np.bincount adds one after another, so in pixel order, which is each
    slice's entry order)."""
    data = np.asarray(data, dtype=np.float32).reshape(len(data), -1)
    if lo is not None:
        data = np.where(data < lo, np.float32(0), data)
    if hi is not None:
        data = np.where(data > hi, np.float32(0), data)
    out = np.empty((data.shape[0], plan.nbins))
    for b, values in enumerate(data * plan.weight[None, :]):
        partial = np.bincount(plan.slice_of_pixel, weights=values, minlength=plan.nslices + 1)
        out[b] = np.bincount(plan.bin_of_slice, weights=partial[:plan.nslices],
                             minlength=plan.nbins)
    return out


def histogram_compiled(data, plan: HistPlan, lo=None, hi=None):
    """histogram_numpy on the compiled CPU engine (gpusmd.numba_kernels), bit for bit."""
    from ..cpu_engine import launch
    data = np.ascontiguousarray(np.asarray(data, dtype=np.float32).reshape(len(data), -1))
    out = np.empty((data.shape[0], plan.nbins))
    flags = (HIST_LO if lo is not None else 0) | (HIST_HI if hi is not None else 0)
    launch("histogram", data, plan.weight, plan.slice_of_pixel, plan.bin_of_slice,
           np.float32(0 if lo is None else lo), np.float32(0 if hi is None else hi), flags, out)
    return out


def _hist_args(xp, data, plan: HistPlan, lo, hi):
    """(data (B, npix) f32, plan arrays in xp, npix, lo, hi, flags)."""
    data = xp.asarray(data, dtype=xp.float32)
    data = xp.ascontiguousarray(data.reshape(data.shape[0], -1))
    if data.shape[1] != plan.npix:
        raise GpusmdError(f"histogram: frames of {data.shape[1]} pixels, the plan's "
                          f"have {plan.npix}")
    if data.shape[0] > HIST_MAX_GRID_Y:
        raise GpusmdError(f"histogram: {data.shape[0]} events > {HIST_MAX_GRID_Y} per launch")
    arrays = [xp.ascontiguousarray(xp.asarray(getattr(plan, k))) for k in
              ("perm", "wsorted", "slice_start", "slice_stop", "bin_slices")]
    flags = (HIST_LO if lo is not None else 0) | (HIST_HI if hi is not None else 0)
    lo = 0.0 if lo is None else float(lo)
    hi = 0.0 if hi is None else float(hi)
    return data, arrays, plan.npix, lo, hi, flags


def histogram_gpu(data, plan: HistPlan, lo=None, hi=None):
    """Per-event weighted histogram on the current CuPy device: data (B, *shape) float32;
    values below lo / above hi count as 0. Returns (B, nbins) float64 sums of value *
    weight per bin, equal bit for bit to :func:`histogram_numpy` (pass a plan already
    on the device, ``plan.to(cupy)``, to skip the copies)."""
    cupy = _cupy()
    data, (perm, wsorted, start, stop, bin_slices), npix, lo, hi, flags = _hist_args(
        cupy, data, plan, lo, hi)
    batch, nslices, nbins = data.shape[0], plan.nslices, plan.nbins
    out = cupy.zeros((batch, nbins), dtype=cupy.float64)
    if batch and nslices:
        partial = cupy.empty((batch, nslices), dtype=cupy.float64)
        per_event = max(1, (32 * _sm_count(cupy.cuda.Device().id)) // batch)
        get_function("histogram", "hist_slices")(
            (min(-(-nslices // HIST_BLOCK), per_event), batch), (HIST_BLOCK,),
            (data, perm, wsorted, start, stop, partial, np.int64(npix), np.int32(nslices),
             np.int32(plan.lanes), np.float32(lo), np.float32(hi), np.int32(flags)))
        get_function("histogram", "hist_bins")(
            (min(-(-nbins // HIST_BLOCK), per_event), batch), (HIST_BLOCK,),
            (partial, bin_slices, out, np.int32(nslices), np.int32(nbins)))
    return out


def histogram_host(data, plan: HistPlan, lo=None, hi=None, blocks: int = 4, block: int = 64):
    """The same kernels run on the CPU through the host build (tests); any ``blocks`` and
    ``block`` give the same result."""
    data, (perm, wsorted, start, stop, bin_slices), npix, lo, hi, flags = _hist_args(
        np, data, plan, lo, hi)
    batch, nslices, nbins = data.shape[0], plan.nslices, plan.nbins
    out = np.zeros((batch, nbins), dtype=np.float64)
    if batch and nslices:
        partial = np.empty((batch, nslices), dtype=np.float64)
        module = host_module("histogram")
        module.launch("hist_slices", (blocks, batch), block, data, perm, wsorted, start, stop,
                      partial, npix, nslices, plan.lanes, lo, hi, flags)
        module.launch("hist_bins", (blocks, batch), block, partial, bin_slices, out, nslices,
                      nbins)
    return out
