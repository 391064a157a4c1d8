"""A user mask drawn on an average image: pixels above or below a value, inside
rectangles, circles or polygons, or with pixel-status bits of the constants.

The mask has the detector's raw shape, uint8, 1 = good (0 = masked), saved as ``.npy``:
what an ROI's or an azav's ``userMask:`` takes (gpusmd.features.roi / azimuthal; the
detector itself has no user-mask key). Shapes are given in the assembled image's pixels
(``row, col``, as the average image's picture shows them; fractional allowed) or, with
``units="um"``, in the detector's x, y coordinates (um, as the azav's ``center``):

    rect     "R0:R1,C0:C1"    rows R0 <= row < R1, columns C0 <= col < C1
    circle   "R,C,RADIUS"     within RADIUS of (R, C)
    polygon  "R,C R,C R,C ..." inside the polygon (matplotlib.path.Path)

A pixel is tested at its centre (in um: its x, y).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..calib.masks import load_user_mask
from ..errors import GpusmdError
from ..io.output import check_new_output, written_whole
from .avimage import AvImage, figure, save_figure


def _numbers(text: str, what: str, n: int | None = None) -> list[float]:
    try:
        values = [float(v) for v in text.replace(":", ",").replace(" ", ",").split(",") if v]
    except ValueError:
        raise GpusmdError(f"{what} {text!r}: not numbers") from None
    if n is not None and len(values) != n:
        raise GpusmdError(f"{what} {text!r}: expected {n} numbers")
    return values


def pixel_positions(av: AvImage, units: str):
    """(u, v) of every pixel: (row, col) of the assembled image, or (x, y) in um."""
    if units == "px":
        return av.row.astype(np.float64), av.col.astype(np.float64)
    if units == "um":
        return av.x.astype(np.float64), av.y.astype(np.float64)
    raise GpusmdError(f"unknown units {units!r} (px: the assembled image's pixels, um: x, y)")


def in_rect(u, v, text: str):
    r0, r1, c0, c1 = _numbers(text, "rectangle", 4)
    return ((u >= min(r0, r1)) & (u < max(r0, r1)) & (v >= min(c0, c1)) & (v < max(c0, c1)))


def in_circle(u, v, text: str):
    r, c, radius = _numbers(text, "circle", 3)
    return (u - r) ** 2 + (v - c) ** 2 <= radius ** 2


def in_polygon(u, v, text: str):
    from matplotlib.path import Path as PolyPath
    values = _numbers(text, "polygon")
    if len(values) < 6 or len(values) % 2:
        raise GpusmdError(f"polygon {text!r}: expected at least 3 points R,C")
    path = PolyPath(np.asarray(values).reshape(-1, 2))
    return path.contains_points(np.stack([u.ravel(), v.ravel()], 1)).reshape(u.shape)


def parse_bits(text) -> int:
    """Status bits: a number (0x.. allowed) or several joined by ',' or '|'."""
    try:
        return int(np.bitwise_or.reduce([int(t, 0) for t in str(text).replace("|", ",").split(",")
                                         if t.strip()] or [0]))
    except ValueError:
        raise GpusmdError(f"status bits {text!r}: expected numbers like 1,4 or 0x5") from None


def make_mask(av: AvImage, above=None, below=None, rects=(), circles=(), polygons=(),
              status_bits=None, units: str = "px", start=None, with_calib_mask=False):
    """The user mask (module docstring) and how many pixels each rule masked."""
    good = np.ones(av.shape, bool)
    if start is not None:
        good &= load_user_mask(start, av.shape)
    counts = {}

    def drop(name, bad):
        counts[name] = counts.get(name, 0) + int((bad & good).sum())
        good[bad] = False

    finite = np.isfinite(av.image)
    if above is not None:
        drop(f"above {above:g}", finite & (av.image > above))
    if below is not None:
        drop(f"below {below:g}", finite & (av.image < below))
    u, v = pixel_positions(av, units)
    for text in rects:
        drop(f"rect {text}", in_rect(u, v, text))
    for text in circles:
        drop(f"circle {text}", in_circle(u, v, text))
    for text in polygons:
        drop(f"polygon {text}", in_polygon(u, v, text))
    if status_bits is not None:
        bits = parse_bits(status_bits)
        status = np.asarray(av.status).astype(np.int64).reshape(-1, *av.shape)
        drop(f"status bits {bits:#x}", ((status & bits) != 0).any(axis=0))
    if with_calib_mask:
        drop("calibration mask", av.mask == 0)
    return good.astype(np.uint8), counts


def save_mask(mask: np.ndarray, path, force: bool = False) -> Path:
    path = check_new_output(path, force)
    if path.suffix != ".npy":
        raise GpusmdError(f"{path}: a user mask is a .npy file")
    with written_whole(path) as part:
        with open(part, "wb") as f:
            np.save(f, mask)
    return path


def plot_mask(av: AvImage, mask: np.ndarray, path, force: bool = False) -> Path:
    """The assembled image with the masked pixels in red over it."""
    fig, ax = figure(av.assembled(), f"{av.detector}: user mask, {int((mask == 0).sum())} "
                                      f"of {mask.size} pixels masked (red)")
    over = av.assembled(mask == 0, fill=0)
    rgba = np.zeros((*over.shape, 4), np.float32)
    rgba[over > 0] = (1.0, 0.0, 0.0, 0.6)
    ax.imshow(rgba, origin="upper", interpolation="none")
    return save_figure(fig, path, force)
