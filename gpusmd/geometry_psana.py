"""psana geometry files (``.data``) -> x, y, z (um) of every raw pixel (DESIGN §7).

A psana geometry file describes a tree of objects, one line each (``#`` starts a
comment line)::

    PARENT PIDX OBJECT OIDX X0 Y0 Z0 ROT_Z ROT_Y ROT_X TILT_Z TILT_Y TILT_X

An object sits in its parent's frame at (X0, Y0, Z0) um, turned by the angles
ROT + TILT (degrees) about z, then about y, then about x, all three about the parent's
axes, i.e. R = Rx(ax) Ry(ay) Rz(az) (counter-clockwise). The leaves are sensor segments,
whose pixel centres within the segment (z = 0) are listed in ``SEGMENTS``; the one object
whose parent is never defined (usually ``IP``) is the top. The result follows what
psana's ``GeometryAccess(path).get_pixel_coords()`` returns, which is the reference
(the tests compare every default file the psana wheel ships):

* segments in depth-first order, children in the order of their lines (not of their
  indices), arrays of shape (nseg, rows, cols); psana's one exception is kept: the two
  2x1 of a ``CSPAD2X2:V1`` are interleaved as (185, 388, 2);
* an object placed directly in a parent whose name starts with ``IP`` with Z0 > 0 has
  Z0 taken negative (psana's convention);
* wide pixels between ASICs (CsPad 2x1, epix10ka, epix100, epix hr / uhr) are placed
  as psana's default does (``use_wide_pix_center=False``: one regular pitch from their
  neighbour, not at their geometric centre); Jungfrau ``JUNGFRAU:V2`` segments always
  have their big pixels' centres corrected by 37.5 um, as psana's;
* Archon fake columns have NaN coordinates;
* ``ARCHON:V1/V2`` and ``MTRXANY:V1`` take their shape (and ``MTRXANY`` its pixel
  size) from the data: give ``segment_shape`` (and ``pixel_size_um``).

Unlike psana, a file that cannot describe one detector is refused with the file and
line: a malformed line, an unknown segment type, a parent never defined (a second top),
an object defined twice, a cycle, a segment with children, segments of unequal shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ConfigError


class GeometryError(ConfigError):
    """A geometry file that cannot be used (names the file and the line)."""


# ---- segments: pixel centres within one sensor (um, segment frame, z = 0) ------------
@dataclass(frozen=True)
class Segment:
    """The pixel centres of one segment type: x[r, c], y[r, c] (um) in its own frame."""
    name: str
    x: np.ndarray
    y: np.ndarray
    pixel_size_um: float        # the pitch psana uses to index an assembled image

    @property
    def shape(self) -> tuple[int, int]:
        return self.x.shape


def _grid(x_of_col, y_of_row, name, pixel):
    """x depends on the column only, y on the row only (most segments)."""
    x_of_col, y_of_row = np.asarray(x_of_col, np.float64), np.asarray(y_of_row, np.float64)
    shape = (len(y_of_row), len(x_of_col))
    return Segment(name, np.broadcast_to(x_of_col[None, :], shape),
                   np.broadcast_to(y_of_row[:, None], shape), float(pixel))


def _mirrored(half):
    """[-half reversed, +half]: columns symmetric about the segment's centre."""
    half = np.asarray(half, np.float64)
    return np.concatenate([-half[::-1], half])


def _wide_gap_axis(n_half, pitch, wide):
    """Centres of n_half regular pixels from the middle outwards, the first one (the wide
    pixel of the ASIC border) placed one pitch from its neighbour: wide - pitch / 2,
    then + pitch each."""
    return np.arange(n_half) * pitch + wide - pitch / 2


def cspad_2x1(_shape=None, _pixel=None):
    """CsPad 2x1 (185 x 388, 109.92 um): two ASICs of 194 columns side by side, the two
    middle columns 274.8 um wide; +x along columns, +y against the row index."""
    p, w = 109.92, 274.80
    y = (92 - np.arange(185)) * p
    return _grid(_mirrored(_wide_gap_axis(194, p, w)), y, "SENS2X1:V1", p)


