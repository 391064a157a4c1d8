"""Launchers of the spectrum kernel, kernels/spectrum.cu: :func:`spectrum_gpu` on a GPU and
:func:`spectrum_host` through the host build.
"""
from __future__ import annotations

import numpy as np

from ..errors import GpusmdError
from ._launch import _event_chunks
from .compile import _cupy, get_function
from .host import host_module


# ---- spectrum (kernels/spectrum.cu) ---------------------------------------------------------
SPECTRUM_BLOCK = 256
SPECTRUM_MAX_BINS = 12288          # shared memory: 4 bytes a bin, 48 KB


def _spectrum_args(xp, data, pixels, edges):
    data = xp.ascontiguousarray(xp.asarray(data, dtype=xp.float32).reshape(len(data), -1))
    edges = xp.ascontiguousarray(xp.asarray(edges, dtype=xp.float64))
    nbins = int(edges.size) - 1
    if not 1 <= nbins <= SPECTRUM_MAX_BINS:
        raise GpusmdError(f"spectrum: {nbins} bins (1 to {SPECTRUM_MAX_BINS} on the GPU)")
    if pixels is not None:
        pixels = xp.ascontiguousarray(xp.asarray(pixels, dtype=xp.int64))
    npix = data.shape[1] if pixels is None else int(pixels.size)
    return data, pixels, npix, edges, nbins


def spectrum_gpu(data, edges, pixels=None):
    """(B, nbins) int32 counts of each event's values (of the given flat pixels, or all)
    in numpy.histogram's bins, on the current CuPy device."""
    cupy = _cupy()
    data, pixels, npix, edges, nbins = _spectrum_args(cupy, data, pixels, edges)
    out = cupy.zeros((data.shape[0], nbins), dtype=cupy.uint32)
    if npix:
        blocks = min(-(-npix // SPECTRUM_BLOCK), 64)
        kernel = get_function("spectrum", "spectrum_counts")
        for b, count in _event_chunks(data.shape[0]):
            kernel((blocks, count), (SPECTRUM_BLOCK,),
                   (data[b], pixels if pixels is not None else 0, np.int64(data.shape[1]),
                    np.int64(npix), edges, np.int32(nbins), out[b]), shared_mem=4 * nbins)
    return out.astype(cupy.int32)


def spectrum_host(data, edges, pixels=None, blocks: int = 3, block: int = 32):
    """The same kernel on the CPU through the host build (tests)."""
    data, pixels, npix, edges, nbins = _spectrum_args(np, data, pixels, edges)
    out = np.zeros((data.shape[0], nbins), dtype=np.uint32)
    if npix:
        module = host_module("spectrum")
        for b, count in _event_chunks(data.shape[0]):
            module.launch("spectrum_counts", (blocks, count), block, data[b], pixels,
                          data.shape[1], npix, edges, nbins, out[b], shared_mem=4 * nbins)
    return out.astype(np.int32)
