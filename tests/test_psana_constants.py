"""gpusmd's constants in psana's form and back: exact arrays, psana's loader reads the
files, and psana's own calibration of a run with the converted constants equals
gpusmd's bit for bit."""
import os
import time

import numpy as np
import psana  # noqa: F401  (psana is a test dependency: never skipped)
import pytest
import requests
from psana.pscalib.calib.MDBUtils import data_from_file

from gpusmd.backend import get_backend
from gpusmd.calib import psana_constants as pc
from gpusmd.calib.calibrate import Calibrator, build_lut
from gpusmd.calib.constants import Constants
from gpusmd.calib.dark import process_dark
from gpusmd.calib.masks import pixel_masks
from gpusmd.cli import main
from gpusmd.detectors import get_detector
from gpusmd.errors import ConstantsError, GpusmdError
from gpusmd.io.raw import RawRun
from gpusmd.io.xtc2 import write_xtc2

TYPES = ("epix10kquad", "jungfrau05M", "epix100")
EXPERIMENT = "tstx00117"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per detector type: (data run, its constants) from a tiny simulated dark (seed 5),
    with random offsets, per-range gains off their nominal values, some masked pixels."""
    from gpusmd.simulate import simulate_run
    base = tmp_path_factory.mktemp("psana_constants")
    out = {}
    for i, t in enumerate(TYPES):
        dark = simulate_run(base / f"{t}_dark.h5", t, n_events=3, dark=True, seed=5)
        data = simulate_run(base / f"{t}_data.h5", t, n_events=3, seed=5,
                            experiment=EXPERIMENT)
        (det, c), = process_dark(dark, base / f"{t}_constants.h5").items()
        rng = np.random.default_rng(i)
        c.offset = rng.normal(0, 3, c.offset.shape).astype(np.float32)
        c.gain = (c.gain * rng.uniform(0.9, 1.1, c.gain.shape)).astype(np.float32)
        c.mask[:, ..., 10:12, 20:23] = 0
        c.status[0, ..., 5, 7] = 3            # and the dark's own status bits
        c.run_min, c.run_max = 4, 9
        out[t] = (det, data, c)
    return out


def assert_same_calibration(a: Constants, b: Constants):
    """The look-up tables of gpusmd's calibration (and so its output) are equal bit for bit."""
    ma, mb = pixel_masks(a.model, a), pixel_masks(b.model, b)
    for name in ("status", "calib", "cmask"):
        assert np.array_equal(ma[name], mb[name]), name
    assert np.array_equal(build_lut(a, ma["cmask"]), build_lut(b, mb["cmask"]))


# ---- gpusmd -> psana -> gpusmd ---------------------------------------------------------
@pytest.mark.parametrize("t", TYPES)
def test_round_trip(runs, t):
    det, _, c = runs[t]
    cc = pc.to_psana(c, det, EXPERIMENT)
    assert list(cc) == list(pc.CTYPES)
    m = c.model
    shape = (m.ngain, *m.shape) if m.ngain > 1 else m.shape
    for ctype, (a, meta) in cc.items():
        assert a.dtype == pc.DTYPES[ctype]
        assert a.shape == (m.shape if ctype == "pixel_mask" else shape)
        for key in ("experiment", "run", "run_orig", "detector", "ctype", "time_sec", "version"):
            assert key in meta
        assert meta["ctype"] == ctype and meta["run"] == 4 and meta["run_end"] == "9"
    # a Jungfrau's offset folds in; the others' is used by neither calibration
    ped = c.pedestal + c.offset if m.family == "jungfrau" else c.pedestal
    assert np.array_equal(cc["pedestals"][0].reshape(c.pedestal.shape), ped)

    back = pc.from_psana(cc, m)
    assert np.array_equal(back.pedestal, ped)
    assert not back.offset.any()
    for name in ("rms", "gain", "status", "mask"):
        got = getattr(back, name)
        assert got.dtype == np.float32 and np.array_equal(got, getattr(c, name)), name
    assert (back.run_min, back.run_max) == (4, 9)
    assert_same_calibration(c, back)
    assert pc.from_psana(cc).model == m                  # the model from the shapes


