"""Common mode by psana's and smalldata_tools' rules (DESIGN §6): each rule against the
psana / smalldata function it follows, on hand-built frames (psana's own functions run on
the same numpy arrays where they can), through the NumPy path and the kernels' host build;
and the codes, the defaults and the raw frames on simulated runs."""
import dataclasses
import re
import textwrap

import h5py
import numpy as np
import pytest

import psana.detector.UtilsCommonMode as ucm
from gpusmd.backend import Backend, get_backend
from gpusmd.calib.calibrate import Calibrator
from gpusmd.calib.common_mode import (DEFAULT_CODES, CommonMode, default_code, mode7_rule,
                                      resolve)
from gpusmd.calib.constants import Constants
from gpusmd.config import load_config
from gpusmd.detectors import get_detector
from gpusmd.replay import replay
from gpusmd.simulate import simulate_run

CPU = get_backend("cpu")
# one epix10k panel (352 x 384, banks 176 x 48): the host build runs it in seconds
EPIX = dataclasses.replace(get_detector("epix10kquad"), shape=(1, 352, 384))
JF = get_detector("jungfrau05M")              # 512 x 1024, banks 256 x 64
E100 = get_detector("epix100")


def psana_mode7(frames, good, model, bits, cormax, npix_min):
    """psana2's mode 7, calling psana's own functions panel by panel, in psana's order
    (UtilsEpix10ka.common_mode_epix_multigain_apply, UtilsJungfrau.calib_jungfrau_single_panel,
    UtilsCommonMode.common_mode_apply)."""
    out = frames.astype(np.float32).copy()
    mask = good.astype(np.int16)
    nseg, rows, cols = model.seg_shape
    nbanks = {"epix10k": 8, "jungfrau": 16, "epix100": 8}[model.family]
    h = rows // 2
    out3, mask3 = out.reshape(nseg, rows, cols), mask.reshape(nseg, rows, cols)
    for s in range(nseg):
        if bits & 4:
            for half in (slice(0, h), slice(h, rows)):
                ucm.common_mode_2d_hsplit_nbanks(out3[s, half], mask3[s, half], nbanks, cormax,
                                                 npix_min)
        if bits & 1:
            ucm.common_mode_rows_hsplit_nbanks(out3[s], mask3[s], nbanks, cormax, npix_min)
        if bits & 2:
            for half in (slice(0, h), slice(h, rows)):
                ucm.common_mode_cols(out3[s, half], mask3[s, half], cormax, npix_min)
    return out


def gpusmd_mode7(frames, good, model, cmpars, engine="array", rules="psana"):
    adu = frames.reshape(1, -1).astype(np.float32).copy()
    CommonMode(model, cmpars, engine=engine, rules=rules)(adu, good.reshape(1, -1))
    return adu.reshape(frames.shape)


def sparse_groups(model, rng, counts):
    """One frame with a few groups holding exactly ``counts`` good pixels: the first banks,
    the first row segments and the first half columns of panel 0, offsets 3..9 ADU."""
    nseg, rows, cols = model.seg_shape
    frames = rng.normal(0, 1, model.shape).astype(np.float32).reshape(nseg, rows, cols)
    good = rng.random(frames.shape) > 0.05
    br, bc = rows // 2, {"epix10k": 48, "jungfrau": 64, "epix100": 96}[model.family]
    for i, n in enumerate(counts):
        good[0, :br, i * bc:(i + 1) * bc] = False               # bank i of the top half
        flat = good[0, :br, i * bc:(i + 1) * bc].reshape(-1)
        flat[rng.choice(flat.size, n, replace=False)] = True
        good[0, :br, i * bc:(i + 1) * bc] = flat.reshape(br, bc)
        frames[0, :br, i * bc:(i + 1) * bc] += 3 + i
    return frames.reshape(model.shape), good.reshape(model.shape)


@pytest.mark.parametrize("model", [EPIX, JF], ids=["epix10k", "jungfrau"])
@pytest.mark.parametrize("bits", [4, 1, 2, 7])
def test_mode7_voter_counts_as_psana(model, bits):
    """UtilsCommonMode.common_mode_2d corrects a bank from npix_min voters on
    (``if npix < npix_min: return``), common_mode_rows / common_mode_cols a row or column
    from npix_min + 1 (``npix > npix_min``): groups with 9, 10, 11 voters, npix_min 10."""
    rng = np.random.default_rng(bits)
    frames, good = sparse_groups(model, rng, [9, 10, 11])
    # row segments / columns with exactly 10 voters too
    frames[0, 200, 0:64] += 4
    good[0, 200, 0:64] = False
    good[0, 200, 0:10] = True
    expected = psana_mode7(frames, good, model, bits, 100, 10)
    # the host build once per rule (it runs the kernels' threads one by one: slow)
    for engine in ("array", "host") if bits == 7 and model is EPIX else ("array",):
        got = gpusmd_mode7(frames, good, model, (7, bits, 100, 10), engine)
        np.testing.assert_allclose(got, expected, atol=2e-6, err_msg=engine)


