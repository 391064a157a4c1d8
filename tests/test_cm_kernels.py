"""The common-mode kernel (kernels/common_mode.cu) against its NumPy reference
gpusmd.calib.common_mode.group_correct: run on the CPU through the host build (no GPU
needed), and on a GPU with ``pytest -m gpu``. NVRTC compilation of the file is covered by
tests/test_kernels.py (every kernels/*.cu).

Medians (and so everything that follows from them: applied flags, corrected pixels) must
be bit-identical to the reference; means agree to float32 rounding (the reference's sum
order depends on NumPy's memory layout of the gathered groups; the kernel uses NumPy's
pairwise order of a contiguous group)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpusmd import cuda
from gpusmd.calib.common_mode import (
    INF,
    Groups,
    Rule,
    bank_rows,
    banks,
    chunks,
    group_correct,
    half_columns,
)
from gpusmd.detectors import get_detector
from gpusmd.errors import GpusmdError
from conftest import gpu_available

NBATCH = 2


# ---- group shapes ------------------------------------------------------------------------
def _subset(groups: Groups, n: int, seed: int) -> Groups:
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(groups.starts), min(n, len(groups.starts)), replace=False))
    return dataclasses.replace(groups, starts=groups.starts[keep])


def _synthetic(name, n_outer, outer_stride, n_inner, inner_stride, starts, npix):
    return Groups(name, np.asarray(starts, np.int64), n_outer, outer_stride, n_inner,
                  inner_stride), npix


def _shape(case: str):
    """(groups, npix) of a test case: a subset of a detector's groups, or a synthetic
    pattern (sizes around the kernel's limits, strided inner axis)."""
    epix10k, jungfrau, epix100 = (get_detector(t) for t in ("epix10kquad", "jungfrau05M", "epix100"))
    if case == "epix10k-bank":          # 176 x 48 = 8448: radix select
        return _subset(banks(epix10k), 16, 1), epix10k.npix
    if case == "epix10k-row":           # 48
        return _subset(bank_rows(epix10k), 24, 2), epix10k.npix
    if case == "epix10k-column":        # 176
        return _subset(half_columns(epix10k), 20, 3), epix10k.npix
    if case == "epix10k-chunk":         # 128
        return _subset(chunks(epix10k, 128), 20, 4), epix10k.npix
    if case == "jungfrau-bank":         # 256 x 64 = 16384
        return _subset(banks(jungfrau), 6, 5), jungfrau.npix
    if case == "jungfrau-column":       # 256: a power of two
        return _subset(half_columns(jungfrau), 16, 6), jungfrau.npix
    if case == "epix100-row":           # 96
        return _subset(bank_rows(epix100), 20, 7), epix100.npix
    if case == "epix100-column":        # 352
        return _subset(half_columns(epix100), 16, 8), epix100.npix
    if case == "epix100-frame":         # 704 x 768: mode 6's whole-frame mean (subtrees)
        return _synthetic("frame", 704, 768, 768, 1, [0], epix100.npix)
    if case == "tiny":                  # 5 pixels: NumPy's short pairwise branch
        return _synthetic("tiny", 1, 0, 5, 1, np.arange(0, 800, 5), 800)
    if case == "single":                # 1 pixel
        return _synthetic("single", 1, 0, 1, 1, np.arange(0, 300, 3), 300)
    if case == "strided":               # 3 adjacent columns x 40 rows: inner axis strided
        starts = [img * 40 * 64 + c for img in range(2) for c in range(0, 63, 6)]
        return _synthetic("strided", 3, 1, 40, 64, starts, 2 * 40 * 64)
    if case == "sort-max":              # 8 x 128 = 1024: the largest sorted group
        w = 512
        starts = [r * 8 * w + c * 128 for r in range(4) for c in range(0, 4, 2)]
        return _synthetic("sort-max", 8, w, 128, 1, starts, 32 * w)
    if case == "just-radix":            # 25 x 41 = 1025: the smallest radix-select group
        w = 100
        starts = [r * 25 * w + c * 41 for r in range(4) for c in range(2)]
        return _synthetic("just-radix", 25, w, 41, 1, starts, 100 * w)
    raise KeyError(case)


SHAPES = ["epix10k-bank", "epix10k-row", "epix10k-column", "epix10k-chunk", "jungfrau-bank",
          "jungfrau-column", "epix100-row", "epix100-column", "epix100-frame", "tiny", "single",
          "strided", "sort-max", "just-radix"]

RULES = {
    # mode 7: median of good pixels, more than 10 voters, |cm| < cormax, good pixels
    "mode7": Rule("median", min_count=11, max_abs=10.0),
    "median-plain": Rule("median"),
    # modes 3 / 4: a window, inclusive limit, subtracted from the whole group
    "median-window-all": Rule("median", lo=-20.0, hi=25.0, max_abs=15.0, inclusive=True,
                              apply_to="all"),
    "median-fraction": Rule("median", min_fraction=0.75, max_abs=40.0),
    # mode 2: mean below a threshold, |cm| <= max, whole group
    "mean-chunks": Rule("mean", hi=30.0, max_abs=10.0, inclusive=True, apply_to="all"),
    "mean-window": Rule("mean", lo=-25.0, hi=25.0, min_count=3),
}


# ---- data --------------------------------------------------------------------------------
def _frames(groups: Groups, npix: int, kind: str, seed: int):
    """(adu, good): smooth offsets that put group medians on both sides of the limits,
    noise, a few special values, and groups that are fully masked or have 0 to 3 voters."""
    rng = np.random.default_rng(seed)
    p = np.arange(npix)
    offset = 18.0 * np.sin(2 * np.pi * p / 4999.0) + 12.0 * np.sin(2 * np.pi * p / 383.0 + 1.0)
    adu = (offset[None, :] + rng.normal(0.0, 6.0, (NBATCH, npix))
           + rng.normal(0.0, 8.0, (NBATCH, 1)))
    if kind == "integer":       # many ties
        adu = np.round(adu)
    elif kind == "few":         # a handful of distinct values: long runs of equal keys
        adu = np.round(adu / 8.0) * 2.0
    adu = adu.astype(np.float32) + np.float32(0.0)          # no -0.0 (see the kernel notes)
    good = rng.random((NBATCH, npix)) < 0.85
    flat = rng.integers(0, npix, 40)
    adu[0, flat[:10]] = np.nan
    adu[1, flat[10:20]] = np.inf
    adu[0, flat[20:30]] = -np.inf
    adu[1, flat[30:]] = 3.0e30                              # votes when the window is open
    index = groups.index()
    ngroups = len(index)
    if ngroups >= 4:
        which = rng.choice(ngroups, max(4, ngroups // 5), replace=False)
        for j, g in enumerate(which):
            b = j % NBATCH
            good[b, index[g]] = False
            nvote = j % 4                                   # 0, 1, 2, 3 voters
            good[b, index[g][rng.choice(index.shape[1], min(nvote, index.shape[1]),
                                        replace=False)]] = True
    return adu, good


def _counts(adu, good, groups, rule):
    values = adu[:, groups.index()]
    return (good[:, groups.index()] & (values > rule.lo) & (values < rule.hi)).sum(-1)


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _compare(rule, adu0, good, groups, got_cm, got_applied, got_adu):
    """The kernel's results against the reference on the same input."""
    ref_adu = adu0.copy()
    ref_cm, ref_applied = group_correct(ref_adu, good, groups, rule)
    assert got_cm.dtype == np.float32 and got_cm.shape == ref_cm.shape
    assert got_applied.dtype == np.bool_ and got_applied.shape == ref_applied.shape
    if rule.stat == "median":
        np.testing.assert_array_equal(_bits(got_cm), _bits(ref_cm))
        np.testing.assert_array_equal(got_applied, ref_applied)
        np.testing.assert_array_equal(_bits(got_adu), _bits(ref_adu))
    else:
        # the groups' value scale bounds the float32 rounding of the sums
        scale = np.nanmax(np.where(np.isfinite(adu0), np.abs(adu0), np.nan)) + 1.0
        np.testing.assert_array_equal(got_applied, ref_applied)
        np.testing.assert_allclose(got_cm, ref_cm, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(got_adu, ref_adu, rtol=1e-5, atol=1e-5 * scale)
    return ref_cm, ref_applied


# ---- host build vs reference -------------------------------------------------------------
@pytest.mark.parametrize("rule_id", list(RULES))
@pytest.mark.parametrize("case", SHAPES)
def test_group_correct_host_matches_reference(case, rule_id):
    rule = RULES[rule_id]
    groups, npix = _shape(case)
    kind = ("float", "integer", "few")[(SHAPES.index(case) + list(RULES).index(rule_id)) % 3]
    adu0, good = _frames(groups, npix, kind, seed=SHAPES.index(case))
    adu = adu0.copy()
    cm, applied = cuda.group_correct_host(adu, good, groups, rule)
    _compare(rule, adu0, good, groups, cm, applied, adu)


def test_cases_cover_the_decisions():
    """The random cases hold what the kernel must decide on: odd and even voter counts
    of applied medians, all-masked groups, groups short of voters, medians over the
    limit, and pixels that were left alone."""
    seen = set()
    for case in ("epix10k-bank", "epix10k-row", "epix100-column", "just-radix"):
        groups, npix = _shape(case)
        rule = RULES["mode7"]
        adu0, good = _frames(groups, npix, "integer", SHAPES.index(case))
        count = _counts(adu0, good, groups, rule)
        adu = adu0.copy()
        cm, applied = cuda.group_correct_host(adu, good, groups, rule)
        _compare(rule, adu0, good, groups, cm, applied, adu)
        seen |= {("odd" if c % 2 else "even") for c in count[applied]}
        if (count == 0).any():
            seen.add("no voters")
        if ((count > 0) & (count < rule.min_count)).any():
            seen.add("too few")
        if (~applied & (count >= rule.min_count)).any():
            seen.add("over max_abs")
    assert seen == {"odd", "even", "no voters", "too few", "over max_abs"}


@pytest.mark.parametrize("case", ["epix10k-column", "just-radix", "epix10k-chunk"])
def test_block_size_does_not_change_results(case):
    """Any block size gives the same bits (threads loop over pairs, pixels and bins)."""
    groups, npix = _shape(case)
    groups = _subset(groups, 5, 12)
    for rule in (RULES["mode7"], RULES["mean-window"]):
        adu0, good = _frames(groups, npix, "float", 11)
        results = []
        for block in (32, 96, 256):
            adu = adu0.copy()
            cm, applied = cuda.group_correct_host(adu, good, groups, rule, block=block)
            results.append((_bits(cm), applied, _bits(adu)))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["tiny", "epix10k-column", "epix10k-bank", "300",
                                  "epix100-frame"])
def test_mean_of_contiguous_group_is_numpy_sum(case):
    """One event: the reference gathers each group contiguously, so NumPy sums it
    pairwise, as the kernel does: then the means are bit-identical too (300 pixels:
    the pairwise split at 144, not at the half)."""
    if case == "300":
        groups, npix = _synthetic("300", 3, 128, 100, 1, np.arange(0, 30) * 3 * 128, 90 * 128)
    else:
        groups, npix = _shape(case)
    rule = RULES["mean-window"]
    adu0, good = _frames(groups, npix, "float", 3)
    adu0, good = adu0[:1].copy(), good[:1].copy()
    values = adu0[:, groups.index()]
    vote = good[:, groups.index()] & (values > rule.lo) & (values < rule.hi)
    total = np.ascontiguousarray(np.where(vote, values, np.float32(0))).sum(-1, dtype=np.float32)
    expected = total / np.maximum(vote.sum(-1), 1).astype(np.float32)
    adu = adu0.copy()
    cm, applied = cuda.group_correct_host(adu, good, groups, rule)
    assert applied.any()
    np.testing.assert_array_equal(_bits(cm[applied]), _bits(expected[applied]))


def _small_groups():
    return Groups("four", np.array([0, 4, 8, 12], np.int64), 1, 0, 4, 1)


def test_known_values():
    """Hand-computed: an even median, an all-masked group, a NaN that does not vote,
    a median over the limit, the inclusive limit, apply to good vs all."""
    nan = np.float32(np.nan)
    adu0 = np.array([[1, 2, 3, 4,  5, 6, 7, 8,  1, 2, 100, nan,  20, 21, 22, 23]], np.float32)
    good = np.array([[1, 1, 1, 1,  0, 0, 0, 0,  1, 1, 1, 1,  1, 1, 1, 0]], bool)
    groups = _small_groups()
    nan_bits = _bits(np.float32(np.nan))
    cases = [
        (Rule("median", max_abs=21.0), [2.5, 0, 2, 0], [1, 0, 1, 0],
         [-1.5, -0.5, 0.5, 1.5, 5, 6, 7, 8, -1, 0, 98, nan, 20, 21, 22, 23]),
        (Rule("median", max_abs=21.0, inclusive=True), [2.5, 0, 2, 21], [1, 0, 1, 1],
         [-1.5, -0.5, 0.5, 1.5, 5, 6, 7, 8, -1, 0, 98, nan, -1, 0, 1, 23]),
        (Rule("median", max_abs=21.0, inclusive=True, apply_to="all"), [2.5, 0, 2, 21],
         [1, 0, 1, 1], [-1.5, -0.5, 0.5, 1.5, 5, 6, 7, 8, -1, 0, 98, nan, -1, 0, 1, 2]),
        (Rule("median", hi=50.0, min_count=3), [2.5, 0, 0, 21], [1, 0, 0, 1],
         [-1.5, -0.5, 0.5, 1.5, 5, 6, 7, 8, 1, 2, 100, nan, -1, 0, 1, 23]),
        (Rule("mean", max_abs=30.0), [2.5, 0, 103 / 3, 21], [1, 0, 0, 1],
         [-1.5, -0.5, 0.5, 1.5, 5, 6, 7, 8, 1, 2, 100, nan, -1, 0, 1, 23]),
    ]
    for rule, cm_want, applied_want, adu_want in cases:
        cm_want = np.array([cm_want], np.float32)
        adu_want = np.array([adu_want], np.float32)
        applied_want = np.array([applied_want], bool)
        cm_want[~applied_want] = 0.0
        for run in ("reference", "host"):
            adu = adu0.copy()
            fn = group_correct if run == "reference" else cuda.group_correct_host
            cm, applied = fn(adu, good, groups, rule)
            np.testing.assert_array_equal(applied, applied_want, err_msg=f"{run} {rule}")
            np.testing.assert_array_equal(cm, cm_want, err_msg=f"{run} {rule}")
            np.testing.assert_array_equal(adu, adu_want, err_msg=f"{run} {rule}")
        assert _bits(adu)[0, 11] == nan_bits


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_extreme_values_match_reference():
    """Infinite windows and limits, values near the float32 limit: an odd median above
    FLT_MAX / 2 overflows to inf in (m + m) / 2 and is not applied, in both."""
    groups = Groups("five", np.arange(0, 40, 5, dtype=np.int64), 1, 0, 5, 1)
    big = np.float32(3.0e38)
    adu0 = np.array([[big, big, big, 1, 2,   big, big, -1, -2, 0,   1e-45, 2e-45, 0, 0, 0,
                      -big, -big, -big, 5, 5,   np.inf, -np.inf, np.nan, 7, 8,
                      1e30, 1e30, 3e30, 0, 0,   6, 6, 6, 6, 6,   -3, -3, 3, 3, 9],
                     [0] * 40], np.float32)
    good = np.ones_like(adu0, bool)
    good[1, ::3] = False
    for rule in (Rule("median"), Rule("median", lo=-INF, hi=INF, max_abs=INF, inclusive=True),
                 Rule("median", lo=-1e31, hi=1e31, apply_to="all"), Rule("mean", max_abs=1e31)):
        adu = adu0.copy()
        cm, applied = cuda.group_correct_host(adu, good, groups, rule)
        _, ref_applied = _compare(rule, adu0, good, groups, cm, applied, adu)
        if rule.stat == "median" and rule.hi == INF:
            assert not ref_applied[0, 0]           # median 3e38: (m + m) / 2 is inf
            assert ref_applied[0, 4]               # 7.5: inf, -inf and NaN do not vote


def test_argument_checks():
    groups = _small_groups()
    adu = np.zeros((1, 16), np.float32)
    good = np.ones((1, 16), bool)
    rule = Rule()
    with pytest.raises(GpusmdError, match="float32"):
        cuda.group_correct_host(adu.astype(np.float64), good, groups, rule)
    with pytest.raises(GpusmdError, match="C-contiguous"):
        cuda.group_correct_host(np.zeros((1, 32), np.float32)[:, ::2], good, groups, rule)
    with pytest.raises(GpusmdError, match="does not match"):
        cuda.group_correct_host(adu, good[:, :8], groups, rule)
    with pytest.raises(GpusmdError, match="bool or uint8"):
        cuda.group_correct_host(adu, good.astype(np.int32), groups, rule)
    with pytest.raises(GpusmdError, match="outside"):
        cuda.group_correct_host(np.zeros((1, 15), np.float32), good[:, :15], groups, rule)
    with pytest.raises(GpusmdError, match="at most"):
        cuda.group_correct_host(adu, good, Groups("huge", np.zeros(1, np.int64), 5000, 1, 5000),
                                rule)
    with pytest.raises(GpusmdError, match="statistic"):
        cuda.group_correct_host(adu, good, groups, Rule("mode"))
    with pytest.raises(GpusmdError, match="apply_to"):
        cuda.group_correct_host(adu, good, groups, Rule(apply_to="bad"))
    # uint8 good and no groups are fine
    cm, applied = cuda.group_correct_host(adu, good.view(np.uint8), groups, rule)
    assert applied.all() and (cm == 0).all()
    empty = Groups("none", np.zeros(0, np.int64), 1, 0, 4)
    cm, applied = cuda.group_correct_host(adu, good, empty, rule)
    assert cm.shape == (1, 0) and applied.shape == (1, 0)


# ---- GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy sees no CUDA device")
@pytest.mark.parametrize("rule_id", list(RULES))
@pytest.mark.parametrize("case", SHAPES)
def test_group_correct_gpu_matches_reference(case, rule_id):
    import cupy
    rule = RULES[rule_id]
    groups, npix = _shape(case)
    kind = ("float", "integer", "few")[(SHAPES.index(case) + list(RULES).index(rule_id)) % 3]
    adu0, good = _frames(groups, npix, kind, seed=SHAPES.index(case))
    adu = cupy.asarray(adu0)
    cm, applied = cuda.group_correct_gpu(adu, cupy.asarray(good), groups, rule)
    _compare(rule, adu0, good, groups, cupy.asnumpy(cm), cupy.asnumpy(applied),
             cupy.asnumpy(adu))
