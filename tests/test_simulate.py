"""The simulator: raw file format, determinism, shared detector truth, photons, gain switching."""
import filecmp

import h5py
import numpy as np
import pytest

from gpusmd.detectors import get_detector
from gpusmd.errors import ConfigError
from gpusmd.io.raw import RawRun
from gpusmd.simulate import make_detector, simulate_run

SMALL = [("epix10kquad", None, 20), ("jungfrau05M", None, 20), ("epix100", None, 10),
         ("cspad", None, 4), ("camera", (64, 64), 10)]


def truth(path, det, key):
    with h5py.File(path, "r") as f:
        return f[f"truth/{det}/{key}"][()]


def test_same_seed_same_bytes(tmp_path):
    a = simulate_run(tmp_path / "a.h5", "epix100", n_events=4, seed=3)
    b = simulate_run(tmp_path / "b.h5", "epix100", n_events=4, seed=3)
    c = simulate_run(tmp_path / "c.h5", "epix100", n_events=4, seed=4)
    assert filecmp.cmp(a, b, shallow=False)
    with h5py.File(a) as fa, h5py.File(c) as fc:
        assert not np.array_equal(fa["epix100/raw"][()], fc["epix100/raw"][()])


@pytest.mark.parametrize("det,shape,n", SMALL)
def test_data_run_format(simulated, det, shape, n):
    path = simulated(det, n_events=n, shape=shape)
    model = get_detector(det, shape)
    with RawRun(path) as run:
        assert list(run.detectors) == [det]
        assert run.detectors[det].shape == model.shape
        assert run.n_events == n and run.run == 2
        assert np.all(np.diff(run.event_id) == 1) and run.event_id[0] == 2000
        assert np.all(np.diff(run.timestamp) > 8e6) and np.all(np.diff(run.timestamp) < 9e6)
        raw = run.read(det, 0, 2)
        assert raw.dtype == np.dtype(model.dtype) and raw.shape == (2, *model.shape)
        assert set(run.scalars) >= {"ipm2/sum", "lightStatus/xray", "lightStatus/laser"}
        assert run.scalars["ipm2/sum"].dtype == np.float32
        assert run.scalars["lightStatus/xray"].dtype == np.int8
        assert np.all(run.steps(det) == 0)
    with h5py.File(path) as f:
        assert f[f"{det}/raw"].chunks == (1, *model.shape)
        assert f.attrs["format"] == "gpusmd-raw"
        for key in ("pedestal", "rms", "gain"):
            assert f[f"truth/{det}/{key}"].shape == (model.ngain, *model.shape)
        for key in ("hot", "dead", "noisy"):
            m = f[f"truth/{det}/{key}"]
            assert m.dtype == np.uint8 and m.shape == model.shape and m[()].sum() >= 1
        if model.family == "epix10k":
            assert f[f"{det}/config/pixel_config"].shape == (1, *model.shape)
            assert f[f"{det}/config/trbit"].shape == (1, model.shape[0], 4)
            assert not f[f"{det}/config/pixel_config"][()].any()     # AML


@pytest.mark.parametrize("det,shape,n", SMALL)
def test_deposits_and_photons(simulated, det, shape, n):
    path = simulated(det, n_events=n, shape=shape)
    model = get_detector(det, shape)
    with h5py.File(path) as f:
        e_kev = f["truth"].attrs["photon_energy_kev"]
        nph = f[f"truth/{det}/nphotons"][()]
        ev = f[f"truth/{det}/deposit_event"][()]
        pix = f[f"truth/{det}/deposit_pixel"][()]
        kev = f[f"truth/{det}/deposit_keV"][()]
        xray = f["lightStatus/xray"][()]
        ipm = f["ipm2/sum"][()]
    assert len(nph) == n
    assert ev.dtype == np.int32 and pix.dtype == np.int64 and kev.dtype == np.float32
    assert np.all(kev > 0) and pix.min() >= 0 and pix.max() < model.npix
    per_event = np.bincount(ev, weights=kev.astype(np.float64), minlength=n)
    np.testing.assert_allclose(per_event, nph * e_kev, rtol=1e-5, atol=1e-3)
    # X-ray-off shots (every 10th, from index 3): no photons, ~0 intensity
    off = xray == 0
    assert off.any() and off.mean() <= 0.25
    assert np.all(nph[off] == 0) and not np.isin(ev, np.flatnonzero(off)).any()
    assert np.all(nph[~off] > 0) and np.all(ipm[off] < 0.05) and ipm[~off].mean() > 0.5
    # charge sharing: photons split over 2-4 pixels, some deposits whole photons (not on
    # the small camera, where the Bragg spots dominate)
    frac = kev / e_kev
    if model.npix > 100_000:
        assert np.mean(frac < 0.95) > 0.05 and np.mean(np.abs(frac - 1) < 0.05) > 0.1


def test_single_photons_and_raw_signal(simulated):
    """Raw - truth pedestal in a pixel hit by one photon ~ E x ADU/keV (epix100, 16 ADU/keV)."""
    path = simulated("epix100", n_events=10)
    with h5py.File(path) as f:
        ped = f["truth/epix100/pedestal"][0].reshape(-1)
        gain = f["truth/epix100/gain"][0].reshape(-1)
        ev = f["truth/epix100/deposit_event"][()]
        pix = f["truth/epix100/deposit_pixel"][()]
        kev = f["truth/epix100/deposit_keV"][()]
        raw = f["epix100/raw"][0].reshape(-1).astype(np.float64)
        dead = f["truth/epix100/dead"][()].reshape(-1).astype(bool)
        assert f["truth"].attrs["adu_per_kev"][0] == 16.0
    sel = (ev == 0) & (kev > 5) & (kev < 10) & ~dead[pix]
    signal = raw[pix[sel]] - ped[pix[sel]]
    expected = kev[sel] * gain[pix[sel]]
    # noise 3.5 ADU plus a common mode of a few ADU
    assert np.median(np.abs(signal - expected)) < 10


