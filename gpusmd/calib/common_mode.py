"""Common-mode correction (DESIGN §6), in ADU, before the gain.

Every mode is built from one operation, :func:`group_correct`: for each group of pixels
of a frame (a bank, a row segment, a column, a chunk), take the median (or mean) of
the pixels that may vote, and subtract it from the group's pixels (all of them, or only
the good ones) when enough pixels voted and the correction is small enough. A group is a
regular pattern of flat pixel offsets (:class:`Groups`), so the same description drives
the NumPy reference here and the CUDA kernel ``kernels/common_mode.cu``.

Config: ``common_mode`` is a smalldata_tools code (:data:`CODES`; -1 raw frames, 0 and 30
no correction) or an explicit cmpars list ``[mode, ...]``; without one, the code
smalldata_tools recommends for the detector (:data:`DEFAULT_CODES`).

Rules (``rules="psana"``, the default), as psana2 applies them:
  - mode 7: a bank is corrected when at least npix_min pixels vote (UtilsCommonMode
    common_mode_2d: ``if npix < npix_min: return``), a row segment or a half-panel
    column when more than npix_min vote (common_mode_rows / common_mode_cols:
    ``npix > npix_min``); |median| < cormax.
  - every unmasked pixel of the voting gain ranges votes, whatever its gain (psana
    builds the voters from the status mask and the gain-range maps only, then
    multiplies by 1 / gain, 0 where the gain is 0).
  - cm_epix (mode 6) flags value >= 10 x rms literally: a pixel with rms 0 is flagged
    when its value is >= 0, with its 4 neighbours (smalldata_tools utilities.cm_epix).
``rules="gpusmd"``: more than npix_min voters in every pass, pixels of gain 0 do not
vote, a pixel of rms 0 (unknown noise) is not flagged by the rms test.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from ..detectors import DetectorModel

INF = float("inf")


def lattice_starts(lattice) -> np.ndarray:
    """The flat starts of a lattice ((count, stride), ...), the last step fastest."""
    steps = [np.arange(n, dtype=np.int64) * stride for n, stride in lattice]
    return sum(np.meshgrid(*steps, indexing="ij")).ravel().astype(np.int64)


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

    # the starts as a product of steps ((count, stride), ...) in the starts' order, where
    # they are one (made by ``on_lattice``): the groups are then a strided view of a frame
    lattice: tuple | None = None

    def __post_init__(self):
        # a lattice that does not give the starts (groups made from others, e.g. by
        # dataclasses.replace) is dropped: such groups are gathered by index
        if self.lattice is not None and not np.array_equal(lattice_starts(self.lattice),
                                                           self.starts):
            object.__setattr__(self, "lattice", None)

    @classmethod
    def on_lattice(cls, name: str, lattice, n_outer: int, outer_stride: int, n_inner: int,
                   inner_stride: int = 1) -> "Groups":
        lattice = tuple((int(n), int(stride)) for n, stride in lattice)
        return cls(name, lattice_starts(lattice), n_outer, outer_stride, n_inner,
                   inner_stride, lattice)

    @functools.cached_property
    def column_run(self) -> int:
        """For groups of single pixels a row apart (columns): how many adjacent groups run
        side by side (starts[g + 1] = starts[g] + 1 within a run); 0 for other groups.
        Found once per set of groups (the compiled engine asks at every pass)."""
        if self.n_inner != 1 or self.n_outer < 2:
            return 0
        starts = self.starts
        steps = np.flatnonzero(np.diff(starts) != 1)
        run = int(steps[0]) + 1 if len(steps) else len(starts)
        if len(starts) % run or not np.array_equal(
                starts.reshape(-1, run) - starts[::run, None],
                np.broadcast_to(np.arange(run), (len(starts) // run, run))):
            return 0
        return run

    def view(self, frames: np.ndarray) -> np.ndarray | None:
        """(B, *lattice counts, n_outer, n_inner) view of frames (B, npix) (C-ordered
        NumPy), writable, in the order of ``index()``; None where there is no lattice."""
        if (self.lattice is None or not isinstance(frames, np.ndarray)
                or not frames.flags.c_contiguous):
            return None
        item = frames.itemsize
        shape = (frames.shape[0], *(n for n, _ in self.lattice), self.n_outer, self.n_inner)
        strides = (frames.strides[0], *(st * item for _, st in self.lattice),
                   self.outer_stride * item, self.inner_stride * item)
        return np.lib.stride_tricks.as_strided(frames, shape, strides)


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
    view, good_view = groups.view(adu), groups.view(good)
    if view is not None and good_view is not None:     # strided copies, no index arrays
        values = view.reshape(len(adu), -1, groups.size)
        in_group = good_view.reshape(values.shape)
    else:
        idx = xp.asarray(groups.index())
        values, in_group = adu[:, idx], good[:, idx]        # (B, G, n)
    vote = in_group & (values > rule.lo) & (values < rule.hi)
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
    target = in_group if rule.apply_to == "good" else xp.ones_like(vote)
    corrected = values - cm[..., None] * target
    if view is not None and good_view is not None:
        view[...] = corrected.reshape(view.shape)
    else:
        adu[:, idx] = corrected
    return cm, applied


def compiled_layout(groups: Groups) -> str | None:
    """Which compiled group pass takes these groups: "runs" (contiguous runs of pixels:
    banks, rows, chunks, frames), "columns", or None (then the array path runs)."""
    if groups.column_run:
        return "columns"
    return "runs" if groups.inner_stride == 1 else None


def group_correct_compiled(adu, good, groups: Groups, rule: Rule):
    """group_correct of a median rule on the compiled CPU engine (gpusmd.numba_kernels),
    same numbers: the voters gathered, sorted by NumPy (on the engine's threads), the
    medians applied. The bounds are compared in float32, as NumPy compares a float32
    array with a Python number. Groups of neither compiled layout take the array path."""
    from ..cpu_engine import launch, sort_rows
    layout = compiled_layout(groups)
    if (layout is None or adu.dtype != np.float32 or not adu.flags.c_contiguous
            or rule.stat != "median"):
        return group_correct(adu, good, groups, rule)
    good = np.ascontiguousarray(good, dtype=bool)
    count = np.empty((len(adu), len(groups.starts)), np.int64)
    padded = np.empty((*count.shape, groups.size), np.float32)
    if layout == "runs":
        where = (groups.starts, groups.n_outer, groups.outer_stride, groups.n_inner)
    else:
        where = (groups.starts, groups.n_outer, groups.outer_stride, groups.column_run)
    launch(f"gather_{layout}", adu, good, *where, np.float32(rule.lo), np.float32(rule.hi),
           padded, count)
    sort_rows(padded.reshape(-1, groups.size))
    cm = np.empty(count.shape, np.float32)
    applied = np.empty(count.shape, bool)
    launch(f"apply_{layout}", adu, good, *where, padded, count, int(rule.min_count),
           float(rule.min_fraction), np.float32(rule.max_abs), bool(rule.inclusive),
           rule.apply_to != "good", cm, applied)
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
    return Groups.on_lattice("bank", ((nseg, rows * cols), (-(-rows // br), br * cols),
                                      (-(-cols // bc), bc)), br, cols, bc, 1)


def bank_rows(model: DetectorModel) -> Groups:
    """Each row of each bank (48 / 64 / 96 pixels)."""
    nseg, rows, cols = model.seg_shape
    _, bc = bank_shape(model)
    return Groups.on_lattice("row", ((nseg, rows * cols), (rows, cols), (-(-cols // bc), bc)),
                             1, 0, bc, 1)


def half_columns(model: DetectorModel) -> Groups:
    """Each column of each half panel (176 / 256 / 352 pixels)."""
    nseg, rows, cols = model.seg_shape
    br, _ = bank_shape(model)
    return Groups.on_lattice("column", ((nseg, rows * cols), (-(-rows // br), br * cols),
                                        (cols, 1)), br, cols, 1, 1)


def chunks(model: DetectorModel, size: int) -> Groups:
    """Consecutive chunks of ``size`` pixels of each segment (a last partial chunk of a
    segment is left alone)."""
    nseg, rows, cols = model.seg_shape
    per_seg = rows * cols // size
    return Groups.on_lattice("chunk", ((nseg, rows * cols), (per_seg, size)), 1, 0, size, 1)


# ---- the modes ------------------------------------------------------------------------------

@dataclass
class ModeContext:
    """What a mode may need besides the frames: the detector and its noise (ADU, the
    first gain range) for the modes that flag signal by rms; and which implementation of
    the group correction runs: "array" (NumPy / CuPy array operations), "kernel" (the
    CUDA kernel, on a GPU), "host" (the same kernel built for the CPU, for tests) or
    "numba" (the compiled CPU engine, for the medians; the means stay NumPy's: its
    pairwise float32 sums are not a loop's)."""
    model: DetectorModel
    rms: np.ndarray | None = None       # (npix,) on the backend
    xp: object = np
    cache: dict = field(default_factory=dict)
    engine: str = "array"
    rules: str = "psana"                # or "gpusmd" (module docstring)

    def correct(self, adu, good, groups: Groups, rule: Rule):
        if self.engine == "kernel":
            from ..cuda import group_correct_gpu
            return group_correct_gpu(adu, good, groups, rule)
        if self.engine == "host":
            from ..cuda import group_correct_host
            return group_correct_host(adu, good, groups, rule)
        if self.engine == "numba":
            return group_correct_compiled(adu, good, groups, rule)
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


RULES = ("psana", "gpusmd")


def mode7_rule(cmpars, key: str = "row", rules: str = "psana") -> tuple[int, Rule]:
    """(bits, rule of the pass ``key``) of mode 7's cmpars [7, bits, cormax, npix_min]:
    with psana's rules a bank needs npix_min voters, a row or column npix_min + 1
    (module docstring); with gpusmd's, every pass npix_min + 1."""
    if rules not in RULES:
        raise ValueError(f"common-mode rules {rules!r} are not one of {', '.join(RULES)}")
    bits = int(cmpars[1]) if len(cmpars) > 1 else 0
    cormax = float(cmpars[2]) if len(cmpars) > 2 else INF
    npix_min = int(cmpars[3]) if len(cmpars) > 3 else 10
    at_least = npix_min if key == "bank" and rules == "psana" else npix_min + 1
    return bits, Rule("median", min_count=at_least, max_abs=cormax, apply_to="good")


def mode7(adu, good, cmpars, ctx: ModeContext, skip: int = 0) -> dict:
    """Banks (bit 4), then row segments (bit 1), then half-panel columns (bit 2): the
    median of the good pixels, subtracted from the good pixels if enough voted
    (:func:`mode7_rule`) and |median| < cormax. The passes whose bit is in ``skip`` are
    left out (done already, see mode7_fused)."""
    stats: dict = {}
    for bit, key, make in MODE7_PASSES:
        bits, rule = mode7_rule(cmpars, key, ctx.rules)
        if bits & bit & ~skip:
            groups = ctx.groups(key, lambda: make(ctx.model))
            _, applied = ctx.correct(adu, good, groups, rule)
            tally(stats, applied)
    return stats


def mode7_fused(raw, control_bits, lut, family: int, vote_ranges: int, cmpars,
                ctx: ModeContext, vote_mask=None):
    """Calibration and mode 7 on the kernel engines (kernels/calibrate_cm.cu): when the
    mode starts with the row segments, their correction is fused into the one read of the
    raw frames (and, when it is the only pass, the gain too); the banks follow on the ADU,
    and the last pass, the columns, applies the gain (or the gain alone). Rows + columns:
    two reads. Same numbers as Calibrator.split + mode7 + the multiply.
    raw: (B, npix); vote_mask: (npix,) the unmasked pixels, which vote whatever their gain
    (None: those whose mask / gain is not 0 vote). Returns (calibrated (B, npix) float32,
    stats)."""
    from .. import cuda
    bits, rule = mode7_rule(cmpars, "row", ctx.rules)
    host = ctx.engine == "host"
    rows_first = bool(bits & 1) and not bits & 4
    finish = not bits & (6 if rows_first else 7)
    # the columns come last: their pass applies the gain too, when the shape fits
    columns_last = bool(bits & 2) and cuda.columns_fit(ctx.model.seg_shape)
    _, seg_len = bank_shape(ctx.model)
    out, good, _, applied = cuda.calibrate_rows(raw, control_bits, lut, family, seg_len,
                                                vote_ranges, rule, rows_first, finish, host,
                                                vote_mask)
    stats: dict = {}
    if rows_first:
        tally(stats, applied)
    if not finish:
        skip = (1 if rows_first else 0) | (2 if columns_last else 0)
        for key, value in mode7(out, good, cmpars, ctx, skip).items():
            stats[key] = stats.get(key, 0) + value
        if columns_last:
            _, rule = mode7_rule(cmpars, "column", ctx.rules)
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


# code -> cmpars per detector family (smalldata_tools' DetObject: lcls2/DetObject.py
# Epix10kObject, JungfrauObject; lcls1/DetObject.py CsPadObject, EpixObject)
CODES = {
    "epix10k": {80: (7, 0, 100), 83: (7, 1, 100, 10), 84: (7, 2, 100, 10), 85: (7, 3, 100, 10)},
    "jungfrau": {71: (7, 1, 10, 10), 72: (7, 2, 10, 10), 7: (7, 3, 10, 10)},
    "epix100": {45: (6, 0, 30, 30, 10), 46: (6, 1, 30, 30, 10), 47: (6, 2, 30, 30, 10),
                4: (4, 6, 30, 10), 34: (4, 6, 100, 100)},
    "cspad": {1: (1, 25, 40, 100, 0), 10: (1, 25, 40, 100, 1), 5: (5, 100), 55: (5, 5000)},
}
GENERIC_CODES = {2: (2, 100, 10, 128), 3: (3, 100, 10, 128)}
# which psana modes a family can use
MODES_FOR = {"epix10k": {2, 3, 7}, "jungfrau": {2, 3, 7}, "epix100": {2, 3, 4, 6, 7},
             "cspad": {1, 2, 3, 5}, "camera": {2, 3}}
# no correction: 0, and smalldata's 30 (psana's calib with its default parameters)
NO_CORRECTION = (0, 30)
# the raw frames as float32: -1 (the epix10k's ADC bits; other detectors' raw values), and
# for the epix10k -2 with its gain bits (smalldata's Epix10kObject -1 / -2)
RAW_CODES = {-1: None, -2: "epix10k"}
# what smalldata_tools recommends when the producer names no code (its documentation,
# "DetObject": CsPad 1, Jungfrau 7, Epix 46; the epix10k producer example uses 84)
DEFAULT_CODES = {"cspad": 1, "jungfrau": 7, "epix100": 46, "epix10k": 84, "camera": 0}
# smalldata codes with no meaning here, and what to use instead
REFUSED = {
    "epix100": {6: "psana1's built-in epix100 mode 6 (psana2 has none: smalldata's LCLS-II "
                   "producer applies no correction); use 46, cm_epix after the frame mean",
                36: "psana1's built-in epix100 mode 6 without the frame mean (psana2 has "
                    "none); use 45, cm_epix"},
    "epix10k": {81: "a fixed-gain kludge from the configuration's nominal gains; use 80 "
                    "(calibrated) or 84 / 85",
                82: "a fixed-gain kludge with calibration rows; use 84 or 85",
                180: "80 with a ghost-image correction read from per-run fit files; use 80",
                181: "81 with a ghost-image correction; use 80"},
}
CONVENTIONS = ("psana2", "psana1")


def default_code(family: str) -> int:
    """The common-mode code a detector gets when the config names none."""
    return DEFAULT_CODES.get(family, 0)


def all_codes() -> set[int]:
    return {*NO_CORRECTION, *RAW_CODES, *GENERIC_CODES,
            *(c for table in (*CODES.values(), *REFUSED.values()) for c in table)}


def raw_output(family: str | None, common_mode) -> bool:
    """Whether the config asks for the raw frames (no pedestal, no gain)."""
    return (not isinstance(common_mode, (list, tuple)) and common_mode in RAW_CODES
            and (family is None or RAW_CODES[common_mode] in (None, family)))


def raw_frames(model: DetectorModel, raw, common_mode, xp=np):
    """smalldata's raw codes: -1 the ADC bits of an epix10k (raw & 0x3fff), the raw values
    of other detectors; -2 an epix10k's raw values with the gain bits. (B, ...) float32."""
    if common_mode == -1 and model.family == "epix10k":
        return model.adc(raw, xp)
    return xp.asarray(raw).astype(xp.float32)


def psana2_cmpars(family: str | None, cmpars: tuple) -> tuple:
    """An explicit cmpars list as psana2's det.raw.calib reads it. Only the epix100
    differs from psana1: psana2 (UtilsEpix100.calib_epix100 -> UtilsCommonMode
    common_mode_apply) reads (alg, bits, cormax, npix_min) with bit 4 the banks, 1 the
    rows of a bank, 2 the columns of a half panel, whatever alg is: mode 7 here. psana1
    reads mode 4 as medianInRegionV3 (4, bits, half_range, maxcorr): mode 4 here."""
    if family == "epix100" and int(cmpars[0]) == 4:
        return (7, *cmpars[1:])
    return cmpars


def resolve(family: str | None, common_mode, check_family: bool = True,
            convention: str = "psana2") -> tuple | None:
    """cmpars of a config value (a code or an explicit [mode, ...] list); None for no
    correction (and for the raw codes: see raw_output); a missing value (None) is the
    family's default code. Explicit lists are read as ``convention`` reads them
    (:func:`psana2_cmpars`); codes name a fixed recipe. Raises ValueError naming the
    problem. Without ``check_family`` only the form is checked (the detector is not
    known yet)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"common-mode convention {convention!r} is not one of "
                         f"{', '.join(CONVENTIONS)}")
    if isinstance(common_mode, (list, tuple)):
        if not common_mode or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                      for v in common_mode):
            raise ValueError(f"cmpars {common_mode!r} must be a list of numbers [mode, ...]")
        cmpars = tuple(common_mode)
        if convention == "psana2":
            cmpars = psana2_cmpars(family, cmpars)
    else:
        if common_mode is None:
            if not check_family:
                return None
            common_mode = default_code(family)
        if common_mode in NO_CORRECTION:
            return None
        if common_mode in RAW_CODES:
            if check_family and not raw_output(family, common_mode):
                raise ValueError(f"common-mode code {common_mode} (raw with gain bits) is for "
                                 f"an epix10k, not a {family} detector; use -1")
            return None
        if not check_family:
            return None
        refused = REFUSED.get(family, {}).get(common_mode)
        if refused:
            raise ValueError(f"common-mode code {common_mode} of smalldata_tools is {refused}")
        table = {**GENERIC_CODES, **CODES.get(family, {})}
        if common_mode not in table:
            known = ", ".join(str(c) for c in [*sorted(RAW_CODES), *NO_CORRECTION, *sorted(table)]
                              if c not in RAW_CODES or raw_output(family, c))
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
                 engine: str | None = None, rules: str = "psana"):
        if rules not in RULES:
            raise ValueError(f"common-mode rules {rules!r} are not one of {', '.join(RULES)}")
        self.model = model
        self.cmpars = tuple(cmpars)
        self.function = mode_function(int(cmpars[0]))
        engine = engine or ("array" if xp is np else "kernel")
        if engine == "numba":
            from ..cpu_engine import compiled
            engine = "numba" if compiled("numba") else "array"     # (it warns, once)
        self.ctx = ModeContext(model, None if rms is None else xp.asarray(rms, dtype=xp.float32)
                               .reshape(-1), xp, engine=engine, rules=rules)

    def __call__(self, adu, good) -> dict:
        """Correct adu (B, npix) in place; returns per-event statistics (B,) arrays."""
        return self._per_event(self.function(adu, good, self.cmpars, self.ctx), len(adu))

    @property
    def fused(self) -> bool:
        """Whether the calibration runs fused with this correction (mode 7 on a kernel
        engine): then ``calibrate`` replaces split + __call__ + the multiply."""
        return self.function is mode7 and self.ctx.engine in ("kernel", "host")

    def calibrate(self, raw, control_bits, lut, family: int, vote_ranges: int, vote_mask=None):
        """Raw frames (B, npix) -> (calibrated (B, npix), per-event statistics); vote_mask
        (npix,): the unmasked pixels (see mode7_fused), the Calibrator's with psana's rules."""
        calib, stats = mode7_fused(raw, control_bits, lut, family, vote_ranges, self.cmpars,
                                   self.ctx, vote_mask)
        return calib, self._per_event(stats, len(calib))

    def _per_event(self, stats: dict, nbatch: int) -> dict:
        xp = self.ctx.xp
        return {k: xp.asarray(v, dtype=xp.int32) + xp.zeros(nbatch, xp.int32)
                for k, v in stats.items()}
