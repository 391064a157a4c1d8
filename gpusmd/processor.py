"""The per-detector processing of a run: calibrate -> mask -> features -> sums.

One DetectorProcessor serves the in-process replay and the service worker alike: it
takes batches of raw frames and returns per-event results as NumPy arrays."""
from __future__ import annotations

import logging

import numpy as np

from .backend import Backend
from .calib.calibrate import Calibrator, build_lut
from .calib.common_mode import (CM_GAIN_RANGES, CommonMode, default_code, raw_frames,
                                raw_output, resolve)
from .calib.constants import NON_FINITE, RUN_ANY, Constants
from .calib.masks import load_user_mask, pixel_masks
from .config import DetectorConfig
from .detectors import DetectorModel
from .errors import ConfigError, ConstantsError, FrameError, GpusmdError
from .features import FEATURES, Ragged
from .features.sums import RunSums
from .geometry import (PSANA_DEFAULT, detector_coords, psana_default_file, read_geometry,
                       with_geometry)

log = logging.getLogger("gpusmd.processor")


def frame_rms(constants: Constants, convention: str = "divide") -> np.ndarray:
    """The pixel noise in the units of the calibrated frames: the rms (ADU) of gain range
    0 converted as the calibration converts a frame in gain range 0 (/ gain with
    ``divide``, x gain with ``multiply``, as is with ``none``; 0 where the gain is 0).

    One map per run, as smalldata_tools (rms[0] / gain[0]): thresholds in rms units count
    the noise of the high gain, the range of the dim pixels a threshold decides on."""
    shape = constants.rms[0].shape
    scale = build_lut(constants, np.ones(shape, np.float32), convention)[0, :, 1]
    return constants.rms[0] * scale.reshape(shape)


def build_feature(f, model, masks, backend, rms=None, parent=None):
    """One configured function, on the detector's frames or on ``parent``'s output; kinds
    that threshold in noise units get ``rms``, the noise in the units of the frames (see
    frame_rms), cut as the parent cuts its frames (an ROI's noise for a function on the
    ROI, as smalldata_tools' ROIFunc.addFunc hands it on)."""
    cls = FEATURES[f.kind]
    extra = {}
    if cls.accepts_rms:
        extra["rms"] = rms if parent is None else parent.child_map(rms)
    return cls(f.name, f.params, model, masks, backend, f.where,
               input_shape=None if parent is None else parent.output_shape, **extra)


def configured_geometry(cfg: DetectorConfig, model: DetectorModel):
    """(the model with the pixel coordinates of the detector's ``geometry:``, the file
    used). A psana file is read and checked against the detector here, before any output;
    a .poni leaves the coordinates as they are (the config handed it to the azav)."""
    if cfg.geometry is None:
        return model, ""
    if cfg.geometry != PSANA_DEFAULT and cfg.geometry.suffix.lower() == ".poni":
        return model, str(cfg.geometry)
    try:
        path = psana_default_file(model.type) if cfg.geometry == PSANA_DEFAULT else cfg.geometry
        geometry = read_geometry(path, model, f"detector {cfg.name!r} (type {model.type})")
    except ConfigError as e:
        raise (cfg.where / "geometry").error(str(e)) from None
    return with_geometry(model, geometry, str(path)), str(path)


