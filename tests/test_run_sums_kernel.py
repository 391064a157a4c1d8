"""The run-sums kernel (kernels/run_sums.cu) through the host build: every sum image of a
batch in one read, bit for bit the NumPy reference (RunSums.update_reference), over
several batches, with NaNs and more sums than one launch takes."""
import numpy as np

from gpusmd import cuda
from gpusmd.backend import get_backend
from gpusmd.features.sums import RunSums

from conftest import gpu_available

KEYS = ["calib", "calib_square", "calib_max", "calib_thresADU2.5", "calib_nhits",
        "calib_nhits1", "calib_thresADU0", "calib_thresADU1", "calib_thresADU3",
        "calib_nhits2", "calib_nhits3"]          # 10 sums: two launches of at most 8
SHAPE = (3, 40, 50)


def batches(seed=0, n=3):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        calib = rng.normal(1, 2, (5, *SHAPE)).astype(np.float32)
        calib[rng.random(calib.shape) < 0.001] = np.nan
        yield calib


def test_kernel_equals_reference():
    cpu = get_backend("cpu")
    reference, kernel = RunSums(KEYS, SHAPE, cpu), RunSums(KEYS, SHAPE, cpu)
    for calib in batches():
        reference.update_reference(calib)
        cuda.run_sums(calib, kernel.sum_keys, kernel.current, host=True)
    for key in KEYS:
        np.testing.assert_array_equal(kernel.acc[key], reference.acc[key], err_msg=key)
    assert np.isnan(reference.acc["calib_max"]).any()          # NaN sticks, in both
    assert (reference.acc["calib_nhits3"] > 0).any()


def test_max_alone_and_no_sums():
    cpu = get_backend("cpu")
    reference, kernel = RunSums(["calib_max"], SHAPE, cpu), RunSums(["calib_max"], SHAPE, cpu)
    for calib in batches(1):
        reference.update_reference(calib)
        cuda.run_sums(calib, kernel.sum_keys, kernel.current, host=True)
    np.testing.assert_array_equal(kernel.acc["calib_max"], reference.acc["calib_max"])


def test_take_hands_over_the_accumulators():
    """A worker's partial sums: take() returns the part and starts from zero."""
    sums = RunSums(KEYS, SHAPE, get_backend("cpu"))
    parts = []
    for calib in batches(2):
        sums.update(calib)
        parts.append({k: v.copy() for k, v in sums.take().items()})
    whole = RunSums(KEYS, SHAPE, get_backend("cpu"))
    for calib in batches(2):
        whole.update(calib)
    merged = RunSums(KEYS, SHAPE, get_backend("cpu"))
    for part in parts:
        merged.merge(part, 5)
    for key in KEYS:
        np.testing.assert_array_equal(merged.acc[key], whole.acc[key], err_msg=key)
    assert merged.n_events == whole.n_events == 15


if gpu_available():
    import pytest

    @pytest.mark.gpu
    def test_on_the_device_equals_the_cpu():
        gpu, cpu = get_backend("gpu"), get_backend("cpu")
        on_gpu, on_cpu = RunSums(KEYS, SHAPE, gpu), RunSums(KEYS, SHAPE, cpu)
        for calib in batches(3):
            on_gpu.update(gpu.asarray(calib))
            on_cpu.update(calib)
        for key in KEYS:
            np.testing.assert_array_equal(gpu.to_host(on_gpu.acc[key]), on_cpu.acc[key],
                                          err_msg=key)
