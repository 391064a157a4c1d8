"""The weighted-histogram kernel (kernels/histogram.cu) against np.bincount: on the CPU
through the host build, and on a GPU when one is present. NVRTC compilation of the file
is covered by tests/test_kernels.py (every kernels/*.cu)."""
from __future__ import annotations

import numpy as np
import pytest

from gpusmd import cuda
from conftest import gpu_available


def reference(data, bins, weight, nbins, lo=None, hi=None):
    data = data.reshape(len(data), -1).astype(np.float64)
    if lo is not None:
        data = np.where(data < lo, 0, data)
    if hi is not None:
        data = np.where(data > hi, 0, data)
    bins = bins.ravel()
    ok = bins >= 0
    out = np.zeros((len(data), nbins))
    for b in range(len(data)):
        w = (data[b] * weight.ravel().astype(np.float32).astype(np.float64))[ok]
        out[b] = np.bincount(bins[ok], weights=w, minlength=nbins)
    return out


def case(nbins, seed, shape=(3, 40, 50), hot=False):
    rng = np.random.default_rng(seed)
    data = rng.normal(5, 3, shape).astype(np.float32)
    bins = rng.integers(-1, nbins, shape[1:]).astype(np.int32)
    if hot:
        bins[:] = np.where(bins >= 0, 0, -1)        # every pixel in one bin
    weight = rng.uniform(0.5, 2, shape[1:]).astype(np.float32)
    return data, bins, weight


@pytest.mark.parametrize("nbins, hot, lo, hi, shared", [
    (17, False, None, None, True),
    (17, True, None, None, True),
    (300, False, 2.0, 9.0, True),
    (300, False, 2.0, None, False),
    (20000, False, None, 8.0, True),               # too many bins for shared memory
])
def test_host_build_matches_bincount(nbins, hot, lo, hi, shared):
    data, bins, weight = case(nbins, nbins, hot=hot)
    got = cuda.histogram_host(data, bins, weight, nbins, lo, hi, shared=shared)
    np.testing.assert_allclose(got, reference(data, bins, weight, nbins, lo, hi),
                               rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(not gpu_available(), reason="no CUDA device")
@pytest.mark.parametrize("nbins", [17, 5000, 20000])
def test_gpu_matches_bincount(nbins):
    import cupy
    data, bins, weight = case(nbins, 7, shape=(5, 300, 400))
    got = cupy.asnumpy(cuda.histogram_gpu(cupy.asarray(data), bins, weight, nbins, 1.0, 10.0))
    np.testing.assert_allclose(got, reference(data, bins, weight, nbins, 1.0, 10.0),
                               rtol=1e-5, atol=1e-3)