def test_jungfrau_pixel_offset_and_status_extra(runs):
    det, _, c = runs["jungfrau05M"]
    cc = pc.to_psana(c, det)
    offs = np.full(cc["pedestals"][0].shape, 2.5, np.float32)
    extra = np.zeros(c.model.shape, np.uint64)
    extra[0, 1, 2] = 1 << 40
    cc.update(pixel_offset=(offs, {}), status_extra=(extra, {}))
    back = pc.from_psana(cc, c.model)
    assert np.array_equal(back.offset, offs)
    assert np.array_equal(back.pedestal, c.pedestal + c.offset)
    assert (back.status[:, 0, 1, 2] != 0).all()          # psana masks it in every range


def test_shape_errors_name_the_ctype():
    m = get_detector("epix10kquad")
    cc = {"pedestals": (np.zeros((7, 16, 352, 384), np.float32), {})}
    with pytest.raises(ConstantsError, match=r"here: pedestals has shape \(7, 16, 352, 384\)"):
        pc.from_psana(cc, m, where="here:")
    with pytest.raises(ConstantsError, match="has no pedestals"):
        pc.from_psana({"pixel_gain": (np.ones(3), {})}, m)


# ---- the file form, read by psana's loader ---------------------------------------------
@pytest.mark.parametrize("t,fmt", [("epix100", "data"), ("jungfrau05M", "npy"),
                                   ("epix10kquad", "npy")])
def test_files_read_by_psana(runs, tmp_path, t, fmt):
    det, _, c = runs[t]
    cc = pc.to_psana(c, det, EXPERIMENT)
    files = pc.write_psana_dir(cc, tmp_path / "ps", fmt=fmt)
    assert sorted(p.name for p in files) == sorted([f"{k}.{fmt}" for k in cc] + [pc.SIDECAR])
    for ctype, (a, _) in cc.items():
        # what `cdb add -f FILE -c CTYPE` deposits
        loaded = data_from_file(str(tmp_path / "ps" / f"{ctype}.{fmt}"), ctype, "ndarray")
        assert loaded.dtype == a.dtype and loaded.shape == a.shape
        assert np.array_equal(loaded, a), ctype
    side = pc.sidecar_of(tmp_path / "ps")
    assert (side["detector"], side["type"], side["run"], side["run_end"]) == (det, t, 4, "9")
    assert side["cdb_add"][0] == (f"cdb add -e {EXPERIMENT} -d {det} -c pedestals -r 4 -R 9 "
                                  f"-f pedestals.{fmt}")

    name, back = pc.from_psana_dir(tmp_path / "ps")
    assert name == det and back.model == c.model
    assert_same_calibration(c, back)
    with pytest.raises(ConstantsError, match="already holds psana constants"):
        pc.write_psana_dir(cc, tmp_path / "ps", fmt=fmt)


def test_text_files_keep_shape_and_dtype(tmp_path):
    """psana's text form of multi-gain arrays (small ones: the real ones take seconds)."""
    rng = np.random.default_rng(3)
    cc = {"pedestals": (rng.normal(1e3, 300, (3, 2, 8, 16)).astype(np.float32), {}),
          "pixel_gain": (np.float32([1e-30, -0.112, 41.0, 3.4e38]).reshape(4, 1, 1, 1), {}),
          "pixel_status": (np.uint64([0, 1, 64, 2**53]).reshape(2, 1, 2, 1), {}),
          "pixel_mask": (np.uint8([[0, 1], [1, 1]]), {})}
    pc.write_psana_dir(cc, tmp_path, detname="jf")
    for ctype, (a, _) in cc.items():
        loaded = data_from_file(str(tmp_path / f"{ctype}.data"), ctype, "ndarray")
        assert loaded.dtype == a.dtype and loaded.shape == a.shape
        assert np.array_equal(loaded, a), ctype


