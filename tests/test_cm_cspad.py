"""CsPad common mode 1 (histogram peak, fallback to mode 5) and mode 5 (unbonded pixels)
on hand-built frames (gpusmd.calib.cm_cspad)."""
import numpy as np
import pytest

from gpusmd.calib import cm_cspad
from gpusmd.calib.common_mode import CommonMode, ModeContext, resolve
from gpusmd.detectors import get_detector

MODEL = get_detector("cspad")
NSEG, ROWS, COLS = MODEL.seg_shape
SIGMA = 3.0
GARBAGE_LOW, GARBAGE_HIGH = -300.0, 5000.0


def make_frames(n_events=3, seed=0, offsets=None, photons=0.1, extra_bad=0.04):
    """(adu (B, npix) float32, good (B, npix) bool, offsets (B, nseg) float64).

    Noise sigma 3 around a per-(event, segment) offset; photons of +30..+60 ADU on a
    fraction of the bonded pixels; extra bad pixels (not voting) hold garbage: half at
    -300 (a spike far above thresh that would be the first peak if it voted), half at
    5000. The geometry mask (edges, central columns, unbonded pixels and neighbours) is
    bad too, with ordinary values."""
    rng = np.random.default_rng(seed)
    shape = (n_events, NSEG, ROWS, COLS)
    if offsets is None:
        offsets = rng.uniform(-15, 15, (n_events, NSEG))
    offsets = np.asarray(offsets, np.float64)
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(SIGMA)
    x += offsets[..., None, None].astype(np.float32)
    bonded = MODEL.unbond_mask(0).astype(bool)               # unbonded pixels see no photons
    hit = (rng.random(shape, dtype=np.float32) < photons) & bonded
    x[hit] += rng.uniform(30, 60, hit.sum()).astype(np.float32)
    good = np.broadcast_to(MODEL.geometry_mask().astype(bool), shape).copy()
    bad = (rng.random(shape, dtype=np.float32) < extra_bad) & good
    x[bad] = np.where(rng.random(bad.sum()) < 0.5, GARBAGE_LOW, GARBAGE_HIGH)
    good &= ~bad
    return x.reshape(n_events, -1), good.reshape(n_events, -1), offsets


def ctx():
    return ModeContext(MODEL)


def per_segment(a):
    return a.reshape(len(a), NSEG, ROWS * COLS)


def applied_cm(before, after):
    """The constant subtracted from each segment (B, nseg); asserts it is one constant (to
    float32 rounding: values reach 1e4)."""
    d = per_segment(before.astype(np.float64) - after.astype(np.float64))
    cm = np.median(d, axis=-1)
    assert np.abs(d - cm[..., None]).max() < 2e-3
    return cm


def hand_unbond_mean(adu):
    """Mean of (r, r), (r, r + 194), r = 10..180, per event and segment, by hand."""
    frames = adu.reshape(len(adu), NSEG, ROWS, COLS)
    out = np.zeros((len(adu), NSEG))
    for b in range(len(adu)):
        for s in range(NSEG):
            vals = [float(frames[b, s, r, c]) for r in range(10, 181, 10) for c in (r, r + 194)]
            assert len(vals) == 36
            out[b, s] = sum(vals) / len(vals)
    return out


# ---- mode 5 -----------------------------------------------------------------------------

def test_unbond_pixels_are_r_10_to_180():
    off = cm_cspad.unbond_offsets()
    rows, cols = np.divmod(off, COLS)
    mrows, mcols = MODEL.unbond_pixels()
    model_pixels = {(int(r), int(c)) for r, c in zip(mrows, mcols) if r >= 10}
    assert len(off) == 36 and set(zip(rows.tolist(), cols.tolist())) == model_pixels
    assert rows.min() == 10 and rows.max() == 180


def test_mode5_subtracts_the_unbond_mean():
    offsets = np.random.default_rng(1).uniform(-15, 15, (2, NSEG))
    offsets[0, 3], offsets[1, 7] = 150.0, -130.0               # beyond maxcorr 100
    adu, good, _ = make_frames(2, seed=1, offsets=offsets)
    per = adu.reshape(2, NSEG, ROWS, COLS)
    per[:, :, 0, 0] = 1e4                                      # r = 0: not read
    per[:, :, 0, 194] = -1e4
    expect = hand_unbond_mean(adu)
    before = adu.copy()
    stats = cm_cspad.mode5(adu, good, (5,), ctx())            # maxcorr 100 by default
    assert adu.dtype == np.float32
    skip = np.abs(expect) > 100
    assert skip.sum() == 2 and skip[0, 3] and skip[1, 7]
    np.testing.assert_allclose(applied_cm(before, adu), np.where(skip, 0, expect), atol=1e-5)
    assert np.array_equal(adu.reshape(2, NSEG, -1)[skip], before.reshape(2, NSEG, -1)[skip])
    assert stats["corrected"].tolist() == [31, 31] and stats["skipped"].tolist() == [1, 1]


