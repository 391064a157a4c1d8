"""Azimuthal integration (DESIGN §8): ``azav`` (nphi, nq), mean per bin, NaN when empty.

From smalldata parameters (center, dis_to_sam, tx, ty, eBeam) the per-pixel maps and the
bins are smalldata_tools' (ana_funcs/azimuthalBinning.py, ``azimuthalBinning._setup``),
formula by formula in the same float64 operations, so that every pixel lands in the bin
smalldata puts it in. Geometry (J. Chem. Phys. 113, 9140 (2000)): pixel (x, y, z) and beam
centre (xc, yc) in mm, distance d, tilts tx, ty, z_off = mean(z) - z, c = d + z_off::

    A = -sin(ty) cos(tx),  B = -sin(tx),  C = -cos(ty) cos(tx)
    a = xc + c tan(ty),    b = yc - c tan(tx)
    r = |(x - a, y - b, c)|
    2theta = arccos((A (x-a) + B (y-b) - C c) / r)
    phi = arccos(((A^2+C^2)(y-b) - A B (x-a) + B C c)
                 / sqrt((A^2+C^2)(r^2 - (A (x-a) + B (y-b) - C c)^2))),
          2 pi - phi where x < xc (undefined on the beam: 0 if y >= yc, else pi)
    q = 4 pi / lambda sin(theta),  lambda [A] = 12398.4 / E [eV]  (smalldata's E2lam)

phi is the angle about the beam from the detector's +y axis (projected perpendicular to
the beam, e_y) towards e_x = e_y x u (= +x with no tilt), i.e. ``atan2(v.e_x, v.e_y)``
in [0, 2 pi) (:func:`pixel_angles`; smalldata's arccos is up to ~1e-5 rad off it near
phi = 0 and pi, close to the beam). Corrections per pixel:

    polarization  (1-P)(1 - (sin phi sin 2theta)^2) + P (1 - (cos phi sin 2theta)^2)
                  (P = Pplane, default 0 as smalldata: the fraction polarized along e_y)
    solid angle   (c / r)^3   (1 at the foot of the perpendicular from the sample)

Pixel x, y, z are the detector's coordinates (gpusmd.geometry.detector_coords: its
``geometry:`` psana file, else the regular grid, z = 0).

Bins (smalldata's rules; pixels in bin i when edge_i <= value < edge_i+1):

* q: ``qbin`` a width (default 0.005 1/A): edges ``np.arange(qmin - qbin, qmax + qbin,
  qbin)`` over the good pixels' q range, so the first bin is empty but for rounding; or
  ``qbin`` / ``qedges`` a list of edges; or (gpusmd) ``qmin`` / ``qmax`` with a width:
  edges qmin, qmin + qbin, ... up to qmax. The q of a bin is the middle of its edges.
  Pixels outside the edges count nowhere (smalldata raises for them).
* phi: ``phiBins`` n (default 1): n bins centred on the n points spread evenly from the
  lowest phi of the detector's pixels to its highest (bins as wide as that range / n);
  what lies beyond (the last half bin, wrapping past 2 pi) falls in bin 0. ``phiBins`` a
  list of values in rad: smalldata's edges (one value max + 0.001 added when max < 2 pi -
  0.01, one min - 0.001 when min > 0; phi is shifted by half the first bin before it is
  compared with them, past 2 pi wrapped), one bin per value, the last open-ended, what
  lies below the first in bin 0. ``phiedges`` (gpusmd): plain edges in degrees, pixels
  outside count nowhere (edges may be given as e.g. [-90, 90]: phi - 360 is tried).

What gpusmd returns, per (phi, q) bin over the good pixels n of the bin (mask & userMask &
inside the q and phi ranges; a fixed set per run)::

    azav = sum_n t(I_n) / (pol_n solid_n) / N_good

where t() zeroes values outside thresADU [lo, hi] (they still count in N_good, as in
smalldata_tools' azav and gpusmd's ROI), NaN where N_good = 0. pyFAI's
``integrate1d(correctSolidAngle=True, polarization_factor=f)`` returns instead
``sum_n I_n / sum_n (pol_n solid_n)``; both are equal when I / (pol solid) is constant
within a bin (and close for a smooth pattern and narrow bins; the tests check 0.1%).

pyFAI correspondence (what :func:`smalldata_to_pyfai` and the ``poni:`` option use):

* pyFAI's detector is gpusmd's assembled image (DESIGN §7): dim1 = image rows = x,
  dim2 = image columns = y, pixel (i, j) centred at ((i + 1/2) p1, (j + 1/2) p2), so
  ``d1 = x - xmin + p1/2``, ``d2 = y - ymin + p2/2`` (m). (For a camera, d1 = x + rows p/2.)
* dist = d; (poni1, poni2) = (a, b) in the (d1, d2) frame (a flat detector, z_off = 0).
* pyFAI's rotation R(rot1, rot2, rot3) takes (d1 - poni1, d2 - poni2, dist) into its lab
  frame (t1, t2, t3), t3 along the beam: the beam in the detector frame is R^T e3 =
  (sin rot2, -cos rot2 sin rot1, cos rot1 cos rot2) = u, so rot2 = asin(-sin ty cos tx),
  rot1 = atan2(sin tx, cos ty cos tx); rot3 is chosen so that pyFAI's t2 axis is e_y,
  which makes pyFAI's ``chi = atan2(t1, t2)`` equal to phi (mod 2 pi).
* pyFAI's polarization 0.5 (1 + cos^2 2th - f cos(2 chi) sin^2 2th) equals the formula
  above with ``f = 2 P - 1`` (P = 1: f = +1; unpolarized P = 0.5: f = 0).
* pyFAI's solid angle (dist / r)^3 is the same; q_A^-1 is the same q for the same
  wavelength (smalldata_to_pyfai gives smalldata's wavelength for eBeam).

With ``poni: file.poni`` the per-pixel maps are computed from pyFAI's own formulas
(any rot3, chi -> phi mod 2 pi) on the positions d1, d2 above (z ignored); PONI versions
1, 2 and 2.1 (detector orientation 3, pyFAI's default, only); the PONI's pixel size must
be the detector's; its Wavelength is the wavelength unless eBeam is given. A detector's
``geometry: file.poni`` is the ``poni`` of each of its azav that gives none of poni,
center, dis_to_sam, tx, ty (gpusmd.config). The bins follow the rules above.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from ..config import Where, check_type
from ..cuda import hist_plan, histogram_compiled, histogram_gpu, histogram_numpy
from ..geometry import detector_coords
from . import Feature, register
from .roi import parse_thresholds

NUMBER = (int, float)
HC_EV_A = 12398.4                    # h c in eV A: smalldata_tools' E2lam (utilities.py)
# pyFAI's (CODATA) h c in keV A: only to state a PONI file's Wavelength as pyFAI's energy
HC_PYFAI_KEV_A = 12.398419843320026
DEFAULT_QBIN = 0.005                 # 1/A, as smalldata_tools
DEFAULT_EBEAM = 9.5                  # keV, as smalldata_tools


# ---- geometry -----------------------------------------------------------------------
def wavelength_A(ebeam_keV):
    """smalldata_tools' ``E2lam(eBeam) * 1e10`` (keV -> eV, then m -> A)."""
    return (HC_EV_A / (ebeam_keV * 1000.0)) * 1e-10 * 1e10


