"""Calibration fused with mode 7 (kernels/calibrate_cm.cu, DESIGN §11): through the host
build it gives the split path's numbers (Calibrator.split, the array common mode, the
multiply) bit for bit, with switched and invalid gains, masked pixels, skipped groups."""
import dataclasses

import numpy as np
import pytest

from gpusmd.backend import Backend, get_backend
from gpusmd.calib.calibrate import Calibrator
from gpusmd.calib.common_mode import CM_GAIN_RANGES, CommonMode, resolve
from gpusmd.calib.constants import Constants
from gpusmd.detectors import epix10k_control_bits, get_detector

from conftest import gpu_available

CPU = Backend("cpu", np)          # the NumPy engine: its split gives the factor


# one panel, two banks wide: the host build runs a block at a time
NARROW = {"jungfrau": (1, 512, 128), "epix10k": (1, 352, 96)}


def scene(detector, nbatch=2, seed=3, backend=CPU, narrow=True):
    """A calibrator with random pedestals, gains and mask, and raw frames holding row and
    column offsets (some beyond cormax), gain switches and invalid gain bits."""
    model = get_detector(detector)
    if narrow:
        model = dataclasses.replace(model, shape=NARROW[model.family])
    rng = np.random.default_rng(seed)
    nseg, rows, cols = model.seg_shape
    c = Constants.default(model)
    c.pedestal[:] = rng.normal(1500, 40, c.pedestal.shape).astype(np.float32)
    c.gain[:] *= rng.uniform(0.9, 1.1, c.gain.shape).astype(np.float32)
    c.gain[rng.random(c.gain.shape) < 0.01] = 0
    mask = (rng.random(model.shape) > 0.05).astype(np.uint8)
    mask[:, 7, :] = 0                                   # a row with no voter at all
    cal = Calibrator(model, c, mask, backend, cm_ranges=CM_GAIN_RANGES[model.family])
    if model.family == "epix10k":
        config = rng.choice([12, 12, 12, 0, 4, 8], (nseg, rows, cols)).astype(np.uint8)
        cal.set_control_bits(0, epix10k_control_bits(config, rng.integers(0, 2, (nseg, 4))))
    level = 1500 + rng.normal(0, 3, (nbatch, nseg, rows, cols))
    level += np.repeat(rng.normal(0, 6, (nbatch, nseg, rows, cols // 32)), 32, axis=3)
    level += np.repeat(rng.normal(0, 4, (nbatch, nseg, 2, cols)), rows // 2, axis=2)
    raw = np.clip(level, 0, 0x3FFF).astype(np.uint16)
    switch = rng.random(raw.shape)
    if model.family == "jungfrau":
        raw[switch < 0.02] |= 0x4000                     # G1
        raw[switch > 0.99] |= 0xC000                     # G2
        raw[(switch > 0.5) & (switch < 0.502)] |= 0x8000  # invalid bits
    else:
        raw[switch < 0.03] |= 0x4000                     # auto-ranged to low gain
    return model, cal, raw


@pytest.mark.parametrize("detector, code", [
    ("jungfrau05M", 7), ("jungfrau05M", 71), ("jungfrau05M", 72), ("jungfrau05M", (7, 7, 10, 10)),
    ("epix10kquad", 85), ("epix10kquad", 83), ("epix10kquad", 80),
])
def test_fused_equals_split(detector, code):
    model, cal, raw = scene(detector)
    cmpars = resolve(model.family, code)
    adu, scale, good = cal.split(raw)
    expected_stats = CommonMode(model, cmpars, engine="array")(adu, good)
    expected = (adu * scale).reshape(raw.shape)

    common_mode = CommonMode(model, cmpars, engine="host")
    assert common_mode.fused
    got, stats = cal.with_common_mode(raw, 0, common_mode)
    np.testing.assert_array_equal(got, expected)
    assert set(stats) == set(expected_stats)
    for key in stats:
        np.testing.assert_array_equal(stats[key], expected_stats[key])
    if cmpars[1]:       # the scene corrects some groups and skips others
        assert (stats["corrected"] > 0).all() and (stats["skipped"] > 0).all()


def test_other_modes_and_the_array_engine_are_not_fused():
    model = get_detector("jungfrau05M")
    assert not CommonMode(model, resolve("jungfrau", 7)).fused            # NumPy engine
    assert not CommonMode(model, (3, 100, 10, 128), engine="host").fused  # chunks


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy sees no CUDA device")
@pytest.mark.parametrize("detector, code", [("jungfrau1M", 7), ("jungfrau1M", 71),
                                            ("epix10kquad", 85), ("epix10kquad", (7, 7, 100, 10))])
def test_fused_on_the_device_equals_the_cpu(detector, code):
    """Whole detectors on the GPU (the 'kernel' engine the processor picks there)."""
    gpu = get_backend("gpu")
    model, cpu_cal, raw = scene(detector, nbatch=3, narrow=False)
    _, gpu_cal, _ = scene(detector, nbatch=3, narrow=False, backend=gpu)
    cmpars = resolve(model.family, code)
    adu, scale, good = cpu_cal.split(raw)
    expected_stats = CommonMode(model, cmpars)(adu, good)
    common_mode = CommonMode(model, cmpars, xp=gpu.xp)
    assert common_mode.fused
    got, stats = gpu_cal.with_common_mode(raw, 0, common_mode)
    np.testing.assert_array_equal(gpu.to_host(got).reshape(adu.shape), adu * scale)
    for key in expected_stats:
        np.testing.assert_array_equal(gpu.to_host(stats[key]), expected_stats[key])
