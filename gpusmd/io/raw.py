"""The raw run file format (one HDF5 file per run; see README "Raw file format").

    /event_id                    (N,) int64
    /timestamp                   (N,) int64 ns
    /<det>/raw                   (N, *shape) detector dtype, one event per chunk;
                                 attrs: type (detector type), shape for cameras
    /<det>/config/pixel_config   (nstep, *shape) uint8   epix10k g (4) / ga (8) bits
    /<det>/config/trbit          (nstep, nseg, 4) uint8  epix10k ASIC trbit
    /<det>/config/step           (N,) int32 config step of each event (default 0)
    /<group>/<name>              (N,) per-event scalars, passed through to the output
    /truth/...                   simulator ground truth (never read by the pipeline)
root attrs: format = "gpusmd-raw", format_version = 1, experiment, run.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..detectors import DetectorModel, epix10k_control_bits, get_detector
from ..errors import GpusmdError, RawFileError
from .h5 import open_h5
from .source import EventBatch, step_split

FORMAT = "gpusmd-raw"
FORMAT_VERSION = 1
RESERVED_GROUPS = ("truth",)


class RawRun:
    """An open raw run: its events, detectors and per-event scalars, validated."""

    def __init__(self, path):
        self.path = Path(path)
        self.source, self.name = str(self.path), self.path.name
        self._h5 = open_h5(self.path, "raw file", RawFileError)
        try:
            self._load()
        except GpusmdError:
            self._h5.close()
            raise

    def _load(self):
        f = self._h5
        for key in ("event_id", "timestamp"):
            if key not in f:
                raise RawFileError(f"{self.path}: missing /{key}")
        self.event_id = f["event_id"][()].astype(np.int64)
        self.timestamp = f["timestamp"][()].astype(np.int64)
        self.n_events = len(self.event_id)
        if len(self.timestamp) != self.n_events:
            raise RawFileError(f"{self.path}: /timestamp has {len(self.timestamp)} entries, "
                               f"/event_id {self.n_events}")
        if np.any(np.diff(self.event_id) <= 0):
            raise RawFileError(f"{self.path}: /event_id is not strictly increasing")
        self.experiment = str(f.attrs.get("experiment", ""))
        self.run = int(f.attrs.get("run", 0))
        self.detectors: dict[str, DetectorModel] = {}
        self._steps: dict[str, np.ndarray] = {}
        self.scalars: dict[str, np.ndarray] = {}
        for name, obj in f.items():
            if not isinstance(obj, h5py.Group) or name in RESERVED_GROUPS:
                continue
            if "raw" in obj:
                self.detectors[name] = self._check_detector(name, obj)
                continue
            for key, ds in obj.items():
                if isinstance(ds, h5py.Dataset) and ds.shape == (self.n_events,):
                    self.scalars[f"{name}/{key}"] = ds[()]

    def _check_detector(self, name, group) -> DetectorModel:
        ds = group["raw"]
        type_ = ds.attrs.get("type")
        if type_ is None:
            raise RawFileError(f"{self.path}: /{name}/raw has no 'type' attribute")
        type_ = type_.decode() if isinstance(type_, bytes) else str(type_)
        try:
            model = get_detector(type_, ds.shape[1:] if type_ == "camera" else None)
        except GpusmdError as e:
            raise RawFileError(f"{self.path}: /{name}/raw: {e}") from None
        if ds.shape[1:] != model.shape:
            raise RawFileError(f"{self.path}: /{name}/raw has frames of shape {ds.shape[1:]}, "
                               f"but a {type_} has {model.shape}")
        if ds.dtype != np.dtype(model.dtype):
            raise RawFileError(f"{self.path}: /{name}/raw has dtype {ds.dtype}, "
                               f"but a {type_} has {model.dtype}")
        if ds.shape[0] != self.n_events:
            raise RawFileError(f"{self.path}: /{name}/raw has {ds.shape[0]} events, "
                               f"/event_id {self.n_events}")
        if model.family == "epix10k":
            for key in ("pixel_config", "trbit"):
                if f"config/{key}" not in group:
                    raise RawFileError(f"{self.path}: /{name}/config/{key} is missing "
                                       f"(epix10k gain decoding needs it)")
        return model

    # ---- access ----------------------------------------------------------------------
    @property
    def scalar_dtypes(self) -> dict[str, np.dtype]:
        return {n: v.dtype for n, v in self.scalars.items()}

    def batches(self, batch_size: int, max_events: int | None = None, detectors=None,
                one_step: bool = False, first: int = 0):
        """The events in order as EventBatch objects of at most ``batch_size`` events,
        from event ``first`` to event ``max_events`` (the run's end when None); with
        ``one_step`` a batch never spans two configuration steps of a detector."""
        dets = list(self.detectors) if detectors is None else list(detectors)
        n = self.n_events if max_events is None else min(max_events, self.n_events)
        steps = {d: self.steps(d) for d in dets}
        start = first
        while start < n:
            stop = min(n, start + batch_size)
            if one_step:
                stop = step_split(steps, start, stop)
            yield EventBatch(start, self.event_id[start:stop], self.timestamp[start:stop],
                             {k: v[start:stop] for k, v in self.scalars.items()},
                             {d: self.read(d, start, stop) for d in dets},
                             {d: s[start:stop] for d, s in steps.items()})
            start = stop

    def read(self, det: str, start: int, stop: int) -> np.ndarray:
        """Raw frames of events [start, stop) of one detector."""
        return self._h5[det]["raw"][start:stop]

    def steps(self, det: str) -> np.ndarray:
        """Configuration step of each event (all 0 for a data run with one config); read
        from the file once."""
        if det not in self._steps:
            g = self._h5[det]
            self._steps[det] = (g["config/step"][()].astype(np.int64) if "config/step" in g
                                else np.zeros(self.n_events, np.int64))
        return self._steps[det]

    def epix10k_config(self, det: str, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_config (nseg, 352, 384), trbit (nseg, 4)) of an epix10k config step."""
        cfg = self._h5[det]["config"]
        n = len(cfg["pixel_config"])
        if not 0 <= step < n:
            raise RawFileError(f"{self.path}: /{det}/config has no configuration step {step} "
                               f"(it has {n})")
        return cfg["pixel_config"][step], cfg["trbit"][step]

    def control_bits(self, det: str, step: int = 0) -> np.ndarray | None:
        """epix10k per-pixel control bits of a config step; None for other detectors."""
        if self.detectors[det].family != "epix10k":
            return None
        return epix10k_control_bits(*self.epix10k_config(det, step))

    def step_control_bits(self, det: str) -> dict[int, np.ndarray]:
        """{step: control bits} of every step the run's events use (epix10k; else {})."""
        if self.detectors[det].family != "epix10k":
            return {}
        return {int(s): self.control_bits(det, int(s)) for s in np.unique(self.steps(det))}

    def close(self):
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
