"""The CsPad common-mode kernels (kernels/cm_cspad.cu) against their NumPy reference
gpusmd.calib.cm_cspad: run on the CPU through the host build (no GPU needed), and on a
GPU with ``pytest -m gpu``. NVRTC compilation of the file is covered by
tests/test_kernels.py (every kernels/*.cu).

The kernels follow the reference's arithmetic (NumPy's pairwise float32 sums of the
refinement, its float64 pairwise sum of the 36 unbonded pixels), so the corrections are
bit-identical to the reference's float64 values and the decisions identical."""
from __future__ import annotations

import numpy as np
import pytest

from gpusmd import cuda
from gpusmd.calib import cm_cspad
from gpusmd.calib.common_mode import ModeContext
from gpusmd.detectors import get_detector
from gpusmd.errors import GpusmdError
from conftest import gpu_available

MODEL = get_detector("cspad")
NSEG, ROWS, COLS = MODEL.seg_shape
SEGPIX = ROWS * COLS
NBATCH = 2


# ---- frames ------------------------------------------------------------------------------
def make_frames(n_events=NBATCH, seed=0):
    """(adu (B, npix) float32, good (B, npix) bool): noise sigma 3 around a per-(event,
    segment) offset, 10% photons of +30..+60, 4% extra bad pixels holding garbage (-300,
    5000, 1e30, NaN, +-inf), the geometry mask bad with ordinary values; and segments
    that exercise every branch of mode 1 (cmpars (1, 25, 25, 100, 1)):

    event 0: seg 1 offset 40 (peak and unbonded mean > 25: none), seg 2 offset 24 (kept),
      seg 3 noise sigma 40 (peak too wide: fallback), seg 4 no good pixel (no peak:
      fallback), seg 5 offset 3000 (outside the histogram: no peak, none), seg 6 wide
      peak and a NaN unbonded pixel (none), seg 7 wide peak and an unbonded mean beyond 25
    event 1: seg 0 all values -1200 but a few and the unbonded pixels (no bin above
      thresh: fallback), seg 8 offset -24.9
    """
    rng = np.random.default_rng(seed)
    shape = (n_events, NSEG, ROWS, COLS)
    offsets = rng.uniform(-15, 15, (n_events, NSEG)).astype(np.float32)
    sigma = np.full((n_events, NSEG), 3.0, np.float32)
    offsets[0, 1], offsets[0, 2], offsets[0, 5] = 40, 24, 3000
    sigma[0, 3] = sigma[0, 6] = sigma[0, 7] = 40
    if n_events > 1:
        offsets[1, 0], offsets[1, 8] = -1200, -24.9
    x = rng.standard_normal(shape, dtype=np.float32) * sigma[..., None, None]
    x += offsets[..., None, None]
    bonded = MODEL.unbond_mask(0).astype(bool)
    hit = (rng.random(shape, dtype=np.float32) < 0.1) & bonded
    x[hit] += rng.uniform(30, 60, hit.sum()).astype(np.float32)
    good = np.broadcast_to(MODEL.geometry_mask().astype(bool), shape).copy()
    bad = (rng.random(shape, dtype=np.float32) < 0.04) & good
    garbage = np.array([-300, 5000, 1e30, np.nan, np.inf, -np.inf], np.float32)
    x[bad] = garbage[rng.integers(0, len(garbage), bad.sum())]
    good &= ~bad
    good[0, 4] = False
    x[0, 6, 10, 10] = np.nan
    x[0, 7, 10:181:10, 10:181:10] += 200           # diagonal unbonded pixels: mean > 25
    if n_events > 1:
        x[1, 0, :2, :5] = 0.0                      # 10 values at 0: below thresh 100
        seg = x[1, 0].reshape(-1)
        seg[cm_cspad.unbond_offsets()] = rng.standard_normal(36) * 3   # fallback applies
    return x.reshape(n_events, -1), good.reshape(n_events, -1)


def reference(adu, good, mode, mean_max, rms_max=25.0, thresh=100, fallback=True):
    """(cm (B, nseg) float64, flag (B, nseg)) from the NumPy reference's own steps."""
    view = adu.reshape(len(adu), NSEG, SEGPIX)
    unbond = cm_cspad._unbond_mean(view, np)
    use5 = np.isfinite(unbond) & (np.abs(unbond) <= mean_max)
    if mode == 5:
        return np.where(use5, unbond, 0.0), np.where(use5, 2, 0).astype(np.uint8)
    g = np.broadcast_to(np.asarray(good, bool), adu.shape).reshape(view.shape)
    hist = cm_cspad.histograms(view, g, np)
    found, peak, sigma = cm_cspad.find_peak(hist, thresh, np)
    mean, sigma = cm_cspad.refine(view, g, peak + cm_cspad.HIST_LOW, sigma, np)
    ok = found & np.isfinite(mean) & (np.abs(mean) <= mean_max) & (sigma <= rms_max)
    use5 &= ~ok & bool(fallback)
    cm = np.where(ok, mean, np.where(use5, unbond, 0.0))
    return cm, np.where(ok, 1, np.where(use5, 2, 0)).astype(np.uint8)


