"""Droplets, droplet2photons and photons: hand-built frames, scipy.ndimage as reference,
and the photon count of simulated low-occupancy runs against the simulator's truth."""
import h5py
import numpy as np
import pytest
import scipy.ndimage

from gpusmd.backend import get_backend
from gpusmd.config import Where
from gpusmd.detectors import get_detector
from gpusmd.errors import ConfigError
from gpusmd.features import Ragged
from gpusmd.features.droplet import Droplet
from gpusmd.features.photons import Droplet2Photons, Photons

BACKEND = get_backend()          # GPUSMD_BACKEND=gpu runs these on the device
CAM = get_detector("camera", (10, 12))
W = Where("test.yaml", "droplet")
ADU = {"useRms": False, "threshold": 5, "thresholdLow": 3, "thresADU": 0}


def build(cls, params, model=CAM, mask=None, shape=None, rms=None):
    shape = tuple(shape or model.shape)
    mask = np.ones(shape, np.uint8) if mask is None else mask
    cls.check_params(params, W)
    return cls("f", params, model, {"cmask": mask}, BACKEND, W, input_shape=shape, rms=rms)


def run(feature, frames):
    out = feature.process(BACKEND.asarray(frames))
    return {k: (v.to_host(BACKEND) if isinstance(v, Ragged) else BACKEND.to_host(v))
            for k, v in out.items()}


def hand_frame():
    f = np.zeros((2, 10, 12), np.float32)
    f[0, 2, 2] = 10          # seed
    f[0, 2, 3] = 4           # grown (> thresholdLow 3)
    f[0, 3, 2] = 2           # below thresholdLow: not grown
    f[0, 4, 2] = 4           # above thresholdLow but two pixels away: not grown
    f[0, 7, 7] = 50
    f[0, 7, 8] = 45          # both seeds, one droplet
    f[1, 5, 5] = 8
    f[1, 0, 11] = 6          # corner seed
    return f


def test_growth_com_and_fields():
    out = run(build(Droplet, ADU), hand_frame())
    r = out["var"]
    np.testing.assert_array_equal(r.lengths, [2, 2])
    np.testing.assert_allclose(r.fields["data"], [14, 95, 6, 8])
    np.testing.assert_array_equal(r.fields["npix"], [2, 2, 1, 1])
    np.testing.assert_allclose(r.fields["row"], [2, 7, 0, 5])
    np.testing.assert_allclose(r.fields["col"], [(2 * 10 + 3 * 4) / 14, (7 * 50 + 8 * 45) / 95,
                                                 11, 5], rtol=1e-6)
    np.testing.assert_array_equal(r.fields["tile"], 0)
    np.testing.assert_array_equal(out["nDroplets"], [2, 2])
    np.testing.assert_array_equal(out["nDroplets_all"], [2, 2])


def test_shared_neighbour_goes_to_brightest_and_growth_is_one_step():
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 5, 3] = 20
    f[0, 5, 5] = 9
    f[0, 5, 4] = 4           # touches both: joins the brighter (20)
    f[0, 5, 6] = 4           # grown into the 9 droplet
    f[0, 5, 7] = 4           # two steps away: not grown
    r = run(build(Droplet, ADU), f)["var"]
    np.testing.assert_allclose(r.fields["data"], [24, 13])
    np.testing.assert_array_equal(r.fields["npix"], [2, 2])


def test_thresADU_cut_and_nDroplets_all():
    out = run(build(Droplet, {**ADU, "thresADU": 10}), hand_frame())
    np.testing.assert_array_equal(out["nDroplets_all"], [2, 2])
    np.testing.assert_array_equal(out["nDroplets"], [2, 0])
    np.testing.assert_array_equal(out["var"].lengths, [2, 0])
    np.testing.assert_allclose(out["var"].fields["data"], [14, 95])


