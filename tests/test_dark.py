"""Dark processing on simulated darks: pedestals and noise against the truth, status bits."""
import shutil

import h5py
import numpy as np
import pytest

from gpusmd.calib.constants import Constants
from gpusmd.calib.dark import (BAD_GAIN, COLD, MEAN_HIGH, MEAN_LOW, NO_DATA, RMS_HIGH, RMS_LOW,
                               process_dark)
from gpusmd.errors import ConstantsError, RawFileError

NFRAMES = 30
DEAD = RMS_LOW | COLD | MEAN_LOW          # raw always 0: 42


def load_truth(path, det):
    with h5py.File(path, "r") as f:
        t = {k: f[f"truth/{det}/{k}"][()] for k in ("pedestal", "rms", "hot", "dead", "noisy")}
        t["cm"] = f["truth"].attrs["common_mode_sigma"]
        t["high"] = f["truth"].attrs["high_gain_ranges"]
    for k in ("hot", "dead", "noisy"):
        t[k] = t[k].astype(bool)
    t["normal"] = ~(t["hot"] | t["dead"] | t["noisy"])
    return t


def expected_sigma(t, g):
    """Std of a dark frame around the truth pedestal: noise (+ common mode in high/medium
    gain) + ADC rounding."""
    cm2 = float(np.sum(np.square(t["cm"]))) if t["high"][g] else 0.0
    return np.sqrt(t["rms"][g] ** 2 + cm2 + 1 / 12)


@pytest.fixture(scope="module")
def darks(simulated, tmp_path_factory):
    """{det: (raw dark path, truth, Constants)} for three detector families."""
    out = {}
    base = tmp_path_factory.mktemp("dark")
    for det in ("epix10kquad", "jungfrau05M", "epix100"):
        raw = simulated(det, dark=True, n_events=NFRAMES)
        consts = process_dark(raw, base / f"{det}.h5")
        assert list(consts) == [det]
        out[det] = (raw, load_truth(raw, det), consts[det], base / f"{det}.h5")
    return out


@pytest.mark.parametrize("det,ngain", [("epix10kquad", 7), ("jungfrau05M", 3), ("epix100", 1)])
def test_pedestal_and_rms_match_truth(darks, det, ngain):
    _, t, c, _ = darks[det]
    assert c.pedestal.shape == (ngain, *c.model.shape)
    for g in range(ngain):
        ok = t["normal"]
        sig = expected_sigma(t, g)[ok]
        dev = (c.pedestal[g][ok] - t["pedestal"][g][ok]) / (sig / np.sqrt(NFRAMES))
        assert np.abs(dev).max() < 6.5, (det, g)
        assert abs(np.mean(dev)) < 0.5, (det, g)
        ratio = c.rms[g][ok] / sig
        assert abs(np.median(ratio) - 1) < 0.05, (det, g)
        assert np.all((ratio > 0.3) & (ratio < 2)), (det, g)


def test_epix10k_low_ranges_copy_fl(darks):
    _, t, c, _ = darks["epix10kquad"]
    for g in (5, 6):                  # AHL_L, AML_L
        np.testing.assert_array_equal(c.pedestal[g], c.pedestal[2])
        np.testing.assert_array_equal(c.rms[g], c.rms[2])
        np.testing.assert_array_equal(c.status[g], c.status[2])
    np.testing.assert_allclose(c.gain[:, 0, 0, 0], [16.4, 5.466, 0.164, 16.4, 5.466, 0.164, 0.164],
                               rtol=1e-6)
    assert c.attrs["dark_frames"].tolist() == [30, 30, 30, 30, 30, 0, 0]


@pytest.mark.parametrize("det", ["epix10kquad", "jungfrau05M", "epix100"])
def test_status_bits_of_defects(darks, det):
    _, t, c, _ = darks[det]
    st = c.status.astype(np.int64)
    assert np.all(st[:, t["hot"]] == MEAN_HIGH)
    assert np.all(st[:, t["noisy"]] == RMS_HIGH)
    if det == "jungfrau05M":
        # raw 0 decodes as G0: a dead pixel has no frames in G1 and G2
        assert np.all(st[0][t["dead"]] == DEAD)
        assert np.all(st[1:][:, t["dead"]] == NO_DATA)
    else:
        assert np.all(st[:, t["dead"]] == DEAD)
    # ordinary pixels are good (a tiny false-positive fraction allowed)
    assert np.mean(st[:, t["normal"]] != 0) < 1e-4
    # every defect is masked by the status mask
    assert not c.status_mask()[~t["normal"]].any()


def test_constants_file_round_trip(darks):
    for det, (raw, _, c, path) in darks.items():
        back = Constants.load(path, det)
        for name in ("pedestal", "rms", "gain", "offset", "status", "mask"):
            np.testing.assert_array_equal(getattr(back, name), getattr(c, name), err_msg=name)
        assert back.run_min == 1 and back.run_max == -1
        assert back.model.type == det
        assert np.all(back.offset == 0) and np.all(back.mask == 1)
        with h5py.File(path) as f:
            assert list(f) == [det]          # the file was replaced, one detector


