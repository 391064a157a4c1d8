"""Cubes: per-event data binned by a scan variable or any per-event column
(smalldata_tools' makeCubeData; its bins are left-closed, [e_i, e_i+1), events outside
every bin left out, as its ``groupby_bins(..., right=False)``).

From small-data files (gpusmd.io.output) every per-event numeric dataset (its values as
float64) is summed per bin (``/sum/<key>``, NaN and infinite values left out) with its sum
of squares (``/sum_square/<key>``); from the raw runs the files were made of (``raw`` and a
config) the calibrated frames of the config's detectors, by the project's own calibration,
are summed per bin too (``/sum/<det>/calib``, raw-shaped). Several ``--bin`` give a cube of
several dimensions.

Counts and sums are what adds up: the cube of several runs is the sum of theirs
(:func:`add_cubes`, :func:`merge_cubes`, ``gpusmd cube merge``). The sums of the per-event
values and of their squares are kept exactly (:class:`ExactSum`: integers in units of a
power of two, every float64 and its square being one), written in ``/exact/``, and
``/sum``, ``/sum_square`` and ``/mean`` (= sum / count, NaN in empty bins) are those exact
values rounded once to float64: cubes added are, to the bit, the cube of all their events
made at once, in whatever order or split. The summed images (per pixel and bin, too many
for that) are float64 sums: they add up to float64 rounding. The means are written for
reading, never added.

File::

    /nEntries               (*nbins) int64 events per bin
    /binning/<var>          the edges of each binning variable (root attribute bin_vars:
                            their names in order)
    /sum/<key>, /sum_square/<key>, /mean/<key>      (*nbins, *row shape) float64
    /count/<key>            finite values per bin and element, where some were left out
    /exact/sum/<key>, /exact/sum_square/<key>       (*nbins, *row shape, L) int64 limbs:
                            the exact value is sum_l limbs[..., l] * 2^(limb_bits * l + exp)
                            (attributes limb_bits = 26, exp; limbs in [-2^25, 2^25))
    root attributes         format = "gpusmd-cube", format_version (2), bin_vars,
                            selection, smd_files, raw_files, n_events (binned),
                            n_selected; a merged cube also merged_from
"""
from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from .. import __version__
from ..backend import Backend, get_backend
from ..config import Config
from ..errors import GpusmdError
from ..io.output import check_new_output, open_small_data, written_h5
from ..io.source import open_run
from ..mpi import count_events
from .avimage import calibration_processors
from .select import Selection

FORMAT = "gpusmd-cube"
FORMAT_VERSION = 2
SKIP_GROUPS = ("UserDataCfg", "Sums", "errors")
SKIP_KEYS = ("event_id", "timestamp")


def parse_bin(text: str):
    """``NAME:e0,e1,...`` (edges) or ``NAME:lo:hi:n`` (n equal bins) -> (name, edges)."""
    name, sep, spec = str(text).partition(":")
    if not sep or not name or not spec:
        raise GpusmdError(f"--bin {text!r}: expected NAME:EDGES (e.g. scan/var:0,1,2,3 or "
                          f"scan/var:0:10:20 for 20 bins from 0 to 10)")
    try:
        if ":" in spec:
            lo, hi, n = spec.split(":")
            if int(n) < 1:
                raise ValueError
            edges = np.linspace(float(lo), float(hi), int(n) + 1)
        else:
            edges = np.asarray([float(v) for v in spec.split(",") if v.strip()], np.float64)
    except ValueError:
        raise GpusmdError(f"--bin {text!r}: edges must be numbers, e0,e1,... or lo:hi:n") \
            from None
    if len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise GpusmdError(f"--bin {text!r}: at least 2 strictly increasing edges")
    return name.strip("/"), edges


def per_event_datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    """The per-event numeric datasets of a small-data file (one row per event)."""
    n = f["event_id"].shape[0]
    out = {}

    def visit(name, obj):
        top = name.split("/")[0]
        if (isinstance(obj, h5py.Dataset) and top not in SKIP_GROUPS and name not in SKIP_KEYS
                and not any(part.startswith("var_") for part in name.split("/"))
                and obj.ndim >= 1 and obj.shape[0] == n
                and (np.issubdtype(obj.dtype, np.number) or obj.dtype == np.bool_)):
            out[name] = obj
    f.visititems(visit)
    return out


