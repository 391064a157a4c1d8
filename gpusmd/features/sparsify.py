"""Sparsify (DESIGN §8): the lit pixels of an image as records data, row, col, tile.

Parameters:

- ``thresADU``: keep the pixels with value > thresADU. Absent (the default): keep every
  non-zero pixel, negative ones included, like smalldata_tools' ``sparsifyFunc`` (which
  stores scipy's ``coo_matrix`` of the image). On calibrated frames noise is non-zero
  almost everywhere, so give a threshold there; chained on an ROI with a thresADU (whose
  image is zero below it and on masked pixels) the default is what you want.
- ``nData``: fixed length. The first nData kept pixels of each event in raster order
  (tile, row, col) as (B, nData) arrays ``data, row, col, tile``, zero-padded, plus
  ``n`` (B,), the true number of kept pixels (which may exceed nData). Without nData:
  variable length, a :class:`Ragged` written as /<det>/var_<name>/{data,row,col,tile}
  and /<det>/var_<name>_len.

Coordinates are those of the function's input: for a 3-D input (nseg, rows, cols) tile
is the first index and row / col the last two; a 2-D input has tile 0; a 1-D input
(e.g. a lineout) has tile 0, row 0 and col = the index. Chained on an ROI (``parent:
ROI_0``) the input is the ROI image, so **row, col and tile are relative to the ROI**
(add the ROI's lower bounds, /UserDataCfg/<det>/<roi>__bounds[:, 0], for detector
coordinates): a child is not told its parent's bounds.

dtypes: data float32, row / col / tile int16, n int32.
"""
from __future__ import annotations

import numpy as np

from ..config import check_type
from . import Feature, check_ndata, register
from .droplet import pack

NUMBER = (int, float)


@register
class Sparsify(Feature):
    kind = "sparsify"
    name_prefix = "sparse"
    PARAMS = ("thresADU", "nData")

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        if params.get("thresADU") is not None:
            check_type(params["thresADU"], NUMBER, where / "thresADU", "a number or null")
        check_ndata(params, where)

    def __init__(self, name, params, model, masks, backend, where, input_shape=None):
        super().__init__(name, params, model, masks, backend, where, input_shape)
        if not 1 <= len(self.input_shape) <= 3:
            raise where.error(f"sparsify takes a 1-, 2- or 3-D image, its input has shape "
                              f"{self.input_shape}")
        shape = (1, 1, *self.input_shape)[-3:]
        if max(shape) > np.iinfo(np.int16).max:
            raise where.error(f"input of shape {self.input_shape} is too large for int16 "
                              f"coordinates")
        self.seg = shape
        thr = params.get("thresADU")
        self.thres_adu = None if thr is None else float(thr)
        self.ndata = params.get("nData")

    def process(self, data):
        xp = self.backend.xp
        B = data.shape[0]
        nseg, R, C = self.seg
        v = data.reshape(B, -1)
        keep = v != 0 if self.thres_adu is None else v > self.thres_adu
        idx = xp.flatnonzero(keep.reshape(-1))          # raster order, events in order
        npix = nseg * R * C
        pix = idx % npix
        fields = {"data": v.reshape(-1)[idx].astype(xp.float32),
                  "row": ((pix // C) % R).astype(xp.int16),
                  "col": (pix % C).astype(xp.int16),
                  "tile": (pix // (R * C)).astype(xp.int16)}
        out = pack(xp, idx // npix, fields, B, self.ndata)
        if self.ndata is not None:
            out["n"] = keep.sum(axis=1).astype(xp.int32)
        return out

    def config_items(self):
        return {"thresADU": np.nan if self.thres_adu is None else self.thres_adu,
                "nData": -1 if self.ndata is None else int(self.ndata)}