# ---- psana's calibration of a run with the converted constants -------------------------
@pytest.mark.parametrize("t", TYPES)
def test_psana_calib_equals_gpusmd(runs, tmp_path, t):
    """The constants injected into a psana run as its calibration database would give them:
    det.raw.calib (status and pixel_mask masks, no common mode) equals gpusmd's pass."""
    from psana import DataSource
    det, data, c = runs[t]
    xtc = write_xtc2(data, tmp_path / f"{t}.xtc2")
    ds = DataSource(files=str(xtc), skip_calib_load="all")
    run = next(ds.runs())
    run._calib_const[det] = pc.to_psana(c, det, EXPERIMENT)
    run.dsparms.calibconst = run._calib_const
    d = run.Detector(det, calib=True)              # calib=True: psana applies pixel_mask
    masks = pixel_masks(c.model, c)
    cal = Calibrator(c.model, c, masks["status"] & masks["calib"], get_backend("cpu"))
    n = 0
    with RawRun(data) as rr:
        steps = rr.steps(det)
        for i, evt in enumerate(run.events()):
            step = int(steps[i])
            cal.set_control_bits(step, rr.control_bits(det, step))
            ours = cal(rr.read(det, i, i + 1), step)[0]
            theirs = np.asarray(d.raw.calib(evt))
            assert theirs.dtype == np.float32
            assert np.array_equal(theirs.reshape(ours.shape), ours), f"event {i}"
            n += 1
    assert n == 3


# ---- psana's database -------------------------------------------------------------------
def test_from_run_offline(tmp_path, monkeypatch):
    src = tmp_path / "run.xtc2"
    src.write_bytes(b"")
    monkeypatch.setenv(pc.OFFLINE_ENV, "1")
    with pytest.raises(ConstantsError) as e:
        pc.from_run(src, "jungfrau")
    msg = str(e.value)
    assert msg == (f"{src}: constants of detector 'jungfrau': the calibration database "
                   f"could not be reached (${pc.OFFLINE_ENV} is set)")
    with pytest.raises(ConstantsError, match="missing.xtc2: XTC2 file not found"):
        pc.from_run(tmp_path / "missing.xtc2", "jungfrau")


def test_from_run_unreachable_is_quick(tmp_path, monkeypatch):
    src = tmp_path / "run.xtc2"
    src.write_bytes(b"")
    monkeypatch.delenv(pc.OFFLINE_ENV, raising=False)
    t0 = time.monotonic()
    with pytest.raises(ConstantsError) as e:               # a port nobody listens on
        pc.from_run(src, "epix100", timeout=2, url="http://127.0.0.1:1/calib_ws/")
    assert time.monotonic() - t0 < 3
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{src}: constants of detector 'epix100': "
                                              f"the calibration database could not be reached")
    assert "127.0.0.1:1" in msg
    # a host that never answers: the probe gives up after the timeout
    def never_answers(*a, **k):
        time.sleep(2)
        raise OSError("timed out")
    monkeypatch.setattr(pc.socket, "create_connection", never_answers)
    t0 = time.monotonic()
    with pytest.raises(ConstantsError, match="no answer in 0.5 s"):
        pc.from_run(src, "epix100", timeout=0.5, url="https://calib.invalid/ws")
    assert time.monotonic() - t0 < 2


