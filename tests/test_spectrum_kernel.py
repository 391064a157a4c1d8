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


def test_spectrum_kernel_splits_batches_beyond_the_grid_limit():
    """More events than CUDA's gridDim.y (65535, which the host launch enforces too): the
    batch goes in launches of at most 65535 events and counts as numpy.histogram."""
    from gpusmd.cuda import host_module
    from gpusmd.errors import GpusmdError
    rng = np.random.default_rng(5)
    data = rng.normal(0, 2, (65535 + 300, 5)).astype(np.float32)
    edges = np.array([-3.0, -1.0, 0.0, 1.0, 3.0])
    pixels = np.array([0, 2, 3, 4])
    got = spectrum_host(data, edges, pixels, blocks=1, block=1)
    expected = np.array([np.histogram(d[pixels], edges)[0] for d in data])
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(GpusmdError, match="65535"):
        host_module("spectrum").launch("spectrum_counts", (1, 65536), 1, data, None, 5, 5,
                                       edges, 4, np.zeros((65536, 4), np.uint32))


def test_spectrum_feature_gives_the_kernel_its_good_pixels(monkeypatch):
    """The spectrum function's device path hands the kernel the frames and the list of
    good pixels (here the kernel's host build on a stand-in device backend holding NumPy
    arrays): the counts of the CPU path, numpy.histogram of the good pixels."""
    import gpusmd.features.spectrum as sp
    from gpusmd.backend import Backend
    from gpusmd.config import Where
    from gpusmd.detectors import get_detector
    seen = []

    def kernel(data, edges, pixels=None):
        seen.append((data.shape, None if pixels is None else pixels.size))
        return spectrum_host(data, edges, pixels)

    monkeypatch.setattr(sp, "spectrum_gpu", kernel)
    model = get_detector("camera", (30, 40))
    rng = np.random.default_rng(8)
    mask = (rng.random(model.shape) > 0.2).astype(np.uint8)
    frames = rng.normal(3, 4, (4, *model.shape)).astype(np.float32)
    params = {"bins": [-5, 15, 40]}
    out = {}
    for name in ("gpu", "cpu"):
        f = sp.Spectrum("s", params, model, {"cmask": mask}, Backend(name, np),
                        Where("t.yaml", "f"))
        out[name] = f.process(frames)["histogram"]
    assert seen == [((4, 1200), int(mask.sum()))]      # whole frames, no masked copy
    np.testing.assert_array_equal(out["gpu"], out["cpu"])
    edges = np.linspace(-5, 15, 41)
    np.testing.assert_array_equal(out["cpu"], [np.histogram(f[mask != 0], edges)[0]
                                               for f in frames])


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
