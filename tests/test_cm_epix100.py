"""epix100 common mode: psana mode 4 and "cm_epix" (mode 6, smalldata 45 / 46 / 47), on
hand-built (704, 768) frames."""
import numpy as np
import pytest

from gpusmd.calib.cm_epix100 import cm_epix_flags, mode4, mode6
from gpusmd.calib.common_mode import CommonMode, ModeContext, resolve
from gpusmd.detectors import get_detector

MODEL = get_detector("epix100")
R, C = 704, 768
BR, BC = 352, 96
NROWS, NCOLS = R * C // BC, 2 * C          # 5632 bank rows, 1536 half columns


def ctx(rms=None):
    return ModeContext(MODEL, None if rms is None else
                       np.broadcast_to(np.asarray(rms, np.float32), (R, C)).reshape(-1).copy())


def run(fn, frames, cmpars, good=None, rms=None):
    """Apply fn to (B, 704, 768) frames (or one frame); returns (corrected frames, stats)."""
    frames = np.asarray(frames, np.float32)
    single = frames.ndim == 2
    frames = frames.reshape(-1, R, C)
    adu = frames.reshape(len(frames), -1).copy()
    good = (np.ones_like(adu, bool) if good is None
            else np.broadcast_to(np.asarray(good, bool).reshape(-1, R * C), adu.shape).copy())
    stats = fn(adu, good, cmpars, ctx(rms))
    out = adu.reshape(frames.shape)
    return (out[0] if single else out), stats


def bank(img, b):
    """View of bank b (0..15: 2 bank rows x 8 bank columns, row-major) of a frame."""
    r, c = divmod(b, 8)
    return img[..., r * BR:(r + 1) * BR, c * BC:(c + 1) * BC]


def bank_offsets(values):
    """A frame whose 16 banks hold the given constants."""
    img = np.zeros((R, C), np.float32)
    for b, v in enumerate(values):
        bank(img, b)[...] = v
    return img


def row_offsets(values):
    """A frame whose 5632 96-pixel bank rows hold the given constants (row-major)."""
    return np.repeat(np.asarray(values, np.float32), BC).reshape(R, C)


def column_offsets(values):
    """A frame whose 2 x 768 352-pixel half columns hold the given constants (values (2, 768))."""
    return np.repeat(np.asarray(values, np.float32).reshape(2, 1, C), BR, axis=1).reshape(R, C)


rng = np.random.default_rng(1)


# ---- mode 4 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, make, n", [
    (1, lambda: bank_offsets(rng.integers(-20, 21, 16) / 2), 16),
    (2, lambda: row_offsets(rng.integers(-18, 19, NROWS) / 2), NROWS),
    (4, lambda: column_offsets(rng.integers(-18, 19, (2, C)) / 2), NCOLS),
])
def test_mode4_removes_offsets_exactly(bits, make, n):
    img = make()
    out, stats = run(mode4, img, (4, bits, 30, 10))
    assert np.array_equal(out, np.zeros_like(out))
    assert stats["corrected"] == n and stats["skipped"] == 0


def test_mode4_with_noise_all_passes():
    noise = rng.normal(0, 1.0, (2, R, C)).astype(np.float32)
    truth = (bank_offsets(rng.uniform(-8, 8, 16)) + row_offsets(rng.uniform(-1, 1, NROWS))
             + column_offsets(rng.uniform(-1, 1, (2, C))))
    out, stats = run(mode4, noise + truth, (4, 7, 30, 10))
    resid = out - noise
    # what is left of the offsets is the median's statistical error: ~1.25 sigma / sqrt(n)
    assert np.abs(resid).mean() < 0.2
    assert np.abs(resid.mean(axis=(1, 2))).max() < 0.05
    assert stats["corrected"].tolist() == [16 + NROWS + NCOLS] * 2


def test_mode4_out_of_range_and_bad_pixels_do_not_vote_but_are_corrected():
    img = bank_offsets([3.0] * 16)
    b0 = bank(img, 0)
    b0[:, :40] = 100.0                       # outside +-30: no vote (40 / 96 of the bank)
    b1 = bank(img, 1)
    b1[:, :40] = 20.0                        # inside the range but bad: no vote
    good = np.ones((R, C), bool)
    bank(good, 1)[:, :40] = False
    out, stats = run(mode4, img, (4, 1, 30, 10), good=good)
    assert np.all(bank(out, 0)[:, :40] == 97.0) and np.all(bank(out, 0)[:, 40:] == 0)
    assert np.all(bank(out, 1)[:, :40] == 17.0) and np.all(bank(out, 1)[:, 40:] == 0)
    assert stats["corrected"] == 16