def test_from_run_psana_request_fails(runs, tmp_path, monkeypatch):
    """psana opens the run and asks its database, which fails: one line, not a traceback."""
    import psana.pscalib.calib.MDBWebUtils as wu
    det, data, _ = runs["epix100"]
    xtc = write_xtc2(data, tmp_path / "r.xtc2")
    monkeypatch.delenv(pc.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(pc, "probe_db", lambda url, timeout: None)

    def refuse(*a, **k):
        raise requests.exceptions.ConnectionError("no route")
    monkeypatch.setattr(wu, "calib_constants_all_types", refuse)
    t0 = time.monotonic()
    with pytest.raises(ConstantsError) as e:
        pc.from_run(xtc, det, url="https://pswww.slac.stanford.edu/ws/calib_ws/")
    assert time.monotonic() - t0 < 10
    assert str(e.value) == (f"{xtc}: constants of detector {det!r}: the calibration database "
                            f"could not be reached (pswww.slac.stanford.edu: ConnectionError)")
    # the database answers: its constants come back as gpusmd's
    _, _, c = runs["epix100"]
    monkeypatch.setattr(wu, "calib_constants_all_types",
                        lambda *a, **k: pc.to_psana(c, det, EXPERIMENT))
    back = pc.from_run(xtc, det, url="https://pswww.slac.stanford.edu/ws/calib_ws/")
    assert_same_calibration(c, back)


# ---- the command ------------------------------------------------------------------------
def test_cli(runs, tmp_path, monkeypatch, capsys):
    det, _, c = runs["epix100"]
    h5 = tmp_path / "c.h5"
    c.save(h5, det, mode="w")
    out = tmp_path / "ps"
    assert main(["constants", "to-psana", str(h5), "-o", str(out), "--experiment", "xpp1",
                 "--format", "npy"]) == 0
    printed = capsys.readouterr().out
    assert "cdb add -e xpp1 -d epix100 -c pedestals -r 4 -R 9 -f pedestals.npy" in printed
    assert main(["constants", "to-psana", str(h5), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: already holds psana constants" in err
    assert main(["constants", "to-psana", str(h5), "-o", str(out), "--format", "npy",
                 "--force"]) == 0

    back = tmp_path / "back.h5"
    assert main(["constants", "from-psana", str(out), "-o", str(back)]) == 0
    assert_same_calibration(c, Constants.load(back, det))
    assert main(["constants", "from-psana", str(out), "-o", str(back)]) == 2
    assert f"{back} exists (give --force to replace it)" in capsys.readouterr().err
    assert main(["constants", "from-psana", str(out), "-o", str(back), "--force",
                 "--detector", "other"]) == 0
    assert_same_calibration(c, Constants.load(back, "other"))

    assert main(["constants", "to-psana", str(h5), "--detector", "nope", "-o",
                 str(tmp_path / "x")]) == 2
    assert "no constants for detector 'nope'" in capsys.readouterr().err

    monkeypatch.setenv(pc.OFFLINE_ENV, "1")
    xtc = tmp_path / "run.xtc2"
    xtc.write_bytes(b"")
    assert main(["constants", "from-db", str(xtc), "--detector", det, "-o",
                 str(tmp_path / "db.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the calibration database could not be reached" in err
    assert not (tmp_path / "db.h5").exists()


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A constants file that fails half-written (a full disk) is one error naming it, and
    neither it nor a temporary file is left; the sidecar is not written."""
    import errno
    cc = {"pedestals": (np.zeros((2, 3), np.float32), {}),
          "pixel_gain": (np.ones((2, 3), np.float32), {})}
    save = np.save

    def fails_on_gain(f, a, *args, **kw):
        if a.dtype == np.float32 and a.min() == 1:
            f.write(b"\x93NUMPY half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(f, a, *args, **kw)

    monkeypatch.setattr(np, "save", fails_on_gain)
    with pytest.raises(GpusmdError, match=r"pixel_gain\.npy: cannot write it \(no space left"):
        pc.write_psana_dir(cc, tmp_path / "ps", detname="jf", fmt="npy")
    assert sorted(os.listdir(tmp_path / "ps")) == ["pedestals.npy"]
    monkeypatch.undo()
    files = pc.write_psana_dir(cc, tmp_path / "ps", detname="jf", fmt="data", force=True)
    assert sorted(os.listdir(tmp_path / "ps")) == sorted(p.name for p in files)
    header = (tmp_path / "ps" / "pedestals.data").read_text()
    assert f"FILE_NAME   {tmp_path / 'ps' / 'pedestals.data'}" in header
