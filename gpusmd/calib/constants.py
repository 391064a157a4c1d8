"""Calibration constants of one detector and their HDF5 file.

    /<det>/{pedestal, rms, gain, offset, status, mask}   (ngain, *shape) float32
    /<det> attrs: type, run_min, run_max (runs the constants are valid for), source
root attrs: format = "gpusmd-constants", format_version = 1
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..detectors import DetectorModel, get_detector
from ..errors import ConstantsError
from ..io.h5 import open_h5
from ..io.output import WriteError, failure_reason, h5_writes

FORMAT = "gpusmd-constants"
FIELDS = ("pedestal", "rms", "gain", "offset", "status", "mask")
RUN_ANY = -1      # run_max of constants valid for every later run
NON_FINITE = 256  # status bit: a constant of the pixel was NaN or infinite


@dataclass
class Constants:
    model: DetectorModel
    pedestal: np.ndarray        # (ngain, *shape) ADU
    rms: np.ndarray             # (ngain, *shape) ADU
    gain: np.ndarray            # (ngain, *shape) ADU per unit (keV for multi-gain)
    offset: np.ndarray          # (ngain, *shape) ADU
    status: np.ndarray          # (ngain, *shape) status bits (DESIGN §5), 0 = good
    mask: np.ndarray            # (ngain, *shape) user pixel mask, 1 = good
    run_min: int = 0
    run_max: int = RUN_ANY
    source: str = ""
    attrs: dict = field(default_factory=dict)

    @classmethod
    def default(cls, model: DetectorModel, pedestal=None, rms=None) -> "Constants":
        """Constants with the model's default gains, zero offsets, all pixels good."""
        shape = (model.ngain, *model.shape)
        gain = np.broadcast_to(np.asarray(model.default_gain, np.float32)
                               .reshape(-1, *([1] * len(model.shape))), shape).copy()
        zeros = np.zeros(shape, np.float32)
        return cls(model,
                   pedestal=zeros.copy() if pedestal is None else np.asarray(pedestal, np.float32),
                   rms=np.ones(shape, np.float32) if rms is None else np.asarray(rms, np.float32),
                   gain=gain, offset=zeros.copy(), status=zeros.copy(),
                   mask=np.ones(shape, np.float32))

    def flag_non_finite(self, where: str) -> int:
        """Pixels whose pedestal, offset, gain or rms is NaN or infinite in a gain range
        get status bit NON_FINITE and 0 for those values there (gain 0: the pixel reads 0);
        returns how many pixels. Constants with no finite pixel at all are refused."""
        bad = np.zeros(self.pedestal.shape, bool)
        for name in ("pedestal", "offset", "gain", "rms"):
            bad |= ~np.isfinite(getattr(self, name))
        if not bad.any():
            return 0
        if bad.all():
            raise ConstantsError(f"{where}: every value of the constants is NaN or infinite")
        for name in ("pedestal", "offset", "gain", "rms"):
            setattr(self, name, np.where(bad, np.float32(0), getattr(self, name)))
        self.status = np.where(bad, np.asarray(self.status, np.int64) | NON_FINITE,
                               self.status).astype(np.float32)
        return int(bad.any(axis=0).sum())

    def status_mask(self) -> np.ndarray:
        """1 where the pixel is good in every gain range (DESIGN §5 'status')."""
        return (self.status == 0).all(axis=0).astype(np.uint8)

    def valid_for(self, run: int) -> bool:
        return self.run_min <= run and (self.run_max == RUN_ANY or run <= self.run_max)

    # ---- file -------------------------------------------------------------------------
    def save(self, path, det: str, mode: str = "a"):
        """Write /<det> into ``path``. A full disk (or another failed write) raises one
        WriteError naming the file, which is then left unfinished: write to a temporary
        name and rename it when done (as ``gpusmd dark`` does) for a file that is either
        complete or absent."""
        arrays = {name: np.asarray(getattr(self, name), np.float32) for name in FIELDS}
        try:
            f = h5py.File(path, mode)
        except OSError as e:
            raise WriteError(path, f"cannot write it ({failure_reason(e)})") from None
        with h5_writes(f, path):
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = 1
            if det in f:
                del f[det]
            g = f.create_group(det)
            # kept open until the flush, where a failed write is raised
            datasets = [g.create_dataset(name, data=a, compression="gzip", compression_opts=1)
                        for name, a in arrays.items()]
            g.attrs.update({"type": self.model.type, "run_min": self.run_min,
                            "run_max": self.run_max, "source": self.source, **self.attrs})
            f.flush()
            f.close()

    @classmethod
    def load(cls, path, det: str, model: DetectorModel | None = None) -> "Constants":
        path = Path(path)
        with open_h5(path, "constants file", ConstantsError) as f:
            if det not in f:
                raise ConstantsError(f"{path}: no constants for detector {det!r} "
                                     f"(has: {', '.join(f) or 'nothing'})")
            g = f[det]
            type_ = g.attrs.get("type", model.type if model else None)
            if model is None:
                model = get_detector(type_, g["pedestal"].shape[1:] if type_ == "camera" else None)
            elif type_ != model.type:
                raise ConstantsError(f"{path}: /{det} holds constants of a {type_}, "
                                     f"not of a {model.type}")
            arrays = {}
            expected = (model.ngain, *model.shape)
            for name in FIELDS:
                if name not in g:
                    raise ConstantsError(f"{path}: /{det}/{name} is missing")
                if g[name].shape != expected:
                    raise ConstantsError(f"{path}: /{det}/{name} has shape {g[name].shape}, "
                                         f"expected {expected}")
                arrays[name] = np.asarray(g[name][()], np.float32)
            extra = {k: v for k, v in g.attrs.items()
                     if k not in ("type", "run_min", "run_max", "source")}
            return cls(model, **arrays, run_min=int(g.attrs.get("run_min", 0)),
                       run_max=int(g.attrs.get("run_max", RUN_ANY)),
                       source=str(g.attrs.get("source", "")), attrs=extra)
