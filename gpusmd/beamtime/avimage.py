"""An average image of a run (smalldata_tools' AvImage / plotAvImage).

:func:`average_image` calibrates the first ``n_events`` selected events of one detector
with the project's own per-detector processing (the config's constants, common mode and
mask; gpusmd.processor) on the chosen backend and reduces them to a mean, max, median
or std image (std: the population standard deviation, numpy's ``std``, as AvImage).
The mean, std and max come from the run-sum accumulators of gpusmd.features.sums (float64
sums in event order, the numbers of a replay's ``/Sums/<det>_calib``); the median needs
the frames, held on the host.

The file it writes (:func:`write_avimage`, read back by :class:`AvImage`) holds all the
next steps need, raw-shaped (the detector's raw shape) unless said otherwise::

    /image                  the chosen statistic, float32
    /mean, /std, /max       float32 (and /median when it was asked for)
    /x, /y, /z              pixel coordinates (um) of the detector's geometry
    /mask                   uint8, 1 = good: the mask the calibration applied
    /status                 (ngain, *shape) pixel status of the constants
    /event_id               the events averaged
    /assembled/image        (H, W) float32: /image placed by the coordinates, NaN in gaps
    /assembled/row, col     (*shape) int32: each pixel's place in the assembled image
    root attributes         format = "gpusmd-avimage", format_version, detector, type, stat,
                            n_events, selection, units, pixel_size_um, xmin_um, ymin_um,
                            source, run, experiment, config, config_file, backend,
                            gpusmd_version, created

The assembled image follows DESIGN §7 (gpusmd.geometry.assemble): row = (x - xmin +
p/2) / p along x, col = (y - ymin + p/2) / p along y, as psana's det.raw.image.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from .. import __version__
from ..backend import Backend, get_backend
from ..config import Config
from ..errors import GpusmdError
from ..features.sums import RunSums
from ..geometry import assemble, detector_coords, image_index
from ..io.output import check_new_output, written_h5, written_whole
from ..io.source import open_run
from ..replay import build_processors
from ..runinfo import RunInfo
from .select import Selection

FORMAT = "gpusmd-avimage"
FORMAT_VERSION = 1
STATS = ("mean", "max", "median", "std")
# the datasets AvImage reads: its field -> the file's dataset
DATASETS = {"image": "image", "x": "x", "y": "y", "z": "z", "mask": "mask", "status": "status",
            "row": "assembled/row", "col": "assembled/col"}


def choose_detector(config: Config, name: str | None) -> str:
    """The detector to average: ``name``, or the config's only one."""
    if name is None:
        if len(config.detectors) != 1:
            raise GpusmdError(f"{config.source}: configures {len(config.detectors)} detectors "
                              f"({', '.join(config.detectors)}); name one with --detector")
        return next(iter(config.detectors))
    if name not in config.detectors:
        raise GpusmdError(f"{config.source}: detector {name!r} is not configured (it has: "
                          f"{', '.join(config.detectors)})")
    return name


def calibration_processors(config: Config, run, detectors, backend: Backend) -> dict:
    """The config's processing of ``detectors`` of an open run, calibration only (its
    functions and sums are left out: the calibrated frames are all that is needed)."""
    dets = {det: dataclasses.replace(config.detectors[det], functions=[], sums=[])
            for det in detectors}
    return build_processors(dataclasses.replace(config, detectors=dets),
                            RunInfo.from_run(run, detectors=list(detectors)), backend)


