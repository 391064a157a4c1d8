"""Pixel masks (DESIGN §5), 1 = good, combined with AND.

``mask``  = status & edges & central & unbond & unbondnbrs
``cmask`` = mask & calib (the user pixel mask from the constants, and the detector
config's ``userMask`` file)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..detectors import DetectorModel
from ..errors import GpusmdError
from .constants import Constants

MASK_CHOICES = ("cmask", "mask", "status", "none")
DEFAULT_MASK_OPTIONS = {"edges": True, "central": True, "unbond": True, "unbondnbrs": True,
                        "unbondnbrs8": False, "status_neighbours": 0}


def spread_bad(good: np.ndarray, seg_shape, neighbours: int) -> np.ndarray:
    """Mark bad also the 4 or 8 neighbours (within a segment) of every bad pixel."""
    if neighbours == 0:
        return good
    bad = good.reshape(seg_shape) == 0
    out = bad.copy()
    shifts = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if neighbours == 8:
        shifts += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    padded = np.pad(bad, ((0, 0), (1, 1), (1, 1)))
    rows, cols = bad.shape[1:]
    for dr, dc in shifts:
        out |= padded[:, 1 + dr:1 + dr + rows, 1 + dc:1 + dc + cols]
    return (~out).astype(np.uint8).reshape(good.shape)


def load_user_mask(path, shape) -> np.ndarray:
    """A user mask file (.npy, non-zero = good) of a detector of raw ``shape``: bool, that
    shape."""
    path = Path(path)
    if not path.exists():
        raise GpusmdError(f"{path}: mask file not found")
    m = np.load(path)
    if m.size != int(np.prod(shape)):
        raise GpusmdError(f"{path}: a mask of shape {m.shape}; the detector's is {tuple(shape)}")
    return m.reshape(shape) != 0


def pixel_masks(model: DetectorModel, constants: Constants, options: dict | None = None,
                user: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The named masks of one detector: status, geometry, mask, calib, cmask (uint8);
    ``user`` (good = True) joins the constants' calib mask in cmask."""
    opts = {**DEFAULT_MASK_OPTIONS, **(options or {})}
    status = spread_bad(constants.status_mask(), model.seg_shape, opts["status_neighbours"])
    geometry = model.geometry_mask(edges=opts["edges"], central=opts["central"],
                                   unbond=opts["unbond"], unbondnbrs=opts["unbondnbrs"],
                                   unbondnbrs8=opts["unbondnbrs8"])
    calib = (constants.mask != 0).all(axis=0).astype(np.uint8)
    if user is not None:
        calib &= user.astype(np.uint8)
    mask = status & geometry
    return {"status": status, "geometry": geometry, "mask": mask, "calib": calib,
            "cmask": mask & calib, "none": np.ones(model.shape, np.uint8)}
