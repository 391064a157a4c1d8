"""Droplets, droplet2photons and photons: hand-built frames, scipy.ndimage as reference,
and the photon count of simulated low-occupancy runs against the simulator's truth.

The droplet rules are smalldata_tools' (smalldata_tools/ana_funcs/droplet.py,
dropletFunc.dropletize / prepareImg / applyThreshold), the photon rules its
droplet2Photons (smalldata_tools/ana_funcs/droplet2Photons.py, process, and
dropletCode/loopdrops.py); each test names the function whose rule it checks."""
import h5py
import numpy as np
import pytest
import scipy.ndimage

from gpusmd.config import Where
from gpusmd.detectors import get_detector
from gpusmd.errors import ConfigError
from gpusmd.features import Ragged
from gpusmd.features.droplet import Droplet
from gpusmd.features.photons import Droplet2Photons, Photons

from conftest import backend_or_skip

BACKEND = backend_or_skip()       # GPUSMD_BACKEND=gpu runs these on the device
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


def two_seeds_one_bridge():
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 5, 3] = 20          # seed, label 1
    f[0, 5, 5] = 9           # seed, label 2
    f[0, 5, 4] = 4           # grown, touches both seeds
    f[0, 5, 6] = 4           # grown into the 9 droplet
    f[0, 5, 7] = 4           # two steps away: not grown
    f[0, 2, 8] = 7           # seed, label 3 (raster order: row 2 before row 5)
    return f


def test_droplets_touching_after_growth_merge():
    """dropletFunc.dropletize, relabel (default true): the grown image (lit pixels >=
    thresholdLow that are seeds or touch one: maximum filter of the labels, masked where
    the low-threshold image is 0) is labelled again, so the two seeds joined by a grown
    pixel are one droplet; growth is one step only."""
    f = two_seeds_one_bridge()
    out = run(build(Droplet, ADU), f)
    r = out["var"]
    # by hand: {(2, 8)} and {(5, 3), (5, 4), (5, 5), (5, 6)}; (5, 7) two steps away
    np.testing.assert_allclose(r.fields["data"], [7, 20 + 4 + 9 + 4])
    np.testing.assert_array_equal(r.fields["npix"], [1, 4])
    np.testing.assert_allclose(r.fields["col"], [8, (3 * 20 + 4 * 4 + 5 * 9 + 6 * 4) / 37],
                               rtol=1e-6)
    np.testing.assert_array_equal(out["nDroplets_all"], [2])
    # the same regions as scipy.ndimage.label of the hand-marked droplet pixels
    member = np.zeros((10, 12), bool)
    member[2, 8] = True
    member[5, 3:7] = True
    lab, n = scipy.ndimage.label(member)
    np.testing.assert_allclose(scipy.ndimage.sum_labels(f[0], lab, np.arange(1, n + 1)),
                               r.fields["data"])


def test_without_relabel_grown_pixel_joins_the_largest_label():
    """dropletFunc.dropletize with relabel false: the droplets are the seeds' regions
    (img_drop), a grown pixel takes the maximum-filtered label, i.e. its neighbouring
    droplet of the largest label (labels in raster order of the first pixel)."""
    p = {**ADU, "relabel": False}
    r = run(build(Droplet, p), two_seeds_one_bridge())["var"]
    # labels: (2, 8) -> 1, 20 -> 2, 9 -> 3; the bridge (5, 4) joins 3 (the 9)
    np.testing.assert_allclose(r.fields["data"], [7, 20, 9 + 4 + 4])
    np.testing.assert_array_equal(r.fields["npix"], [1, 1, 3])


def test_join_brightest_option():
    """gpusmd's option (no smalldata counterpart): without relabel, a grown pixel touching
    two droplets joins the one of its brightest seed neighbour."""
    p = {**ADU, "relabel": False, "joinBrightest": True}
    r = run(build(Droplet, p), two_seeds_one_bridge())["var"]
    np.testing.assert_allclose(r.fields["data"], [7, 24, 13])
    np.testing.assert_array_equal(r.fields["npix"], [1, 2, 2])