def _epix_2x2(name, rows, cols, y_against_rows):
    """epix10ka-like 2 x 2 ASICs (100 um, 225 um wide border pixels)."""
    p, w = 100.0, 225.0
    x = _mirrored(_wide_gap_axis(cols // 2, p, w))
    y = _mirrored(_wide_gap_axis(rows // 2, p, w))
    return _grid(x, -y if y_against_rows else y, name, p)


def epix10ka(_shape=None, _pixel=None):
    """epix10ka 2x2 (352 x 384, 100 um): +y against the row index."""
    return _epix_2x2("EPIX10KA:V1", 352, 384, True)


def epixhr_2x2(_shape=None, _pixel=None):
    """epix hr 2x2 (288 x 384, 100 um): laid out as the epix10ka."""
    return _epix_2x2("EPIXHR2X2:V1", 288, 384, True)


def epix100(_shape=None, _pixel=None):
    """epix100 (704 x 768, 50 um, 175 um wide border pixels): +y along the row index."""
    p, w = 50.0, 175.0
    x = _mirrored(_wide_gap_axis(384, p, w))
    y = _mirrored(_wide_gap_axis(352, p, w))
    return _grid(x, y, "EPIX100:V1", p)


def epixhr_1x4(_shape=None, _pixel=None):
    """epix hr 1x4 (144 x 768, 100 um): four ASICs of 192 columns, as psana places them.
    The rows restart at the middle (psana's layout: rows 0-71 go from +7050 to -50 um,
    rows 72-143 from +50 to -7050 um)."""
    p, w = 100.0, 225.0
    asic = np.arange(192) * p - p / 2
    inner = asic + w                           # the two ASICs beside the centre
    outer = asic + 3 * w + 191 * p             # the two outer ASICs
    x = _mirrored(np.concatenate([inner, outer]))
    y_half = np.arange(72) * p - p / 2
    return _grid(x, np.concatenate([y_half[::-1], -y_half]), "EPIXHR1X4:V1", p)


def epixuhr_3x2(_shape=None, _pixel=None):
    """epix uhr 3x2 (336 x 576, 100 um): three ASICs of 192 columns 425 um apart (centre
    to centre of their edge pixels), two of 168 rows; +y against the row index."""
    p, gap, w = 100.0, 425.0, 262.5
    span = 191 * p                             # first to last pixel centre of one ASIC
    middle = np.arange(192) * p - span // 2
    x = np.concatenate([middle - span - gap, middle, middle + span + gap])
    top = (w - p // 2) + 167 * p - np.arange(168) * p    # 16912.5 ... 212.5
    return _grid(x, np.concatenate([top, -top[::-1]]), "EPIXUHR3X2:V1", p)


def _jungfrau_x():
    """Jungfrau columns: four ASICs of 256 columns (75 um) with a 2-pixel gap between
    ASICs (their big border pixels)."""
    col = np.arange(256) * 75.0
    starts = np.array([-514.5, -256.5, 1.5, 259.5]) * 75.0
    return np.concatenate([col + s for s in starts])


def jungfrau_v1(_shape=None, _pixel=None):
    """Jungfrau module, psana V1 (512 x 1024, 75 um): +y against the row index."""
    row = np.arange(256) * 75.0
    y = np.concatenate([256.5 * 75 - row, -1.5 * 75 - row])
    return _grid(_jungfrau_x(), y, "JUNGFRAU:V1", 75.0)


def jungfrau_v2(_shape=None, _pixel=None):
    """Jungfrau module, psana V2 (front view): +y along the row index, and the centres of
    the big pixels on each side of an ASIC border moved 37.5 um towards it (half a
    pitch), as psana always does for V2."""
    x = _jungfrau_x()
    row = np.arange(256) * 75.0
    y = np.concatenate([-256.5 * 75 + row, 1.5 * 75 + row])
    for c in (255, 511, 767):
        x[c] += 37.5
        x[c + 1] -= 37.5
    y[255] += 37.5
    y[256] -= 37.5
    return _grid(x, y, "JUNGFRAU:V2", 75.0)


def matrix_v1(name, rows, cols, p_row, p_col):
    """A plain matrix, psana MatrixV1 (e.g. pnCCD): x = row * p_row, y = col * p_col,
    origin at pixel (0, 0)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return Segment(name, r * float(p_row), c * float(p_col), float(min(p_row, p_col)))


def matrix_v2(name, rows, cols, p_row, p_col, pixel=None):
    """A plain matrix, psana MatrixV2: centred, +x along columns, +y against rows."""
    x = (np.arange(cols) - (cols - 1) / 2) * float(p_col)
    y = -(np.arange(rows) - (rows - 1) / 2) * float(p_row)
    return _grid(x, y, name, min(p_row, p_col) if pixel is None else pixel)


def pnccd(_shape=None, _pixel=None):
    """pnCCD quarter (512 x 512, 75 um)."""
    return matrix_v1("PNCCD:V1", 512, 512, 75.0, 75.0)


def epixm_asic(_shape=None, _pixel=None):
    """epixM 320 ASIC (192 x 384, 50 um), a MatrixV2."""
    return matrix_v2("EPIXMASIC:V1", 192, 384, 50.0, 50.0)


def epixuhr_asic(_shape=None, _pixel=None):
    """epix uhr ASIC (168 x 192, 100 um), a MatrixV2."""
    return matrix_v2("EPIXUHRASIC:V1", 168, 192, 100.0, 100.0)


ARCHON_BANKS, ARCHON_REAL, ARCHON_FAKE = 16, 264, 36   # columns per bank: real + fake


def _archon(name, shape, fake_first):
    """Archon (rows x 4800): 16 banks of 264 real columns (10 um) and 36 fake ones
    (NaN), rows 20 um, centred; +y against the row index."""
    cols = ARCHON_BANKS * (ARCHON_REAL + ARCHON_FAKE)
    if shape is None or len(shape) != 2 or int(shape[1]) != cols:
        raise ValueError(f"{name} takes its rows from the data: give segment_shape "
                         f"(rows, {cols})")
    rows = int(shape[0])
    real = np.arange(ARCHON_REAL) * 10.0
    fake = np.full(ARCHON_FAKE, np.nan)
    bank = np.concatenate([fake, real] if fake_first else [real, fake])
    x = np.concatenate([bank + i * ARCHON_REAL * 10.0 for i in range(ARCHON_BANKS)])
    x -= (ARCHON_BANKS * ARCHON_REAL - 1) * 10.0 / 2
    y = ((rows - 1) / 2 - np.arange(rows)) * 20.0
    return _grid(x, y, name, 10.0)


def archon_v1(shape=None, _pixel=None):
    return _archon("ARCHON:V1", shape, fake_first=False)


def archon_v2(shape=None, _pixel=None):
    return _archon("ARCHON:V2", shape, fake_first=True)


def matrix_any(shape=None, pixel=None):
    """``MTRXANY:V1``: a MatrixV2 whose shape and pixel size come from the data."""
    if shape is None or len(shape) != 2 or pixel is None:
        raise ValueError("MTRXANY:V1 takes its shape and pixel size from the data: give "
                         "segment_shape (rows, cols) and pixel_size_um")
    p_row, p_col = (pixel, pixel) if np.isscalar(pixel) else pixel
    return matrix_v2("MTRXANY:V1", int(shape[0]), int(shape[1]), p_row, p_col)


SEGMENTS: dict[str, Callable[..., Segment]] = {
    "SENS2X1:V1": cspad_2x1,
    "EPIX10KA:V1": epix10ka,
    "EPIXHR2X2:V1": epixhr_2x2,
    "EPIXHR1X4:V1": epixhr_1x4,
    "EPIXUHR3X2:V1": epixuhr_3x2,
    "EPIX100:V1": epix100,
    "JUNGFRAU:V1": jungfrau_v1,
    "JUNGFRAU:V2": jungfrau_v2,
    "PNCCD:V1": pnccd,
    "EPIXMASIC:V1": epixm_asic,
    "EPIXUHRASIC:V1": epixuhr_asic,
    "ARCHON:V1": archon_v1,
    "ARCHON:V2": archon_v2,
    "MTRXANY:V1": matrix_any,
}
MATRIX_FORMS = ("MTRX:<rows>:<cols>:<pixel_row_um>:<pixel_col_um>", "MTRX:V2:<...same>")


def is_segment(name: str) -> bool:
    return name in SEGMENTS or name.startswith("MTRX:")


def segment(name: str, segment_shape=None, pixel_size_um=None) -> Segment:
    """The pixel layout of a segment type (ValueError for an unknown or incomplete one)."""
    if name in SEGMENTS:
        return SEGMENTS[name](segment_shape, pixel_size_um)
    if name.startswith("MTRX:"):
        fields = name.split(":")[1:]
        v2 = fields[:1] == ["V2"]
        fields = fields[1:] if v2 else fields
        try:
            if len(fields) != 4:
                raise ValueError
            rows, cols, p_row, p_col = int(fields[0]), int(fields[1]), float(fields[2]), float(fields[3])
            if rows < 1 or cols < 1 or not (p_row > 0 and p_col > 0):
                raise ValueError
        except ValueError:
            raise ValueError(f"matrix segment {name!r} is not {' or '.join(MATRIX_FORMS)}") from None
        return (matrix_v2 if v2 else matrix_v1)(name, rows, cols, p_row, p_col)
    raise ValueError(f"unknown segment type {name!r} (known: {', '.join(SEGMENTS)}, "
                     f"{', '.join(MATRIX_FORMS)})")


# ---- the tree of objects -------------------------------------------------------------
FIELDS = ("PARENT", "PIDX", "OBJECT", "OIDX", "X0", "Y0", "Z0", "ROT_Z", "ROT_Y", "ROT_X",
          "TILT_Z", "TILT_Y", "TILT_X")


@dataclass
class GeoObject:
    """One line of the file: an object placed in its parent's frame."""
    parent: tuple[str, int]
    key: tuple[str, int]
    origin: tuple[float, float, float]       # um
    angles: tuple[float, float, float]       # rotation + tilt about z, y, x (degrees)
    line: int

    def rotation(self) -> np.ndarray:
        """R = Rx(ax) Ry(ay) Rz(az): about z first, then y, then x (parent's axes)."""
        az, ay, ax = (math.radians(a) for a in self.angles)
        cz, sz, cy, sy, cx, sx = (math.cos(az), math.sin(az), math.cos(ay), math.sin(ay),
                                  math.cos(ax), math.sin(ax))
        rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
        ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
        rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
        return rx @ ry @ rz


def _name(key) -> str:
    return f"{key[0]} {key[1]}"


def parse_lines(text: str, source: str) -> list[GeoObject]:
    objects = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        f = line.split()
        where = f"{source}: line {n}"
        if len(f) != len(FIELDS):
            raise GeometryError(f"{where}: expected {len(FIELDS)} fields "
                                f"({' '.join(FIELDS)}), got {len(f)}")
        try:
            pidx, oidx = int(f[1]), int(f[3])
        except ValueError:
            raise GeometryError(f"{where}: the indices {f[1]!r} and {f[3]!r} must be "
                                f"integers") from None
        try:
            values = [float(v) for v in f[4:]]
        except ValueError as e:
            raise GeometryError(f"{where}: X0 ... TILT_X must be numbers ({e})") from None
        if not all(math.isfinite(v) for v in values):
            raise GeometryError(f"{where}: X0 ... TILT_X must be finite numbers")
        x0, y0, z0 = values[:3]
        if f[0].startswith("IP") and z0 > 0:        # psana: the detector at negative z
            z0 = -z0
        rot, tilt = values[3:6], values[6:9]
        objects.append(GeoObject((f[0], pidx), (f[2], oidx), (x0, y0, z0),
                                 tuple(r + t for r, t in zip(rot, tilt)), n))
    if not objects:
        raise GeometryError(f"{source}: no geometry lines (only comments or blank lines)")
    return objects


def _segment_paths(objects: list[GeoObject], source: str) -> list[list[GeoObject]]:
    """Every leaf's chain of objects up to the top, depth first in line order."""
    children: dict[tuple[str, int], list[GeoObject]] = {}
    for o in objects:
        for other in children.get(o.parent, []):
            if other.key == o.key:
                raise GeometryError(f"{source}: line {o.line}: object {_name(o.key)} in "
                                    f"{_name(o.parent)} is already defined on line {other.line}")
        children.setdefault(o.parent, []).append(o)
    by_key: dict[tuple[str, int], GeoObject] = {}     # the objects that hold others
    for o in objects:
        if o.key in children:
            if o.key in by_key:
                raise GeometryError(
                    f"{source}: line {o.line}: {_name(o.key)} holds other objects and is "
                    f"defined twice (also on line {by_key[o.key].line}): which one holds "
                    f"them is ambiguous")
            by_key[o.key] = o
    tops = [k for k in children if k not in by_key]       # parents never defined
    if not tops:
        o = objects[0]
        raise GeometryError(f"{source}: line {o.line}: no top object (every parent is "
                            f"defined: the objects form a cycle)")
    if len(tops) > 1:
        # psana keeps the last one it meets; an IP is the usual top
        ips = [k for k in tops if k[0].startswith("IP")]
        top = ips[0] if len(ips) == 1 else tops[-1]
        other = next(k for k in tops if k != top)
        o = children[other][0]
        raise GeometryError(f"{source}: line {o.line}: parent {_name(other)} is never "
                            f"defined (the top object is {_name(top)})")
    top = tops[0]
    paths, seen = [], set()

    def walk(key, chain):
        for o in children.get(key, []):
            seen.add(o.line)
            kids = children.get(o.key)
            if kids and is_segment(o.key[0]):
                raise GeometryError(f"{source}: line {kids[0].line}: {_name(o.key)} is a "
                                    f"sensor segment, it cannot hold other objects")
            if kids:
                walk(o.key, [o, *chain])
            elif not is_segment(o.key[0]):
                raise GeometryError(f"{source}: line {o.line}: unknown segment type "
                                    f"{o.key[0]!r} (an object holding nothing must be a "
                                    f"sensor segment; known: {', '.join(SEGMENTS)}, "
                                    f"{', '.join(MATRIX_FORMS)})")
            else:
                paths.append([o, *chain])

    walk(top, [])
    lost = [o for o in objects if o.line not in seen]
    if lost:
        raise GeometryError(f"{source}: line {lost[0].line}: {_name(lost[0].key)} is not "
                            f"under the top object {_name(top)} (its parents form a cycle)")
    return paths


# ---- the result ----------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """Pixel centres x, y, z (um, float64) of every raw pixel, shaped (nseg, rows, cols)
    (psana's order), and the pitch that indexes the assembled image."""
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    pixel_size_um: float
    source: str = ""
    segment_type: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    @property
    def npix(self) -> int:
        return int(self.x.size)

    @property
    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x, self.y, self.z

    @classmethod
    def from_psana_file(cls, path, segment_shape=None, pixel_size_um=None) -> "Geometry":
        """Read a psana geometry file. ``segment_shape`` (rows, cols) and ``pixel_size_um``
        are needed only by segments that take them from the data (Archon, MTRXANY)."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise GeometryError(f"{path}: geometry file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise GeometryError(f"{path}: cannot read the geometry file: {e}") from None
        return cls.from_psana_text(text, str(path), segment_shape, pixel_size_um)

    @classmethod
    def from_psana_text(cls, text: str, source: str = "<geometry>", segment_shape=None,
                        pixel_size_um=None) -> "Geometry":
        paths = _segment_paths(parse_lines(text, source), source)
        layouts = {}
        for chain in paths:
            name = chain[0].key[0]
            if name not in layouts:
                try:
                    layouts[name] = segment(name, segment_shape, pixel_size_um)
                except ValueError as e:
                    raise GeometryError(f"{source}: line {chain[0].line}: {e}") from None
        first = layouts[paths[0][0].key[0]]
        for chain in paths:
            seg = layouts[chain[0].key[0]]
            if seg.shape != first.shape:
                raise GeometryError(f"{source}: line {chain[0].line}: segment {seg.name} "
                                    f"{seg.shape} differs from the first segment's "
                                    f"{first.name} {first.shape}")
        out = np.empty((3, len(paths), *first.shape), np.float64)
        for i, chain in enumerate(paths):
            rot, shift = np.eye(3), np.zeros(3)
            for o in chain:                                  # leaf first, up to the top
                r = o.rotation()
                rot, shift = r @ rot, r @ shift + np.asarray(o.origin)
            seg = layouts[chain[0].key[0]]
            for axis in range(3):                            # segment z = 0
                out[axis, i] = rot[axis, 0] * seg.x + rot[axis, 1] * seg.y + shift[axis]
        x, y, z = out
        if any(o.key[0] == "CSPAD2X2:V1" for o in paths[0][1:]) and x.shape == (2, 185, 388):
            x, y, z = (np.moveaxis(a, 0, -1) for a in (x, y, z))   # psana's (185, 388, 2)
        kinds = sorted({s.name for s in layouts.values()})
        return cls(x, y, z, first.pixel_size_um, source, ", ".join(kinds))

    def reshaped(self, shape, what: str = "the detector") -> tuple[np.ndarray, ...]:
        """x, y, z in a detector's raw shape: the same shape, or one segment of an
        unsegmented detector (1, rows, cols) -> (rows, cols). Anything else (another
        number of segments or of pixels) is refused: the pixel order would be a guess."""
        shape = tuple(int(s) for s in shape)
        if self.shape == shape or (self.shape[0] == 1 and self.shape[1:] == shape):
            return tuple(np.ascontiguousarray(a).reshape(shape) for a in self.coords)
        nseg = self.shape[0] if len(self.shape) == 3 else 1
        raise GeometryError(f"{self.source}: geometry of {nseg} segment(s) {self.segment_type} "
                            f"{self.shape} ({self.npix} pixels) does not match {what}: shape "
                            f"{shape} ({int(np.prod(shape))} pixels)")