def test_mode4_half_range_is_inclusive():
    img = row_offsets(np.zeros(NROWS))
    img[0, :BC] = 30.0                       # exactly +half_range: votes
    img[1, :BC] = -30.0
    img[2, :BC] = 30.5                       # outside: nobody votes, skipped
    out, stats = run(mode4, img, (4, 2, 30, 0))        # maxcorr 0: no limit
    assert np.all(out[:2, :BC] == 0) and np.all(out[2, :BC] == 30.5)
    assert stats["skipped"] == 1


def test_mode4_maxcorr():
    img = bank_offsets([10.0, 12.0, -10.0, -10.5] + [0.0] * 12)
    out, stats = run(mode4, img, (4, 1, 30, 10))
    assert np.all(bank(out, 0) == 0) and np.all(bank(out, 2) == 0)     # |cm| == maxcorr: applied
    assert np.all(bank(out, 1) == 12.0) and np.all(bank(out, 3) == -10.5)
    assert stats["corrected"] == 14 and stats["skipped"] == 2


def test_mode4_needs_at_least_10_voters():
    img = row_offsets(np.full(NROWS, 2.0))
    good = np.ones((R, C), bool)
    good[0, 10:BC] = False                   # 10 voters: corrected
    good[1, 9:BC] = False                    # 9 voters: left alone
    out, stats = run(mode4, img, (4, 2, 30, 10), good=good)
    assert np.all(out[0, :BC] == 0) and np.all(out[1, :BC] == 2.0)
    assert stats["skipped"] == 1 and stats["corrected"] == NROWS - 1


def test_mode4_even_count_median_is_mean_of_middle_values():
    img = np.zeros((R, C), np.float32)
    img[5, :12] = [7, 1, 12, 3, 9, 2, 11, 4, 10, 5, 8, 6]     # 12 voters: (6 + 7) / 2
    good = np.zeros((R, C), bool)
    good[5, :12] = True
    img[5, 12:BC] = 50.0                     # bad pixels, corrected too
    out, _ = run(mode4, img, (4, 2, 30, 10), good=good)
    assert np.array_equal(out[5, :12], img[5, :12] - 6.5)
    assert np.all(out[5, 12:BC] == 43.5)
    # odd count: the middle value
    good[5, 2] = False                       # drop the 12: 1..11 -> 6
    out, _ = run(mode4, img, (4, 2, 30, 10), good=good)
    assert np.array_equal(out[5, :BC], img[5, :BC] - 6.0)