def test_fixed_length_zero_padded():
    out = run(build(Droplet, {**ADU, "nData": 3}), hand_frame())
    assert "var" not in out
    assert out["data"].shape == (2, 3)
    np.testing.assert_allclose(out["data"], [[14, 95, 0], [6, 8, 0]])
    np.testing.assert_array_equal(out["npix"], [[2, 2, 0], [1, 1, 0]])
    out = run(build(Droplet, {**ADU, "nData": 1}), hand_frame())
    np.testing.assert_allclose(out["data"], [[14], [6]])
    np.testing.assert_array_equal(out["nDroplets"], [2, 2])     # not capped by nData


def test_segments_never_join():
    f = np.zeros((1, 3, 8, 10), np.float32)
    f[0, 0, 7, 4] = 10       # last row of segment 0
    f[0, 1, 0, 4] = 10       # first row of segment 1: adjacent in memory, not joined
    f[0, 1, 0, 5] = 4        # grown into segment 1's droplet only
    f[0, 2, 3, 9] = 10
    r = run(build(Droplet, ADU, shape=(3, 8, 10)), f)["var"]
    np.testing.assert_array_equal(r.lengths, [3])
    np.testing.assert_array_equal(r.fields["tile"], [0, 1, 2])
    np.testing.assert_allclose(r.fields["data"], [10, 14, 10])
    np.testing.assert_allclose(r.fields["row"], [7, 0, 3])
    np.testing.assert_allclose(r.fields["col"], [4, (4 * 10 + 5 * 4) / 14, 9], rtol=1e-6)


def test_events_never_join():
    f = np.zeros((2, 10, 12), np.float32)
    f[:, 9, 0] = 10
    f[:, 0, 0] = 10
    out = run(build(Droplet, ADU), f)
    np.testing.assert_array_equal(out["nDroplets"], [2, 2])


def test_labels_agree_with_scipy_on_random_sparse_frames():
    model = get_detector("epix10kquad")
    rng = np.random.default_rng(1)
    f = rng.normal(0, 1, (2, *model.shape)).astype(np.float32)
    lit = rng.random(f.shape) < 0.02
    f[lit] += rng.uniform(5, 50, lit.sum())
    mask = (rng.random(model.shape) > 0.01).astype(np.uint8)
    params = {"useRms": False, "threshold": 4, "thresholdLow": 4, "thresADU": -1e9}
    r = run(build(Droplet, params, model, mask), f)["var"]
    cross = scipy.ndimage.generate_binary_structure(2, 1)
    expect, lengths = [], []
    for e in range(2):
        n_ev = 0
        for s in range(model.shape[0]):
            img = np.where(mask[s] != 0, f[e, s], 0)
            lab, n = scipy.ndimage.label((img > 4) & (mask[s] != 0), cross)
            idx = np.arange(1, n + 1)
            sums = scipy.ndimage.sum_labels(img, lab, idx)
            npix = scipy.ndimage.sum_labels(np.ones_like(img), lab, idx)
            com = scipy.ndimage.center_of_mass(img, lab, idx)
            expect += [(s, round(float(a), 2), int(p), round(c[0], 3), round(c[1], 3))
                       for a, p, c in zip(sums, npix, com)]
            n_ev += n
        lengths.append(n_ev)
    got = [(int(t), round(float(a), 2), int(p), round(float(y), 3), round(float(x), 3))
           for t, a, p, y, x in zip(r.fields["tile"], r.fields["data"], r.fields["npix"],
                                    r.fields["row"], r.fields["col"])]
    np.testing.assert_array_equal(r.lengths, lengths)
    assert len(got) == len(expect) > 1000
    # same regions: compare sorted (tile, sum, npix, com) tuples (tolerant rounding)
    g = np.array(sorted(got))
    x = np.array(sorted(expect))
    np.testing.assert_allclose(g, x, atol=2e-2)


