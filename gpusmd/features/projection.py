"""Projection (DESIGN §8): the input summed or averaged over one axis, as smalldata_tools'
projectionFunc.

Parameters: ``axis`` (an axis of one event's input; a negative one, the default -1 as in
smalldata_tools, projects onto a single number: the sum or mean of the whole input),
``mean`` (false: sum), ``thresADU`` (a lower threshold, or [lo, hi]: values below lo
and above hi count as 0, like the ROI), ``thresRms`` (values below thresRms x the
pixel's noise, in the frames' units, count as 0), ``singlePhoton`` (every value left
above 0 after the thresholds counts as 1), ``mask`` (a mask name, default cmask).

Choices, on purpose:

* The default name is ``pj_ax_<|axis|>`` (smalldata names it from ``abs(axis)``), so a
  projection of ROI_0 on axis 1 is written as ROI_0_pj_ax_1.
* The mask applies when the input is the detector's frame (input_shape == model.shape);
  a chained function's input (an ROI's masked image) has its masked pixels at 0 already,
  and naming a mask there is a config error.
* ``mean`` divides by the number of good (unmasked) pixels along the axis, thresholded
  pixels included (they count as 0, as in smalldata); an output element with no good
  pixel is NaN.
* The output is float32 (B, *input_shape without axis), summed in float64.
"""
from __future__ import annotations

import numpy as np

from ..config import Where, check_type
from . import Feature, register
from .roi import parse_thresholds


def check_mask_name(params, where: Where):
    if "mask" in params:
        check_type(params["mask"], (str,), where / "mask", "a mask name")


def input_mask(feature: Feature, params: dict, where: Where, default="cmask"):
    """The good-pixel mask (host uint8, input-shaped) of a feature, or None.

    Only a function on the detector's frames has one: ``mask`` names one of the
    detector's masks (``default`` when absent; None as default means no mask)."""
    name = params.get("mask", default)
    if feature.input_shape != tuple(feature.model.shape):
        if "mask" in params:
            raise (where / "mask").error(
                f"a mask applies to the detector's frames {tuple(feature.model.shape)}; this "
                f"function takes another function's output of shape {feature.input_shape}")
        return None
    if name is None:
        return None
    if name not in feature.masks:
        raise (where / "mask").error(f"unknown mask {name!r} (known: {', '.join(feature.masks)})")
    return (np.asarray(feature.masks[name]) != 0).astype(np.uint8)


def check_bool(params, key, where: Where):
    check_type(params.get(key, False), (bool,), where / key, "true or false")


def apply_thresholds(xp, data, lo, hi):
    """Values below lo and above hi set to 0 (a new array; the input is left alone)."""
    if lo is not None:
        data = xp.where(data < lo, xp.float32(0), data)
    if hi is not None:
        data = xp.where(data > hi, xp.float32(0), data)
    return data


@register
class Projection(Feature):
    kind = "projection"
    name_prefix = "pj"
    PARAMS = ("axis", "mean", "thresADU", "thresRms", "singlePhoton", "mask")
    accepts_rms = True

    @classmethod
    def default_name_for(cls, params, index):
        axis = params.get("axis", -1)
        if isinstance(axis, int) and not isinstance(axis, bool):
            return f"pj_ax_{abs(axis)}"
        return cls.default_name(index)

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        check_type(params.get("axis", -1), (int,), where / "axis", "an integer axis")
        if params.get("thresRms") is not None:
            check_type(params["thresRms"], (int, float), where / "thresRms", "a number")
        check_bool(params, "mean", where)
        check_bool(params, "singlePhoton", where)
        parse_thresholds(params.get("thresADU"), where / "thresADU")
        check_mask_name(params, where)

    def __init__(self, name, params, model, masks, backend, where, input_shape=None, rms=None):
        super().__init__(name, params, model, masks, backend, where, input_shape)
        xp = backend.xp
        ndim = len(self.input_shape)
        axis = int(params.get("axis", -1))
        if axis >= ndim:
            raise (where / "axis").error(
                f"axis {axis} is not an axis of the input (shape {self.input_shape})")
        # smalldata_tools' projectionFunc: a negative axis gives one number per event
        self.axis = None if axis < 0 else axis       # of one event's input
        self.mean = bool(params.get("mean", False))
        self.single_photon = bool(params.get("singlePhoton", False))
        self.lo, self.hi = parse_thresholds(params.get("thresADU"), where / "thresADU")
        self.thres_rms = params.get("thresRms")
        self.rms_cut = None
        if self.thres_rms is not None:
            if rms is None or np.shape(rms) != self.input_shape:
                raise (where / "thresRms").error(
                    f"a threshold in noise units needs the pixels' noise, which the input "
                    f"(shape {self.input_shape}) does not have: use thresADU")
            self.rms_cut = xp.asarray(np.float32(self.thres_rms) * np.asarray(rms, np.float32))
        mask = input_mask(self, params, where)
        self.mask = None if mask is None else xp.asarray(mask.astype(np.float32))
        counted = np.ones(self.input_shape) if mask is None else mask
        count = (counted.sum(dtype=np.float64) if self.axis is None
                 else counted.sum(axis=self.axis, dtype=np.float64))
        with np.errstate(divide="ignore"):
            self.inv_count = xp.asarray(np.where(count > 0, 1.0 / count, np.nan))
        self.output_shape = tuple(np.shape(count))

    def process(self, calib):
        xp = self.backend.xp
        if self.backend.is_gpu and self.axis is not None and self.rms_cut is None:
            # one fused pass: thresholds, mask, sum or mean
            from ..cuda import project_gpu
            out = project_gpu(calib, self.axis, self.mask, self.inv_count if self.mean else None,
                              self.lo, self.hi, self.single_photon, self.mean)
            self.child_data = out
            return {"data": out}
        data = apply_thresholds(xp, calib, self.lo, self.hi)
        if self.rms_cut is not None:
            data = xp.where(data < self.rms_cut, xp.float32(0), data)
        if self.single_photon:
            data = (data > 0).astype(xp.float32)
        if self.mask is not None:
            data = data * self.mask
        axes = tuple(range(1, data.ndim)) if self.axis is None else self.axis + 1
        out = data.sum(axis=axes, dtype=xp.float64)
        if self.mean:
            out = out * self.inv_count
        out = out.astype(xp.float32)
        self.child_data = out
        return {"data": out}

    def config_items(self):
        return {"axis": -1 if self.axis is None else self.axis, "mean": int(self.mean),
                "thresRms": np.nan if self.thres_rms is None else float(self.thres_rms),
                "singlePhoton": int(self.single_photon),
                "thresADU": np.array([np.nan if v is None else v for v in (self.lo, self.hi)]),
                "mask": "none" if self.mask is None else self.params.get("mask", "cmask")}