def test_mode5_maxcorr_from_cmpars():
    adu, good, _ = make_frames(2, seed=2)
    expect = hand_unbond_mean(adu)
    before = adu.copy()
    stats = cm_cspad.mode5(adu, good, (5, 5), ctx())
    small = np.abs(expect) <= 5
    assert 0 < small.sum() < small.size
    np.testing.assert_allclose(applied_cm(before, adu), np.where(small, expect, 0), atol=1e-5)
    assert stats["corrected"].tolist() == small.sum(axis=1).tolist()


# ---- mode 1 -----------------------------------------------------------------------------

def test_mode1_recovers_the_offset_despite_photons_and_garbage():
    adu, good, offsets = make_frames(3, seed=3)
    before = adu.copy()
    stats = cm_cspad.mode1(adu, good, (1, 25, 25, 100, 1), ctx())
    assert adu.dtype == np.float32
    cm = applied_cm(before, adu)
    assert np.abs(cm - offsets).max() < 0.05 * SIGMA
    assert stats["corrected"].tolist() == [NSEG] * 3 and stats["skipped"].tolist() == [0] * 3
    # not the unbonded-pixel mean (36 pixels: ~0.5 ADU of noise), the peak of 60000 pixels
    assert np.abs(cm - hand_unbond_mean(before)).max() > 0.2


def test_mode1_bad_pixels_do_not_vote():
    """If the -300 garbage voted it would be the first peak: |mean| > 25 -> fallback."""
    adu, good, offsets = make_frames(1, seed=4)
    all_good = np.ones_like(good)
    before = adu.copy()
    cm_cspad.mode1(adu, all_good, (1, 25, 25, 100, 1), ctx())
    np.testing.assert_allclose(applied_cm(before, adu), hand_unbond_mean(before), atol=1e-5)
    adu = before.copy()
    cm_cspad.mode1(adu, good, (1, 25, 25, 100, 1), ctx())
    assert np.abs(applied_cm(before, adu) - offsets).max() < 0.05 * SIGMA


def test_mode1_falls_back_to_mode5_when_the_peak_is_too_wide():
    adu, good, _ = make_frames(2, seed=5)
    before = adu.copy()
    stats = cm_cspad.mode1(adu, good, (1, 25, 1.0, 100, 1), ctx())    # rms_max 1 < sigma 3
    expect = before.copy()
    cm_cspad.mode5(expect, good, (5, 25), ctx())                      # maxcorr = mean_max
    assert np.array_equal(adu, expect)
    np.testing.assert_allclose(applied_cm(before, adu), hand_unbond_mean(before), atol=1e-5)
    assert stats["corrected"].tolist() == [NSEG, NSEG]


def test_mode1_without_fallback_leaves_the_segment():
    adu, good, _ = make_frames(2, seed=5)
    before = adu.copy()
    stats = cm_cspad.mode1(adu, good, (1, 25, 1.0, 100, 0), ctx())
    assert np.array_equal(adu, before)
    assert stats["corrected"].tolist() == [0, 0] and stats["skipped"].tolist() == [NSEG, NSEG]


def test_mode1_mean_limit_and_fallback_limit():
    offsets = np.random.default_rng(6).uniform(-15, 15, (1, NSEG))
    offsets[0, 2], offsets[0, 9] = 40.0, 24.0
    adu, good, _ = make_frames(1, seed=6, offsets=offsets)
    before = adu.copy()
    stats = cm_cspad.mode1(adu, good, (1, 25, 25, 100, 1), ctx())
    cm = applied_cm(before, adu)
    assert cm[0, 2] == 0                          # mode 1 and mode 5 both beyond 25
    assert abs(cm[0, 9] - 24.0) < 0.05 * SIGMA    # within the limit
    assert stats["corrected"].tolist() == [NSEG - 1]
    # no bin above thresh: no peak, fallback (the unbonded mean is within 25 here)
    adu = before.copy()
    stats = cm_cspad.mode1(adu, good, (1, 25, 25, 10 ** 6, 1), ctx())
    expect = hand_unbond_mean(before)
    np.testing.assert_allclose(applied_cm(before, adu),
                               np.where(np.abs(expect) <= 25, expect, 0), atol=1e-5)


def test_mode1_non_contiguous_adu():
    adu, good, _ = make_frames(2, seed=7)
    ref = adu.copy()
    cm_cspad.mode1(ref, good, (1, 25, 25, 100, 1), ctx())
    f = np.asfortranarray(adu)
    cm_cspad.mode1(f, good, (1, 25, 25, 100, 1), ctx())
    assert np.array_equal(f, ref)


# ---- the histogram and the peak search against a literal port of psana's scan ----------

def psana_peak(hist, thresh):
    """psana findCommonMode's scan (pdscalibdata / ImgAlgos CommonMode.h), literally."""
    hsize = len(hist)
    peak_pos, peak_count, hm_right = -1, -1, hsize
    for i in range(hsize):
        if hist[i] > peak_count and hist[i] > thresh:
            peak_pos, peak_count = i, hist[i]
        elif peak_count > 0 and hist[i] <= peak_count // 2:
            hm_right = i
            break
    if peak_pos < 0:
        return False, None, None
    hm_left = -1
    i = peak_pos
    while hm_left < 0 and i >= 0:
        if hist[i] <= peak_count // 2:
            hm_left = i
        i -= 1
    return True, peak_pos, (hm_right - hm_left) / 2.36