def test_bank_with_npix_min_voters_is_corrected():
    """The bank of exactly npix_min voters is corrected (psana common_mode_2d), the row of
    exactly npix_min is not (common_mode_rows); gpusmd's rules need more than npix_min in
    both."""
    rng = np.random.default_rng(0)
    frames, good = sparse_groups(EPIX, rng, [10])
    bank = (0, slice(0, 176), slice(0, 48))
    before = frames[bank][good[bank]]
    out = gpusmd_mode7(frames, good, EPIX, (7, 4, 100, 10))
    assert np.all(out[bank][good[bank]] != before)
    out = gpusmd_mode7(frames, good, EPIX, (7, 4, 100, 10), rules="gpusmd")
    np.testing.assert_array_equal(out[bank][good[bank]], before)
    assert mode7_rule((7, 4, 100, 10), "bank")[1].min_count == 10
    assert mode7_rule((7, 4, 100, 10), "row")[1].min_count == 11
    assert mode7_rule((7, 4, 100, 10), "bank", "gpusmd")[1].min_count == 11


def constants_with_zero_gains(model, seed=0):
    """Constants of pedestal 1000, gain 16.4 (gain range 0), and gain 0 on 10% of the
    pixels of each bank row."""
    rng = np.random.default_rng(seed)
    c = Constants.default(model)
    c.pedestal[...] = 1000.0
    gain = np.full(c.gain.shape, 16.4, np.float32)
    gain[:, rng.random(model.shape) < 0.1] = 0.0
    c.gain[...] = gain
    return c


@pytest.mark.parametrize("model, code", [(EPIX, 84), (EPIX, 83), (JF, 7)],
                         ids=["epix10k-84", "epix10k-83", "jungfrau-7"])
