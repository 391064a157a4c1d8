"""Common-mode correction (DESIGN §6), in ADU, before the gain.

Every mode is built from one operation, :func:`group_correct`: for each group of pixels
of a frame (a bank, a row segment, a column, a chunk), take the median (or mean) of
the pixels that may vote, and subtract it from the group's pixels (all of them, or only
the good ones) when enough pixels voted and the correction is small enough. A group is a
regular pattern of flat pixel offsets (:class:`Groups`), so the same description drives
the NumPy reference here and the CUDA kernel ``kernels/common_mode.cu``.

Config: ``common_mode`` is a code (0 = none; smalldata codes 80, 83, 84, 85 for epix10k,
71, 72, 7 for Jungfrau, 45, 46, 47 for epix100, psana modes 1-7) or an explicit cmpars
list ``[mode, ...]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..detectors import DetectorModel

INF = float("inf")


@dataclass(frozen=True)
class Groups:
    """Groups of pixels of one frame: group g holds the flat pixels
    starts[g] + o * outer_stride + i * inner_stride, o < n_outer, i < n_inner."""
    name: str
    starts: np.ndarray              # (ngroups,) int64
    n_outer: int
    outer_stride: int
    n_inner: int
    inner_stride: int = 1

    @property
    def size(self) -> int:
        return self.n_outer * self.n_inner

    def offsets(self) -> np.ndarray:
        o = np.arange(self.n_outer)[:, None] * self.outer_stride
        i = np.arange(self.n_inner)[None, :] * self.inner_stride
        return (o + i).ravel()

    def index(self) -> np.ndarray:
        """(ngroups, size) flat pixel indices."""
        return self.starts[:, None] + self.offsets()[None, :]


@dataclass(frozen=True)
class Rule:
    """How a group's correction is found and applied.

    Pixels vote when good and lo < value < hi; the statistic is "median" (the mean of the
    two middle values for an even count) or "mean"; the correction is applied when at
    least ``min_count`` and at least ``min_fraction`` of the group voted and |cm| is below
    ``max_abs`` (or equal to it, with ``inclusive``); it is subtracted from the good
    pixels (``apply_to="good"``) or from all pixels of the group."""
    stat: str = "median"
    lo: float = -INF
    hi: float = INF
    min_count: int = 1
    min_fraction: float = 0.0
    max_abs: float = INF
    inclusive: bool = False
    apply_to: str = "good"


def group_correct(adu, good, groups: Groups, rule: Rule, xp=np):
    """Correct adu (B, npix) float32 in place, group by group; returns the correction
    per group (B, ngroups), 0 where the group was skipped, and the applied flags."""
    idx = xp.asarray(groups.index())
    values = adu[:, idx]                                    # (B, G, n)
    vote = good[:, idx] & (values > rule.lo) & (values < rule.hi)
    count = vote.sum(axis=-1)
    if rule.stat == "median":
        stat = masked_median(values, vote, count, xp)
    else:
        total = xp.where(vote, values, xp.float32(0)).sum(axis=-1, dtype=xp.float32)
        stat = total / xp.maximum(count, 1).astype(xp.float32)
    big = xp.abs(stat) > rule.max_abs if rule.inclusive else xp.abs(stat) >= rule.max_abs
    applied = ((count >= max(rule.min_count, 1)) & (count >= rule.min_fraction * groups.size)
               & ~big & xp.isfinite(stat))
    cm = xp.where(applied, stat, xp.float32(0))
    target = good[:, idx] if rule.apply_to == "good" else xp.ones_like(vote)
    adu[:, idx] = values - cm[..., None] * target
    return cm, applied


def masked_median(values, vote, count, xp=np):
    """Median over the last axis of the voting values: the middle one, or the mean of the
    two middle ones for an even count (as numpy's median); NaN where nobody voted.
    Non-voters sort to the end as +inf, so the voters' order statistics come first."""
    ordered = xp.sort(xp.where(vote, values, xp.float32(np.inf)), axis=-1)
    low = xp.maximum(count - 1, 0) // 2
    high = xp.maximum(count, 1) // 2 - (count == 0)
    a = xp.take_along_axis(ordered, low[..., None], axis=-1)[..., 0]
    b = xp.take_along_axis(ordered, xp.maximum(high, 0)[..., None], axis=-1)[..., 0]
    median = (a + b) / xp.float32(2)
    return xp.where(count > 0, median, xp.float32(np.nan)).astype(xp.float32)


# ---- the groups of a detector -------------------------------------------------------------

BANK_SHAPE = {"epix10k": (176, 48), "jungfrau": (256, 64), "epix100": (352, 96)}


def bank_shape(model: DetectorModel) -> tuple[int, int]:
    if model.family not in BANK_SHAPE:
        raise ValueError(f"{model.type} has no ASIC banks")
    return BANK_SHAPE[model.family]


def banks(model: DetectorModel) -> Groups:
    nseg, rows, cols = model.seg_shape
    br, bc = bank_shape(model)
    s, r, c = np.meshgrid(np.arange(nseg), np.arange(0, rows, br), np.arange(0, cols, bc),
                          indexing="ij")
    starts = (s * rows * cols + r * cols + c).ravel()
    return Groups("bank", starts.astype(np.int64), br, cols, bc, 1)


def bank_rows(model: DetectorModel) -> Groups:
    """Each row of each bank (48 / 64 / 96 pixels)."""
    nseg, rows, cols = model.seg_shape
    _, bc = bank_shape(model)
    s, r, c = np.meshgrid(np.arange(nseg), np.arange(rows), np.arange(0, cols, bc), indexing="ij")
    return Groups("row", (s * rows * cols + r * cols + c).ravel().astype(np.int64), 1, 0, bc, 1)


def half_columns(model: DetectorModel) -> Groups:
    """Each column of each half panel (176 / 256 / 352 pixels)."""
    nseg, rows, cols = model.seg_shape
    br, _ = bank_shape(model)
    s, r, c = np.meshgrid(np.arange(nseg), np.arange(0, rows, br), np.arange(cols), indexing="ij")
    return Groups("column", (s * rows * cols + r * cols + c).ravel().astype(np.int64), br, cols, 1, 1)


def chunks(model: DetectorModel, size: int) -> Groups:
    """Consecutive chunks of ``size`` pixels of each segment (a last partial chunk of a
    segment is left alone)."""
    nseg, rows, cols = model.seg_shape
    per_seg = rows * cols // size
    s, k = np.meshgrid(np.arange(nseg), np.arange(per_seg), indexing="ij")
    return Groups("chunk", (s * rows * cols + k * size).ravel().astype(np.int64), 1, 0, size, 1)


# ---- the modes ------------------------------------------------------------------------------

@dataclass
class ModeContext:
    """What a mode may need besides the frames: the detector and its noise (ADU, the
    first gain range) for the modes that flag signal by rms; and which implementation of
    the group correction runs: "array" (NumPy / CuPy array operations), "kernel" (the
    CUDA kernel, on a GPU) or "host" (the same kernel built for the CPU, for tests)."""
    model: DetectorModel
    rms: np.ndarray | None = None       # (npix,) on the backend
    xp: object = np
    cache: dict = field(default_factory=dict)
    engine: str = "array"

    def correct(self, adu, good, groups: Groups, rule: Rule):
        if self.engine == "kernel":
            from ..cuda import group_correct_gpu
            return group_correct_gpu(adu, good, groups, rule)
        if self.engine == "host":
            from ..cuda import group_correct_host
            return group_correct_host(adu, good, groups, rule)
        return group_correct(adu, good, groups, rule, self.xp)

    def groups(self, key, make):
        """Group descriptions are built once per run."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def tally(stats: dict, applied):
    """Add one pass's corrected / skipped group counts (per event) to ``stats``."""
    n = applied.shape[-1]
    done = applied.sum(axis=-1)
    stats["corrected"] = stats.get("corrected", 0) + done
    stats["skipped"] = stats.get("skipped", 0) + (n - done)


MODE7_PASSES = ((4, "bank", banks), (1, "row", bank_rows), (2, "column", half_columns))


def mode7_rule(cmpars) -> tuple[int, Rule]:
    """(bits, rule) of mode 7's cmpars [7, bits, cormax, npix_min]."""
    bits = int(cmpars[1]) if len(cmpars) > 1 else 0
    cormax = float(cmpars[2]) if len(cmpars) > 2 else INF
    npix_min = int(cmpars[3]) if len(cmpars) > 3 else 10
    return bits, Rule("median", min_count=npix_min + 1, max_abs=cormax, apply_to="good")


def mode7(adu, good, cmpars, ctx: ModeContext, skip: int = 0) -> dict:
    """Banks (bit 4), then row segments (bit 1), then half-panel columns (bit 2): the
    median of the good pixels, subtracted from the good pixels if more than npix_min
    voted and |median| < cormax. The passes whose bit is in ``skip`` are left out (done
    already, see mode7_fused)."""
    bits, rule = mode7_rule(cmpars)
    stats: dict = {}
    for bit, key, make in MODE7_PASSES:
        if bits & bit & ~skip:
            groups = ctx.groups(key, lambda: make(ctx.model))
            _, applied = ctx.correct(adu, good, groups, rule)
            tally(stats, applied)
    return stats


def mode7_fused(raw, control_bits, lut, family: int, vote_ranges: int, cmpars,
                ctx: ModeContext):
    """Calibration and mode 7 on the kernel engines (kernels/calibrate_cm.cu): when the
    mode starts with the row segments, their correction is fused into the one read of the
    raw frames (and, when it is the only pass, the gain too); the banks follow on the ADU,
    and the last pass, the columns, applies the gain (or the gain alone). Rows + columns:
    two reads. Same numbers as Calibrator.split + mode7 + the multiply.
    raw: (B, npix). Returns (calibrated (B, npix) float32, stats)."""
    from .. import cuda
    bits, rule = mode7_rule(cmpars)
    host = ctx.engine == "host"
    rows_first = bool(bits & 1) and not bits & 4
    finish = not bits & (6 if rows_first else 7)
    # the columns come last: their pass applies the gain too, when the shape fits
    columns_last = bool(bits & 2) and cuda.columns_fit(ctx.model.seg_shape)
    _, seg_len = bank_shape(ctx.model)
    out, good, _, applied = cuda.calibrate_rows(raw, control_bits, lut, family, seg_len,
                                                vote_ranges, rule, rows_first, finish, host)
    stats: dict = {}
    if rows_first:
        tally(stats, applied)
    if not finish:
        skip = (1 if rows_first else 0) | (2 if columns_last else 0)
        for key, value in mode7(out, good, cmpars, ctx, skip).items():
            stats[key] = stats.get(key, 0) + value
        if columns_last:
            _, applied = cuda.columns_gain(out, good, raw, control_bits, lut, family,
                                           ctx.model.seg_shape, rule, host)
            tally(stats, applied)
        else:
            cuda.apply_gain(raw, control_bits, lut, family, out, host)
    return out, stats


def mode_chunks(adu, good, cmpars, ctx: ModeContext) -> dict:
    """Modes 2 (mean) and 3 (median): consecutive chunks of cmpars[3] pixels (128 when
    below 100) of each segment; good pixels below cmpars[1] vote; subtracted from the
    whole chunk when |cm| <= cmpars[2]."""
    size = int(cmpars[3]) if len(cmpars) > 3 and cmpars[3] >= 100 else 128
    rule = Rule("mean" if cmpars[0] == 2 else "median", hi=float(cmpars[1]),
                max_abs=float(cmpars[2]), inclusive=True, apply_to="all")
    groups = ctx.groups(("chunk", size), lambda: chunks(ctx.model, size))
    _, applied = ctx.correct(adu, good, groups, rule)
    stats: dict = {}
    tally(stats, applied)
    return stats


def mode_function(mode: int):
    """The function of a psana mode number."""
    if mode == 7:
        return mode7
    if mode in (2, 3):
        return mode_chunks
    if mode in (1, 5):
        from . import cm_cspad
        return cm_cspad.mode1 if mode == 1 else cm_cspad.mode5
    if mode in (4, 6):
        from . import cm_epix100
        return cm_epix100.mode4 if mode == 4 else cm_epix100.mode6
    raise KeyError(mode)


# code -> cmpars per detector family; 0 (none) for every family
CODES = {
    "epix10k": {80: (7, 0, 100), 83: (7, 1, 100, 10), 84: (7, 2, 100, 10), 85: (7, 3, 100, 10)},
    "jungfrau": {71: (7, 1, 10, 10), 72: (7, 2, 10, 10), 7: (7, 3, 10, 10)},
    "epix100": {45: (6, 0, 30, 30, 10), 46: (6, 1, 30, 30, 10), 47: (6, 2, 30, 30, 10),
                4: (4, 6, 30, 10)},
    "cspad": {1: (1, 25, 25, 100, 1), 5: (5, 100)},
}
GENERIC_CODES = {2: (2, 100, 10, 128), 3: (3, 100, 10, 128)}
# which psana modes a family can use
MODES_FOR = {"epix10k": {2, 3, 7}, "jungfrau": {2, 3, 7}, "epix100": {2, 3, 4, 6, 7},
             "cspad": {1, 2, 3, 5}, "camera": {2, 3}}


def all_codes() -> set[int]:
    return {0, -1, *GENERIC_CODES, *(c for table in CODES.values() for c in table)}


def resolve(family: str | None, common_mode, check_family: bool = True) -> tuple | None:
    """cmpars of a config value (a code or an explicit [mode, ...] list); None for no
    correction. Raises ValueError naming the problem. Without ``check_family`` only the
    form is checked (the detector is not known yet)."""
    if isinstance(common_mode, (list, tuple)):
        if not common_mode or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                      for v in common_mode):
            raise ValueError(f"cmpars {common_mode!r} must be a list of numbers [mode, ...]")
        cmpars = tuple(common_mode)
    else:
        if common_mode in (0, None, -1):
            return None
        if not check_family:
            return None
        table = {**GENERIC_CODES, **CODES.get(family, {})}
        if common_mode not in table:
            known = ", ".join(str(c) for c in [0, *sorted(table)])
            raise ValueError(f"common-mode code {common_mode} is not known for a {family} "
                             f"detector (known: {known}; or give cmpars as [mode, ...])")
        cmpars = table[common_mode]
    mode = int(cmpars[0])
    if not check_family:
        if mode not in {m for modes in MODES_FOR.values() for m in modes}:
            raise ValueError(f"unknown common-mode mode {mode}")
        return cmpars
    if mode not in MODES_FOR.get(family, set()):
        raise ValueError(f"common-mode mode {mode} does not apply to a {family} detector "
                         f"(modes: {sorted(MODES_FOR.get(family, set()))})")
    return cmpars


