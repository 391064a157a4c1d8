"""Common mode (DESIGN §6): mode 7 and modes 2 / 3 on hand-built frames, the pixels that
vote, the thresholds, and on simulated runs the noise it leaves."""
import textwrap

import h5py
import numpy as np
import pytest

from gpusmd.backend import Backend, get_backend
from gpusmd.calib.calibrate import Calibrator
from gpusmd.calib.common_mode import CommonMode, Groups, Rule, group_correct, resolve
from gpusmd.calib.constants import Constants
from gpusmd.calib.dark import process_dark
from gpusmd.config import load_config
from gpusmd.detectors import get_detector
from gpusmd.replay import replay
from gpusmd.simulate import simulate_run

EPIX = get_detector("epix10kquad")          # panels 352 x 384, banks 176 x 48


def offsets(shape, bank=None, row=None, col=None, seed=0):
    """Frames (B, nseg, 352, 384) made of per-bank, per-row-segment, per-half-column offsets."""
    rng = np.random.default_rng(seed)
    b, nseg, rows, cols = shape
    f = np.zeros(shape, np.float32)
    if bank:
        f += np.repeat(np.repeat(rng.normal(0, bank, (b, nseg, 2, 8)), 176, 2), 48, 3)
    if row:
        f += np.repeat(rng.normal(0, row, (b, nseg, rows, 8)), 48, 3)
    if col:
        f += np.repeat(rng.normal(0, col, (b, nseg, 2, cols)), 176, 2)
    return f.astype(np.float32)


def run_cm(frames, cmpars, good=None, model=EPIX):
    adu = frames.reshape(len(frames), -1).copy()
    good = np.ones(adu.shape, bool) if good is None else good.reshape(adu.shape)
    stats = CommonMode(model, cmpars)(adu, good)
    return adu.reshape(frames.shape), stats


@pytest.mark.parametrize("bits, kind", [(4, "bank"), (1, "row"), (2, "col"), (3, "row+col")])
def test_mode7_removes_known_offsets_exactly(bits, kind):
    shape = (2, 4, 352, 384)
    frames = offsets(shape, bank=5 if kind == "bank" else None,
                     row=3 if "row" in kind else None, col=3 if "col" in kind else None)
    out, stats = run_cm(frames, (7, bits, 1000, 10))
    np.testing.assert_allclose(out, 0, atol=1e-4)
    ngroups = {4: 4 * 16, 1: 4 * 352 * 8, 2: 4 * 2 * 384, 3: 4 * 352 * 8 + 4 * 2 * 384}[bits]
    np.testing.assert_array_equal(stats["corrected"], [ngroups, ngroups])
    np.testing.assert_array_equal(stats["skipped"], [0, 0])


def test_mode7_masked_pixels_neither_vote_nor_get_corrected():
    frames = np.full((1, 4, 352, 384), 5.0, np.float32)
    good = np.ones(frames.shape, bool)
    frames[0, 0, 10, 0:20] = 1e4            # 20 of the 48 pixels of one row segment
    good[0, 0, 10, 0:20] = False
    out, _ = run_cm(frames, (7, 1, 100, 10), good)
    assert np.all(out[0, 0, 10, 20:48] == 0)
    assert np.all(out[0, 0, 10, 0:20] == 1e4)
    assert np.all(out[0, 1] == 0)


def test_mode7_thresholds_and_even_counts():
    frames = np.zeros((1, 4, 352, 384), np.float32)
    good = np.zeros(frames.shape, bool)
    # row segment A: 11 good pixels of value 7 -> 11 > npix_min = 10: corrected
    frames[0, 0, 0, 0:11] = 7
    good[0, 0, 0, 0:11] = True
    # row segment B: 10 good pixels -> not more than npix_min: left alone
    frames[0, 0, 1, 0:10] = 7
    good[0, 0, 1, 0:10] = True
    # row segment C: median 150 >= cormax 100: left alone
    frames[0, 0, 2, 0:20] = 150
    good[0, 0, 2, 0:20] = True
    # row segment D: 12 good values, median = mean of the two middle ones = (2 + 3) / 2
    frames[0, 0, 3, 0:12] = [1, 1, 1, 1, 1, 2, 3, 9, 9, 9, 9, 9]
    good[0, 0, 3, 0:12] = True
    out, stats = run_cm(frames, (7, 1, 100, 10), good)
    assert np.all(out[0, 0, 0, 0:11] == 0)
    assert np.all(out[0, 0, 1, 0:10] == 7)
    assert np.all(out[0, 0, 2, 0:20] == 150)
    np.testing.assert_allclose(out[0, 0, 3, 0:12], np.array([1, 1, 1, 1, 1, 2, 3, 9, 9, 9, 9, 9]) - 2.5)
    assert stats["corrected"][0] == 2
    assert stats["skipped"][0] == 4 * 352 * 8 - 2


