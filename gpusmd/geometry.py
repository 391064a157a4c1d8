"""Where a detector's pixels are, and the assembled 2-D image (DESIGN §7).

:func:`detector_coords` is the one answer to "the x, y, z (um) of every raw pixel of this
detector": a geometry given with the model (:func:`with_geometry`, what a detector's
``geometry:`` config key sets), else the model's regular grid
(``DetectorModel.coords_um()``). Geometry files are read by :mod:`gpusmd.geometry_psana`;
:func:`default_geometry` gives the psana wheel's default file of a detector type.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .geometry_psana import Geometry, GeometryError

PSANA_DEFAULT = "psana-default"      # the config word for the wheel's default file
GEOMETRY_SUFFIXES = {".data": "a psana geometry file", ".poni": "a pyFAI PONI file"}

# gpusmd detector type -> the default geometry file the psana wheel ships
# (psana/pscalib/geometry/data/). epix10k2M has none (its geometry comes with each
# detector's calibration): it keeps the regular grid, as cameras do.
PSANA_DEFAULT_FILES = {
    "epix10kquad": "geometry-def-epix10kaquad.data",
    "jungfrau05M": "geometry-def-jungfrau05M.data",
    "jungfrau1M": "geometry-def-jungfrau1M.data",
    "jungfrau4M": "geometry-def-jungfrau4M.data",
    "epix100": "geometry-def-epix100a.data",
    "cspad": "geometry-def-cspad.data",
}


# ---- which geometry --------------------------------------------------------------------
def psana_geometry_dir() -> Path:
    """The psana wheel's folder of default geometry files (psana is not imported)."""
    spec = importlib.util.find_spec("psana")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{PSANA_DEFAULT}: the psana package is not installed (its default "
                          f"geometry files come with it); give a geometry file instead")
    return Path(next(iter(spec.submodule_search_locations))) / "pscalib" / "geometry" / "data"


def psana_default_file(type_: str) -> Path:
    """The psana wheel's default geometry file of a gpusmd detector type."""
    if type_ not in PSANA_DEFAULT_FILES:
        raise ConfigError(f"{PSANA_DEFAULT}: psana ships no default geometry for a {type_} "
                          f"(it has one for {', '.join(PSANA_DEFAULT_FILES)}); give a "
                          f"geometry file, or omit the key for the regular grid")
    path = psana_geometry_dir() / PSANA_DEFAULT_FILES[type_]
    if not path.exists():
        raise ConfigError(f"{PSANA_DEFAULT}: {path} is missing from the psana package")
    return path


def read_geometry(path, model, what: str | None = None) -> Geometry:
    """A psana geometry file read for one detector: its coordinates in the detector's raw
    shape are checked here (GeometryError naming the file and ``what``)."""
    seg = model.seg_shape[1:]
    geometry = Geometry.from_psana_file(path, segment_shape=seg, pixel_size_um=model.pixel_size_um)
    geometry.reshaped(model.shape, what or f"type {model.type}")
    return geometry


def default_geometry(model) -> Geometry | None:
    """The psana default geometry of the model's type, or None where psana ships none
    (epix10k2M, cameras: their coordinates stay the regular grid of
    ``DetectorModel.coords_um()``). Only used when asked for (``geometry: psana-default``):
    the models' own default stays the regular grid."""
    if model.type not in PSANA_DEFAULT_FILES:
        return None
    return read_geometry(psana_default_file(model.type), model)


# ---- the coordinates -------------------------------------------------------------------
def with_geometry(model, geometry: Geometry, source: str | None = None):
    """A copy of the model whose pixel coordinates (and pitch) are the geometry's."""
    x, y, z = geometry.reshaped(model.shape, f"type {model.type}")
    extra = {**model.extra, "coords_um": (x, y, z), "geometry": source or geometry.source}
    return dataclasses.replace(model, pixel_size_um=float(geometry.pixel_size_um), extra=extra)


def detector_coords(model, geometry: Geometry | None = None):
    """x, y, z (um) of every raw pixel, each of the model's raw shape: ``geometry`` if
    given, else the coordinates the model carries (:func:`with_geometry`; an (x, y) pair
    gets z = 0), else the model's regular grid."""
    if geometry is not None:
        return geometry.reshaped(model.shape, f"type {model.type}")
    coords = model.extra.get("coords_um") if isinstance(model.extra, dict) else None
    if coords is None:
        return model.coords_um()
    x, y = (np.asarray(c).reshape(model.shape) for c in coords[:2])
    z = np.asarray(coords[2]).reshape(model.shape) if len(coords) > 2 else np.zeros_like(x)
    return x, y, z


# ---- the assembled image ---------------------------------------------------------------
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


__all__ = ["Geometry", "GeometryError", "PSANA_DEFAULT", "PSANA_DEFAULT_FILES",
           "GEOMETRY_SUFFIXES", "psana_default_file", "read_geometry", "default_geometry",
           "with_geometry", "detector_coords", "image_index", "assemble"]