def test_find_peak_matches_psana_scan():
    rng = np.random.default_rng(8)
    n = cm_cspad.NBINS
    i = np.arange(n)
    hists = []
    for k in range(300):
        h = np.zeros(n)
        for _ in range(rng.integers(1, 4)):                   # 1 to 3 peaks
            mu = rng.choice([rng.uniform(0, n), rng.uniform(-3, 3), rng.uniform(n - 3, n + 3)])
            h += rng.uniform(20, 5000) * np.exp(-0.5 * ((i - mu) / rng.uniform(0.3, 8)) ** 2)
        h = rng.poisson(h + rng.uniform(0, 5))
        if k % 10 == 0:                                       # a dip inside a peak
            h[min(np.argmax(h) + 1, n - 1)] = h.max() * 0.6
        hists.append(h)
    hists = np.array(hists, np.int64)
    for thresh in (100, 1000):
        found, peak, sigma = cm_cspad.find_peak(hists, thresh, np)
        for k, h in enumerate(hists):
            f, p, s = psana_peak(h.tolist(), thresh)
            assert found[k] == f, k
            if f:
                assert (peak[k], sigma[k]) == (p, s), k


def test_histogram_rounds_half_away_from_zero_and_counts_good_in_range():
    vals = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.4999998, -2.4999998, 0.49999997,
                     -1000.5, -1000.4, 1999.4, 1999.5, np.nan, np.inf, 3.0, 7.0], np.float32)
    good = np.ones(vals.shape, bool)
    good[-1] = False
    view = vals[None, None, :]
    h = cm_cspad.histograms(view, good[None, None, :], np)[0, 0]
    expect = np.zeros(cm_cspad.NBINS, np.int64)
    for v in [-3, -2, -1, 1, 2, 2, -2, 0, -1000, 1999, 3]:
        expect[v + 1000] += 1
    assert np.array_equal(h, expect)


# ---- end to end -------------------------------------------------------------------------

@pytest.mark.parametrize("code", [1, 5])
def test_common_mode_end_to_end(code):
    cmpars = resolve("cspad", code)
    assert int(cmpars[0]) == code
    adu, good, offsets = make_frames(2, seed=9)
    direct = adu.copy()
    fn = cm_cspad.mode1 if code == 1 else cm_cspad.mode5
    fn(direct, good, cmpars, ctx())
    stats = CommonMode(MODEL, cmpars)(adu, good)
    assert adu.dtype == np.float32 and np.array_equal(adu, direct)
    assert set(stats) == {"corrected", "skipped"}
    for v in stats.values():
        assert v.dtype == np.int32 and v.shape == (2,)
    assert (stats["corrected"] + stats["skipped"]).tolist() == [NSEG, NSEG]
    if code == 1:
        residual = per_segment(adu)[..., 1000] - (per_segment(direct)[..., 1000])
        assert not residual.any()


def test_explicit_cmpars_resolve():
    assert resolve("cspad", [1, 25, 25, 100, 0]) == (1, 25, 25, 100, 0)
    assert resolve("cspad", [5, 50]) == (5, 50)
    adu, good, _ = make_frames(1, seed=10)
    before = adu.copy()
    CommonMode(MODEL, resolve("cspad", [1, 25, 1, 100, 0]))(adu, good)
    assert np.array_equal(adu, before)


def test_mode1_non_finite_bad_pixels_do_not_vote():
    adu, good, _ = make_frames(2, seed=11)
    ref = adu.copy()
    cm_cspad.mode1(ref, good, (1, 25, 25, 100, 1), ctx())
    rng = np.random.default_rng(11)
    bad = np.flatnonzero(~good[0])
    pick = rng.choice(bad, 300, replace=False)
    adu[0, pick] = np.array([np.nan, np.inf, -np.inf], np.float32)[np.arange(300) % 3]
    cm_cspad.mode1(adu, good, (1, 25, 25, 100, 1), ctx())
    assert np.array_equal(adu[good], ref[good])
    assert np.isnan(adu[0, pick[::3]]).all()


class _BatchXP:
    """NumPy under another name: drives the whole-batch path other backends (CuPy) take."""

    def __getattr__(self, name):
        return getattr(np, name)


def test_whole_batch_path_matches_per_event_path():
    adu, good, _ = make_frames(3, seed=12)
    adu[1, np.flatnonzero(~good[1])[:50]] = np.nan
    for code, cmpars in ((1, (1, 25, 25, 100, 1)), (1, (1, 25, 1, 100, 1)), (5, (5, 100))):
        fn = cm_cspad.mode1 if code == 1 else cm_cspad.mode5
        a, b = adu.copy(), adu.copy()
        sa = fn(a, good, cmpars, ModeContext(MODEL))
        sb = fn(b, good, cmpars, ModeContext(MODEL, xp=_BatchXP()))
        assert np.array_equal(a, b, equal_nan=True)
        assert all(np.array_equal(sa[k], sb[k]) for k in sa)