@pytest.fixture(scope="module")
def frames():
    return make_frames()


def _same(a, b):
    """Bit for bit (NaN never appears in a correction)."""
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


# ---- mode 1 --------------------------------------------------------------------------------
PARS = [(25.0, 25.0, 100, True), (25.0, 1.0, 100, True), (25.0, 1.0, 100, False),
        (25.0, 25.0, 10 ** 6, True), (5.0, 25.0, 3000, True)]


@pytest.mark.parametrize("pars", PARS, ids=["default", "rms1", "rms1-nofallback",
                                            "no-peak", "tight"])
def test_mode1_host_matches_reference(frames, pars):
    adu, good = frames
    before = adu.copy()
    cm, flag = cuda.cspad_common_mode_host(adu, good, NSEG, 1, *pars)
    rcm, rflag = reference(adu, good, 1, *pars)
    assert np.array_equal(adu, before, equal_nan=True)           # not modified
    assert _same(flag, rflag)
    assert _same(cm, rcm)


def test_cases_cover_the_decisions(frames):
    adu, good = frames
    _, flag = reference(adu, good, 1, 25.0, 25.0, 100, True)
    assert flag[0, 0] == 1 and flag[0, 2] == 1 and flag[1, 8] == 1      # peak, near limit
    assert flag[0, 3] == 2 and flag[0, 4] == 2                          # wide, no good pixel
    assert flag[0, 1] == 0 and flag[0, 5] == 0 and flag[0, 6] == 0 and flag[0, 7] == 0
    assert flag[1, 0] == 2                                              # no bin > thresh
    # the pixels the kernel sums hold NaN and +-inf garbage (bad, not voting)
    assert not np.isfinite(adu[good == 0]).all()
    counts = [np.bincount(reference(adu, good, 1, *pars)[1].ravel(), minlength=3).tolist()
              for pars in PARS]
    assert counts[1][1] == 0 and counts[1][2] > 50       # rms_max 1: all fall back ...
    assert counts[2] == [2 * NSEG, 0, 0]                  # ... or none without fallback
    assert counts[3][1] == 0 and counts[3][2] > 50       # no peak anywhere
    assert counts[4][0] > 10 and counts[4][1] > 10 and counts[4][2] > 0    # mean_max 5


def test_mode1_block_size_and_shared_mask(frames):
    adu, good = frames
    pars = (25.0, 25.0, 100, True)
    ref = cuda.cspad_common_mode_host(adu, good, NSEG, 1, *pars)
    for block in (32, 100):
        out = cuda.cspad_common_mode_host(adu, good, NSEG, 1, *pars, block=block)
        assert _same(out[0], ref[0]) and _same(out[1], ref[1])
    mask = good[1]                               # one (npix,) mask for both events
    cm, flag = cuda.cspad_common_mode_host(adu, mask, NSEG, 1, *pars)
    rcm, rflag = reference(adu, mask, 1, *pars)
    assert _same(cm, rcm) and _same(flag, rflag)


@pytest.mark.parametrize("cmpars", [(1, 25, 25, 100, 1), (1, 25, 1.0, 100, 1), (1,)])
def test_mode1_engine_host_matches_array(frames, cmpars):
    adu, good = frames
    ref, out = adu.copy(), adu.copy()
    rstats = cm_cspad.mode1(ref, good, cmpars, ModeContext(MODEL))
    stats = cm_cspad.mode1(out, good, cmpars, ModeContext(MODEL, engine="host"))
    assert np.array_equal(out, ref, equal_nan=True)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
    assert {k: v.tolist() for k, v in stats.items()} == {k: v.tolist() for k, v in rstats.items()}


def test_mode1_engine_host_non_contiguous(frames):
    adu, good = frames
    ref = adu.copy()
    cm_cspad.mode1(ref, good, (1, 25, 25, 100, 1), ModeContext(MODEL))
    f = np.asfortranarray(adu)
    cm_cspad.mode1(f, good, (1, 25, 25, 100, 1), ModeContext(MODEL, engine="host"))
    assert np.array_equal(f.view(np.uint32), ref.view(np.uint32))