def average_image(source, config: Config, detector: str | None = None, n_events: int = 100,
                  selection: Selection | None = None, stat: str = "mean",
                  backend: Backend | None = None, batch_size: int | None = None,
                  progress: bool = True) -> dict:
    """The statistics image of the first ``n_events`` events of ``source`` that pass
    ``selection`` (see the module docstring); returns the arrays and attributes that
    :func:`write_avimage` writes."""
    if stat not in STATS:
        raise GpusmdError(f"unknown statistic {stat!r} (known: {', '.join(STATS)})")
    if n_events < 1:
        raise GpusmdError(f"the number of events must be at least 1, got {n_events}")
    det = choose_detector(config, detector)
    selection = selection or Selection()
    backend = backend or get_backend(config=config.backend)
    batch = batch_size or config.batch_size
    with open_run(source, [det]) as run:
        selection.check(run.scalar_dtypes, str(run.source))
        proc = calibration_processors(config, run, [det], backend)[det]
        shape = proc.model.shape
        sums = RunSums(["calib", "calib_square", "calib_max"], shape, backend)
        frames = np.empty((n_events, *shape), np.float32) if stat == "median" else None
        event_ids = []
        total = n_events if run.n_events is None else min(n_events, run.n_events)
        with tqdm(total=total, unit="ev", disable=not progress, desc=f"{det} {stat}") as bar:
            for b in run.batches(batch, detectors=[det], one_step=True):
                keep = selection(b.scalars, len(b))
                keep[np.cumsum(keep) > n_events - len(event_ids)] = False
                if not keep.any():
                    continue
                calib, _ = proc.calibrate(b.frames[det][keep], int(b.steps[det][0]))
                sums.update(calib)
                if frames is not None:
                    frames[len(event_ids):len(event_ids) + int(keep.sum())] = \
                        backend.to_host(calib)
                event_ids.extend(b.event_id[keep].tolist())
                bar.update(int(keep.sum()))
                if len(event_ids) >= n_events:
                    break
        experiment, run_number, src = run.experiment, run.run, str(run.source)
    n = len(event_ids)
    if n == 0:
        raise GpusmdError(f"{source}: no event passes the selection {str(selection)!r}"
                          if selection else f"{source}: the run has no events")
    acc = {key: backend.to_host(value) for key, value in sums.acc.items()}
    mean = acc["calib"] / n
    var = np.maximum(acc["calib_square"] / n - mean * mean, 0.0)
    images = {"mean": mean.astype(np.float32), "std": np.sqrt(var).astype(np.float32),
              "max": acc["calib_max"].astype(np.float32)}
    if frames is not None:
        images["median"] = np.median(frames[:n], axis=0).astype(np.float32)
    x, y, z = (np.asarray(c, np.float64) for c in detector_coords(proc.model))
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "detector": det,
             "type": proc.model.type, "stat": stat, "n_events": n, "selection": str(selection),
             "units": proc.units, "pixel_size_um": float(proc.model.pixel_size_um),
             "xmin_um": float(x.min()), "ymin_um": float(y.min()), "source": src,
             "run": int(run_number), "experiment": experiment, "config": config.text,
             "config_file": str(config.source), "backend": backend.name,
             "geometry_file": proc.geometry_file, "gpusmd_version": __version__,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if n < n_events:
        attrs["n_events_asked"] = int(n_events)
    return {"images": images, "x": x, "y": y, "z": z,
            "mask": np.asarray(proc.masks[proc.cfg.mask], np.uint8),
            "status": np.asarray(proc.constants.status), "event_id": np.asarray(event_ids, np.int64),
            "attrs": attrs}


def write_avimage(path, result: dict, force: bool = False) -> Path:
    """The file of the module docstring, written whole or not at all."""
    path = check_new_output(path, force)
    attrs = result["attrs"]
    images = result["images"]
    image = images[attrs["stat"]]
    x, y, p = result["x"], result["y"], attrs["pixel_size_um"]
    rows, cols = image_index(x, y, p)
    nbytes = image.nbytes + sum(np.asarray(v).nbytes for v in (
        *images.values(), *(result[k] for k in ("x", "y", "z", "mask", "status", "event_id"))))
    with written_h5(path, nbytes) as f:         # room for its arrays first
        f.create_dataset("image", data=image)
        for key, value in images.items():
            f.create_dataset(key, data=value)
        for key in ("x", "y", "z", "mask", "status", "event_id"):
            f.create_dataset(key, data=result[key])
        g = f.create_group("assembled")
        g.create_dataset("image", data=assemble(image, x, y, p))
        g.create_dataset("row", data=rows.astype(np.int32))
        g.create_dataset("col", data=cols.astype(np.int32))
        f.attrs.update(attrs)
    return path