def test_cm_skips_low_gain_ranges():
    """epix10k: pixels switched to a low gain range neither vote nor get corrected."""
    consts = Constants.default(EPIX)
    cal = Calibrator(EPIX, consts, np.ones(EPIX.shape, np.uint8), Backend("cpu", np),
                     "divide", cm_ranges=(0, 1, 3, 4))           # the NumPy engine's factor
    cal.set_control_bits(0, np.zeros(EPIX.npix, np.uint8))          # AML
    raw = np.full((1, EPIX.npix), 100, np.uint16)
    raw[0, :5] |= 0x4000                                             # AML_L
    adu, scale, good = cal.split(raw)
    assert not good[0, :5].any() and good[0, 5:].all()
    np.testing.assert_allclose(scale[0, :2], 1 / 0.164, rtol=1e-6)


@pytest.mark.parametrize("mode, expected", [(2, (32 * 6 + 95 * 2) / 127), (3, 2.0)])
def test_chunk_modes(mode, expected):
    model = get_detector("camera", (4, 256))
    frame = np.zeros((1, 4, 256), np.float32)
    frame[0, 0, :128] = 2.0
    frame[0, 0, :32] = 6.0
    frame[0, 0, 100] = 500.0                # above the vote threshold: does not vote
    frame[0, 1, :128] = 50.0                # |cm| 50 > maxcorr 10: left alone
    out, stats = run_cm(frame, (mode, 100, 10, 128), model=model)
    np.testing.assert_allclose(out[0, 0, 32:100], 2.0 - expected, rtol=1e-6)
    assert out[0, 0, 100] == pytest.approx(500.0 - expected)   # every pixel of the chunk
    assert np.all(out[0, 1, :128] == 50.0)
    assert stats["corrected"][0] == 7 and stats["skipped"][0] == 1


def test_group_correct_rule_window_and_apply_all():
    groups = Groups("g", np.array([0, 10]), 1, 0, 10, 1)
    adu = np.array([[1, 2, 3, 4, 5, 50, 60, -70, 5, 6] + [0] * 10], np.float32)
    good = np.ones(adu.shape, bool)
    cm, applied = group_correct(adu, good, groups, Rule("median", lo=-30, hi=30, apply_to="all"))
    assert cm[0, 0] == 4.0 and applied.all()      # voters 1, 2, 3, 4, 5, 5, 6
    assert adu[0, 5] == 46.0 and adu[0, 7] == -74.0


def test_codes_resolve_per_family():
    assert resolve("epix10k", 85) == (7, 3, 100, 10)
    assert resolve("jungfrau", 7) == (7, 3, 10, 10)
    assert resolve("jungfrau", 0) is None
    assert resolve("epix10k", [7, 1, 50, 5]) == (7, 1, 50, 5)
    with pytest.raises(ValueError, match="not known for a epix10k"):
        resolve("epix10k", 71)


