"""The CUDA kernels: every file compiles with NVRTC (no GPU needed), and the host C++
build of each kernel (kernels/cuda_host.h) agrees with its NumPy reference. On a GPU
(pytest -m gpu) the CuPy launch is compared with the reference too."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpusmd import cuda
from gpusmd.calib.calibrate import (FAMILY_EPIX10K, FAMILY_JUNGFRAU, FAMILY_SINGLE,
                                    calibrate_reference, family_code, lut_rows)
from gpusmd.detectors import get_detector
from gpusmd.errors import GpusmdError
from conftest import gpu_available

TEST_KERNELS = Path(__file__).parent / "kernels"
BLOCK_SUM = TEST_KERNELS / "block_sum.cu"


def _nvrtc_available():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return True
    except Exception:
        return False


needs_nvrtc = pytest.mark.skipif(not _nvrtc_available(),
                                 reason="CuPy NVRTC bindings not installed (pip install .[test])")


# ---- NVRTC -------------------------------------------------------------------------------
def test_kernel_files_found():
    assert "calibrate" in cuda.kernel_names()
    assert "calibrate(" in cuda.kernel_source("calibrate")


@needs_nvrtc
@pytest.mark.parametrize("name", cuda.kernel_names())
def test_kernel_compiles_with_nvrtc(name):
    ptx = cuda.compile_ptx(name)
    for kernel in cuda.parse_kernels(cuda.kernel_source(name)):
        assert f".entry {kernel}(" in ptx


@needs_nvrtc
def test_test_kernels_compile_with_nvrtc():
    ptx = cuda.compile_ptx(BLOCK_SUM)
    assert ".entry block_sum(" in ptx and ".entry warp_sum(" in ptx


@needs_nvrtc
def test_nvrtc_error_is_reported(tmp_path):
    broken = tmp_path / "broken.cu"
    broken.write_text('extern "C" __global__ void broken(float* x)\n'
                      "{\n    x[threadIdx.x] = undefined_name;\n}\n")
    with pytest.raises(GpusmdError) as err:
        cuda.compile_ptx(broken)
    message = str(err.value)
    assert "broken.cu" in message
    assert "undefined_name" in message and "error" in message


# ---- calibration: host build vs NumPy reference -------------------------------------------
NPIX = 5000            # not a multiple of the 256-thread block
NBATCH = 3

CASES = {
    # id: (detector, raw dtype)
    "single-uint16": ("epix100", np.uint16),
    "single-int16": ("cspad", np.int16),
    "jungfrau": ("jungfrau05M", np.uint16),
    "epix10k": ("epix10k2M", np.uint16),
}


def _random_case(detector, dtype, seed=0):
    rng = np.random.default_rng(seed)
    model = get_detector(detector)
    raw = rng.integers(0, 1 << 16, size=(NBATCH, NPIX), dtype=np.uint16).view(dtype)
    cb = rng.integers(0, 64, size=NPIX, dtype=np.uint8) if model.family == "epix10k" else None
    rows = lut_rows(model)
    lut = np.empty((rows, NPIX, 2), np.float32)
    lut[..., 0] = rng.normal(1500.0, 500.0, size=(rows, NPIX))
    lut[..., 1] = rng.normal(0.0, 2.0, size=(rows, NPIX))
    lut[..., 1][rng.random((rows, NPIX)) < 0.1] = 0.0    # masked pixels
    return model, raw, cb, lut


def test_random_data_covers_every_gain_case():
    model, raw, cb, _ = _random_case("jungfrau05M", np.uint16)
    assert set(np.unique(model.gain_index(raw))) == {-1, 0, 1, 2}
    model, raw, cb, _ = _random_case("epix10k2M", np.uint16)
    assert set(np.unique(model.gain_index(raw, cb))) == {-1, 0, 1, 2, 3, 4, 5, 6}


@pytest.mark.parametrize("case", list(CASES))
def test_calibrate_host_matches_reference(case):
    model, raw, cb, lut = _random_case(*CASES[case])
    expected = calibrate_reference(raw, cb, lut, model)
    family = family_code(model)
    assert family == {"single-uint16": FAMILY_SINGLE, "single-int16": FAMILY_SINGLE,
                      "jungfrau": FAMILY_JUNGFRAU, "epix10k": FAMILY_EPIX10K}[case]
    # one thread per element, and a short grid so that the grid-stride loop wraps
    # around the pixel index several times
    for blocks in (None, 7):
        got = cuda.calibrate_host(raw, cb, lut, family, blocks=blocks)
        assert got.dtype == np.float32 and got.shape == (NBATCH, NPIX)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)


def test_calibrate_host_known_values():
    """A hand-built Jungfrau frame: one pixel per gain case."""
    model = get_detector("jungfrau05M")
    lut = np.zeros((3, 4, 2), np.float32)
    lut[0, :] = (100.0, 0.5)
    lut[1, :] = (200.0, 2.0)
    lut[2, :] = (300.0, -1.0)
    raw = np.array([[0x0000 | 1100, 0x4000 | 1200, 0x8000 | 1300, 0xC000 | 1400]], np.uint16)
    expected = np.array([[500.0, 2000.0, 0.0, -1100.0]], np.float32)
    np.testing.assert_array_equal(calibrate_reference(raw, None, lut, model), expected)
    np.testing.assert_array_equal(cuda.calibrate_host(raw, None, lut, FAMILY_JUNGFRAU), expected)
    # a lut view that is not 8-byte aligned for the kernel's float2 reads
    shifted = np.zeros(lut.size + 1, np.float32)[1:].reshape(lut.shape)
    shifted[...] = lut
    np.testing.assert_array_equal(cuda.calibrate_host(raw, None, shifted, FAMILY_JUNGFRAU), expected)


def test_calibrate_argument_checks():
    lut = np.zeros((3, 10, 2), np.float32)
    with pytest.raises(GpusmdError, match="uint16 or int16"):
        cuda.calibrate_host(np.zeros((1, 10), np.float32), None, lut, FAMILY_JUNGFRAU)
    with pytest.raises(GpusmdError, match="control bits"):
        cuda.calibrate_host(np.zeros((1, 10), np.uint16), None, np.zeros((8, 10, 2)), FAMILY_EPIX10K)
    with pytest.raises(GpusmdError, match="lut"):
        cuda.calibrate_host(np.zeros((1, 11), np.uint16), None, lut, FAMILY_JUNGFRAU)


# ---- the host shim itself -----------------------------------------------------------------
def test_host_shim_block_reduction():
    """__shared__ + __syncthreads + atomicAdd: threads of a block run as std::threads."""
    module = cuda.host_module(BLOCK_SUM)
    assert module.threaded
    x = np.random.default_rng(1).random(10_000).astype(np.float32)
    total = np.zeros(1, np.float32)
    blocks_done = np.zeros(1, np.uint32)
    module.launch("block_sum", 5, 256, x, total, blocks_done, x.size)
    assert blocks_done[0] == 5
    np.testing.assert_allclose(total[0], x.astype(np.float64).sum(), rtol=1e-5)


def test_host_shim_warp_functions_and_dynamic_shared():
    """__shfl_down_sync, __ballot_sync, extern __shared__, a partial last block."""
    module = cuda.host_module(BLOCK_SUM)
    rng = np.random.default_rng(2)
    x = rng.random(1000).astype(np.float32)
    totals = np.zeros(1, np.float64)
    counts = np.zeros(1, np.int32)
    block = 128
    grid = -(-x.size // block)
    module.launch("warp_sum", grid, block, x, totals, counts, x.size, 0.75,
                  shared_mem=4 * block // 32)
    np.testing.assert_allclose(totals[0], x.astype(np.float64).sum(), rtol=1e-5)
    assert counts[0] == np.count_nonzero(x > np.float32(0.75))


@pytest.mark.parametrize("threaded", [False, True])
def test_host_shim_thread_and_block_indices(threaded):
    module = cuda.host_module(BLOCK_SUM, threaded=threaded)
    grid, block = (3, 2, 2), (8, 4, 2)
    per_block, nblocks = 8 * 4 * 2, 3 * 2 * 2
    out = np.full(per_block * nblocks, -1, np.int32)
    module.launch("index_map", grid, block, out)
    b, t = np.divmod(np.arange(out.size), per_block)
    np.testing.assert_array_equal(out, b * 10000 + t)


def test_host_launch_argument_checks():
    module = cuda.host_module(BLOCK_SUM)
    x = np.zeros(10, np.float32)
    with pytest.raises(GpusmdError, match="takes 4 arguments"):
        module.launch("block_sum", 1, 256, x)
    with pytest.raises(GpusmdError, match="does not take a float64"):
        module.launch("block_sum", 1, 256, x.astype(np.float64), np.zeros(1, np.float32),
                      np.zeros(1, np.uint32), 10)
    with pytest.raises(GpusmdError, match="C-contiguous"):
        module.launch("block_sum", 1, 256, np.zeros(20, np.float32)[::2],
                      np.zeros(1, np.float32), np.zeros(1, np.uint32), 10)
    with pytest.raises(GpusmdError, match="no kernel"):
        module.launch("nope", 1, 1)
    with pytest.raises(GpusmdError, match="> 1024"):
        module.launch("index_map", 1, (64, 32), np.zeros(2048, np.int32))


def test_host_build_error_is_reported(tmp_path):
    broken = tmp_path / "broken_host.cu"
    broken.write_text('extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }\n')
    with pytest.raises(GpusmdError, match="undefined_name"):
        cuda.host_module(broken)


def test_parse_kernels_signatures():
    src = '''
    // extern "C" __global__ void commented_out(int a)
    extern "C" __global__ void __launch_bounds__(256) k(const unsigned int* __restrict__ a,
        float b, unsigned long long c, signed char d, double e[])
    { }
    '''
    kernels = cuda.parse_kernels(src)
    assert list(kernels) == ["k"]
    assert [(p.name, p.base, p.pointer) for p in kernels["k"]] == [
        ("a", "unsigned", True), ("b", "float", False), ("c", "unsigned long long", False),
        ("d", "signed char", False), ("e", "double", True)]


# ---- GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy sees no CUDA device")
@pytest.mark.parametrize("case", list(CASES))
def test_calibrate_gpu_matches_reference(case):
    import cupy
    model, raw, cb, lut = _random_case(*CASES[case])
    expected = calibrate_reference(raw, cb, lut, model)
    got = cuda.calibrate_gpu(cupy.asarray(raw), None if cb is None else cupy.asarray(cb),
                             cupy.asarray(lut), family_code(model))
    assert got.dtype == cupy.float32 and got.shape == (NBATCH, NPIX)
    np.testing.assert_allclose(cupy.asnumpy(got), expected, rtol=1e-6, atol=1e-4)