def test_mode4_pass_order_bank_then_rows_then_columns():
    # a bank offset beyond maxcorr for rows but not for the bank: only bit 1 removes it
    img = bank_offsets([9.0] * 16) + row_offsets(np.where((np.arange(NROWS) // 8) % 2, 4.0, -4.0))
    out, _ = run(mode4, img, (4, 3, 30, 10))
    # bank medians are 9 +- 4 -> mean of middle values = 9; then rows remove +-4
    assert np.array_equal(out, np.zeros_like(out))
    out, _ = run(mode4, img, (4, 2, 30, 10))
    assert np.all(out[1::2] == 13.0) and np.all(out[::2] == 0)       # 13 > maxcorr: skipped


# ---- mode 6: flags --------------------------------------------------------------------------

def flags_of(img, good=None, rms=None, hist_range=30, nsigma=10, rules="psana"):
    adu = np.asarray(img, np.float32).reshape(1, -1)
    good = np.ones_like(adu, bool) if good is None else np.asarray(good).reshape(1, -1)
    context = ctx(rms)
    context.rules = rules
    return cm_epix_flags(adu, good, context, hist_range, nsigma).reshape(R, C)


def test_mode6_flags_bright_pixels_and_their_four_neighbours():
    img = np.zeros((R, C), np.float32)
    img[100, 200] = 10.0                     # >= 10 x rms(1): itself and 4 neighbours
    img[0, 0] = 15.0                         # corner: 3 in the frame
    img[351, 95] = 12.0                      # bank corner: neighbours across bank borders
    img[500, 500] = 9.99                     # below: not flagged
    f = flags_of(img, rms=1.0)
    expect = np.zeros((R, C), bool)
    for r, c in [(100, 200), (0, 0), (351, 95)]:
        for dr, dc in [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]:
            if 0 <= r + dr < R and 0 <= c + dc < C:
                expect[r + dr, c + dc] = True
    assert np.array_equal(f, expect)
    assert f[352, 95] and f[351, 96]
    assert f.sum() == 5 + 3 + 5


def test_mode6_flags_hist_range_bad_pixels_alone_and_rms_optional():
    img = np.zeros((R, C), np.float32)
    img[10, 10] = 31.0                       # |v| > histoRange: alone (no rms given)
    img[20, 20] = -31.0
    img[30, 30] = 30.0                       # == histoRange: not flagged
    good = np.ones((R, C), bool)
    good[40, 40] = False                     # bad: alone
    f = flags_of(img, good=good)
    assert sorted(zip(*np.nonzero(f))) == [(10, 10), (20, 20), (40, 40)]
    # rms 0 (a dead pixel): smalldata_tools utilities.cm_epix flags img >= rms * 10, so
    # the pixel is flagged when its value is >= 0, and its 4 neighbours with it
    rms = np.ones((R, C), np.float32)
    rms[50, 50] = 0.0
    rms[80, 80] = 0.0
    img = np.zeros((R, C), np.float32)
    img[80, 80] = -1.0                       # below 0 x 10: not flagged
    f = flags_of(img, rms=rms)
    assert sorted(zip(*np.nonzero(f))) == [(49, 50), (50, 49), (50, 50), (50, 51), (51, 50)]
    # gpusmd's rules: an rms of 0 is unknown and flags nothing
    assert not flags_of(img, rms=rms, rules="gpusmd").any()
    # nsigma scales the threshold
    img = np.zeros((R, C), np.float32)
    img[60, 60] = 5.0
    assert flags_of(img, rms=1.0, nsigma=5).sum() == 5
    assert flags_of(img, rms=1.0, nsigma=10).sum() == 0


# ---- mode 6: corrections --------------------------------------------------------------------

def test_mode6_removes_column_and_row_offsets():
    cols = rng.integers(-16, 17, (2, C)) / 2
    rows = rng.integers(-10, 11, NROWS) / 2
    img = column_offsets(cols)
    out, stats = run(mode6, img, (6, 0, 30, 30, 10), rms=1.0)
    assert np.array_equal(out, np.zeros_like(out))
    img = row_offsets(rows)
    out, stats = run(mode6, img, (6, 0, 30, 30, 10), rms=1.0)
    assert np.array_equal(out, np.zeros_like(out))
    assert stats["corrected"] == NCOLS + NROWS and stats["skipped"] == 0


def test_mode6_with_noise():
    noise = rng.normal(0, 1.0, (2, R, C)).astype(np.float32)
    truth = column_offsets(rng.uniform(-5, 5, (2, C))) + row_offsets(rng.uniform(-3, 3, NROWS))
    photons = np.zeros((2, R, C), np.float32)
    hits = rng.integers(0, R * C, 2000)
    photons.reshape(2, -1)[0, hits] = 60.0      # photons: flagged (and their neighbours)
    out, stats = run(mode6, noise + truth + photons, (6, 0, 30, 30, 10), rms=1.0)
    resid = out - noise - photons
    assert np.abs(resid).mean() < 0.25
    assert np.abs(resid.mean(axis=(1, 2))).max() < 0.05
    assert stats["skipped"].tolist() == [0, 0]


def test_mode6_neighbours_of_bright_pixels_do_not_vote():
    img = np.zeros((R, C), np.float32)
    row = img[10, :BC]
    row[0::4] = 12.0                         # 24 bright pixels (>= 10 rms)
    row[1::2] = 5.0                          # 48 at 5: 47 of them are neighbours (not col 95)
    row[2::4] = 1.0                          # 24 at 1
    out, stats = run(mode6, img, (6, 0, 30, 30, 10), rms=1.0)
    # 71 of 96 flagged (<= 75 %); voters: 24 x 1 and col 95 (5) -> median 1
    assert np.array_equal(out[10, :BC], row - 1.0)
    assert np.count_nonzero(out) == np.count_nonzero(row - 1.0)
    # with the neighbours voting the median would have been 5
    assert stats["skipped"] == 0


def test_mode6_too_many_flagged_gives_zero():
    img = row_offsets(np.zeros(NROWS))
    good = np.ones((R, C), bool)
    img[0, :BC] = 3.0
    good[0, :73] = False                     # 73 / 96 flagged > 75 %: 0
    img[1, :BC] = 3.0
    good[1, :72] = False                     # 72 / 96 = 75 %: applied
    out, stats = run(mode6, img, (6, 0, 30, 30, 10), good=good)
    assert np.all(out[0, :BC] == 3.0) and np.all(out[1, :BC] == 0.0)
    assert stats["skipped"] == 1
    # a half column: 264 / 352 flagged is allowed, 265 is not
    img = column_offsets(np.zeros((2, C)))
    good = np.ones((R, C), bool)
    img[:BR, 0] = 2.0
    good[:265, 0] = False
    img[:BR, 1] = 2.0
    good[:264, 1] = False
    out, stats = run(mode6, img, (6, 0, 30, 30, 10), good=good)
    assert np.all(out[:BR, 1] == 0.0)
    # column 0 skipped; its rows have median 0, so it keeps its 2
    assert np.all(out[:BR, 0] == 2.0)


def test_mode6_maxcorr():
    img = row_offsets(np.zeros(NROWS))
    img[0, :BC] = 30.0                       # == maxCorr: applied
    img[1, :BC] = -31.0                      # > maxCorr: 0
    out, stats = run(mode6, img, (6, 0, 30, 40, 10))
    assert np.all(out[0, :BC] == 0) and np.all(out[1, :BC] == -31.0)
    assert stats["skipped"] == 1


def test_mode6_variant46_removes_frame_mean_first():
    cols = rng.integers(-8, 9, (2, C)).astype(np.float32)
    cols -= cols.mean()                      # exact: mean 0 over the half columns
    img = column_offsets(cols) + 20.0
    img.reshape(-1)[rng.choice(R * C, 1000, replace=False)] = 1000.0   # flagged: no vote
    hot = img == 1000.0
    out0, _ = run(mode6, img, (6, 0, 25, 40, 10))
    assert np.abs(out0[~hot]).max() > 1      # columns beyond maxCorr left alone
    out1, stats = run(mode6, img, (6, 1, 25, 40, 10))
    np.testing.assert_allclose(out1[~hot], 0, atol=1e-3)
    # every pixel, flagged or not, is shifted: the hot ones by the frame mean + column
    np.testing.assert_allclose(out1[hot], 1000.0 - 20.0 - column_offsets(cols)[hot], atol=1e-3)
    assert stats["corrected"] == 1 + NCOLS + NROWS


def test_mode6_variant47_removes_bank_medians_first():
    banks = rng.integers(-20, 21, 16).astype(np.float32)
    banks[:2] = [20.0, -18.0]
    cols = rng.integers(-5, 6, (2, C)).astype(np.float32)
    img = bank_offsets(banks) + column_offsets(cols)
    out0, _ = run(mode6, img, (6, 0, 10, 30, 10))
    assert np.any(bank(out0, 0) != 0) and np.any(bank(out0, 1) != 0)
    out2, stats = run(mode6, img, (6, 2, 10, 30, 10))
    assert np.array_equal(out2, np.zeros_like(out2))
    assert stats["corrected"] == 16 + NCOLS + NROWS


def test_mode6_batch_events_are_independent():
    a = row_offsets(rng.integers(-9, 10, NROWS))           # < 10 x rms
    b = column_offsets(rng.integers(-9, 10, (2, C)))
    out, stats = run(mode6, np.stack([a, b]), (6, 0, 30, 30, 10), rms=1.0)
    assert np.array_equal(out, np.zeros_like(out))
    single, _ = run(mode6, b, (6, 0, 30, 30, 10), rms=1.0)
    assert np.array_equal(single, out[1])


def test_mode6_bad_variant():
    with pytest.raises(ValueError):
        run(mode6, np.zeros((R, C)), (6, 3))


# ---- through the framework ------------------------------------------------------------------

def test_resolve_and_common_mode_codes():
    assert resolve("epix100", 45) == (6, 0, 30, 30, 10)
    assert resolve("epix100", 46) == (6, 1, 30, 30, 10)
    assert resolve("epix100", 47) == (6, 2, 30, 30, 10)
    assert resolve("epix100", 4) == (4, 6, 30, 10)
    truth = column_offsets(rng.integers(-6, 7, (2, C)))
    rms = np.full((R, C), 2.0, np.float32)
    extra = {45: 0, 46: 1, 47: 16, 4: 0}
    for code in (45, 46, 47, 4):
        cm = CommonMode(get_detector("epix100"), resolve("epix100", code), rms)
        adu = np.stack([truth, truth + 1.0]).reshape(2, -1).astype(np.float32)
        good = np.ones_like(adu, bool)
        stats = cm(adu, good)
        assert stats["corrected"].shape == (2,) and stats["corrected"].dtype == np.int32
        assert (stats["corrected"] + stats["skipped"]).tolist() == [NROWS + NCOLS + extra[code]] * 2
        assert np.array_equal(adu, np.zeros_like(adu)), code
    # mode 4 (bits 6: rows, then columns) on a row-only pattern
    cm = CommonMode(get_detector("epix100"), resolve("epix100", 4))
    adu = row_offsets(rng.integers(-8, 9, NROWS)).reshape(1, -1).copy()
    stats = cm(adu, np.ones_like(adu, bool))
    assert np.array_equal(adu, np.zeros_like(adu))
    assert stats["skipped"].tolist() == [0]