@pytest.mark.parametrize("detector, code, rms_truth_range", [
    ("epix10kquad", 85, 4),        # AML_M
    ("jungfrau05M", 7, 0),         # G0
    ("epix100", [4, 7, 30, 30], 0),      # banks too, and corrections up to 30 ADU
    ("epix100", 46, 0),
    ("cspad", 1, 0),
])
def test_simulated_dark_noise_after_common_mode(tmp_path, detector, code, rms_truth_range):
    """Dark-subtracted frames without X-rays: the right mode brings the rms down to
    within 10% of the simulated pixel noise; without it the rms is far above."""
    simulate_run(tmp_path / "dark.h5", detector, n_events=30, dark=True, seed=4, run=1)
    process_dark(tmp_path / "dark.h5", tmp_path / "c.h5")
    data = simulate_run(tmp_path / "run.h5", detector, n_events=6, seed=4, run=2,
                        photons_per_pixel=0.0, bragg_spots=0.0)
    model = get_detector(detector)
    bounds = ([[0, 1]] if model.segmented else []) + [[0, n] for n in model.seg_shape[1:]]
    rms = {}
    for cm in (0, code):
        (tmp_path / "run.yaml").write_text(textwrap.dedent(f"""\
            detectors:
              {detector}:
                calib: c.h5
                common_mode: {cm}
                gain_convention: none
                functions: [{{kind: roi, bounds: {bounds}, writeArea: true}}]
            """))
        out = tmp_path / f"out{cm}.h5"
        replay(data, load_config(tmp_path / "run.yaml"), out, get_backend(), progress=False)
        with h5py.File(out, "r") as f:
            area = f[f"{detector}/ROI_0_area"][()].reshape(6, -1)
            mask = f[f"UserDataCfg/{detector}/cmask"][()].astype(bool).reshape(-1)[:area.shape[1]]
            if cm:
                assert f[f"{detector}/common_mode_corrected"][()].min() > 0
                np.testing.assert_array_equal(f[f"UserDataCfg/{detector}/common_mode_pars"][()],
                                              resolve(get_detector(detector).family, code))
        rms[str(cm)] = area[:, mask].std()
    with h5py.File(data, "r") as f:
        truth = f[f"truth/{detector}/rms"][rms_truth_range].reshape(-1)[:len(mask)][mask]
        truth = truth[truth > 0]
    noise = np.sqrt(np.mean(truth ** 2))
    assert rms["0"] > 1.5 * noise                       # the offsets are there
    assert rms[str(code)] < 1.1 * noise, (rms, noise)


def test_mode7_equals_psana_style_loops():
    """Mode 7 against a second implementation: per-group np.median loops as psana writes it."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from psana_style import cm_mode7_event
    model = get_detector("jungfrau05M")
    rng = np.random.default_rng(3)
    frames = (offsets_like(model, rng) + rng.normal(0, 2, (2, *model.shape))).astype(np.float32)
    good = rng.random(frames.shape) > 0.2
    frames[~good] += 1000                       # bad pixels: never vote, never corrected
    out, _ = run_cm(frames, (7, 7, 10, 10), good, model)
    for e in range(2):
        expected = cm_mode7_event(frames[e].copy(), good[e], "jungfrau", 7, 10, 10)
        np.testing.assert_allclose(out[e], expected, atol=2e-5)


def offsets_like(model, rng):
    nseg, rows, cols = model.seg_shape
    f = np.repeat(rng.normal(0, 3, (2, nseg, rows, cols // 64)), 64, 3)
    return f + np.repeat(rng.normal(0, 3, (2, nseg, 2, cols)), rows // 2, 2)


@pytest.mark.parametrize("detector, cmpars", [
    ("epix10kquad", (7, 4, 100, 10)),             # banks: one block each
    ("epix100", (4, 1, 30, 10)),
    ("epix100", (6, 0, 30, 30, 10)),               # half columns and bank rows
    ("camera", (2, 100, 10, 128)),
    ("camera", (3, 100, 10, 128)),
])
def test_modes_through_the_host_built_kernel(detector, cmpars):
    """Each group-based mode gives the same frames with the CUDA kernel (host build) as
    with the array implementation, on random frames with random masks."""
    model = get_detector(detector, (64, 256)) if detector == "camera" else get_detector(detector)
    rng = np.random.default_rng(7)
    frames = rng.normal(0, 3, (1, model.npix)).astype(np.float32)
    frames += np.repeat(rng.normal(0, 4, (1, model.npix // 128)), 128, axis=1)
    good = rng.random(frames.shape) > 0.1
    rms = np.full(model.npix, 3.0, np.float32)
    results = {}
    for engine in ("array", "host"):
        adu = frames.copy()
        stats = CommonMode(model, cmpars, rms, engine=engine)(adu, good)
        results[engine] = adu, stats
    np.testing.assert_array_equal(results["host"][0], results["array"][0])
    for key in results["array"][1]:
        np.testing.assert_array_equal(results["host"][1][key], results["array"][1][key])
    assert results["array"][1]["corrected"][0] > 0