def test_seed_and_growth_thresholds_are_inclusive():
    """dropletFunc.applyThreshold zeroes img < threshold: a pixel at exactly threshold is
    a seed, at exactly thresholdLow is grown; below either it is not."""
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 1, 1] = 5.0         # == threshold: seed
    f[0, 1, 2] = 3.0         # == thresholdLow: grown
    f[0, 6, 6] = np.nextafter(np.float32(5), np.float32(0))     # just below: nothing
    f[0, 6, 7] = 4.0
    r = run(build(Droplet, ADU), f)["var"]
    np.testing.assert_allclose(r.fields["data"], [8])
    np.testing.assert_array_equal(r.fields["npix"], [2])


def test_zero_pixels_never_join():
    """dropletFunc.dropletize labels the non-zero pixels of the thresholded image: with
    thresholdLow 0 a zero or negative neighbour is not grown, a positive one is."""
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 4, 4] = 10
    f[0, 4, 5] = 0.5
    f[0, 4, 3] = -1
    r = run(build(Droplet, {**ADU, "thresholdLow": 0}), f)["var"]
    np.testing.assert_allclose(r.fields["data"], [10.5])
    np.testing.assert_array_equal(r.fields["npix"], [2])


def test_defaults_are_smalldata_defaults():
    """dropletFunc.__init__: threshold 5, thresholdLow = threshold (no growth), thresADU
    None (no cut on the droplet sum), pixmax None, useRms true, relabel true."""
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 2, 2] = 6           # a droplet of sum 6: no thresADU cut keeps it
    f[0, 2, 3] = 4.9         # above 3 but below thresholdLow = threshold: not grown
    f[0, 7, 7] = 1e6         # no pixmax
    feat = build(Droplet, {"useRms": False})
    r = run(feat, f)["var"]
    np.testing.assert_allclose(r.fields["data"], [6, 1e6])
    items = feat.config_items()
    assert items["threshold"] == items["thresholdLow"] == 5
    assert items["relabel"] == 1 and items["joinBrightest"] == 0
    assert "thresADU" not in items and "pixmax" not in items
    with pytest.raises(ConfigError, match="useRms"):       # rms units by default
        build(Droplet, {})
    # thresholdLow follows a given threshold
    assert build(Droplet, {"useRms": False, "threshold": 7}).finder.threshold_low == 7


def test_pixmax_leaves_hot_pixels_out():
    """dropletFunc.prepareImg: pixels above pixmax are set to 0 before both thresholds,
    so they are in no droplet (not seeds, not grown, not summed); at pixmax they count."""
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 3, 2:7] = [10, 20, 500, 20, 10]     # a hot pixel in the middle splits it
    f[0, 8, 8] = 100                         # == pixmax: kept
    f[0, 8, 9] = 4                           # grown into it
    r = run(build(Droplet, {**ADU, "pixmax": 100}), f)["var"]
    np.testing.assert_allclose(r.fields["data"], [30, 30, 104])
    np.testing.assert_array_equal(r.fields["npix"], [2, 2, 2])
    r = run(build(Droplet, ADU), f)["var"]
    np.testing.assert_allclose(r.fields["data"], [560, 104])


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
    """dropletFunc.dropletize with thresholdLow = threshold: ndi.label of the masked
    image thresholded at >= threshold, per segment (3-d footprint of one 2-d cross)."""
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
            lab, n = scipy.ndimage.label((img >= 4) & (mask[s] != 0), cross)
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


@pytest.mark.parametrize("params, key", [
    ({"threshold": 0}, "threshold"), ({"threshold": 3, "thresholdLow": 4}, "thresholdLow"),
    ({"thresholdLow": 6}, "thresholdLow"),            # above the default threshold 5
    ({"nData": 0}, "nData"), ({"useRms": 1}, "useRms"), ({"thresADU": "5"}, "thresADU"),
    ({"thresADU": float("nan")}, "thresADU"), ({"pixmax": "hot"}, "pixmax"),
    ({"pixmax": 0}, "pixmax"), ({"pixmax": True}, "pixmax"), ({"relabel": "no"}, "relabel"),
    ({"joinBrightest": True}, "joinBrightest"),       # needs relabel: false
    ({"photpts": [1, 2]}, "photpts")])                # not a droplet key