def q_of(tth, wavelength):
    return 4 * np.pi / wavelength * np.sin(tth / 2)


def smalldata_angles(x_um, y_um, z_um, center_um, dis_to_sam_mm, tx_deg, ty_deg):
    """2theta, phi in [0, 2pi) and solid angle (c/r)^3 per pixel, as
    azimuthalBinning._setup computes them (same operations, so the same bits)."""
    x = np.asarray(x_um, np.float64) / 1e3
    y = np.asarray(y_um, np.float64) / 1e3
    z = np.asarray(z_um, np.float64) / 1e3
    z_off = np.nanmean(z) - z
    xcen, ycen = float(center_um[0]) / 1e3, float(center_um[1]) / 1e3
    tx, ty = np.deg2rad(tx_deg), np.deg2rad(ty_deg)
    A, B, C = (-np.sin(ty) * np.cos(tx), -np.sin(tx), -np.cos(ty) * np.cos(tx))
    c = dis_to_sam_mm + z_off
    a, b = xcen + c * np.tan(ty), ycen - c * np.tan(tx)
    r = np.sqrt((x - a) ** 2 + (y - b) ** 2 + c ** 2)
    along = A * (x - a) + B * (y - b) - C * c
    with np.errstate(invalid="ignore", divide="ignore"):   # on the beam: phi undefined
        tth = np.arccos(along / r)
        phi = np.arccos(((A ** 2 + C ** 2) * (y - b) - A * B * (x - a) + B * C * c)
                        / np.sqrt((A ** 2 + C ** 2) * (r ** 2 - along ** 2)))
    phi[(y >= ycen) & np.isnan(phi)] = 0
    phi[(y < ycen) & np.isnan(phi)] = np.pi
    left = x < xcen
    phi[left] = (np.pi - phi[left]) + np.pi
    solid = c / r
    solid *= (c / r) ** 2
    return tth, phi, solid