def test_pixels_of_gain_zero_vote_as_psana(model, code):
    """psana (UtilsEpix10ka.common_mode_epix_multigain_apply, UtilsJungfrau
    calib_jungfrau_single_panel) builds the voters from the mask and the gain-range maps
    only: a pixel of gain 0 votes; its output is 0 (factor 1 / gain, divide_protected).
    Split path (NumPy) and fused kernels (host build) alike; gpusmd's rules drop them."""
    rng = np.random.default_rng(1)
    consts = constants_with_zero_gains(model)
    # all pixels in gain range 0 (epix10k FH: control bits 28); a row offset per segment
    cb = np.full(model.npix, 28, np.uint8) if model.family == "epix10k" else None
    nseg, rows, cols = model.seg_shape
    seg = {"epix10k": 48, "jungfrau": 64}[model.family]
    offset = np.repeat(rng.normal(0, 5, (nseg, rows, cols // seg)), seg, axis=2)
    signal = rng.normal(0, 1, model.shape) + offset.reshape(model.shape)
    signal[..., 0, :] += 40                                  # the pixels of gain 0 matter
    raw = (1000 + np.round(signal)).astype(np.uint16).reshape(1, *model.shape)
    mask = np.ones(model.shape, np.uint8)
    mask[..., 5, :] = 0
    cmpars = resolve(model.family, code)
    # psana: (raw - ped), common mode on mask & gain range 0, x mask / gain
    gain0 = consts.gain[0]
    adu = (raw[0] & 0x3FFF).astype(np.float32) - consts.pedestal[0]
    expected = psana_mode7(adu, mask.astype(bool), model, cmpars[1], cmpars[2], cmpars[3])
    with np.errstate(divide="ignore"):
        factor = np.where(gain0 != 0, 1 / gain0, 0).astype(np.float32)
    expected = expected * factor * mask
    engines = [("array", False), ("numba", False)] + ([("host", True)] if model is EPIX else [])
    for engine, fused in engines:
        backend = Backend("cpu", np, "numba" if engine == "numba" else "numpy")
        cal = Calibrator(model, consts, mask, backend, cm_ranges=(0,))
        if cb is not None:
            cal.set_control_bits(0, cb)
        cm = CommonMode(model, cmpars, engine=engine)
        if fused:
            out, _ = cal.with_common_mode(raw, 0, cm)
        else:
            a, scale, good = cal.split(raw, 0)
            cm(a, good)
            out = cal.apply_gain(raw.reshape(a.shape), a, scale)
        np.testing.assert_allclose(out.reshape(model.shape), expected, atol=2e-5, err_msg=engine)
    # gpusmd's rules: the pixels of gain 0 do not vote, and the medians move
    cal = Calibrator(model, consts, mask, CPU, cm_ranges=(0,), cm_gain_zero_votes=False)
    if cb is not None:
        cal.set_control_bits(0, cb)
    a, scale, good = cal.split(raw, 0)
    assert not good.reshape(model.shape)[gain0 == 0].any()


def test_epix100_cmpars_4_by_psana2_and_psana1():
    """An explicit [4, bits, ...] is read as psana2's det.raw.calib reads it
    (UtilsCommonMode.common_mode_apply: bit 4 banks, 1 bank rows, 2 half columns,
    cormax, npix_min), unless the detector's convention is psana1 (medianInRegionV3:
    bit 1 banks, 2 rows, 4 columns, half_range, maxcorr). Codes 4 and 34 are psana1's."""
    assert resolve("epix100", [4, 6, 30, 10]) == (7, 6, 30, 10)
    assert resolve("epix100", [4, 6, 30, 10], convention="psana1") == (4, 6, 30, 10)
    assert resolve("epix100", 4) == (4, 6, 30, 10)
    assert resolve("epix100", 34) == (4, 6, 100, 100)
    rng = np.random.default_rng(2)
    frames = (rng.normal(0, 2, E100.shape)
              + np.repeat(rng.normal(0, 5, (704, 8)), 96, axis=1)).astype(np.float32)
    good = rng.random(E100.shape) > 0.1
    mask = good.astype(np.int16).reshape(1, *E100.shape)
    for bits in (1, 2, 4, 7):
        expected = frames.reshape(1, *E100.shape).copy()
        ucm.common_mode_apply(expected, mask.copy(), cmpars=(4, bits, 30, 10))
        for engine in ("array", "host") if bits == 1 else ("array",):
            got = gpusmd_mode7(frames, good, E100, resolve("epix100", [4, bits, 30, 10]), engine)
            np.testing.assert_allclose(got, expected[0], atol=2e-6, err_msg=f"{bits} {engine}")


def test_codes_of_smalldata_producers():
    """smalldata_tools DetObject codes (lcls1/DetObject.py CsPadObject, EpixObject;
    lcls2/DetObject.py Epix10kObject, JungfrauObject, Epix100Object): each has its
    cmpars, or is refused with what to use instead."""
    assert resolve("cspad", 1) == (1, 25, 40, 100, 0)        # CsPadObject.getData
    assert resolve("cspad", 10) == (1, 25, 40, 100, 1)
    assert resolve("cspad", 5) == (5, 100)
    assert resolve("cspad", 55) == (5, 5000)
    assert resolve("epix10k", 83) == (7, 1, 100, 10)
    for family in ("cspad", "epix100", "epix10k", "jungfrau", "camera"):
        assert resolve(family, 30) is None and resolve(family, 0) is None
        assert resolve(family, -1) is None
    with pytest.raises(ValueError, match="use 46"):
        resolve("epix100", 6)
    with pytest.raises(ValueError, match="use 45"):
        resolve("epix100", 36)
    for code in (81, 82, 180, 181):
        with pytest.raises(ValueError, match="use 8"):
            resolve("epix10k", code)
    with pytest.raises(ValueError, match="use -1"):
        resolve("jungfrau", -2)
    assert resolve("epix10k", -2) is None


def test_default_codes_are_smalldata_recommendations():
    """smalldata_tools' documentation (DetObject, "currently recommended methods"): CsPad
    1, Jungfrau 7, Epix 46; the epix10k producer example 84; cameras none."""
    assert DEFAULT_CODES == {"cspad": 1, "jungfrau": 7, "epix100": 46, "epix10k": 84,
                             "camera": 0}
    assert resolve("jungfrau", None) == (7, 3, 10, 10)
    assert resolve("camera", None) is None
    assert default_code("epix10k") == 84


def reduce(tmp_path, detector, common_mode_line, name):
    """Replay a small simulated run with a config whose common_mode line is given."""
    (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(f"""\
        detectors:
          {detector}:
            calib: c.h5
            {common_mode_line}
            functions: [{{kind: roi, bounds: [[0, 1], [0, 40], [0, 60]], writeArea: true}}]
        """))
    out = tmp_path / f"{name}.h5"
    replay(tmp_path / "run.h5", load_config(tmp_path / f"{name}.yaml"), out, CPU,
           progress=False)
    return h5py.File(out, "r")


@pytest.fixture(scope="module")
def jungfrau_run(tmp_path_factory):
    from gpusmd.calib.dark import process_dark
    tmp = tmp_path_factory.mktemp("jf")
    simulate_run(tmp / "dark.h5", "jungfrau05M", n_events=8, dark=True, seed=5, run=1)
    process_dark(tmp / "dark.h5", tmp / "c.h5")
    simulate_run(tmp / "run.h5", "jungfrau05M", n_events=3, seed=5, run=2)
    return tmp


def test_default_code_applied_and_stored(jungfrau_run):
    """No common_mode in the config: smalldata's recommendation runs (Jungfrau 7) and is
    what /UserDataCfg/<det>/common_mode records; the same frames as common_mode: 7."""
    with reduce(jungfrau_run, "jungfrau05M", "", "default") as f, \
            reduce(jungfrau_run, "jungfrau05M", "common_mode: 7", "seven") as g:
        assert f["UserDataCfg/jungfrau05M/common_mode"][()] == 7
        np.testing.assert_array_equal(f["UserDataCfg/jungfrau05M/common_mode_pars"][()],
                                      [7, 3, 10, 10])
        np.testing.assert_array_equal(f["jungfrau05M/ROI_0_area"][()],
                                      g["jungfrau05M/ROI_0_area"][()])
        assert f["jungfrau05M/common_mode_corrected"][()].min() > 0


def test_minus_one_returns_the_raw_frames(jungfrau_run):
    """common_mode -1: the raw frames, no pedestal, no gain (smalldata's DetObject -1:
    det.raw_data; the epix10k's ADC bits, raw & 0x3fff)."""
    with h5py.File(jungfrau_run / "run.h5", "r") as r:
        key = next(k for k in ("jungfrau05M/raw", "raw/jungfrau05M") if k in r)
        raw = r[key][()]
    with reduce(jungfrau_run, "jungfrau05M", "common_mode: -1", "raw") as f:
        area = f["jungfrau05M/ROI_0_area"][()]
        keep = f["UserDataCfg/jungfrau05M/cmask"][()][0:1, 0:40, 0:60].astype(bool)
        np.testing.assert_array_equal(area[:, keep],
                                      raw[:, 0:1, 0:40, 0:60][:, keep].astype(np.float32))
        assert f["UserDataCfg/jungfrau05M/common_mode"][()] == -1


def test_raw_frames_of_an_epix10k():
    from gpusmd.calib.common_mode import raw_frames
    raw = np.array([[0x4000 | 123, 77]], np.uint16)
    np.testing.assert_array_equal(raw_frames(EPIX, raw, -1), [[123, 77]])
    np.testing.assert_array_equal(raw_frames(EPIX, raw, -2), [[0x4000 | 123, 77]])


def test_group_correct_register_budget():
    """group_correct runs with 1024 threads for groups over 65536 pixels: its
    __launch_bounds__ caps it at 64 registers a thread on sm_90, without spills
    (ptxas's report through NVRTC; skipped where NVRTC is missing)."""
    from gpusmd import cuda
    src = cuda.kernel_source("common_mode")
    assert re.search(r"__launch_bounds__\(CM_BLOCK_MAX\)\s*group_correct", src)
    assert "#define CM_BLOCK_MAX 1024" in src and cuda.CM_BLOCK_HUGE == 1024
    try:
        from cupy.cuda import nvrtc
    except Exception as e:                                   # pragma: no cover
        pytest.skip(f"no NVRTC: {e}")
    prog = nvrtc.createProgram(src, "common_mode.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["-arch=sm_90", cuda.NVRTC_STD,
                                    f"-I{cuda.kernel_dir()}", "-Xptxas=-v"])
        log = nvrtc.getProgramLog(prog)
        log = log.decode() if isinstance(log, bytes) else log
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert ".maxntid 1024, 1, 1" in ptx
    part = log.split("Function properties for group_correct")[1]
    registers = int(re.search(r"Used (\d+) registers", part).group(1))
    assert registers <= 64, log
    assert "0 bytes spill stores, 0 bytes spill loads" in part, log