LIMB_BITS = 26
_MASK = (1 << LIMB_BITS) - 1
_HALF = 1 << (LIMB_BITS - 1)
_UNIT = -87 * LIMB_BITS      # 2^-2262: below the lowest bit of a float64's square, 2^-2252
_CHUNK = 1 << 22             # values added at once: their int64 sums cannot overflow
_M18, _M27 = (1 << 18) - 1, (1 << 27) - 1


class ExactSum:
    """Exact sums of float64 values, one per group: integers in balanced limbs of
    LIMB_BITS bits, ``limbs[g, l]`` in [-2^25, 2^25), the value of group ``g``
    sum_l limbs[g, l] * 2^(LIMB_BITS * (low + l) + _UNIT). Kept canonical (every limb in
    range, no all-zero limb at either end), so equal sums have equal limbs."""

    def __init__(self, limbs: np.ndarray, low: int = 0):
        self.limbs = np.asarray(limbs, np.int64)
        if self.limbs.ndim != 2 or self.limbs.shape[1] < 1:
            self.limbs = self.limbs.reshape(len(self.limbs), -1)
            if self.limbs.shape[1] < 1:
                self.limbs = np.zeros((len(self.limbs), 1), np.int64)
        self.low = int(low)

    @classmethod
    def zeros(cls, n_groups: int) -> "ExactSum":
        return cls(np.zeros((n_groups, 1), np.int64))

    @property
    def exp(self) -> int:
        """The power of two of limb 0."""
        return LIMB_BITS * self.low + _UNIT

    @classmethod
    def from_file(cls, limbs, exp: int) -> "ExactSum":
        exp = int(exp) - _UNIT
        if exp % LIMB_BITS:
            raise GpusmdError(f"exact sums with limb 0 at 2^{exp + _UNIT}: not a multiple "
                              f"of {LIMB_BITS} bits from 2^{_UNIT}")
        limbs = np.asarray(limbs, np.int64)
        return cls(limbs.reshape(-1, limbs.shape[-1]), exp // LIMB_BITS).canonical()

    def canonical(self) -> "ExactSum":
        """Carries propagated (balanced limbs), all-zero limbs at the ends dropped."""
        a = np.concatenate([self.limbs, np.zeros((len(self.limbs), 1), np.int64)], axis=1)
        for l in range(a.shape[1] - 1):
            carry = (a[:, l] + _HALF) >> LIMB_BITS
            a[:, l] -= carry << LIMB_BITS
            a[:, l + 1] += carry
        while np.any(np.abs(a[:, -1]) >= _HALF):            # more room for the top carry
            a = np.concatenate([a, np.zeros((len(a), 1), np.int64)], axis=1)
            carry = (a[:, -2] + _HALF) >> LIMB_BITS
            a[:, -2] -= carry << LIMB_BITS
            a[:, -1] += carry
        used = np.flatnonzero(a.any(axis=0))
        if not len(used):
            return ExactSum(np.zeros((len(a), 1), np.int64), 0)
        return ExactSum(a[:, used[0]:used[-1] + 1].copy(), self.low + int(used[0]))

    def __add__(self, other: "ExactSum") -> "ExactSum":
        if len(self.limbs) != len(other.limbs):
            raise ValueError("exact sums of different sizes")
        low = min(self.low, other.low)
        high = max(self.low + self.limbs.shape[1], other.low + other.limbs.shape[1])
        a = np.zeros((len(self.limbs), high - low), np.int64)
        for s in (self, other):
            a[:, s.low - low:s.low - low + s.limbs.shape[1]] += s.limbs
        return ExactSum(a, low).canonical()

    def integers(self) -> np.ndarray:
        """Each group's sum in units of 2^exp, as Python ints (an object array)."""
        n = self.limbs[:, -1].astype(object)
        for l in range(self.limbs.shape[1] - 2, -1, -1):
            n = n * (1 << LIMB_BITS) + self.limbs[:, l].astype(object)
        return n

    def to_float(self, divisor=None) -> np.ndarray:
        """Each group's sum (over ``divisor``, ints per group: NaN where 0) rounded once to
        the nearest float64 (Python's int division is correctly rounded)."""
        num = self.integers()
        den = 1
        if self.exp >= 0:
            num = num * (1 << self.exp)
        else:
            den = 1 << -self.exp
        dens = (np.full(len(num), den, object) if divisor is None
                else np.asarray(divisor, np.int64).astype(object) * den)
        return np.fromiter((_divide(a, b) for a, b in zip(num, dens)), np.float64, len(num))


def _divide(a: int, b: int) -> float:
    if b == 0:
        return float("nan")
    try:
        return a / b
    except OverflowError:
        return float("inf") if (a > 0) == (b > 0) else float("-inf")


def exact_sums(groups: np.ndarray, x: np.ndarray, n_groups: int, squares: bool = False
               ) -> ExactSum:
    """The exact sum per group of the finite float64 values ``x`` (or of their squares),
    ``groups`` the group of each value. Each value is its integer mantissa times a power
    of two (np.frexp); the mantissas' 27-bit halves (for a square: the products of its
    18-bit thirds) are added as int64 per group and exponent, without overflow, and those
    few sums per group placed, in LIMB_BITS-bit pieces, in the limbs they fall in."""
    x = np.asarray(x, np.float64).ravel()
    groups = np.asarray(groups, np.int64).ravel()
    keep = x != 0
    x, groups = x[keep], groups[keep]
    total = ExactSum.zeros(n_groups)
    for a in range(0, len(x), _CHUNK):
        m, e = np.frexp(x[a:a + _CHUNK])
        mant = (m * 2.0 ** 53).astype(np.int64)        # exact: x = mant * 2^(e - 53)
        e = e.astype(np.int64)
        if squares:                                     # mant^2 = sum_k c_k 2^(18 k)
            u = np.abs(mant)
            p0, p1, p2 = u & _M18, (u >> 18) & _M18, u >> 36
            coeffs = [p0 * p0, 2 * p0 * p1, p1 * p1 + 2 * p0 * p2, 2 * p1 * p2, p2 * p2]
            shifts, base = [18 * k for k in range(5)], -106 - _UNIT
        else:
            coeffs = [mant & _M27, mant >> 27]          # floor halves: mant = lo + hi 2^27
            shifts, base = [0, 27], -53 - _UNIT
        scale = 2 if squares else 1
        e_min = int(e.min())
        n_e = int(e.max()) - e_min + 1
        key = groups[a:a + _CHUNK] * n_e + (e - e_min)
        if n_groups * n_e <= max(1 << 20, 2 * len(key)):
            where, size = key, n_groups * n_e
            cells = None
        else:
            cells, where = np.unique(key, return_inverse=True)
            size = len(cells)
        sums = []
        for c in coeffs:                                # |c| < 2^38, 2^22 of them: no overflow
            acc = np.zeros(size, np.int64)
            np.add.at(acc, where, c)
            sums.append(acc)
        used = np.flatnonzero(np.any(sums, axis=0))
        cell = used if cells is None else cells[used]
        g, exp = cell // n_e, scale * (cell % n_e + e_min) + base
        total = total + _spread(np.tile(g, len(sums)),
                                np.concatenate([s_[used] for s_ in sums]),
                                np.concatenate([exp + d for d in shifts]), n_groups)
    return total


def _spread(groups, terms, offsets, n_groups) -> ExactSum:
    """The integers ``terms`` (|t| < 2^63) times 2^offsets (in bits above 2^_UNIT, >= 0)
    added per group into LIMB_BITS-bit limbs."""
    if not len(terms):
        return ExactSum.zeros(n_groups)
    sign, mag = np.sign(terms), np.abs(terms)
    k, shift = offsets // LIMB_BITS, offsets % LIMB_BITS
    low = int(k.min())
    width = int(k.max()) + 4 - low
    acc = np.zeros(n_groups * width, np.int64)
    at = groups * width + k - low
    for j in range(3):                                  # 3 pieces of 26 bits: < 2^78
        piece = (mag >> (LIMB_BITS * j)) & _MASK
        shifted = piece << shift                        # < 2^52
        np.add.at(acc, at + j, sign * (shifted & _MASK))
        np.add.at(acc, at + j + 1, sign * (shifted >> LIMB_BITS))
    return ExactSum(acc.reshape(n_groups, width), low).canonical()


class CubeSums:
    """Counts and sums per bin, to be filled from one run after the other: the sums of
    the per-event values exact (:class:`ExactSum`, over the bins times the elements of a
    row), their counts int64."""

    def __init__(self, bins):
        self.bins = [(name, np.asarray(edges, np.float64)) for name, edges in bins]
        self.shape = tuple(len(e) - 1 for _, e in self.bins)
        self.n_bins = int(np.prod(self.shape))
        self.counts = np.zeros(self.n_bins, np.int64)
        self.sums: dict[str, ExactSum] = {}
        self.squares: dict[str, ExactSum] = {}
        self.finite: dict[str, np.ndarray] = {}
        self.row_shapes: dict[str, tuple] = {}
        self.n_selected = 0

    def bin_of(self, columns: dict) -> np.ndarray:
        """Flat bin of each event (-1 outside), from its binning columns."""
        idx = []
        for name, edges in self.bins:
            i = np.digitize(np.asarray(columns[name], np.float64), edges) - 1
            i[(i < 0) | (i >= len(edges) - 1)] = -1
            idx.append(i)
        inside = np.all([i >= 0 for i in idx], axis=0)
        flat = np.full(len(idx[0]), -1, np.int64)
        if inside.any():
            flat[inside] = np.ravel_multi_index(tuple(i[inside] for i in idx), self.shape)
        return flat

    def add_column(self, key: str, values: np.ndarray, flat: np.ndarray):
        """Add the values (one row per event, as float64; non-finite left out) of the
        events in a bin (``flat`` >= 0) to the key's sums."""
        inside = flat >= 0
        shape = tuple(values.shape[1:])
        width = int(np.prod(shape))
        rows = values[inside].reshape(int(inside.sum()), width).astype(np.float64)
        groups = flat[inside][:, None] * width + np.arange(width)[None, :]
        good = np.isfinite(rows)
        groups, x = groups[good], rows[good]
        n_groups = self.n_bins * width
        counts = np.bincount(groups, minlength=n_groups).astype(np.int64)
        self._add_sums(key, shape, exact_sums(groups, x, n_groups),
                       exact_sums(groups, x, n_groups, squares=True),
                       counts.reshape(self.n_bins, *shape))

    def _add_sums(self, key, shape, s: ExactSum, q: ExactSum, counts):
        if key in self.sums:
            if self.row_shapes[key] != shape:
                raise GpusmdError(f"{key}: rows of shape {shape}, elsewhere "
                                  f"{self.row_shapes[key]}")
            s, q, counts = s + self.sums[key], q + self.squares[key], counts + self.finite[key]
        self.sums[key], self.squares[key], self.finite[key] = s, q, counts
        self.row_shapes[key] = shape

    def add(self, other: "CubeSums"):
        """Add the cube ``other`` (same bins, same keys)."""
        self.counts = self.counts + other.counts
        self.n_selected += other.n_selected
        for key in other.sums:
            self._add_sums(key, other.row_shapes[key], other.sums[key], other.squares[key],
                           other.finite[key])

    def datasets(self) -> dict[str, np.ndarray]:
        """{dataset path: array} of the counts, of the sums (rounded once from the exact
        ones), the sums of squares and means, and the counts of each key's values."""
        out = {"nEntries": self.counts.reshape(self.shape)}
        for key, s in self.sums.items():
            full = (*self.shape, *self.row_shapes[key])
            finite = self.finite[key].reshape(-1)
            out[f"sum/{key}"] = s.to_float().reshape(full)
            out[f"sum_square/{key}"] = self.squares[key].to_float().reshape(full)
            out[f"mean/{key}"] = s.to_float(finite).reshape(full)
            out[f"count/{key}"] = self.finite[key].reshape(full)
        return out

    @staticmethod
    def _add(store, key, value):
        if key in store:
            store[key] += value
        else:
            store[key] = value


def _check_columns(names, f: h5py.File, path):
    n = f["event_id"].shape[0]
    for name in names:
        if name not in f or not isinstance(f[name], h5py.Dataset) or f[name].shape != (n,):
            have = sorted(k for k, d in per_event_datasets(f).items() if d.ndim == 1)
            raise GpusmdError(f"{path}: no per-event value {name!r} (one number per event; it "
                              f"has: {', '.join(have) or 'none'})")


def make_cube(smd_paths, bins, selection: Selection | None = None, raw_paths=None,
              config: Config | None = None, keys=None, backend: Backend | None = None,
              batch_size: int | None = None, progress: bool = True, share=None) -> dict:
    """The cube of the small-data files ``smd_paths`` (module docstring); ``raw_paths``
    (one per small-data file, with ``config``): also the calibrated frames per bin;
    ``keys``: only the per-event datasets starting with one of these. ``share``
    (gpusmd.mpi.RankShare): one rank of an MPI job, which calibrates its block of each
    raw run's events (see bin_frames); every rank gets the whole cube."""
    selection = selection or Selection()
    smd_paths = [Path(p) for p in smd_paths]
    raw_paths = list(raw_paths or [])
    if raw_paths and len(raw_paths) != len(smd_paths):
        raise GpusmdError(f"{len(raw_paths)} raw runs for {len(smd_paths)} small-data files: "
                          f"give one --raw per file, in the same order")
    if raw_paths and config is None:
        raise GpusmdError("--raw needs --config (the calibration of the frames)")
    cube = CubeSums(bins)
    images: dict[str, np.ndarray] = {}
    for k, path in enumerate(smd_paths):
        with open_small_data(path) as f:
            if "event_id" not in f:
                raise GpusmdError(f"{path}: no /event_id (not a small-data file)")
            _check_columns([name for name, _ in bins] + selection.names, f, path)
            n = f["event_id"].shape[0]
            columns = {name: f[name][()] for name in {*selection.names, *(b for b, _ in bins)}}
            keep = selection(columns, n)
            flat = np.where(keep, cube.bin_of(columns), -1)
            cube.n_selected += int(keep.sum())
            datasets = per_event_datasets(f)
            if keys:
                datasets = {name: d for name, d in datasets.items()
                            if any(name == key or name.startswith(key.rstrip("/") + "/")
                                   for key in keys)}
                if not datasets:
                    raise GpusmdError(f"{path}: no per-event dataset under {', '.join(keys)}")
            for name, ds in datasets.items():
                cube.add_column(name, ds[()], flat)
            event_ids = f["event_id"][()]
        cube.counts += np.bincount(flat[flat >= 0], minlength=cube.n_bins)
        if raw_paths:
            for det, value in bin_frames(raw_paths[k], config, event_ids, flat, cube.n_bins,
                                         backend, batch_size, progress, share).items():
                CubeSums._add(images, det, value)
    return {"cube": cube, "images": images, "attrs": {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "bin_vars": [name for name, _ in bins], "selection": str(selection),
        "smd_files": [str(p) for p in smd_paths], "raw_files": [str(p) for p in raw_paths],
        "n_events": int(cube.counts.sum()), "n_selected": int(cube.n_selected),
        "config": config.text if config is not None else "",
        "gpusmd_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}


def bin_frames(raw, config: Config, event_ids, flat, n_bins, backend=None, batch_size=None,
               progress=True, share=None) -> dict[str, np.ndarray]:
    """Sums per bin of the calibrated frames of the config's detectors, the events of the
    raw run matched to the small-data file's by event id. ``share``: this MPI rank's
    block of the run's events, then the ranks' sums added in rank order (the same
    numbers run after run; they differ from one process's only in float64 rounding)."""
    backend = backend or get_backend(config=config.backend)
    xp = backend.xp
    wanted = dict(zip(np.asarray(event_ids).tolist(), np.asarray(flat).tolist()))
    n_wanted = int((np.asarray(flat) >= 0).sum())
    dets = list(config.detectors)
    found = 0
    with open_run(raw, dets) as run:
        procs = calibration_processors(config, run, dets, backend)
        sums = {det: xp.zeros((n_bins, *proc.model.shape), xp.float64)
                for det, proc in procs.items()}
        first, stop = (0, None) if share is None else share.block(count_events(run, None))
        with tqdm(total=n_wanted, unit="ev", disable=not progress or first > 0,
                  desc=f"cube {Path(str(raw)).name}") as bar:
            for b in run.batches(batch_size or config.batch_size, stop, detectors=dets,
                                 one_step=True, first=first):
                where = np.array([wanted.get(int(e), -1) for e in b.event_id], np.int64)
                take = where >= 0
                if not take.any():
                    continue
                for det, proc in procs.items():
                    calib, _ = proc.calibrate(b.frames[det][take], int(b.steps[det][0]))
                    for bin_ in np.unique(where[take]):
                        sel = xp.asarray(np.flatnonzero(where[take] == bin_))
                        sums[det][int(bin_)] += calib[sel].sum(axis=0, dtype=xp.float64)
                found += int(take.sum())
                bar.update(int(take.sum()))
    sums = {det: backend.to_host(s) for det, s in sums.items()}
    if share is not None:
        sums = {det: share.sum_in_order(s) for det, s in sums.items()}
        found = int(share.sum_exact(np.array([found], np.int64))[0])
    if found != n_wanted:
        raise GpusmdError(f"{raw}: holds {found} of the {n_wanted} binned events of the "
                          f"small-data file (is it the run the file was made of?)")
    return {f"{det}/calib": s for det, s in sums.items()}


def image_datasets(images: dict, counts: np.ndarray, shape) -> dict[str, np.ndarray]:
    """sum/<key> and mean/<key> (sum over the bin's events, NaN where none) of the summed
    images (float64, one per flat bin), in the cube's shape."""
    out = {}
    for key, value in images.items():
        value = value.reshape(*shape, *value.shape[1:])
        n = np.asarray(counts).reshape(*shape, *([1] * (value.ndim - len(shape))))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"sum/{key}"], out[f"mean/{key}"] = \
                value, np.where(n > 0, value / np.maximum(n, 1), np.nan)
    return out


def write_cube(path, result: dict, force: bool = False) -> Path:
    """Write the cube ``result`` (of :func:`make_cube` or :func:`merge_cubes`)."""
    path = check_new_output(path, force)
    cube: CubeSums = result["cube"]
    shape = cube.shape
    data = cube.datasets()
    with written_h5(path, sum(np.asarray(v).nbytes for v in data.values())) as f:  # room first
        f.create_dataset("nEntries", data=data["nEntries"])
        for name, edges in cube.bins:
            f.create_dataset(f"binning/{name}", data=edges)
        for key in cube.sums:
            for group in ("sum", "sum_square", "mean"):
                f.create_dataset(f"{group}/{key}", data=data[f"{group}/{key}"])
            n = data["nEntries"].reshape(*shape, *([1] * len(cube.row_shapes[key])))
            if not np.array_equal(data[f"count/{key}"], n + 0 * data[f"count/{key}"]):
                f.create_dataset(f"count/{key}", data=data[f"count/{key}"])  # NaN left out
            for group, store in (("sum", cube.sums), ("sum_square", cube.squares)):
                ex = store[key]
                d = f.create_dataset(f"exact/{group}/{key}", data=ex.limbs.reshape(
                    *shape, *cube.row_shapes[key], ex.limbs.shape[1]))
                d.attrs.update({"limb_bits": LIMB_BITS, "exp": ex.exp})
        for name, value in image_datasets(result["images"], cube.counts, shape).items():
            f.create_dataset(name, data=value)
        f.attrs.update(result["attrs"])
    return path


def read_cube(path) -> dict:
    """{dataset path: array} and the attributes of a cube file."""
    path = Path(path)
    if not path.exists():
        raise GpusmdError(f"{path}: cube file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise GpusmdError(f"{path}: cannot read it as HDF5 ({e})") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise GpusmdError(f"{path}: not a cube file (root attribute format is "
                              f"{f.attrs.get('format')!r})")
        data, exps = {}, {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data[name] = obj[()]
                if "exp" in obj.attrs:
                    exps[name] = int(obj.attrs["exp"])
        f.visititems(visit)
        return {"data": data, "attrs": dict(f.attrs), "exp": exps}


def load_cube(path) -> dict:
    """A cube file as :func:`make_cube` returns it (``cube``, ``images``, ``attrs``)."""
    c = read_cube(path)
    data, attrs = c["data"], c["attrs"]
    if int(attrs.get("format_version", 0)) < 2:
        raise GpusmdError(f"{path}: a cube of format version "
                          f"{attrs.get('format_version')}, without exact sums: make it again")
    names = [str(v) for v in np.atleast_1d(attrs["bin_vars"])]
    cube = CubeSums([(name, data[f"binning/{name}"]) for name in names])
    cube.counts = np.asarray(data["nEntries"], np.int64).reshape(-1)
    cube.n_selected = int(attrs.get("n_selected", 0))
    images = {}
    for name in data:
        if not name.startswith("sum/"):
            continue
        key = name[4:]
        value = data[name]
        row = value.shape[len(cube.shape):]
        if f"exact/sum/{key}" not in data:
            images[key] = value.reshape(cube.n_bins, *row)
            continue
        count = data.get(f"count/{key}")
        if count is None:
            count = cube.counts.reshape(cube.n_bins, *([1] * len(row))) \
                + np.zeros((cube.n_bins, *row), np.int64)
        cube.sums[key], cube.squares[key] = (
            ExactSum.from_file(data[f"exact/{g}/{key}"], c["exp"][f"exact/{g}/{key}"])
            for g in ("sum", "sum_square"))
        cube.finite[key] = np.asarray(count, np.int64).reshape(cube.n_bins, *row)
        cube.row_shapes[key] = tuple(row)
    return {"cube": cube, "images": images, "attrs": attrs}


def merge_cubes(paths) -> dict:
    """The cube of all the events of the cubes ``paths`` (same binning, same datasets):
    counts and exact sums added, so that it is the cube made of all their small-data
    files at once (its sums, sums of squares and means the same to the bit); the summed
    images added in float64, equal to that one's to float64 rounding."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise GpusmdError("no cube to add")
    total, first = None, None
    for path in paths:
        c = load_cube(path)
        cube = c["cube"]
        if total is None:
            total, first = c, path
            total["attrs"] = dict(c["attrs"])
            total["images"] = dict(c["images"])
            lists = {k: [str(v) for v in np.atleast_1d(c["attrs"].get(k, []))]
                     for k in ("smd_files", "raw_files")}
            selections, configs = [str(c["attrs"].get("selection", ""))], \
                [str(c["attrs"].get("config", ""))]
            continue
        t: CubeSums = total["cube"]
        if [n for n, _ in cube.bins] != [n for n, _ in t.bins] or any(
                not np.array_equal(a, b) for (_, a), (_, b) in zip(cube.bins, t.bins)):
            raise GpusmdError(f"{path}: binned otherwise than {first}")
        if (cube.sums.keys() != t.sums.keys() or c["images"].keys() != total["images"].keys()
                or any(cube.row_shapes[k] != t.row_shapes[k] for k in cube.sums)
                or any(v.shape != total["images"][k].shape for k, v in c["images"].items())):
            raise GpusmdError(f"{path}: holds other datasets than {first}")
        t.add(cube)
        for key, value in c["images"].items():
            total["images"][key] = total["images"][key] + value
        for k in lists:
            lists[k] += [str(v) for v in np.atleast_1d(c["attrs"].get(k, []))]
        selections.append(str(c["attrs"].get("selection", "")))
        configs.append(str(c["attrs"].get("config", "")))
    t = total["cube"]
    total["attrs"].update(lists)
    total["attrs"].update({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "selection": selections[0] if len(set(selections)) == 1 else " ; ".join(selections),
        "config": configs[0] if len(set(configs)) == 1 else "\n---\n".join(configs),
        "n_events": int(t.counts.sum()), "n_selected": int(t.n_selected),
        "merged_from": [str(p) for p in paths],
        "gpusmd_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return total


def add_cubes(paths) -> dict:
    """The cubes ``paths`` added (:func:`merge_cubes`) as {dataset path: array}: nEntries,
    and of every per-event dataset sum/, sum_square/, mean/ (rounded once from the exact
    sums) and count/; the summed images (float64) in sum/ and mean/ too."""
    total = merge_cubes(paths)
    cube = total["cube"]
    return {**cube.datasets(), **image_datasets(total["images"], cube.counts, cube.shape)}
