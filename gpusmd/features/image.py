"""Image and lineout (DESIGN §7, §8): the assembled 2-D image from the pixel coordinates.

``image``: field ``img`` (B, H, W) float32, the frame placed by gpusmd.geometry's
image_index (row = (x - xmin + p/2) / p, col = (y - ymin + p/2) / p), optionally
``rebin``-ned: each output pixel is the sum of an r x r block; the image is padded with
zeros to a multiple of r, so partial blocks at the bottom / right edge are kept (summed
over the pixels they have). Gaps between segments are 0 (not NaN: the image is a sum of
the pixels that land there). Default name ``img``; with ``rebin`` ``img_rebin<r>``.

``lineout``: field ``data`` (B, n) float32: the assembled image summed over ``axis``
(0: over rows, giving a profile along the columns; 1: over columns, a profile along the
rows), restricted to ``band: [lo, hi)`` of the summed axis (the whole axis by default), so
a horizontal band of rows lo..hi-1 gives (axis 0) one value per column. Default name
``lineout_ax_<axis>``. ``rebin`` works as for the image (applied before the lineout).

Both take the detector's frames (placed by the detector's pixel coordinates) or any 2-D
input, e.g. an ROI's image, taken as it is (row, col). ``mask`` (a mask name; none by
default, as smalldata's image): masked pixels count as 0. The placement is one index map
per run, built at construction: one gather (``img[:, dest] = data``) per batch when no
two pixels land on the same image pixel, else one ``bincount`` per batch.
"""
from __future__ import annotations

import numpy as np

from ..config import Where, check_type
from ..geometry import detector_coords, image_index
from . import Feature, register
from .projection import check_mask_name, input_mask


def pixel_coords(model):
    """x, y (um) of every raw pixel: the detector's geometry (gpusmd.geometry)."""
    x, y, _ = detector_coords(model)
    return x, y


def check_rebin(params, where: Where):
    r = check_type(params.get("rebin", 1), (int,), where / "rebin", "an integer factor")
    if r < 1:
        raise (where / "rebin").error(f"the factor must be at least 1, got {r}")
    return r


class ImageMap:
    """Raw (or any 2-D) input -> assembled image (B, H, W), with rebinning."""

    def __init__(self, feature: Feature, params, where: Where):
        self.backend = xpb = feature.backend
        xp = xpb.xp
        shape = feature.input_shape
        if shape == tuple(feature.model.shape):
            x, y = pixel_coords(feature.model)
            rows, cols = image_index(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                     feature.model.pixel_size_um)
        elif len(shape) == 2:
            rows, cols = np.indices(shape)
        else:
            raise where.error(f"an image needs the detector's frames or a 2-D input; this "
                              f"input has shape {shape}")
        self.rebin = check_rebin(params, where)
        r = self.rebin
        height, width = int(rows.max()) + 1, int(cols.max()) + 1
        self.full_shape = (-(-height // r) * r, -(-width // r) * r)     # padded to r
        self.shape = (self.full_shape[0] // r, self.full_shape[1] // r)
        dest = (rows * self.full_shape[1] + cols).reshape(-1).astype(np.int64)
        mask = input_mask(feature, params, where, default=None)
        keep = np.ones(dest.size, bool) if mask is None else mask.reshape(-1) != 0
        self.all_kept = bool(keep.all())
        self.src = None if self.all_kept else xp.asarray(np.flatnonzero(keep))
        dest = dest[keep]
        self.unique = bool((np.bincount(dest, minlength=1) <= 1).all())
        self.dest = xp.asarray(dest)
        self.npix_img = self.full_shape[0] * self.full_shape[1]

    def __call__(self, calib):
        xp = self.backend.xp
        nb = len(calib)
        values = calib.reshape(nb, -1)
        if self.src is not None:
            values = values[:, self.src]
        if self.unique:
            img = xp.zeros((nb, self.npix_img), xp.float32)
            img[:, self.dest] = values
        else:
            flat = (self.dest[None, :] + (xp.arange(nb) * self.npix_img)[:, None]).reshape(-1)
            img = xp.bincount(flat, weights=values.reshape(-1),
                              minlength=nb * self.npix_img).astype(xp.float32)
        img = img.reshape(nb, *self.full_shape)
        r = self.rebin
        if r > 1:
            img = img.reshape(nb, self.shape[0], r, self.shape[1], r).sum(axis=(2, 4))
        return img


@register
class Image(Feature):
    kind = "image"
    name_prefix = "img"
    PARAMS = ("rebin", "mask")

    @classmethod
    def name_base(cls, params):
        r = params.get("rebin", 1)
        return f"img_rebin{r}" if isinstance(r, int) and r > 1 else "img"

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        check_rebin(params, where)
        check_mask_name(params, where)

    def __init__(self, name, params, model, masks, backend, where, input_shape=None):
        super().__init__(name, params, model, masks, backend, where, input_shape)
        self.map = ImageMap(self, params, where)
        self.output_shape = self.map.shape

    def process(self, calib):
        img = self.map(calib)
        self.child_data = img
        return {"img": img}

    def config_items(self):
        return {"rebin": self.map.rebin, "shape": np.array(self.map.shape, np.int64),
                "mask": self.params.get("mask", "none")}


@register
class Lineout(Feature):
    kind = "lineout"
    name_prefix = "lineout"
    PARAMS = ("axis", "band", "rebin", "mask")

    @classmethod
    def name_base(cls, params):
        axis = params.get("axis")
        return f"lineout_ax_{axis}" if axis in (0, 1) else "lineout"

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        if "axis" not in params:
            raise (where / "axis").error("required key is missing")
        axis = check_type(params["axis"], (int,), where / "axis", "0 or 1")
        if axis not in (0, 1, -1, -2):
            raise (where / "axis").error(f"an image has axes 0 and 1, got {axis}")
        if "band" in params:
            band = check_type(params["band"], (list,), where / "band", "[lo, hi]")
            ok = (len(band) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                         for v in band) and 0 <= band[0] < band[1])
            if not ok:
                raise (where / "band").error(f"expected [lo, hi] integers, 0 <= lo < hi, "
                                             f"got {band!r}")
        check_rebin(params, where)
        check_mask_name(params, where)

    def __init__(self, name, params, model, masks, backend, where, input_shape=None):
        super().__init__(name, params, model, masks, backend, where, input_shape)
        self.map = ImageMap(self, params, where)
        self.axis = int(params["axis"]) % 2
        size = self.map.shape[self.axis]
        lo, hi = params.get("band", [0, size])
        if hi > size:
            raise (where / "band").error(f"band {[lo, hi]} passes the image's {size} "
                                         f"{'rows' if self.axis == 0 else 'columns'} "
                                         f"(image shape {self.map.shape})")
        self.band = (int(lo), int(hi))
        self.output_shape = (self.map.shape[1 - self.axis],)

    def process(self, calib):
        img = self.map(calib)
        lo, hi = self.band
        part = img[:, lo:hi, :] if self.axis == 0 else img[:, :, lo:hi]
        out = part.sum(axis=self.axis + 1, dtype=self.backend.xp.float64)
        out = out.astype(self.backend.xp.float32)
        self.child_data = out
        return {"data": out}

    def config_items(self):
        return {"axis": self.axis, "band": np.array(self.band, np.int64),
                "rebin": self.map.rebin, "mask": self.params.get("mask", "none")}