def test_rms_units():
    rms = np.full(CAM.shape, 2.0, np.float32)
    rms[:, 6:] = 4.0
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 1, 1] = 11          # > 5 x 2
    f[0, 1, 8] = 11          # < 5 x 4
    f[0, 5, 8] = 21          # > 5 x 4
    f[0, 5, 9] = 13          # > 3 x 4: grown
    p = {"threshold": 5, "thresholdLow": 3, "thresADU": 0}
    r = run(build(Droplet, p, rms=rms), f)["var"]
    np.testing.assert_allclose(r.fields["data"], [11, 34])
    with pytest.raises(ConfigError, match="rms"):
        build(Droplet, p)


@pytest.mark.parametrize("params", [{"threshold": 0}, {"threshold": 3, "thresholdLow": 4},
                                    {"nData": 0}, {"useRms": 1}, {"pixmax": 3}])
def test_bad_params(params):
    with pytest.raises(ConfigError):
        Droplet.check_params(params, W)
    with pytest.raises(ConfigError):
        Droplet2Photons.check_params({"thresholdLow": 1}, W)          # no aduspphot


# ---- droplet2photons ------------------------------------------------------------------
def test_droplet2photons_hand_frame():
    f = hand_frame()
    p = build(Droplet2Photons, {**ADU, "aduspphot": 10})
    out = run(p, f)
    r = out["var"]
    # 14 -> 1 photon at the com (2, 2.29) -> (2, 2); 95 -> 10 (rint 9.5): greedy on 50 / 45
    # gives 5 + 5; 6 -> 1 at (0, 11); 8 -> 1 at (5, 5)
    np.testing.assert_array_equal(r.lengths, [11, 2])
    np.testing.assert_array_equal(out["nPhotons"], [11, 2])
    pts = list(zip(r.fields["row"], r.fields["col"]))
    assert pts[:11] == [(2, 2)] + [(7, 7)] * 5 + [(7, 8)] * 5
    assert pts[11:] == [(0, 11), (5, 5)]
    assert out["prob"].shape == (2, 11)
    np.testing.assert_allclose(out["prob"][0, [0, 1, 5]], [117 / 120, 1 / 120, 2 / 120])
    np.testing.assert_allclose(out["prob"][1, [0, 1]], [118 / 120, 2 / 120])
    np.testing.assert_allclose(out["mean"], [11 / 120, 2 / 120])


def test_greedy_matches_a_loop():
    rng = np.random.default_rng(3)
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 3:6, 3:7] = rng.uniform(4, 70, (3, 4))
    out = run(build(Droplet2Photons, {**ADU, "aduspphot": 10}), f)
    v = f[0].copy()
    n = int(np.rint(f[0].sum() / 10))
    expect = np.zeros_like(v, int)
    for _ in range(n):
        i = np.unravel_index(np.argmax(v), v.shape)
        expect[i] += 1
        v[i] -= 10
    got = np.zeros_like(expect)
    np.add.at(got, (out["var"].fields["row"], out["var"].fields["col"]), 1)
    np.testing.assert_array_equal(got, expect)
    out = run(build(Droplet2Photons, {**ADU, "aduspphot": 10, "nData": 4}), f)
    assert out["row"].shape == (1, 4) and out["nPhotons"][0] == n


# ---- photons --------------------------------------------------------------------------
def test_photons_hand_frame():
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 1, 1] = 25          # 2 whole + 0.5, no neighbour: 2
    f[0, 4, 4] = 6           # 0.6 + 0.4 (neighbour) = 1.0 > 0.9: 1 photon at (4, 4)
    f[0, 4, 5] = 4
    f[0, 7, 7] = 5           # 0.5 + 0.3 < 0.9: none
    f[0, 7, 8] = 3
    f[0, 9, 0] = 31          # 3 whole + 0.1: 3
    f[0, 9, 1] = -20         # negative: none
    out = run(build(Photons, {"ADU_per_photon": 10}), f)
    r = out["var"]
    assert list(zip(r.fields["row"], r.fields["col"], r.fields["nphot"])) == \
        [(1, 1, 2), (4, 4, 1), (9, 0, 3)]
    np.testing.assert_array_equal(out["nPhot"], [6])
    out = run(build(Photons, {"ADU_per_photon": 10, "thr_fraction": 0.7}), f)
    np.testing.assert_array_equal(out["nPhot"], [7])        # 0.8 > 0.7: (7, 7) too
    mask = np.ones(CAM.shape, np.uint8)
    mask[1, 1] = 0
    out = run(build(Photons, {"ADU_per_photon": 10}, mask=mask), f)
    np.testing.assert_array_equal(out["nPhot"], [4])