def test_jungfrau_invalid_gain_bits(simulated, tmp_path):
    det = "jungfrau05M"
    src = simulated(det, dark=True, n_events=NFRAMES)
    raw = tmp_path / "dark_bad_bits.h5"
    shutil.copy(src, raw)
    t = load_truth(src, det)
    pixels = np.flatnonzero(t["normal"].reshape(-1))[[100, 5000, 200000]]
    with h5py.File(raw, "r+") as f:
        ds = f[f"{det}/raw"]
        for i, frame in enumerate((3, 40, 75)):          # one frame in G0, G1, G2 each
            img = ds[frame].reshape(-1)
            img[pixels[i]] = (2 << 14) | 1500
            ds[frame] = img.reshape(ds.shape[1:])
    c = process_dark(raw, tmp_path / "c.h5")[det]
    st = c.status.reshape(3, -1).astype(np.int64)
    assert np.all(st[:, pixels] == BAD_GAIN)
    np.testing.assert_array_equal(np.flatnonzero((st & BAD_GAIN).any(0)), np.sort(pixels))


def test_outlier_rejection(simulated, tmp_path):
    det = "epix100"
    src = simulated(det, dark=True, n_events=NFRAMES)
    raw = tmp_path / "dark_outlier.h5"
    shutil.copy(src, raw)
    t = load_truth(src, det)
    pixels = np.flatnonzero(t["normal"].reshape(-1))[[10, 20000, 300000]]
    with h5py.File(raw, "r+") as f:
        ds = f[f"{det}/raw"]
        img = ds[7].reshape(-1)
        img[pixels] += 3000                               # a cosmic ray in one frame
        ds[7] = img.reshape(ds.shape[1:])
    plain = process_dark(raw, tmp_path / "a.h5")[det]
    robust = process_dark(raw, tmp_path / "b.h5", outlier_sigma=4)[det]
    truth_ped = t["pedestal"][0].reshape(-1)[pixels]
    sig = expected_sigma(t, 0).reshape(-1)[pixels]
    assert np.all(plain.pedestal.reshape(-1)[pixels] - truth_ped > 80)
    assert np.all(np.abs(robust.pedestal.reshape(-1)[pixels] - truth_ped) < 6 * sig / np.sqrt(29))
    assert np.all(robust.rms.reshape(-1)[pixels] < 2 * sig)
    assert robust.attrs["outlier_sigma"] == 4
    ok = t["normal"].reshape(-1).copy()
    ok[pixels] = False
    ok = ok.reshape(t["normal"].shape)
    np.testing.assert_allclose(robust.pedestal[0][ok], plain.pedestal[0][ok], atol=2.0)


def test_gain_file(simulated, tmp_path):
    det = "epix100"
    raw = simulated(det, dark=True, n_events=NFRAMES)
    gain = np.full((1, 704, 768), 16.0, np.float32)
    with h5py.File(tmp_path / "gain.h5", "w") as f:
        f[f"{det}/gain"] = gain
    c = process_dark(raw, tmp_path / "c.h5", gain_path=tmp_path / "gain.h5", run_max=7)[det]
    np.testing.assert_array_equal(c.gain, gain)
    back = Constants.load(tmp_path / "c.h5", det)
    assert back.run_max == 7 and np.all(back.gain == 16.0)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f[f"{det}/gain"] = gain[:, :10]
    with pytest.raises(ConstantsError, match="bad.h5"):
        process_dark(raw, tmp_path / "c2.h5", gain_path=tmp_path / "bad.h5")
    with pytest.raises(ConstantsError, match="nothere.h5"):
        process_dark(raw, tmp_path / "c2.h5", gain_path=tmp_path / "nothere.h5")


def test_bad_inputs(epix10k_pair, simulated, tmp_path):
    _, data = epix10k_pair
    with pytest.raises(RawFileError, match=r"epix10kquad_data.*no dark frames in gain range\(s\) FH"):
        process_dark(data, tmp_path / "c.h5")
    assert not (tmp_path / "c.h5").exists()
    dark = simulated("epix100", dark=True, n_events=NFRAMES)
    with pytest.raises(RawFileError, match="no detector 'cspad'"):
        process_dark(dark, tmp_path / "c.h5", detectors=["cspad"])
    with pytest.raises(RawFileError, match="raw file not found"):
        process_dark(tmp_path / "missing.h5", tmp_path / "c.h5")
    # a Jungfrau dark without its G2 frames
    jf = tmp_path / "jf.h5"
    src = simulated("jungfrau05M", dark=True, n_events=NFRAMES)
    with h5py.File(src) as f, h5py.File(jf, "w") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v
        n = 2 * NFRAMES
        for key in ("event_id", "timestamp", "ipm2/sum", "lightStatus/xray", "lightStatus/laser"):
            g[key] = f[key][:n]
        g.create_dataset("jungfrau05M/raw", data=f["jungfrau05M/raw"][:n])
        g["jungfrau05M/raw"].attrs["type"] = "jungfrau05M"
    with pytest.raises(RawFileError, match="jf.h5.*G2"):
        process_dark(jf, tmp_path / "c.h5")