def test_dark_and_data_share_the_detector(epix10k_pair):
    dark, data = epix10k_pair
    for key in ("pedestal", "rms", "gain", "hot", "dead", "noisy"):
        np.testing.assert_array_equal(truth(dark, "epix10kquad", key), truth(data, "epix10kquad", key))
    ped = truth(dark, "epix10kquad", "pedestal")
    np.testing.assert_array_equal(ped[5], ped[2])      # AHL_L, AML_L = FL
    np.testing.assert_array_equal(ped[6], ped[2])
    with h5py.File(dark) as fd, h5py.File(data) as fe:
        assert not np.array_equal(fd["epix10kquad/raw"][0], fe["epix10kquad/raw"][0])
    assert len(truth(dark, "epix10kquad", "nphotons")) == 150
    assert truth(dark, "epix10kquad", "nphotons").sum() == 0


def test_epix10k_dark_steps(epix10k_pair):
    dark, _ = epix10k_pair
    with RawRun(dark) as run:
        det = "epix10kquad"
        model = run.detectors[det]
        assert run.n_events == 150 and run.run == 1
        steps = run.steps(det)
        np.testing.assert_array_equal(steps, np.repeat(np.arange(5), 30))
        np.testing.assert_array_equal(run.scalars["lightStatus/xray"], 0)
        for step, g in zip(range(5), range(5)):        # FH, FM, FL, AHL_H, AML_M
            raw = run.read(det, 30 * step, 30 * step + 2)
            gi = model.gain_index(raw, run.control_bits(det, step))
            assert np.all(gi == g), step


def test_epix10k_data_switches_to_aml_l(epix10k_pair):
    _, data = epix10k_pair
    det = "epix10kquad"
    with RawRun(data) as run:
        model = run.detectors[det]
        raw = run.read(det, 0, run.n_events)
        gi = model.gain_index(raw, run.control_bits(det, 0))
    counts = np.bincount(gi.reshape(-1).astype(np.int64) + 1, minlength=8)[1:]
    assert counts[4] > 0.99 * gi.size                 # AML_M
    assert counts[6] > 0                               # AML_L, raw bit 14
    assert counts[[0, 1, 2, 3, 5]].sum() == 0
    assert np.all((raw[gi == 6] & 0x4000) != 0)


def test_jungfrau_gain_switching_and_dark(simulated):
    data = simulated("jungfrau05M", n_events=20)
    dark = simulated("jungfrau05M", dark=True, n_events=30)
    model = get_detector("jungfrau05M")
    with RawRun(data) as run:
        gi = model.gain_index(run.read("jungfrau05M", 0, run.n_events))
    counts = np.bincount(gi.reshape(-1).astype(np.int64) + 1, minlength=4)
    assert counts[0] == 0 and counts[2] > 0 and counts[3] > 0     # no invalid; G1 and G2
    with RawRun(dark) as run:
        assert run.n_events == 90
        dead = truth(dark, "jungfrau05M", "dead").reshape(-1).astype(bool)
        for g in range(3):
            raw = run.read("jungfrau05M", 30 * g, 30 * g + 2).reshape(2, -1)
            assert np.all(model.gain_index(raw[:, ~dead]) == g)
            assert np.all(raw[:, dead] == 0)
    np.testing.assert_array_equal(truth(dark, "jungfrau05M", "pedestal"),
                                  truth(data, "jungfrau05M", "pedestal"))


def test_defects_in_raw(simulated):
    path = simulated("epix100", dark=True, n_events=30)
    with h5py.File(path) as f:
        raw = f["epix100/raw"][()].reshape(30, -1).astype(np.float64)
        t = {k: f[f"truth/epix100/{k}"][()].reshape(-1) for k in ("hot", "dead", "noisy")}
        ped = f["truth/epix100/pedestal"][0].reshape(-1)
    hot, dead, noisy = (t[k].astype(bool) for k in ("hot", "dead", "noisy"))
    assert not (hot & dead).any() and not (hot & noisy).any() and not (dead & noisy).any()
    assert np.all(raw[:, dead] == 0)
    normal = ~(hot | dead | noisy)
    assert raw[:, hot].mean() - np.median(ped[normal]) > 1500
    assert np.median(raw[:, noisy].std(0)) > 5 * np.median(raw[:, normal][:, :2000].std(0))


def test_detector_depends_only_on_seed():
    a = make_detector("camera", seed=5, shape=(32, 48))
    b = make_detector("camera", seed=5, shape=(32, 48))
    c = make_detector("camera", seed=6, shape=(32, 48))
    np.testing.assert_array_equal(a.pedestal, b.pedestal)
    assert not np.array_equal(a.pedestal, c.pedestal)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown parameter"):
        simulate_run(tmp_path / "x.h5", "epix100", n_events=2, photons_per_pixle=1)
    with pytest.raises(ConfigError, match="camera"):
        simulate_run(tmp_path / "x.h5", "epix100", n_events=2, shape=(10, 10))
    with pytest.raises(ConfigError, match="unknown detector"):
        simulate_run(tmp_path / "x.h5", "epix1M", n_events=2)
