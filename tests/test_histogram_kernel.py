"""The weighted-histogram kernels (kernels/histogram.cu): on the CPU through the host
build, and on a GPU when one is present, against the NumPy path (cuda.histogram_numpy,
bit for bit: the same summation order) and against a plain float64 np.bincount (to
float64 rounding). NVRTC compilation of the file is covered by tests/test_kernels.py."""
from __future__ import annotations

import numpy as np
import pytest

from gpusmd import cuda
from conftest import gpu_available


def reference(data, bins, weight, nbins, lo=None, hi=None):
    data = data.reshape(len(data), -1).astype(np.float32)
    if lo is not None:
        data = np.where(data < lo, np.float32(0), data)
    if hi is not None:
        data = np.where(data > hi, np.float32(0), data)
    bins = bins.ravel()
    ok = (bins >= 0) & (bins < nbins)
    out = np.zeros((len(data), nbins))
    for b in range(len(data)):
        w = (data[b] * weight.ravel().astype(np.float32)).astype(np.float64)[ok]
        out[b] = np.bincount(bins[ok], weights=w, minlength=nbins)
    return out


def case(nbins, seed, shape=(3, 40, 50), hot=False):
    rng = np.random.default_rng(seed)
    data = rng.normal(5, 3, shape).astype(np.float32)
    data[0, :3] *= 1e6                                # large and small terms together
    bins = rng.integers(-1, nbins, shape[1:]).astype(np.int32)
    if hot:
        bins[:] = np.where(bins >= 0, 0, -1)        # every pixel in one bin
    weight = rng.uniform(0.5, 2, shape[1:]).astype(np.float32)
    return data, bins, weight


CASES = [(17, False, None, None), (17, True, None, None), (300, False, 2.0, 9.0),
         (300, False, 2.0, None), (20000, False, None, 8.0)]


@pytest.mark.parametrize("nbins, hot, lo, hi", CASES)
def test_host_build_equals_numpy_path_for_any_launch(nbins, hot, lo, hi):
    data, bins, weight = case(nbins, nbins, hot=hot)
    plan = cuda.hist_plan(bins, weight, nbins)
    expected = cuda.histogram_numpy(data, plan, lo, hi)
    for blocks, block in [(1, 1), (3, 32), (7, 64), (64, 128)]:
        got = cuda.histogram_host(data, plan, lo, hi, blocks=blocks, block=block)
        np.testing.assert_array_equal(got, expected)
    # the kernels' arrays alone (what a device plan holds)
    np.testing.assert_array_equal(cuda.histogram_host(data, plan.to(np), lo, hi), expected)
    # one event at a time: the same sums
    np.testing.assert_array_equal(
        np.concatenate([cuda.histogram_host(data[i:i + 1], plan, lo, hi) for i in range(3)]),
        expected)
    # a plain sequential bincount: the same to float64 rounding
    ref = reference(data, bins, weight, nbins, lo, hi)
    scale = np.abs(data).reshape(len(data), -1).sum(axis=1, keepdims=True) * 2
    assert np.all(np.abs(expected - ref) <= 1e-15 * scale)


def test_plan_slices_stay_within_bins():
    bins = np.array([3, -1, 0, 3, 3, 7, 0, 3, 3, 3], np.int32)
    plan = cuda.hist_plan(bins, np.ones(10, np.float32), 5, slice_len=2, lanes=2)
    # bin 7 (>= nbins) and -1 are not counted; bins sorted, pixels ascending within a bin
    np.testing.assert_array_equal(plan.perm, [2, 6, 0, 3, 4, 7, 8, 9])
    # chunks of 2 x 2 entries, 2 interleaved slices each: bin 0 [0, 2), bin 3 [2, 6), [6, 8)
    np.testing.assert_array_equal(plan.slice_start, [0, 1, 2, 3, 6, 7])
    np.testing.assert_array_equal(plan.slice_stop, [2, 2, 6, 6, 8, 8])
    np.testing.assert_array_equal(plan.bin_of_slice, [0, 0, 3, 3, 3, 3])
    np.testing.assert_array_equal(plan.bin_slices, [0, 2, 2, 2, 6, 6])
    np.testing.assert_array_equal(plan.slice_of_pixel, [2, 6, 0, 3, 2, 6, 1, 3, 4, 5])
    data = np.arange(10, dtype=np.float32)[None]
    expected = [[8.0, 0.0, 0.0, 31.0, 0.0]]
    np.testing.assert_array_equal(cuda.histogram_host(data, plan), expected)
    np.testing.assert_array_equal(cuda.histogram_numpy(data, plan), expected)


def test_nan_propagates_like_numpy():
    data, bins, weight = case(17, 3)
    data[1, 5, 5] = np.nan
    plan = cuda.hist_plan(bins, weight, 17)
    got = cuda.histogram_host(data, plan)
    np.testing.assert_array_equal(got, cuda.histogram_numpy(data, plan))
    assert np.isnan(got[1]).sum() == (bins[5, 5] >= 0)


@pytest.mark.skipif(not gpu_available(), reason="no CUDA device")
@pytest.mark.parametrize("nbins", [17, 5000, 20000])
def test_gpu_equals_numpy_path(nbins):
    import cupy
    data, bins, weight = case(nbins, 7, shape=(5, 300, 400))
    plan = cuda.hist_plan(bins, weight, nbins)
    expected = cuda.histogram_numpy(data, plan, 1.0, 10.0)
    for batch in (5, 2):
        got = cupy.asnumpy(cuda.histogram_gpu(cupy.asarray(data[:batch]), plan.to(cupy),
                                              1.0, 10.0))
        np.testing.assert_array_equal(got, expected[:batch])