@dataclass
class AvImage:
    """An average-image file (module docstring), read whole."""
    path: Path
    image: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    mask: np.ndarray
    status: np.ndarray
    row: np.ndarray
    col: np.ndarray
    attrs: dict

    @property
    def pixel_size_um(self) -> float:
        return float(self.attrs["pixel_size_um"])

    @property
    def detector(self) -> str:
        return str(self.attrs["detector"])

    @property
    def shape(self) -> tuple:
        return self.image.shape

    @classmethod
    def load(cls, path) -> "AvImage":
        path = Path(path)
        if not path.exists():
            raise GpusmdError(f"{path}: average-image file not found (make one with "
                              f"`gpusmd avimage`)")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise GpusmdError(f"{path}: not an average-image file (root attribute "
                                      f"format is {f.attrs.get('format')!r}, not {FORMAT!r})")
                missing = [name for name in DATASETS.values() if name not in f]
                if missing:
                    raise GpusmdError(f"{path}: missing /{missing[0]}")
                arrays = {key: f[name][()] for key, name in DATASETS.items()}
                attrs = {k: (v.decode() if isinstance(v, bytes) else v)
                         for k, v in f.attrs.items()}
        except OSError as e:
            raise GpusmdError(f"{path}: cannot read it as HDF5 ({e})") from None
        shape = arrays["image"].shape
        for key in ("x", "y", "z", "mask", "row", "col"):
            if arrays[key].shape != shape:
                raise GpusmdError(f"{path}: /{key} has shape {arrays[key].shape}, /image {shape}")
        return cls(path, attrs=attrs, **arrays)

    @property
    def assembled_shape(self) -> tuple:
        """(H, W) of the assembled image."""
        return int(self.row.max()) + 1, int(self.col.max()) + 1

    def assembled(self, values=None, fill=np.nan) -> np.ndarray:
        """A raw-shaped array (default the image) placed as the assembled image."""
        values = self.image if values is None else np.asarray(values)
        img = np.full(self.assembled_shape, fill, np.float32)
        img[self.row.ravel(), self.col.ravel()] = values.astype(np.float32).ravel()
        return img

    def to_image_px(self, x_um, y_um):
        """Detector coordinates (um) -> (row, col) of the assembled image (fractional)."""
        p = self.pixel_size_um
        return ((np.asarray(x_um) - float(self.attrs["xmin_um"])) / p,
                (np.asarray(y_um) - float(self.attrs["ymin_um"])) / p)

    def to_um(self, row, col):
        """(row, col) of the assembled image -> detector coordinates x, y (um)."""
        p = self.pixel_size_um
        return (float(self.attrs["xmin_um"]) + np.asarray(row, np.float64) * p,
                float(self.attrs["ymin_um"]) + np.asarray(col, np.float64) * p)


def figure(img: np.ndarray, title: str, percentile=(1.0, 99.5)):
    """A matplotlib figure (Agg, no pyplot, no display) of an assembled image, colour
    limits at percentiles of its finite values (as plotAvImage's clim); returns (fig, ax)."""
    from .plot import _figure
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, percentile) if finite.size else (0.0, 1.0)
    fig = _figure((7, 6.5), layout=None)
    ax = fig.add_subplot()
    shown = ax.imshow(img, origin="upper", interpolation="none", cmap="viridis",
                      vmin=lo, vmax=hi if hi > lo else lo + 1)
    fig.colorbar(shown, ax=ax, shrink=0.8)
    ax.set_xlabel("column (y)")
    ax.set_ylabel("row (x)")
    ax.set_title(title, fontsize=9)
    return fig, ax


def save_figure(fig, path, force: bool = False) -> Path:
    path = check_new_output(path, force)
    with written_whole(path) as part:
        fig.savefig(part, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def plot_avimage(av: AvImage, path, force: bool = False) -> Path:
    a = av.attrs
    title = (f"{a['detector']} ({a['type']}) {a['stat']} of {a['n_events']} events"
             + (f" [{a['selection']}]" if a.get("selection") else "")
             + f", {a.get('units', '')}\n{Path(str(a.get('source', ''))).name}")
    fig, _ = figure(av.assembled(), title)
    return save_figure(fig, path, force)
