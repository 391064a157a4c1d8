"""Cubes: per-event data binned by a scan variable or any per-event column
(smalldata_tools' makeCubeData; its bins are left-closed, [e_i, e_i+1), events outside
every bin left out, as its ``groupby_bins(..., right=False)``).

From small-data files (gpusmd.io.output) every per-event numeric dataset is summed per
bin (``/sum/<key>``, float64, NaN values left out) with its sum of squares
(``/sum_square/<key>``); from the raw runs the files were made of (``raw`` and a config)
the calibrated frames of the config's detectors, by the project's own calibration, are
summed per bin too (``/sum/<det>/calib``, raw-shaped). Several ``--bin`` give a cube of
several dimensions. Counts and sums are what adds up: the cube of several runs is the sum
of theirs (:func:`add_cubes`), to float64 rounding. The means are written for reading
(``/mean/<key>`` = sum / count, NaN in empty bins), never added.

File::

    /nEntries               (*nbins) int64 events per bin
    /binning/<var>          the edges of each binning variable (root attribute bin_vars:
                            their names in order)
    /sum/<key>, /sum_square/<key>, /mean/<key>      (*nbins, *row shape)
    /count/<key>            finite values per bin and element, where NaN were left out
    root attributes         format = "gpusmd-cube", format_version, bin_vars, selection,
                            smd_files, raw_files, n_events (binned), n_selected
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
from ..io.output import check_new_output, open_small_data, written_whole
from ..io.source import open_run
from .avimage import calibration_processors
from .select import Selection

FORMAT = "gpusmd-cube"
FORMAT_VERSION = 1
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


class CubeSums:
    """Counts and sums per bin, to be filled from one run after the other."""

    def __init__(self, bins):
        self.bins = list(bins)
        self.shape = tuple(len(e) - 1 for _, e in self.bins)
        self.n_bins = int(np.prod(self.shape))
        self.counts = np.zeros(self.n_bins, np.int64)
        self.sums: dict[str, np.ndarray] = {}
        self.squares: dict[str, np.ndarray] = {}
        self.finite: dict[str, np.ndarray] = {}
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
        inside = flat >= 0
        rows = values[inside].reshape(int(inside.sum()), -1).astype(np.float64)
        where = flat[inside]
        bad = ~np.isfinite(rows)
        rows = np.where(bad, 0.0, rows)
        s = np.zeros((self.n_bins, rows.shape[1]))
        q = np.zeros_like(s)
        np.add.at(s, where, rows)
        np.add.at(q, where, rows * rows)
        shape = values.shape[1:]
        self._add(self.sums, key, s.reshape(self.n_bins, *shape))
        self._add(self.squares, key, q.reshape(self.n_bins, *shape))
        c = np.zeros_like(s)
        np.add.at(c, where, (~bad).astype(np.float64))
        self._add(self.finite, key, c.reshape(self.n_bins, *shape))

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
              batch_size: int | None = None, progress: bool = True) -> dict:
    """The cube of the small-data files ``smd_paths`` (module docstring); ``raw_paths``
    (one per small-data file, with ``config``): also the calibrated frames per bin;
    ``keys``: only the per-event datasets starting with one of these."""
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
                                         backend, batch_size, progress).items():
                CubeSums._add(images, det, value)
    return {"cube": cube, "images": images, "attrs": {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "bin_vars": [name for name, _ in bins], "selection": str(selection),
        "smd_files": [str(p) for p in smd_paths], "raw_files": [str(p) for p in raw_paths],
        "n_events": int(cube.counts.sum()), "n_selected": int(cube.n_selected),
        "config": config.text if config is not None else "",
        "gpusmd_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}


def bin_frames(raw, config: Config, event_ids, flat, n_bins, backend=None, batch_size=None,
               progress=True) -> dict[str, np.ndarray]:
    """Sums per bin of the calibrated frames of the config's detectors, the events of the
    raw run matched to the small-data file's by event id."""
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
        with tqdm(total=n_wanted, unit="ev", disable=not progress,
                  desc=f"cube {Path(str(raw)).name}") as bar:
            for b in run.batches(batch_size or config.batch_size, detectors=dets,
                                 one_step=True):
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
    if found != n_wanted:
        raise GpusmdError(f"{raw}: holds {found} of the {n_wanted} binned events of the "
                          f"small-data file (is it the run the file was made of?)")
    return {f"{det}/calib": backend.to_host(s) for det, s in sums.items()}


def write_cube(path, result: dict, force: bool = False) -> Path:
    path = check_new_output(path, force)
    cube: CubeSums = result["cube"]
    shape = cube.shape
    counts = cube.counts.reshape(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as part, h5py.File(part, "w") as f:
        f.create_dataset("nEntries", data=counts)
        for name, edges in cube.bins:
            f.create_dataset(f"binning/{name}", data=edges)
        stores = [("sum", cube.sums), ("sum_square", cube.squares), ("sum", result["images"])]
        for group, store in stores:
            for key, value in store.items():
                f.create_dataset(f"{group}/{key}", data=value.reshape(*shape, *value.shape[1:]))
        for key, value in {**cube.sums, **result["images"]}.items():
            n = cube.counts.reshape(-1, *([1] * (value.ndim - 1)))
            if key in cube.finite and not np.array_equal(cube.finite[key], n + 0 * value):
                n = cube.finite[key]          # NaN values were left out
                f.create_dataset(f"count/{key}", data=n.reshape(*shape, *value.shape[1:]))
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(n > 0, value / np.maximum(n, 1), np.nan)
            f.create_dataset(f"mean/{key}", data=mean.reshape(*shape, *value.shape[1:]))
        f.attrs.update(result["attrs"])
    return path


def read_cube(path) -> dict:
    """{dataset path: array} and the attributes of a cube file."""
    path = Path(path)
    if not path.exists():
        raise GpusmdError(f"{path}: cube file not found")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise GpusmdError(f"{path}: not a cube file (root attribute format is "
                              f"{f.attrs.get('format')!r})")
        data = {}
        f.visititems(lambda name, obj: data.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
        return {"data": data, "attrs": dict(f.attrs)}


def add_cubes(paths) -> dict:
    """The counts and sums of several cubes of the same binning added (the cube of all
    their events); {dataset path: array} of nEntries, sum/, sum_square/, count/."""
    total, first = None, None
    for path in paths:
        c = read_cube(path)
        data = c["data"]
        edges = {k: v for k, v in data.items() if k.startswith("binning/")}
        additive = {k: v for k, v in data.items()
                    if k == "nEntries" or k.split("/")[0] in ("sum", "sum_square")}
        for k in [k for k in additive if k.startswith("sum/")]:    # counts of every key
            count = data.get("count/" + k[4:])
            if count is None:
                nd = additive[k].ndim - data["nEntries"].ndim
                count = data["nEntries"].reshape(data["nEntries"].shape + (1,) * nd) \
                    + np.zeros_like(additive[k])
            additive["count/" + k[4:]] = count
        if total is None:
            total, first = additive, (path, edges)
            continue
        if edges.keys() != first[1].keys() or any(not np.array_equal(edges[k], first[1][k])
                                                  for k in edges):
            raise GpusmdError(f"{path}: binned otherwise than {first[0]}")
        if additive.keys() != total.keys():
            raise GpusmdError(f"{path}: holds other datasets than {first[0]}")
        for k, v in additive.items():
            total[k] = total[k] + v
    return total