def smalldata_frame(center_mm, dis_to_sam_mm, tx_deg, ty_deg):
    """(a, b, c) and the 3x3 rotation whose rows are e_x, e_y, u (detector frame)."""
    tx, ty = math.radians(tx_deg), math.radians(ty_deg)
    A, B, C = -math.sin(ty) * math.cos(tx), -math.sin(tx), -math.cos(ty) * math.cos(tx)
    d = float(dis_to_sam_mm)
    a = center_mm[0] + d * math.tan(ty)
    b = center_mm[1] - d * math.tan(tx)
    n = math.sqrt(A * A + C * C)
    ey = np.array([-A * B, A * A + C * C, B * C]) / n
    ex = np.array([-C, 0.0, -A]) / n
    u = np.array([A, B, -C])
    return (a, b, d), np.stack([ex, ey, u])


def pyfai_rotation(rot1, rot2, rot3):
    """pyFAI's calc_pos_zyx as a matrix: rows give t1, t2, t3 from (p1, p2, L)."""
    c1, s1 = math.cos(rot1), math.sin(rot1)
    c2, s2 = math.cos(rot2), math.sin(rot2)
    c3, s3 = math.cos(rot3), math.sin(rot3)
    return np.array([
        [c2 * c3, c3 * s1 * s2 - c1 * s3, -(c1 * c3 * s2 + s1 * s3)],
        [c2 * s3, c1 * c3 + s1 * s2 * s3, -(-(c3 * s1) + c1 * s2 * s3)],
        [s2, -c2 * s1, c1 * c2],
    ])


def pixel_angles(x, y, abc, rot):
    """2theta, phi in [0, 2pi) and solid angle (c/r)^3 for positions x, y (same unit as
    abc); ``rot`` rows: phi's x axis, phi's y axis, beam (all in the detector frame)."""
    a, b, c = abc
    vx = np.asarray(x, np.float64) - a
    vy = np.asarray(y, np.float64) - b
    r = np.sqrt(vx * vx + vy * vy + c * c)
    t1 = rot[0, 0] * vx + rot[0, 1] * vy + rot[0, 2] * c
    t2 = rot[1, 0] * vx + rot[1, 1] * vy + rot[1, 2] * c
    t3 = rot[2, 0] * vx + rot[2, 1] * vy + rot[2, 2] * c
    tth = np.arctan2(np.sqrt(t1 * t1 + t2 * t2), t3)
    phi = np.mod(np.arctan2(t1, t2), 2 * np.pi)
    solid = (c / r) ** 3
    return tth, phi, solid


def polarization(tth, phi, pplane):
    s = np.sin(tth)
    return ((1 - pplane) * (1 - (np.sin(phi) * s) ** 2)
            + pplane * (1 - (np.cos(phi) * s) ** 2))


def image_origin(x_um, y_um, p1_um, p2_um):
    """(x, y) in um of pyFAI's (d1, d2) = (0, 0): d1 = x - xmin + p1/2."""
    return float(np.min(x_um)) - p1_um / 2, float(np.min(y_um)) - p2_um / 2


