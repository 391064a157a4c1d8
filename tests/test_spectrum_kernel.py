"""The spectrum kernel (host build) counts like numpy.histogram."""
import numpy as np
import pytest

from gpusmd.cuda import spectrum_host


@pytest.mark.parametrize("edges", [
    np.linspace(-5, 50, 56),                      # uniform
    np.array([-3.0, -1.0, 0.0, 0.5, 2.0, 10.0]),  # uneven
    np.array([0.0, 1.0]),                         # one closed bin
])
def test_spectrum_kernel_equals_numpy_histogram(edges):
    rng = np.random.default_rng(2)
    data = rng.normal(5, 10, (3, 4000)).astype(np.float32)
    data[0, :20] = edges[:20].repeat(2)[:20] if len(edges) >= 10 else edges[0]   # on edges
    data[1, :5] = [np.nan, np.inf, -np.inf, edges[-1], edges[0]]
    expected = np.array([np.histogram(d, edges)[0] for d in data])
    np.testing.assert_array_equal(spectrum_host(data, edges), expected)
    pixels = np.flatnonzero(rng.random(4000) > 0.3)
    expected = np.array([np.histogram(d[pixels], edges)[0] for d in data])
    np.testing.assert_array_equal(spectrum_host(data, edges, pixels), expected)


@pytest.mark.gpu
def test_spectrum_gpu_equals_numpy_histogram():
    from gpusmd.backend import get_backend
    backend = get_backend("auto")     # the GPU when there is one, whatever $GPUSMD_BACKEND
    if not backend.is_gpu:
        pytest.skip("no CUDA device")
    from gpusmd.cuda import spectrum_gpu
    data = np.random.default_rng(3).normal(0, 5, (4, 100000)).astype(np.float32)
    edges = np.linspace(-10, 10, 101)
    got = backend.to_host(spectrum_gpu(backend.asarray(data), edges))
    np.testing.assert_array_equal(got, [np.histogram(d, edges)[0] for d in data])