def test_bad_params(params, key):
    with pytest.raises(ConfigError, match=rf"droplet\.{key}\b"):
        Droplet.check_params(params, W)
    with pytest.raises(ConfigError, match="aduspphot"):
        Droplet2Photons.check_params({"thresholdLow": 1}, W)          # no aduspphot


@pytest.mark.parametrize("photpts, why", [
    ([0, 10], "at least 3"), ([0, 20, 10], "increasing"), ([0, 10, 10], "increasing"),
    ("0 10 20", "list"), ([0, "10", 20], r"\[1\]: expected a number"),
    ([0, 10, float("inf")], "finite")])
def test_bad_photpts(photpts, why):
    with pytest.raises(ConfigError, match=rf"droplet\.photpts.*{why}"):
        Droplet2Photons.check_params({"aduspphot": 10, "photpts": photpts}, W)


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


def test_photpts_default_and_given():
    """droplet2Photons.__init__ / process / loopdrops: n = digitize(sum, photpts) - 1,
    one photon for photpts[1] <= sum < photpts[2], none below photpts[1] or at or above
    photpts[-1]; default photpts = arange(N) x aduspphot - aduspphot / 2 (so 25 ADU at 10
    ADU per photon is 3 photons: halves round up)."""
    f = np.zeros((1, 10, 12), np.float32)
    for col, value in zip((0, 2, 4, 6, 8, 10), (4.9, 5, 14.9, 25, 35, 80)):
        f[0, 5, col] = value                 # one-pixel droplets, apart
    def counts(extra):
        out = run(build(Droplet2Photons, {**ADU, "aduspphot": 10, **extra}), f)
        got = np.zeros(12, int)
        np.add.at(got, out["var"].fields["col"], 1)
        return got[::2]
    np.testing.assert_array_equal(counts({}), [0, 1, 1, 3, 4, 8])
    np.testing.assert_array_equal(counts({"photpts": [-5, 8, 15, 30, 80]}), [0, 0, 1, 2, 3, 0])


def test_greedy_matches_a_loop():
    rng = np.random.default_rng(3)
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 3:6, 3:7] = rng.uniform(4, 70, (3, 4))
    out = run(build(Droplet2Photons, {**ADU, "aduspphot": 10}), f)
    v = f[0].copy()
    n = int(np.floor(f[0].sum() / 10 + 0.5))
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


@pytest.mark.parametrize("key, value", [("pixmax", 100), ("relabel", False),
                                        ("thresholdLow", 3)])
def test_chained_droplet2photons_refuses_droplet_parameters(key, value):
    """droplet2Photons takes its droplet function's droplets (DetObjectFunc.addFunc):
    the droplet parameters belong to the parent."""
    parent = build(Droplet, ADU)
    with pytest.raises(ConfigError, match=rf"droplet\.{key}: chained on a droplet"):
        Droplet2Photons("d2p", {"aduspphot": 10, key: value}, CAM, {"cmask": np.ones(
            CAM.shape, np.uint8)}, BACKEND, W, input_shape=parent.output_shape)


def test_pixmax_is_in_frame_units_with_rms_thresholds():
    """dropletFunc.prepareImg compares pixmax with the image itself, not x rms."""
    f = np.zeros((1, 10, 12), np.float32)
    f[0, 2, 2] = 30          # > 5 x rms 2, < pixmax 40
    f[0, 6, 6] = 50          # > pixmax 40 (= 20 rms)
    p = {"pixmax": 40}
    out = run(build(Droplet2Photons, {**p, "aduspphot": 30},
                    rms=np.full(CAM.shape, 2.0, np.float32)), f)
    np.testing.assert_array_equal(out["nPhotons"], [1])
