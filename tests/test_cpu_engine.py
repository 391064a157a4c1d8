"""The compiled CPU engine (gpusmd.numba_kernels) gives the NumPy engine's numbers bit
for bit: the calibration pass of every family, the split for the common mode and the
gain after it, every group layout and median rule, every common-mode code that uses
them, the azimuthal histogram; on any thread count. Without numba the NumPy engine runs, with a warning, and a
replay gives the same file."""
import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from gpusmd import cpu_engine
from gpusmd.backend import Backend
from gpusmd.calib.calibrate import Calibrator, calibrate_switch, switch_tables
from gpusmd.calib.common_mode import (CM_GAIN_RANGES, CommonMode, Rule, bank_rows, banks,
                                      chunks, compiled_layout, group_correct,
                                      group_correct_compiled, half_columns, resolve)
from gpusmd.calib.cm_epix100 import frames
from gpusmd.calib.constants import Constants
from gpusmd.detectors import epix10k_control_bits, get_detector
from gpusmd.errors import GpusmdError

from conftest import dark_and_run

pytest.importorskip("numba", reason="the compiled engine's tests need numba (extra test)")

NUMPY = Backend("cpu", np, "numpy")
NUMBA = Backend("cpu", np, "numba")
# small detectors: one or two panels, every layout of groups, two banks wide
SMALL = {"jungfrau05M": (1, 512, 128), "epix10kquad": (2, 352, 96), "epix100": (2, 704, 192),
         "cspad": (2, 185, 388)}


def small(detector):
    model = get_detector(detector)
    return dataclasses.replace(model, shape=SMALL[detector])