# ---- simulated run ------------------------------------------------------------------------
def test_photon_count_matches_simulation_truth(tmp_path):
    from gpusmd.calib.calibrate import Calibrator
    from gpusmd.calib.dark import process_dark
    from gpusmd.calib.masks import pixel_masks
    from gpusmd.io.raw import RawRun
    from gpusmd.simulate import simulate_run

    kw = {"detector": "camera", "shape": (256, 256), "seed": 5, "common_mode_scale": 0.0}
    simulate_run(tmp_path / "dark.h5", n_events=40, dark=True, **kw)
    simulate_run(tmp_path / "data.h5", n_events=20, photons_per_pixel=0.002, bragg_spots=0,
                 photon_energy_kev=20.0, **kw)
    consts = process_dark(tmp_path / "dark.h5", tmp_path / "c.h5")["camera"]
    model = consts.model
    masks = pixel_masks(model, consts)
    cal = Calibrator(model, consts, masks["cmask"], BACKEND)
    with RawRun(tmp_path / "data.h5") as raw:
        frames = cal(raw.read("camera", 0, 20))
    with h5py.File(tmp_path / "data.h5") as h:
        t = h["truth/camera"]
        nphot, ev, pix, kev = (t[k][()] for k in ("nphotons", "deposit_event",
                                                   "deposit_pixel", "deposit_keV"))
        adu_per_photon = 20.0 * float(t["gain"][0].mean())
    # truth: photons deposited in good pixels (energy / photon energy), per event
    good = masks["cmask"].reshape(-1) != 0
    truth = np.bincount(ev, weights=kev * good[pix], minlength=20) / 20.0
    assert nphot.sum() > 1500
    assert abs(truth.sum() - nphot.sum()) < 0.01 * nphot.sum()
    p = {"threshold": 5, "thresholdLow": 3, "thresADU": adu_per_photon / 2,
         "aduspphot": adu_per_photon}
    feat = Droplet2Photons("d2p", p, model, masks, BACKEND, W, rms=consts.rms[0])
    out = run(feat, frames)
    got = out["nPhotons"]
    lit = nphot > 20
    np.testing.assert_allclose(got[lit], truth[lit], rtol=0.05)
    assert abs(got.sum() - truth.sum()) < 0.02 * truth.sum()
    assert got[~lit].sum() <= 1              # X-ray-off events: no photons from noise
    np.testing.assert_allclose(out["mean"], got / masks["cmask"].sum(), rtol=0.05)
    # droplets of the same run: about one per photon at this occupancy
    d = run(Droplet("droplet", {k: p[k] for k in ("threshold", "thresholdLow", "thresADU")},
                    model, masks, BACKEND, W, rms=consts.rms[0]), frames)
    assert 0.85 * got.sum() < d["nDroplets"].sum() <= got.sum()
    # photons (psana finder): merging only two fractions, it loses photons shared by 3-4
    # pixels or pushed below thr_fraction by the noise (~12 % at 0.9 here), fewer at 0.7
    ph = run(Photons("photons", {"ADU_per_photon": adu_per_photon}, model, masks, BACKEND, W),
             frames)
    assert 0.8 * truth.sum() < ph["nPhot"].sum() < truth.sum()
    ph = run(Photons("photons", {"ADU_per_photon": adu_per_photon, "thr_fraction": 0.7},
                     model, masks, BACKEND, W), frames)
    np.testing.assert_allclose(ph["nPhot"][lit], truth[lit], rtol=0.1)
    assert abs(ph["nPhot"].sum() - truth.sum()) < 0.05 * truth.sum()
    assert ph["nPhot"][~lit].sum() <= 1