def smalldata_to_pyfai(center_um, dis_to_sam_mm, tx_deg=0.0, ty_deg=0.0, eBeam_keV=None,
                       origin_um=(0.0, 0.0), Pplane=None):
    """pyFAI geometry (m, rad) equivalent to smalldata parameters; ``origin_um`` is the
    (x, y) of pyFAI's d1 = d2 = 0 (see :func:`image_origin`)."""
    (a, b, d), rot = smalldata_frame(np.asarray(center_um) / 1e3, dis_to_sam_mm, tx_deg, ty_deg)
    u = rot[2]
    rot2 = math.asin(max(-1.0, min(1.0, float(u[0]))))
    rot1 = math.atan2(-u[1], u[2])
    r0 = pyfai_rotation(rot1, rot2, 0.0)
    ey = rot[1]
    rot3 = math.atan2(float(ey @ r0[0]), float(ey @ r0[1]))
    out = {"dist": d * 1e-3, "poni1": (a * 1e3 - origin_um[0]) * 1e-6,
           "poni2": (b * 1e3 - origin_um[1]) * 1e-6, "rot1": rot1, "rot2": rot2, "rot3": rot3}
    if eBeam_keV is not None:       # the wavelength gpusmd (and smalldata) use for eBeam
        out["wavelength"] = wavelength_A(eBeam_keV) * 1e-10
    if Pplane is not None:
        out["polarization_factor"] = 2 * Pplane - 1
    return out


def read_poni(path, where: Where) -> dict:
    """The geometry of a pyFAI PONI file (versions 1, 2, 2.1): dist, poni1, poni2, rot1-3
    (m, rad), wavelength (m or None), pixel1, pixel2 (m or None)."""
    path = Path(path)
    if not path.exists():
        raise where.error(f"PONI file {path} not found")
    items = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        items[key.strip().lower()] = value.strip()
    out = {"pixel1": None, "pixel2": None, "wavelength": None}
    try:
        for key in ("distance", "poni1", "poni2", "rot1", "rot2", "rot3"):
            if key not in items:
                raise where.error(f"PONI file {path} has no {key.capitalize()}")
            out["dist" if key == "distance" else key] = float(items[key])
        if "wavelength" in items:
            out["wavelength"] = float(items["wavelength"])
        if "detector_config" in items:
            cfg = json.loads(items["detector_config"])
            if int(cfg.get("orientation", 3)) != 3:
                raise where.error(f"PONI file {path}: detector orientation "
                                  f"{cfg['orientation']} is not supported (only 3, pyFAI's default)")
            out["pixel1"], out["pixel2"] = cfg.get("pixel1"), cfg.get("pixel2")
        if "pixelsize1" in items:
            out["pixel1"] = float(items["pixelsize1"])
        if "pixelsize2" in items:
            out["pixel2"] = float(items["pixelsize2"])
    except (ValueError, json.JSONDecodeError) as e:
        raise where.error(f"PONI file {path} cannot be read: {e}") from None
    return out


# ---- binning ------------------------------------------------------------------------
def smalldata_qedges(q_good, qbin):
    """azimuthalBinning._setup's q edges for a bin width: the first bin below the lowest q."""
    qbin = np.array(qbin)
    return np.arange(np.nanmin(q_good) - qbin, np.nanmax(q_good) + qbin, qbin)


def smalldata_phi_bins(phi, phi_bins):
    """azimuthalBinning._setup's phi binning of ``phi`` (rad, all the detector's pixels)
    for ``phi_bins`` n or a list of values (rad): (bin of each pixel, the edges phiVec
    that phi + shift (wrapped past 2 pi) is compared with, shift)."""
    if isinstance(phi_bins, (list, tuple)):
        vec = [float(v) for v in phi_bins]
        if max(vec) < (2 * np.pi - 0.01):
            vec.append(np.array(vec).max() + 0.001)
        if min(vec) > 0:
            vec.append(np.array(vec).min() - 0.001)
        vec.sort()
        nphi = len(vec)
        shift = (vec[1] - vec[0]) / 2
        pbm = _wrap(phi + shift)
        vec = np.array(vec)
    else:
        nphi = int(phi_bins)
        shift = (phi.max() - phi.min()) / nphi / 2
        pbm = _wrap(phi + shift)
        vec = np.linspace(phi.min(), phi.max() + np.spacing(np.min(pbm)), nphi + 1)
    idx = np.digitize(pbm.ravel(), vec).reshape(phi.shape) - 1
    idx[idx < 0] = 0                    # under- and overflow: bin 0
    idx[idx == nphi] = 0
    return idx, vec, shift