def same(a, b):
    """Equal bit for bit (NaN and the sign of zero included)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def calibrators(detector, seed=4):
    """The same calibrator on both engines, random constants and mask, and raw frames
    with every switch state and out-of-range values."""
    model = small(detector)
    rng = np.random.default_rng(seed)
    c = Constants.default(model)
    c.pedestal[:] = rng.normal(1500, 40, c.pedestal.shape).astype(np.float32)
    c.gain[:] *= rng.uniform(0.9, 1.1, c.gain.shape).astype(np.float32)
    c.gain[rng.random(c.gain.shape) < 0.01] = 0
    mask = (rng.random(model.shape) > 0.05).astype(np.uint8)
    mask[:, 5, :] = 0                                      # a row without voters
    cals = [Calibrator(model, c, mask, b, cm_ranges=CM_GAIN_RANGES.get(model.family))
            for b in (NUMPY, NUMBA)]
    if model.family == "epix10k":
        nseg, rows, cols = model.seg_shape
        config = rng.choice([12, 12, 12, 0, 4, 8], (nseg, rows, cols)).astype(np.uint8)
        bits = epix10k_control_bits(config, rng.integers(0, 2, (nseg, 4)))
        for cal in cals:
            cal.set_control_bits(0, bits)
    level = 1500 + rng.normal(0, 3, (3, model.npix))
    level += np.repeat(rng.normal(0, 8, (3, model.npix // 32 + 1)), 32, axis=1)[:, :model.npix]
    info = np.iinfo(model.dtype)
    raw = np.clip(level, info.min, info.max).astype(model.dtype)
    if model.multigain:
        switch = rng.random(raw.shape)
        raw[switch < 0.03] |= 0x4000
        raw[switch > 0.99] |= 0x8000
    return model, cals, raw


@pytest.mark.parametrize("detector", list(SMALL))
def test_calibration_and_split_equal_numpy(detector):
    model, (numpy_cal, numba_cal), raw = calibrators(detector)
    assert same(numba_cal(raw), numpy_cal(raw))
    out = np.full(raw.shape, np.nan, np.float32)
    assert np.shares_memory(numba_cal(raw, out=out), out) and same(out, numpy_cal(raw))
    adu, scale, good = numpy_cal.split(raw)
    adu2, scale2, good2 = numba_cal.split(raw)
    assert scale2 is None and same(adu2, adu) and same(good2, good)
    assert same(numba_cal.apply_gain(raw, adu2, scale2), numpy_cal.apply_gain(raw, adu, scale))


def test_calibration_of_random_raw_words_equals_numpy():
    """Every raw word (gain bits, invalid states, signed CsPad values) on random tables."""
    rng = np.random.default_rng(1)
    for detector in ("jungfrau05M", "epix10kquad", "cspad", "epix100"):
        model = get_detector(detector)
        npix, rows = 5000, model.ngain + (model.family == "epix10k")
        lut = rng.normal(100, 50, (rows, npix, 2)).astype(np.float32)
        lut[..., 1][rng.random((rows, npix)) < 0.1] = 0
        cb = (rng.choice([0, 4, 8, 12, 16, 24, 28], npix).astype(np.uint8)
              if model.family == "epix10k" else None)
        info = np.iinfo(model.dtype)
        raw = rng.integers(info.min, info.max, (2, npix), endpoint=True).astype(model.dtype)
        ped, scale, _ = switch_tables(lut, cb, model)
        from gpusmd.calib.calibrate import calibrate_compiled
        assert same(calibrate_compiled(raw, ped, scale, model),
                    calibrate_switch(raw, ped, scale, model)), detector


RULES = [Rule("median", min_count=11, max_abs=100.0),
         Rule("median", min_count=11, max_abs=3.0, inclusive=True, apply_to="all"),
         Rule("median", lo=-5.0, hi=4.5, min_fraction=0.25, max_abs=30.0, inclusive=True,
              apply_to="all"),
         Rule("median", min_count=1)]


@pytest.mark.parametrize("make", [banks, bank_rows, half_columns, frames,
                                  lambda m: chunks(m, 128)],
                         ids=["banks", "rows", "columns", "frames", "chunks"])
def test_every_group_layout_and_rule_equals_numpy(make):
    model = small("epix100") if make is frames else small("epix10kquad")
    groups = make(model)
    assert compiled_layout(groups) is not None
    rng = np.random.default_rng(2)
    adu = rng.normal(0, 3, (2, model.npix)).astype(np.float32)
    adu[:, ::97] = np.nan                                    # never vote
    adu[:, 1::89] = np.inf
    good = rng.random(adu.shape) > 0.1
    good[:, groups.index()[0]] = False                       # a group with no voter
    for rule in RULES:
        a, b = adu.copy(), adu.copy()
        cm, applied = group_correct(a, good, groups, rule)
        cm2, applied2 = group_correct_compiled(b, good, groups, rule)
        assert same(b, a) and same(cm2, cm) and same(applied2, applied), rule
        assert applied.any() and not applied.all()


def test_a_mean_and_other_layouts_take_the_array_path():
    """Means (NumPy's pairwise float32 sums) and groups of neither layout give the array
    path's numbers through the compiled engine's entry."""
    model = small("epix10kquad")
    rng = np.random.default_rng(3)
    adu = rng.normal(0, 3, (1, model.npix)).astype(np.float32)
    good = rng.random(adu.shape) > 0.1
    strided = dataclasses.replace(bank_rows(model), inner_stride=2, n_inner=24)
    assert compiled_layout(strided) is None
    for groups, rule in ((banks(model), Rule("mean", apply_to="all")),
                         (strided, Rule("median", min_count=5))):
        a, b = adu.copy(), adu.copy()
        expected = group_correct(a, good, groups, rule)
        got = group_correct_compiled(b, good, groups, rule)
        assert same(b, a) and all(same(x, y) for x, y in zip(got, expected))


CODES = [("epix10kquad", c) for c in (80, 83, 84, 85, (7, 7, 100, 10), 3)] + \
        [("jungfrau05M", c) for c in (7, 71, 72)] + \
        [("epix100", c) for c in (4, 34, 45, 46, 47)] + \
        [("cspad", c) for c in (1, 5)]


@pytest.mark.parametrize("detector, code", CODES, ids=[f"{d}-{c}" for d, c in CODES])
def test_every_common_mode_code_equals_numpy(detector, code):
    model, (numpy_cal, numba_cal), raw = calibrators(detector)
    cmpars = resolve(model.family, code)
    rms = np.full(model.npix, 2.5, np.float32)
    adu, scale, good = numpy_cal.split(raw)
    adu2, _, good2 = numba_cal.split(raw)
    stats = CommonMode(model, cmpars, rms, engine="array")(adu, good)
    stats2 = CommonMode(model, cmpars, rms, engine="numba")(adu2, good2)
    assert same(adu2, adu)
    assert stats.keys() == stats2.keys() and all(same(stats2[k], stats[k]) for k in stats)


def test_the_azimuthal_histogram_equals_numpy():
    """Random bins (some not counted), NaN values, each threshold."""
    from gpusmd.cuda import hist_plan, histogram_compiled, histogram_numpy
    rng = np.random.default_rng(5)
    npix, nbins = 20000, 37
    plan = hist_plan(rng.integers(-1, nbins + 3, npix), rng.random(npix), nbins)
    data = rng.normal(0, 5, (3, npix)).astype(np.float32)
    data[:, ::101] = np.nan
    for lo, hi in ((None, None), (1.0, None), (None, 2.5), (-2.0, 3.5)):
        assert same(histogram_compiled(data, plan, lo, hi), histogram_numpy(data, plan, lo, hi))


def test_any_thread_count_gives_the_same_numbers():
    model, (_, numba_cal), raw = calibrators("jungfrau05M")
    cm = CommonMode(model, resolve("jungfrau", 7), engine="numba")
    results = []
    for n in (1, 2, 3):
        cpu_engine.set_threads(n)
        adu, scale, good = numba_cal.split(raw)
        cm(adu, good)
        results.append(numba_cal.apply_gain(raw, adu, scale))
    cpu_engine.set_threads(cpu_engine.usable_cores())
    assert same(results[1], results[0]) and same(results[2], results[0])


def test_the_engine_asked_for(monkeypatch):
    monkeypatch.delenv(cpu_engine.ENV_VAR, raising=False)
    assert cpu_engine.cpu_engine() == "numba"
    assert cpu_engine.cpu_engine("numpy") == "numpy"
    monkeypatch.setenv(cpu_engine.ENV_VAR, "numpy")
    assert cpu_engine.cpu_engine() == "numpy" and cpu_engine.cpu_engine("numba") == "numba"
    monkeypatch.setenv(cpu_engine.ENV_VAR, "fortran")
    with pytest.raises(GpusmdError, match="unknown CPU engine 'fortran'.*GPUSMD_CPU_ENGINE"):
        cpu_engine.cpu_engine()
    # without numba: the NumPy engine, and a warning that names the install
    monkeypatch.delenv(cpu_engine.ENV_VAR)
    monkeypatch.setattr(cpu_engine, "numba_kernels", lambda: None)
    monkeypatch.setattr(cpu_engine, "_warned", False)
    with pytest.warns(cpu_engine.EngineFallbackWarning, match=r"gpusmd\[fast\]"):
        assert cpu_engine.cpu_engine("numba") == "numpy"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # said once a process
        assert cpu_engine.cpu_engine() == "numpy"


def test_thread_counts(monkeypatch):
    monkeypatch.delenv(cpu_engine.THREADS_VAR, raising=False)
    assert cpu_engine.thread_count() == cpu_engine.usable_cores()
    assert cpu_engine.thread_count(3) == 3
    monkeypatch.setenv(cpu_engine.THREADS_VAR, "2")
    assert cpu_engine.thread_count() == 2 and cpu_engine.thread_count(5) == 5
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(cpu_engine.THREADS_VAR, bad)
        with pytest.raises(GpusmdError, match="GPUSMD_THREADS.*positive whole number"):
            cpu_engine.thread_count()
    assert cpu_engine.share_of_cores(cpu_engine.usable_cores() * 4) == 1


def test_a_replay_without_numba_gives_the_same_file(tmp_path):
    """numba hidden from a fresh process: the replay warns once, runs NumPy and writes
    the file the compiled engine writes (calibration, common mode 7, ROI, azimuthal
    integration, sums)."""
    from gpusmd.io.compare import diff_files
    d = tmp_path
    dark_and_run(d, "jungfrau05M", 6, dark_events=4)
    (d / "run.yaml").write_text(textwrap.dedent("""\
        batch_size: 4
        detectors:
          jungfrau05M:
            calib: constants.h5
            common_mode: 7
            functions:
              - {kind: roi, bounds: [[0, 1], [10, 300], [20, 600]]}
              - {kind: azav, center: [0.0, 0.0], dis_to_sam: 100.0, qbin: 0.05, phiBins: 2}
            sums: [calib, calib_max]
        """))
    outs = {}
    for name, hide in (("numba", ""), ("numpy", "sys.modules['numba'] = None; ")):
        out = tmp_path / f"{name}.h5"
        code = (f"import sys; {hide}from gpusmd.cli import main; "
                f"sys.exit(main(['replay', '{d / 'run.h5'}', '--config', '{d / 'run.yaml'}', "
                f"'-o', '{out}', '--backend', 'cpu', '-q']))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, env={**os.environ, cpu_engine.ENV_VAR: "auto"})
        assert done.returncode == 0, done.stderr
        outs[name] = (out, done.stderr)
    assert "numba is not available" in outs["numpy"][1]
    assert outs["numpy"][1].count("numba is not available") == 1
    assert "numba is not available" not in outs["numba"][1]
    assert diff_files(outs["numba"][0], outs["numpy"][0]) == []