# ---- mode 5 --------------------------------------------------------------------------------
@pytest.mark.parametrize("maxcorr", [100.0, 5.0])
def test_mode5_host_matches_reference(frames, maxcorr):
    adu, good = frames
    cm, flag = cuda.cspad_common_mode_host(adu, None, NSEG, 5, maxcorr)
    rcm, rflag = reference(adu, good, 5, maxcorr)
    assert _same(flag, rflag) and _same(cm, rcm)
    assert 0 < (flag == 2).sum() < flag.size
    out, ref = adu.copy(), adu.copy()
    rstats = cm_cspad.mode5(ref, good, (5, maxcorr), ModeContext(MODEL))
    stats = cm_cspad.mode5(out, good, (5, maxcorr), ModeContext(MODEL, engine="host"))
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
    assert stats["corrected"].tolist() == rstats["corrected"].tolist()


def test_mode5_sum_order_is_numpys():
    """Unbonded values of very different magnitudes: the float64 sum is not exact, so
    only the reference's order (one after another: NumPy gathers them F-ordered) gives
    its mean; two events, as the gather's layout depends on the batch shape."""
    rng = np.random.default_rng(9)
    adu = rng.standard_normal((2, NSEG * SEGPIX)).astype(np.float32)
    view = adu.reshape(2, NSEG, SEGPIX)
    off = cm_cspad.unbond_offsets()
    view[:, :, off] = (rng.standard_normal((2, NSEG, 36))
                       * 10.0 ** rng.integers(-8, 9, (2, NSEG, 36))).astype(np.float32)
    cm, flag = cuda.cspad_common_mode_host(adu, None, NSEG, 5, np.inf)
    rcm, _ = reference(adu, None, 5, np.inf)
    assert _same(cm, rcm) and flag.all()


# ---- helpers and checks ----------------------------------------------------------------------
def test_pairwise_depth():
    assert cuda.pairwise_depth(128) == 0 and cuda.pairwise_depth(129) == 1
    assert cuda.pairwise_depth(SEGPIX) == 10


def test_argument_checks(frames):
    adu, good = frames
    with pytest.raises(GpusmdError, match="mode"):
        cuda.cspad_common_mode_host(adu, good, NSEG, 2, 25.0)
    with pytest.raises(GpusmdError, match="segments"):
        cuda.cspad_common_mode_host(adu[:, :-1].copy(), good, NSEG, 1, 25.0)
    with pytest.raises(GpusmdError, match="float32"):
        cuda.cspad_common_mode_host(adu.astype(np.float64), good, NSEG, 1, 25.0)
    with pytest.raises(GpusmdError, match="good"):
        cuda.cspad_common_mode_host(adu, good[:, 1:], NSEG, 1, 25.0)
    cm, flag = cuda.cspad_common_mode_host(adu[:0], good[:0], NSEG, 1, 25.0)
    assert cm.shape == (0, NSEG) and flag.shape == (0, NSEG)


# ---- GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy sees no CUDA device")
@pytest.mark.parametrize("pars", PARS[:4], ids=["default", "rms1", "rms1-nofallback", "no-peak"])
def test_mode1_gpu_matches_reference(frames, pars):
    import cupy
    adu, good = frames
    cm, flag = cuda.cspad_common_mode_gpu(cupy.asarray(adu), cupy.asarray(good), NSEG, 1, *pars)
    rcm, rflag = reference(adu, good, 1, *pars)
    assert _same(flag.get(), rflag)
    assert _same(cm.get(), rcm)
    cm5, flag5 = cuda.cspad_common_mode_gpu(cupy.asarray(adu), None, NSEG, 5, 5.0)
    rcm5, rflag5 = reference(adu, good, 5, 5.0)
    assert _same(flag5.get(), rflag5) and _same(cm5.get(), rcm5)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy sees no CUDA device")
def test_engine_kernel_matches_array(frames):
    import cupy
    adu, good = frames
    ref = adu.copy()
    cm_cspad.mode1(ref, good, (1, 25, 25, 100, 1), ModeContext(MODEL))
    out = cupy.asarray(adu)
    cm_cspad.mode1(out, cupy.asarray(good), (1, 25, 25, 100, 1),
                   ModeContext(MODEL, xp=cupy, engine="kernel"))
    assert np.array_equal(out.get().view(np.uint32), ref.view(np.uint32))