# gain ranges whose pixels vote and are corrected (DESIGN §6 "good" pixels)
CM_GAIN_RANGES = {"epix10k": (0, 1, 3, 4), "jungfrau": (0,)}


class CommonMode:
    """The common-mode correction of one detector for a run."""

    def __init__(self, model: DetectorModel, cmpars: tuple, rms=None, xp=np,
                 engine: str | None = None):
        self.model = model
        self.cmpars = tuple(cmpars)
        self.function = mode_function(int(cmpars[0]))
        engine = engine or ("array" if xp is np else "kernel")
        self.ctx = ModeContext(model, None if rms is None else xp.asarray(rms, dtype=xp.float32)
                               .reshape(-1), xp, engine=engine)

    def __call__(self, adu, good) -> dict:
        """Correct adu (B, npix) in place; returns per-event statistics (B,) arrays."""
        return self._per_event(self.function(adu, good, self.cmpars, self.ctx), len(adu))

    @property
    def fused(self) -> bool:
        """Whether the calibration runs fused with this correction (mode 7 on a kernel
        engine): then ``calibrate`` replaces split + __call__ + the multiply."""
        return self.function is mode7 and self.ctx.engine in ("kernel", "host")

    def calibrate(self, raw, control_bits, lut, family: int, vote_ranges: int):
        """Raw frames (B, npix) -> (calibrated (B, npix), per-event statistics)."""
        calib, stats = mode7_fused(raw, control_bits, lut, family, vote_ranges, self.cmpars,
                                   self.ctx)
        return calib, self._per_event(stats, len(calib))

    def _per_event(self, stats: dict, nbatch: int) -> dict:
        xp = self.ctx.xp
        return {k: xp.asarray(v, dtype=xp.int32) + xp.zeros(nbatch, xp.int32)
                for k, v in stats.items()}
