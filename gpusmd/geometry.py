"""Pixel coordinates -> assembled 2-D image (DESIGN §7)."""
from __future__ import annotations

import numpy as np


def image_index(x, y, pixel_size_um: float):
    """Row and column of every pixel in the assembled image:
    row = (x - xmin + p/2) / p, col = (y - ymin + p/2) / p."""
    p = pixel_size_um
    rows = np.floor((x - x.min() + p / 2) / p).astype(np.int64)
    cols = np.floor((y - y.min() + p / 2) / p).astype(np.int64)
    return rows, cols


def assemble(values, x, y, pixel_size_um: float, fill=np.nan) -> np.ndarray:
    """A raw-shaped array as one 2-D image (gaps filled with ``fill``)."""
    rows, cols = image_index(np.asarray(x), np.asarray(y), pixel_size_um)
    img = np.full((rows.max() + 1, cols.max() + 1), fill, dtype=np.float32)
    img[rows.ravel(), cols.ravel()] = np.asarray(values, np.float32).ravel()
    return img