def _wrap(pbm):
    pbm[pbm >= 2 * np.pi] -= 2 * np.pi
    return pbm


def bin_index(values, edges):
    """Bin of each value in ascending ``edges`` (last bin closed), -1 outside."""
    idx = np.searchsorted(edges, values, side="right") - 1
    idx[values == edges[-1]] = len(edges) - 2
    idx[(idx < 0) | (idx >= len(edges) - 1) | ~np.isfinite(values)] = -1
    return idx


def _check_number(params, key, where, positive=False):
    if key in params:
        v = check_type(params[key], NUMBER, where / key, "a number")
        if positive and not v > 0:
            raise (where / key).error(f"expected a positive number, got {v!r}")


def _check_edges(value, where, what):
    check_type(value, (list, tuple), where, f"a list of {what} edges")
    if len(value) < 2:
        raise where.error("expected at least 2 edges")
    for i, v in enumerate(value):
        check_type(v, NUMBER, where / i, "a number")
    if any(b <= a for a, b in itertools.pairwise(value)):
        raise where.error("edges must be strictly increasing")


@register
class AzimuthalIntegration(Feature):
    kind = "azav"
    name_prefix = "azav"
    numbered = True
    PARAMS = ("center", "dis_to_sam", "eBeam", "qbin", "qedges", "qmin", "qmax", "phiBins",
              "phiedges", "tx", "ty", "Pplane", "polarization", "solidangle", "thresADU",
              "mask", "userMask", "poni")

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        if "poni" in params:
            check_type(params["poni"], (str,), where / "poni", "a .poni file path")
            for key in ("center", "dis_to_sam", "tx", "ty"):
                if key in params:
                    raise (where / key).error("not allowed together with poni (the PONI file "
                                              "gives the geometry)")
        else:
            for key in ("center", "dis_to_sam"):
                if key not in params:
                    raise (where / key).error("required key is missing (or give poni)")
            center = check_type(params["center"], (list, tuple), where / "center",
                                "[x, y] in um")
            if len(center) != 2:
                raise (where / "center").error(f"expected [x, y] in um, got {center!r}")
            for i, v in enumerate(center):
                check_type(v, NUMBER, where / "center" / i, "a number (um)")
        for key in ("dis_to_sam", "eBeam"):
            _check_number(params, key, where, positive=True)
        if isinstance(params.get("qbin"), (list, tuple)):           # edges, as smalldata
            _check_edges(params["qbin"], where / "qbin", "q")
        else:
            _check_number(params, "qbin", where, positive=True)
        for key in ("qmin", "qmax", "tx", "ty", "Pplane"):
            _check_number(params, key, where)
        if "Pplane" in params and not 0 <= params["Pplane"] <= 1:
            raise (where / "Pplane").error(f"expected a fraction in [0, 1], got {params['Pplane']!r}")
        if "qbin" in params and "qedges" in params:
            raise (where / "qedges").error("give qbin or qedges, not both")
        if "qedges" in params:
            _check_edges(params["qedges"], where / "qedges", "q")
        if "qedges" in params or isinstance(params.get("qbin"), (list, tuple)):
            for key in ("qmin", "qmax"):
                if key in params:
                    raise (where / key).error("not allowed together with q edges")
        if "qmin" in params and "qmax" in params and params["qmax"] <= params["qmin"]:
            raise (where / "qmax").error(f"qmax {params['qmax']} is not above qmin {params['qmin']}")
        if "phiBins" in params and "phiedges" in params:
            raise (where / "phiedges").error("give phiBins or phiedges, not both")
        if isinstance(params.get("phiBins"), (list, tuple)):         # smalldata's, in rad
            values = params["phiBins"]
            if not values:
                raise (where / "phiBins").error("expected at least one value")
            for i, v in enumerate(values):
                check_type(v, NUMBER, where / "phiBins" / i, "a number (rad)")
                if not 0 <= v <= 2 * math.pi:
                    raise (where / "phiBins" / i).error(
                        f"expected an angle in [0, 2 pi] rad, got {v!r} (phiedges takes degrees)")
        elif "phiBins" in params:
            n = check_type(params["phiBins"], (int,), where / "phiBins",
                           "a positive integer or a list of angles (rad)")
            if n < 1:
                raise (where / "phiBins").error(f"expected a positive integer, got {n}")
        if "phiedges" in params:
            _check_edges(params["phiedges"], where / "phiedges", "phi (degree)")
        for key in ("polarization", "solidangle"):
            if key in params:
                check_type(params[key], (bool,), where / key, "true or false")
        parse_thresholds(params.get("thresADU"), where / "thresADU")
        for key, what in (("mask", "a mask name"), ("userMask", "a .npy file path")):
            if key in params:
                check_type(params[key], (str,), where / key, what)

    def __init__(self, name, params, model, masks, backend, where, input_shape=None):
        super().__init__(name, params, model, masks, backend, where, input_shape=input_shape)
        if self.input_shape != tuple(model.shape):
            raise where.error(f"azav works on the detector's frames {tuple(model.shape)}, "
                              f"not on a parent's output {self.input_shape}")
        xp = backend.xp
        x, y, z = (np.asarray(c, np.float64) for c in detector_coords(model))
        self.lo, self.hi = parse_thresholds(params.get("thresADU"), where / "thresADU")
        self.pplane = float(params.get("Pplane", 0.0))
        self.use_pol = bool(params.get("polarization", True))
        self.use_solid = bool(params.get("solidangle", True))
        self.tx, self.ty = float(params.get("tx", 0.0)), float(params.get("ty", 0.0))
        p = model.pixel_size_um
        if "poni" in params:
            poni = read_poni(params["poni"], where / "poni")
            for key in ("pixel1", "pixel2"):
                if poni[key] is not None and abs(poni[key] * 1e6 - p) > 1e-3 * p:
                    raise (where / "poni").error(
                        f"the PONI file's {key} {poni[key] * 1e6:g} um is not the detector's "
                        f"pixel size {p:g} um")
            if "eBeam" in params or not poni["wavelength"]:
                self.ebeam = float(params.get("eBeam", DEFAULT_EBEAM))
                self.wavelength_A = wavelength_A(self.ebeam)
            else:
                self.wavelength_A = poni["wavelength"] * 1e10
                self.ebeam = HC_PYFAI_KEV_A / self.wavelength_A
            x0, y0 = image_origin(x, y, p, p)
            abc = ((x0 + poni["poni1"] * 1e6) / 1e3, (y0 + poni["poni2"] * 1e6) / 1e3,
                   poni["dist"] * 1e3)
            rot = pyfai_rotation(poni["rot1"], poni["rot2"], poni["rot3"])
            tth, phi, solid = pixel_angles(x / 1e3, y / 1e3, abc, rot)
            self.center = None
            self.dis_to_sam = poni["dist"] * 1e3
            self.poni = poni
        else:
            self.ebeam = float(params.get("eBeam", DEFAULT_EBEAM))
            self.wavelength_A = wavelength_A(self.ebeam)
            self.center = [float(v) for v in params["center"]]
            self.dis_to_sam = float(params["dis_to_sam"])
            tth, phi, solid = smalldata_angles(x, y, z, self.center, self.dis_to_sam,
                                               self.tx, self.ty)
            self.poni = None
        q = q_of(tth, self.wavelength_A)
        corr = np.ones_like(q)
        if self.use_pol:
            corr = corr * polarization(tth, phi, self.pplane)
        if self.use_solid:
            corr = corr * solid
        self.q_map, self.phi_map, self.tth_map, self.correction = q, phi, tth, corr

        # good pixels
        mask_name = params.get("mask", "cmask")
        if mask_name not in masks:
            raise (where / "mask").error(f"unknown mask {mask_name!r} (known: {', '.join(masks)})")
        good = np.asarray(masks[mask_name]).reshape(model.shape) != 0
        if "userMask" in params:
            good &= self._load_user_mask(params["userMask"], where / "userMask")
        good &= np.isfinite(q) & (corr > 0)

        # bins
        qbin = params.get("qbin", DEFAULT_QBIN)
        qg = q[good]
        if isinstance(qbin, (list, tuple)) or "qedges" in params:
            q_edges = np.asarray(params.get("qedges", qbin), np.float64)
        elif "qmin" in params or "qmax" in params:
            qmin = float(params.get("qmin", qg.min() if qg.size else 0.0))
            qmax = float(params.get("qmax", qg.max() if qg.size else qmin + qbin))
            nq = max(1, math.ceil((qmax - qmin) / qbin - 1e-9))
            q_edges = qmin + qbin * np.arange(nq + 1)
        elif qg.size:
            q_edges = smalldata_qedges(qg, qbin)
        else:
            q_edges = np.array([0.0, float(qbin)])
        phi_deg = np.degrees(phi)
        if "phiedges" in params:        # edges may be given as e.g. [-90, 90]: try phi - 360
            phi_edges = np.asarray(params["phiedges"], np.float64)
            iphi = bin_index(phi_deg, phi_edges)
            alt = bin_index(phi_deg - 360.0, phi_edges)
            iphi = np.where(iphi < 0, alt, iphi)
        else:
            phi_bins = params.get("phiBins", 1)
            iphi, vec, shift = smalldata_phi_bins(phi, phi_bins)
            if isinstance(phi_bins, (list, tuple)):   # one bin per value, the last to 2 pi
                vec = np.append(vec, 2 * np.pi)
            phi_edges = np.degrees(vec - shift)
        self.q_edges, self.phi_edges = q_edges, phi_edges
        self.nq, self.nphi = len(q_edges) - 1, len(phi_edges) - 1
        self.nbins = self.nq * self.nphi
        iq = bin_index(q, q_edges)
        ok = good & (iq >= 0) & (iphi >= 0)
        pixel_bin = np.where(ok, iphi * self.nq + iq, -1).astype(np.int64)
        self.pixel_bin = pixel_bin
        self.counts = np.bincount(pixel_bin[ok].ravel(), minlength=self.nbins
                                  ).reshape(self.nphi, self.nq)
        inv = np.where(ok, 1.0 / np.where(ok, corr, 1.0), 0.0).astype(np.float32)
        # the pixels' summation order, the same on the CPU and the GPU (kernels/histogram.cu)
        self._plan = hist_plan(pixel_bin, inv, self.nbins)
        if backend.is_gpu:
            self._plan = self._plan.to(xp)
        with np.errstate(divide="ignore"):
            inv_counts = np.where(self.counts > 0, 1.0 / np.maximum(self.counts, 1), np.nan)
        self._inv_counts = xp.asarray(inv_counts.ravel())

    def _load_user_mask(self, path, where):
        path = Path(path)
        if not path.exists():
            raise where.error(f"user mask file {path} not found")
        m = np.load(path)
        if m.size != self.model.npix:
            raise where.error(f"user mask has shape {m.shape}; expected the detector's "
                              f"{self.model.shape}")
        return m.reshape(self.model.shape) != 0

    def process(self, calib):
        xp = self.backend.xp
        batch = calib.shape[0]
        data = calib.reshape(batch, -1)
        if self.backend.is_gpu:
            sums = histogram_gpu(data, self._plan, self.lo, self.hi)
        elif self.backend.compiled:
            sums = histogram_compiled(data, self._plan, self.lo, self.hi)
        else:
            sums = histogram_numpy(data, self._plan, self.lo, self.hi)
        azav = (sums * self._inv_counts[None, :]).astype(xp.float32)
        return {"azav": azav.reshape(batch, self.nphi, self.nq)}

    @property
    def q(self):
        return (self.q_edges[:-1] + self.q_edges[1:]) / 2

    @property
    def phi(self):
        return (self.phi_edges[:-1] + self.phi_edges[1:]) / 2

    def config_items(self):
        nan = np.nan
        return {"q": self.q, "q_edges": self.q_edges, "phi": self.phi,
                "phi_edges": self.phi_edges, "npix": self.counts.astype(np.int64),
                "center": np.array(self.center if self.center is not None else [nan, nan]),
                "dis_to_sam": self.dis_to_sam, "eBeam": self.ebeam,
                "wavelength": self.wavelength_A, "tx": self.tx, "ty": self.ty,
                "Pplane": self.pplane, "polarization": int(self.use_pol),
                "solidangle": int(self.use_solid),
                "thresADU": np.array([nan if v is None else v for v in (self.lo, self.hi)]),
                "mask": self.params.get("mask", "cmask"),
                "poni": self.params.get("poni", "")}