class DetectorProcessor:
    def __init__(self, cfg: DetectorConfig, model: DetectorModel, backend: Backend,
                 run: int | None = None, constants: Constants | None = None):
        """constants: where the config names no ``calib`` file, constants from elsewhere
        (psana's, for a psana run)."""
        if cfg.type is not None and cfg.type != model.type:
            raise (cfg.where / "type").error(f"config says {cfg.type}, the data hold a {model.type}")
        model, self.geometry_file = configured_geometry(cfg, model)
        self.cfg, self.model, self.backend = cfg, model, backend
        if cfg.calib is not None or constants is not None:
            self.constants = (Constants.load(cfg.calib, cfg.name, model) if cfg.calib is not None
                              else constants)
            if run is not None and not self.constants.valid_for(run):
                last = "on" if self.constants.run_max == RUN_ANY else self.constants.run_max
                raise ConstantsError(f"{cfg.calib}: constants of {cfg.name!r} are valid for runs "
                                     f"{self.constants.run_min}-{last}, not for run {run}")
        elif model.multigain:
            raise (cfg.where / "calib").error(f"a {model.type} needs calibration constants "
                                              f"(make them with `gpusmd dark`)")
        else:
            self.constants = Constants.default(model)    # cameras: raw values, no pedestal
        # the code that runs: the config's, or the one smalldata recommends for the detector
        self.cm_code = default_code(model.family) if cfg.common_mode is None else cfg.common_mode
        self.raw_output = raw_output(model.family, self.cm_code)
        try:
            self.cmpars = resolve(model.family, self.cm_code,
                                  convention=cfg.common_mode_convention)
        except ValueError as e:
            raise (cfg.where / "common_mode").error(str(e)) from None
        flagged = self.constants.flag_non_finite(f"{cfg.calib or self.constants.source}: "
                                                 f"detector {cfg.name!r}")
        if flagged:
            log.warning("%s: %d pixels with NaN or infinite constants are masked (status %d)",
                        cfg.name, flagged, NON_FINITE)
        user = None
        if cfg.user_mask is not None:
            try:
                user = load_user_mask(cfg.user_mask, model.shape)
            except GpusmdError as e:
                raise (cfg.where / "userMask").error(str(e)) from None
        self.masks = pixel_masks(model, self.constants, cfg.mask_options, user)
        self._calibrator = None          # built at the first batch: a sink never needs it
        self._control_bits = {}
        self._common_mode = None
        self.features = []
        self.parents = {}                  # child name -> parent feature
        by_name = {}
        rms = None                         # the frames' noise, for the functions that take it
        for f in cfg.functions:
            parent = by_name.get(f.parent)
            if parent is not None and (parent.output_shape is None
                                       or not FEATURES[f.kind].takes(parent)):
                raise (f.where / "parent").error(f"a {f.kind} cannot take the output of "
                                                 f"{f.parent} ({parent.kind})")
            if rms is None and FEATURES[f.kind].accepts_rms:
                rms = frame_rms(self.constants, cfg.gain_convention)
            feature = build_feature(f, model, self.masks, backend, rms, parent)
            if parent is not None:
                self.parents[feature.name] = parent
            by_name[f.name] = feature
            self.features.append(feature)
        self.sums = RunSums(cfg.sums, model.shape, backend)

    @property
    def units(self) -> str:
        raw_adu = self.raw_output or self.cfg.gain_convention != "divide"
        return "ADU" if raw_adu else self.model.units

    @property
    def common_mode(self) -> CommonMode | None:
        if self.cmpars is not None and self._common_mode is None:
            self._common_mode = CommonMode(self.model, self.cmpars, self.constants.rms[0],
                                           self.backend.xp,
                                           "numba" if self.backend.compiled else None,
                                           rules=self.cfg.common_mode_rules)
        return self._common_mode

    @property
    def calibrator(self) -> Calibrator:
        if self._calibrator is None:
            self._calibrator = Calibrator(self.model, self.constants, self.masks[self.cfg.mask],
                                          self.backend, self.cfg.gain_convention,
                                          CM_GAIN_RANGES.get(self.model.family),
                                          self.cfg.common_mode_rules == "psana")
            for step, control_bits in self._control_bits.items():
                self._calibrator.set_control_bits(step, control_bits)
        return self._calibrator

    def set_control_bits(self, step: int, control_bits):
        self._control_bits[step] = control_bits
        if self._calibrator is not None:
            self._calibrator.set_control_bits(step, control_bits)

    def calibrate(self, raw, step: int = 0):
        """Raw frames (B, *shape) -> (calibrated frames on the backend, per-event
        common-mode statistics {"corrected", "skipped"}: empty without a common mode).
        On the CPU frame by frame, into the batch's output: the frame-sized arrays of one
        frame stay in the caches, where those of a batch do not (the same numbers; a
        batch of 8 was 1.5-2.5x slower per frame than frames one at a time)."""
        if self.backend.is_gpu or self.raw_output or len(raw) <= 1:
            return self._calibrate(raw, step)
        calib = np.empty(raw.shape, np.float32)
        stats: dict = {}
        for i in range(len(raw)):
            _, one = self._calibrate(raw[i:i + 1], step, calib[i:i + 1])
            for key, value in one.items():
                stats.setdefault(key, []).append(np.atleast_1d(value))
        return calib, {key: np.concatenate(parts) for key, parts in stats.items()}

    def _calibrate(self, raw, step: int = 0, out=None):
        if self.raw_output:
            return raw_frames(self.model, self.backend.xp.asarray(raw), self.cm_code,
                              self.backend.xp), {}
        if self.common_mode is None:
            return self.calibrator(raw, step, out), {}
        if self.common_mode.fused:         # mode 7 on a GPU: one pass over the raw frames
            return self.calibrator.with_common_mode(raw, step, self.common_mode)
        adu, scale, good = self.calibrator.split(raw, step)
        stats = self.common_mode(adu, good)
        calib = self.calibrator.apply_gain(raw, adu, scale, step,
                                           None if out is None else out.reshape(adu.shape))
        return calib.reshape(raw.shape), stats

    def process(self, raw: np.ndarray, step: int = 0) -> dict[str, np.ndarray]:
        """Raw frames (B, *shape) of one config step -> {"<func>_<field>": (B, ...)}."""
        if raw.shape[1:] != self.model.shape:
            raise FrameError(f"{self.cfg.name}: frames of shape {raw.shape[1:]}, "
                              f"a {self.model.type} has {self.model.shape}")
        out = {}
        calib, stats = self.calibrate(raw, step)
        on_backend = {f"common_mode_{key}": value for key, value in stats.items()}
        self.sums.update(calib)
        self.last_calib = calib            # for the user functions of the batch
        for feature in self.features:
            parent = self.parents.get(feature.name)
            data = calib if parent is None else parent.child_data
            for field, value in feature.process(data).items():
                if isinstance(value, Ragged):
                    out[f"var_{feature.name}"] = value.to_host(self.backend)
                else:
                    on_backend[f"{feature.name}_{field}"] = value
        out.update(self.backend.to_host_all(on_backend))   # one wait for all of them
        return out

    def user_data_cfg(self) -> dict:
        """What /UserDataCfg/<det>/ holds: constants, masks, coordinates, parameters."""
        c = self.constants
        x, y, z = detector_coords(self.model)
        items = {"pedestal": c.pedestal, "rms": c.rms, "gain": c.gain, "offset": c.offset,
                 "status": c.status, "mask": self.masks["mask"], "cmask": self.masks["cmask"],
                 "calib_mask": self.masks[self.cfg.mask], "x": x, "y": y, "z": z,
                 "common_mode": np.asarray(self.cm_code),
                 "common_mode_pars": np.asarray(self.cmpars if self.cmpars else [0], np.float64),
                 "gain_convention": self.cfg.gain_convention,
                 "units": self.units, "type": self.model.type,
                 "constants_file": str(self.cfg.calib or ""),
                 "constants_source": self.constants.source,
                 "geometry_file": self.geometry_file,
                 "user_mask_file": str(self.cfg.user_mask or ""),
                 "constants_runs": np.array([c.run_min, c.run_max])}
        for feature in self.features:
            items[f"{feature.name}__kind"] = feature.kind
            for key, value in feature.config_items().items():
                items[f"{feature.name}__{key}"] = value
        return items

    def run_sums(self) -> dict[str, np.ndarray]:
        return self.sums.result()
