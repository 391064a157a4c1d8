"""Region of interest (DESIGN §8): sum, mean, max, com, area, nsat.

Differences from smalldata_tools, on purpose: thresholds never modify the shared
calibrated frame (they act on the ROI's own copy); ``com`` is given in the detector's
row / column coordinates (not relative to the ROI) and weighs only positive values, so
noise around zero cannot push it outside the ROI.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import Where, check_type
from . import Feature, register

NUMBER = (int, float)


def is_number(v) -> bool:
    return isinstance(v, NUMBER) and not isinstance(v, bool) and np.isfinite(v)


def parse_thresholds(value, where: Where) -> tuple[float | None, float | None]:
    """thresADU: a scalar lower threshold, or [lo, hi] with either null."""
    if value is None:
        return None, None
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise where.error("expected a number or [low, high]")
        lo, hi = (None if v is None else float(check_type(v, NUMBER, where, "a number or null"))
                  for v in value)
        if lo is not None and hi is not None and hi <= lo:
            raise where.error(f"high threshold {hi} is not above low threshold {lo}")
        return lo, hi
    return float(check_type(value, NUMBER, where, "a number or [low, high]")), None


def check_bounds(bounds, shape, where: Where) -> tuple[tuple[int, int], ...]:
    """Half-open [lo, hi) per raw axis, as smalldata_tools' ROIFunc.applyROI takes them:
    a pair in either order, numbers truncated to integers, the high end clipped to the
    detector (and the low end to 0); a single [lo, hi] is the first axis's range."""
    if len(bounds) == 2 and all(isinstance(v, NUMBER) for v in bounds):
        bounds = [bounds] + [[0, size] for size in shape[1:]]
    if len(bounds) != len(shape):
        raise where.error(f"{len(bounds)} ranges given, the detector has {len(shape)} axes "
                          f"(shape {tuple(shape)})")
    out = []
    for axis, (pair, size) in enumerate(zip(bounds, shape)):
        lo, hi = (int(v) for v in sorted(pair))
        lo, hi = max(lo, 0), min(hi, size)
        if lo >= hi:
            raise where.error(f"range {list(pair)} on axis {axis} holds no pixel of the "
                              f"detector (shape {tuple(shape)})")
        out.append((lo, hi))
    return tuple(out)


@register
class ROI(Feature):
    kind = "roi"
    name_prefix = "ROI"
    numbered = True
    PARAMS = ("bounds", "thresADU", "userMask", "writeArea", "mask", "meanOver")
    PARAM_ALIASES = {"ROI": "bounds"}

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        if "bounds" not in params:
            raise (where / "bounds").error("required key is missing")
        bounds = check_type(params["bounds"], (list,), where / "bounds", "a list of [lo, hi] ranges")
        if not (len(bounds) == 2 and all(is_number(v) for v in bounds)):
            for i, pair in enumerate(bounds):
                if not (isinstance(pair, list) and len(pair) == 2
                        and all(is_number(v) for v in pair)):
                    raise (where / "bounds" / i).error(f"expected [lo, hi] numbers, got {pair!r}")
        mean_over = params.get("meanOver", "all")
        if mean_over not in ("all", "good"):
            raise (where / "meanOver").error(f"expected 'all' (smalldata_tools) or 'good', "
                                             f"got {mean_over!r}")
        parse_thresholds(params.get("thresADU"), where / "thresADU")
        check_type(params.get("writeArea", False), (bool,), where / "writeArea", "true or false")
        if "userMask" in params:
            check_type(params["userMask"], (str,), where / "userMask", "a .npy file path")
        if "mask" in params:
            check_type(params["mask"], (str,), where / "mask", "a mask name")

    def __init__(self, name, params, model, masks, backend, where, input_shape=None):
        super().__init__(name, params, model, masks, backend, where, input_shape)
        if self.input_shape != model.shape:
            raise where.error("an ROI takes the detector's frames, not another function's output")
        xp = backend.xp
        self.bounds = check_bounds(params["bounds"], model.shape, where / "bounds")
        self.lo, self.hi = parse_thresholds(params.get("thresADU"), where / "thresADU")
        self.write_area = bool(params.get("writeArea", False))
        self.slices = tuple(slice(lo, hi) for lo, hi in self.bounds)
        mask_name = params.get("mask", "cmask")
        if mask_name not in masks:
            raise (where / "mask").error(f"unknown mask {mask_name!r} (known: {', '.join(masks)})")
        mask = masks[mask_name][self.slices].astype(np.float32)
        if "userMask" in params:
            mask = mask * self._load_user_mask(params["userMask"], mask.shape, where / "userMask")
        self.mask = xp.asarray(mask)
        # the mean's denominator: smalldata_tools' ROIFunc takes every pixel of the ROI
        # (masked ones as 0); "good" takes the unmasked ones only
        self.mean_over = params.get("meanOver", "all")
        self.npix_mean = float(mask.sum() if self.mean_over == "good" else mask.size)
        self.output_shape = mask.shape           # children take the masked ROI image
        # absolute row / column of every ROI pixel, for the centre of mass
        self.rows = xp.asarray(np.arange(*self.bounds[-2], dtype=np.float32))
        self.cols = xp.asarray(np.arange(*self.bounds[-1], dtype=np.float32))

    def _load_user_mask(self, path, roi_shape, where):
        path = Path(path)
        if not path.exists():
            raise where.error(f"user mask file {path} not found")
        m = np.load(path)
        if m.shape == self.model.shape:
            m = m[self.slices]
        if m.shape != roi_shape:
            raise where.error(f"user mask has shape {m.shape}; expected the ROI's {roi_shape} "
                              f"or the detector's {self.model.shape}")
        return (m != 0).astype(np.float32)

    def process(self, calib):
        xp = self.backend.xp
        data = calib[(slice(None), *self.slices)]
        axes = tuple(range(1, data.ndim))
        out = {}
        if self.lo is not None:
            data = xp.where(data < self.lo, xp.float32(0), data)
        if self.hi is not None:
            over = data > self.hi
            out["nsat"] = over.sum(axis=axes).astype(xp.int32)
            data = xp.where(over, xp.float32(0), data)
        data = data * self.mask
        self.child_data = data
        total = data.sum(axis=axes, dtype=xp.float64)
        out["sum"] = total
        out["mean"] = total / self.npix_mean if self.npix_mean else xp.full_like(total, xp.nan)
        out["max"] = data.max(axis=axes)
        weights = xp.maximum(data, 0)
        w_rows = weights.sum(axis=-1)                       # (B, [seg,] rows)
        w_cols = weights.sum(axis=-2)                       # (B, [seg,] cols)
        wsum = w_rows.reshape(len(data), -1).sum(axis=1, dtype=xp.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            com_r = (w_rows * self.rows).reshape(len(data), -1).sum(axis=1) / wsum
            com_c = (w_cols * self.cols).reshape(len(data), -1).sum(axis=1) / wsum
        out["com"] = xp.stack([com_r, com_c], axis=1).astype(xp.float32)
        if self.write_area:
            out["area"] = data.astype(xp.float32)
        return out

    def child_map(self, per_pixel):
        return np.asarray(per_pixel)[self.slices]

    def config_items(self):
        return {"bounds": np.array(self.bounds, np.int64),
                "thresADU": np.array([np.nan if v is None else v for v in (self.lo, self.hi)]),
                "writeArea": int(self.write_area),
                "mask": self.params.get("mask", "cmask"), "meanOver": self.mean_over,
                "userMask": np.asarray(self.backend.to_host(self.mask))}
