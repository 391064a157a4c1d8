"""The beam centre (and the sample-detector distance, the tilts) from the rings of an
average image, as smalldata_tools' fitting helpers find it (ana_funcs/fitCenter.py,
utilities_FitCenter.py: ring points, RANSAC, a least-squares fit of concentric circles).

Everything works on the raw-shaped image and the pixel coordinates of the detector's
geometry (um) of an average-image file (gpusmd.beamtime.avimage), so that segments, gaps
and a centre off the detector need nothing special:

1. Ring points: the good pixels (the file's mask, and a user mask) whose value,
   smoothed within each segment by a Gaussian of ``smooth`` pixels (gaps and masked
   pixels do not count), lies above the ``threshold`` percentile (fitCenter's
   percentile threshold; FindFitCenter takes Canny edges at quantiles instead).
2. A first centre: a RANSAC circle (3-point circles, the one with most points within
   ``tolerance`` pixels; FindFitCenter's skimage ransac / CircleModel) through the points,
   unless a guess is given.
3. Rings: peaks of the histogram of the points' distance to the centre; each ring takes
   the points near its peak, then those within 3 rms of its fitted radius.
4. Concentric circles fitted together (centre + one radius per ring, least squares, as
   _fit_circles), twice with the points taken again.
5. With the scattering angle of rings known (their q in 1/A, or a pyFAI calibrant's
   lines, and the beam energy) the geometry itself is fitted: the centre, the distance
   (unless given) and, with ``fit_tilt``, the tilts tx, ty, minimizing the 2theta of the
   ring points from their ring's, with 2theta as gpusmd's azav computes it (smalldata's
   azimuthalBinning: J. Chem. Phys. 113, 9140). Rings are matched to the known q by the
   distance that makes the most of them agree. With a given distance and no known q, the
   ring's q is reported.

The centre is given as the azav takes it: ``center: [x, y]`` in um, the detector's
coordinates (with tilts, smalldata's (xc, yc): the direct beam hits the detector at
x = xc, y = yc - c tan(tx) (1 + 1 / cos(ty)), c the distance); and as the pyFAI
geometry (PONI) of the assembled image (gpusmd.features.azimuthal.smalldata_to_pyfai).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage, optimize, signal

from ..errors import GpusmdError
from ..features.azimuthal import (DEFAULT_EBEAM, image_origin, pixel_angles, q_of,
                                  smalldata_frame, smalldata_to_pyfai, wavelength_A)
from ..io.output import check_new_output, written_whole
from .avimage import AvImage, figure, save_figure


# ---- ring points --------------------------------------------------------------------
def smoothed(image: np.ndarray, good: np.ndarray, sigma_px: float) -> np.ndarray:
    """The image smoothed within each segment (normalised convolution: masked pixels and
    the segment's borders add nothing)."""
    if sigma_px <= 0:
        return np.where(good, image, 0.0)
    seg = image.reshape(-1, *image.shape[-2:]).astype(np.float64)
    w = good.reshape(seg.shape).astype(np.float64)
    sig = (0, sigma_px, sigma_px)
    num = ndimage.gaussian_filter(np.where(w > 0, seg, 0.0), sig, mode="constant")
    den = ndimage.gaussian_filter(w, sig, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 1e-3, num / den, 0.0)
    return out.reshape(image.shape)


def ring_points(av: AvImage, threshold: float = 95.0, smooth: float = 1.0, user_mask=None):
    """Boolean raw-shaped map of the pixels taken for rings (step 1 of the module doc)."""
    good = (av.mask != 0) & np.isfinite(av.image)
    if user_mask is not None:
        good &= np.asarray(user_mask).reshape(av.shape) != 0
    if not good.any():
        raise GpusmdError(f"{av.path}: no good pixel in the image")
    values = smoothed(np.nan_to_num(av.image), good, smooth)
    cut = np.percentile(values[good], threshold)
    return good & (values > cut)


# ---- circles ------------------------------------------------------------------------
def circle_through(x, y):
    """Centres and radii of the circles through triples of points, x, y (..., 3)."""
    ax, bx, cx = x[..., 0], x[..., 1], x[..., 2]
    ay, by, cy = y[..., 0], y[..., 1], y[..., 2]
    d = 2 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by))
    with np.errstate(invalid="ignore", divide="ignore"):
        ux = ((ax ** 2 + ay ** 2) * (by - cy) + (bx ** 2 + by ** 2) * (cy - ay)
              + (cx ** 2 + cy ** 2) * (ay - by)) / d
        uy = ((ax ** 2 + ay ** 2) * (cx - bx) + (bx ** 2 + by ** 2) * (ax - cx)
              + (cx ** 2 + cy ** 2) * (bx - ax)) / d
    return ux, uy, np.hypot(ax - ux, ay - uy)


def circle_lsq(x, y):
    """Algebraic (Kasa) circle through points: (xc, yc, r)."""
    a = np.stack([x, y, np.ones_like(x)], 1)
    (d, e, f), *_ = np.linalg.lstsq(a, -(x * x + y * y), rcond=None)
    xc, yc = -d / 2, -e / 2
    return xc, yc, math.sqrt(max(xc * xc + yc * yc - f, 0.0))


def ransac_circle(x, y, tolerance, trials=2000, seed=0, max_points=4000):
    """The circle with the most points within ``tolerance`` (RANSAC over 3-point circles),
    refined on its points: (xc, yc, r, number of points)."""
    rng = np.random.default_rng(seed)
    if len(x) < 3:
        raise GpusmdError("fewer than 3 ring points: lower --threshold or check the image")
    sub = rng.choice(len(x), min(len(x), max_points), replace=False)
    xs, ys = x[sub], y[sub]
    triples = rng.integers(0, len(xs), (trials, 3))
    ux, uy, r = circle_through(xs[triples], ys[triples])
    ok = np.isfinite(r) & (r > 3 * tolerance)
    ux, uy, r = ux[ok], uy[ok], r[ok]
    best, best_n = None, -1
    for start in range(0, len(r), 250):          # bounded memory: 250 circles at a time
        sl = slice(start, start + 250)
        dist = np.hypot(xs[None, :] - ux[sl, None], ys[None, :] - uy[sl, None])
        counts = (np.abs(dist - r[sl, None]) < tolerance).sum(1)
        k = int(np.argmax(counts))
        if counts[k] > best_n:
            best_n, best = int(counts[k]), (ux[sl][k], uy[sl][k], r[sl][k])
    if best is None:
        raise GpusmdError("no circle through the ring points")
    xc, yc, rc = best
    for _ in range(3):
        inl = np.abs(np.hypot(x - xc, y - yc) - rc) < tolerance
        if inl.sum() < 3:
            break
        xc, yc, rc = circle_lsq(x[inl], y[inl])
    return xc, yc, rc, int(inl.sum())


def find_rings(x, y, center, pixel_um, min_points=40, max_rings=10):
    """Ring radii (um) from the peaks of the histogram of the points' distances to
    ``center``, strongest first, with the half width of each peak (um)."""
    r = np.hypot(x - center[0], y - center[1])
    width = pixel_um / 2
    edges = np.arange(r.min() - width, r.max() + 2 * width, width)
    counts, _ = np.histogram(r, edges)
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), 1.0)
    peaks, props = signal.find_peaks(smooth, distance=max(1, int(round(4 * pixel_um / width))),
                                     prominence=0)
    if not len(peaks):
        return []
    prom = props["prominences"]
    keep = prom >= 0.1 * prom.max()
    peaks, prom = peaks[keep], prom[keep]
    halfw = signal.peak_widths(smooth, peaks, rel_height=0.75)[0] * width
    centres = (edges[peaks] + edges[peaks + 1]) / 2
    order = np.argsort(-prom)[:max_rings]
    rings = []
    for k in order:
        lo = max([centres[k] - 1.5 * halfw[k] - width]
                 + [(centres[k] + c) / 2 for c in centres if c < centres[k]])
        hi = min([centres[k] + 1.5 * halfw[k] + width]
                 + [(centres[k] + c) / 2 for c in centres if c > centres[k]])
        if ((r >= lo) & (r < hi)).sum() >= min_points:
            rings.append((float(centres[k]), float(lo), float(hi)))
    return sorted(rings)


def fit_concentric(xs, ys, center):
    """Concentric circles through point sets (one per ring), least squares on the
    distances: (xc, yc, radii)."""
    r0 = [float(np.hypot(x - center[0], y - center[1]).mean()) for x, y in zip(xs, ys)]

    def resid(p):
        return np.concatenate([np.hypot(x - p[0], y - p[1]) - p[2 + i]
                               for i, (x, y) in enumerate(zip(xs, ys))])

    res = optimize.least_squares(resid, [center[0], center[1], *r0], x_scale="jac")
    return res.x[0], res.x[1], list(res.x[2:])


# ---- the geometry -------------------------------------------------------------------
def two_theta(x_um, y_um, zoff_um, center_um, distance_mm, tx_deg=0.0, ty_deg=0.0):
    """2theta (rad) of pixels, the azav's geometry (gpusmd.features.azimuthal)."""
    (_, _, _), rot = smalldata_frame(np.asarray(center_um) / 1e3, distance_mm, tx_deg, ty_deg)
    c = distance_mm + np.asarray(zoff_um) / 1e3
    a = center_um[0] / 1e3 + c * math.tan(math.radians(ty_deg))
    b = center_um[1] / 1e3 - c * math.tan(math.radians(tx_deg))
    return pixel_angles(np.asarray(x_um) / 1e3, np.asarray(y_um) / 1e3, (a, b, c), rot)[0]


def center_of_spot(spot_um, distance_mm, tx_deg=0.0, ty_deg=0.0):
    """The azav centre (xc, yc) whose direct beam hits the detector at ``spot_um``: x = xc,
    y = yc - d tan(tx) (1 + 1 / cos(ty)) (smalldata's geometry, module docstring)."""
    tx, ty = math.radians(tx_deg), math.radians(ty_deg)
    return (spot_um[0], spot_um[1] + distance_mm * 1e3 * math.tan(tx) * (1 + 1 / math.cos(ty)))


def spot_of_center(center_um, distance_mm, tx_deg=0.0, ty_deg=0.0):
    tx, ty = math.radians(tx_deg), math.radians(ty_deg)
    return (center_um[0],
            center_um[1] - distance_mm * 1e3 * math.tan(tx) * (1 + 1 / math.cos(ty)))


def tth_of_q(q, ebeam_keV):
    s = np.asarray(q, np.float64) * wavelength_A(ebeam_keV) / (4 * np.pi)
    if np.any(s >= 1):
        raise GpusmdError(f"q {np.asarray(q)[s >= 1][0]:g} 1/A is beyond 4 pi / lambda at "
                          f"{ebeam_keV:g} keV")
    return 2 * np.arcsin(s)


def calibrant_q(name: str, ebeam_keV: float | None = DEFAULT_EBEAM) -> list[float]:
    """q (1/A) of a pyFAI calibrant's lines, 2 pi / d: those a beam of ``ebeam_keV`` can
    reach (q < 4 pi / lambda; all with None)."""
    import pyFAI.calibrant
    if name not in pyFAI.calibrant.names():
        raise GpusmdError(f"unknown calibrant {name!r} (pyFAI knows: "
                          f"{', '.join(sorted(pyFAI.calibrant.names()))})")
    cal = pyFAI.calibrant.get_calibrant(name)
    d = getattr(cal, "dspacing", None) or cal.dSpacing
    q = 2 * np.pi / np.asarray(d, np.float64)
    if ebeam_keV is not None:
        q = q[q < 4 * np.pi / wavelength_A(ebeam_keV)]
    return sorted(q)


def match_rings(radii_um, tth_known, distance_mm=None, tolerance=0.03):
    """For each ring radius the index of its known 2theta (or None): by the given
    distance, else by the distance (from one ring and one line) that matches most rings
    best. Returns (indices, distance estimate in mm)."""
    radii = np.asarray(radii_um, np.float64)
    tth = np.asarray(tth_known, np.float64)
    candidates = ([distance_mm] if distance_mm is not None else
                  [r / 1e3 / math.tan(t) for r in radii for t in tth])
    best = (None, -1, np.inf, None)
    for d in candidates:
        pred = d * 1e3 * np.tan(tth)
        rel = np.abs(radii[:, None] - pred[None, :]) / radii[:, None]
        idx = rel.argmin(1)
        hit = rel[np.arange(len(radii)), idx] < tolerance
        # one line per ring
        used, picks = set(), []
        for i in np.argsort(rel[np.arange(len(radii)), idx]):
            picks.append((i, int(idx[i]) if hit[i] and idx[i] not in used else None))
            if hit[i]:
                used.add(int(idx[i]))
        picks = dict(picks)
        n = sum(v is not None for v in picks.values())
        cost = float(sum(rel[i, v] for i, v in picks.items() if v is not None))
        if n > best[1] or (n == best[1] and cost < best[2]):
            best = ([picks[i] for i in range(len(radii))], n, cost, d)
    if best[1] <= 0:
        raise GpusmdError(f"no ring of radius {', '.join(f'{r:.0f}' for r in radii)} um "
                          f"matches the known q at any distance"
                          + (f" (distance {distance_mm:g} mm)" if distance_mm else ""))
    return best[0], float(best[3])


@dataclass
class Ring:
    radius_um: float            # of the fitted circle
    npoints: int
    rms_px: float               # of the points about the fit (circle or 2theta, in pixels)
    tth_deg: float | None = None
    q: float | None = None      # 1/A
    q_known: bool = False


@dataclass
class BeamCenter:
    center_um: tuple
    distance_mm: float | None
    tx_deg: float
    ty_deg: float
    ebeam_keV: float
    rings: list = field(default_factory=list)
    pixel_size_um: float = 0.0
    origin_um: tuple = (0.0, 0.0)           # x, y of pyFAI's d1 = d2 = 0
    points: list = field(default_factory=list)   # (x, y) um per ring, for the picture
    fitted: str = "centre"

    def azav(self) -> dict:
        out = {"center": [round(float(v), 2) for v in self.center_um]}
        if self.distance_mm is not None:
            out["dis_to_sam"] = round(float(self.distance_mm), 4)
        if self.tx_deg or self.ty_deg:
            out.update(tx=round(self.tx_deg, 4), ty=round(self.ty_deg, 4))
        out["eBeam"] = self.ebeam_keV
        return out

    def poni(self) -> dict | None:
        if self.distance_mm is None:
            return None
        out = smalldata_to_pyfai(self.center_um, self.distance_mm, self.tx_deg, self.ty_deg,
                                 self.ebeam_keV, self.origin_um)
        out["pixel1"] = out["pixel2"] = self.pixel_size_um * 1e-6
        return out


def fit_beam_center(av: AvImage, q_known=None, distance_mm=None, ebeam_keV=None,
                    fit_tilt=False, tilt_deg=(0.0, 0.0), guess_um=None, threshold=95.0,
                    smooth=1.0, user_mask=None, tolerance_px=2.0, min_points=40,
                    max_rings=10) -> BeamCenter:
    """The beam centre of an average image (module docstring). ``q_known``: q (1/A) of
    rings that may be in the image; ``distance_mm``: a known distance (then not fitted)."""
    p = av.pixel_size_um
    ebeam = float(ebeam_keV or DEFAULT_EBEAM)
    sel = ring_points(av, threshold, smooth, user_mask)
    x, y = av.x[sel].astype(np.float64), av.y[sel].astype(np.float64)
    zoff = (np.nanmean(av.z) - av.z[sel]).astype(np.float64)
    if guess_um is None:
        xc, yc, _, _ = ransac_circle(x, y, tolerance_px * p)
    else:
        xc, yc = (float(v) for v in guess_um)
    rings = []
    for _ in range(3):        # rings found again about the better centre
        rings = find_rings(x, y, (xc, yc), p, min_points, max_rings)
        if not rings:
            raise GpusmdError(f"{av.path}: no ring found in the image (try another "
                              f"--threshold, or give --guess)")
        members = [(np.hypot(x - xc, y - yc) >= lo) & (np.hypot(x - xc, y - yc) < hi)
                   for _, lo, hi in rings]
        for _ in range(2):
            xc, yc, radii = fit_concentric([x[m] for m in members], [y[m] for m in members],
                                           (xc, yc))
            dist = np.hypot(x - xc, y - yc)
            new = []
            for m, r in zip(members, radii):
                rms = max(float(np.sqrt(np.mean((dist[m] - r) ** 2))), p / 2)
                new.append(np.abs(dist - r) < 3 * rms)
            members = [m for m in new if m.sum() >= min_points] or new
    radii = [float(np.hypot(x[m] - xc, y[m] - yc).mean()) for m in members]
    order = np.argsort(radii)
    members = [members[i] for i in order]
    radii = [radii[i] for i in order]
    tx, ty = (float(v) for v in tilt_deg)
    origin = image_origin(av.x, av.y, p, p)
    result = BeamCenter((xc, yc), distance_mm, tx, ty, ebeam, pixel_size_um=p, origin_um=origin)

    if q_known:
        tth_known = tth_of_q(sorted(q_known), ebeam)
        picks, d_est = match_rings(radii, tth_known, distance_mm)
        use = [i for i, k in enumerate(picks) if k is not None]
        target = {i: float(tth_known[picks[i]]) for i in use}
        fit_d = distance_mm is None
        # fitted: where the direct beam hits the detector (the rings' centre, nearly
        # independent of the tilts), the distance, the tilts; the azav centre follows
        start = [xc, yc] + ([d_est] if fit_d else []) + ([tx, ty] if fit_tilt else [])

        def unpack(v):
            d = v[2] if fit_d else distance_mm
            t = (v[-2], v[-1]) if fit_tilt else (tx, ty)
            return center_of_spot((v[0], v[1]), d, *t), d, t

        def resid(v, sets):
            c, d, t = unpack(v)
            return np.concatenate([two_theta(x[m], y[m], zoff[m], c, d, *t) - target[i]
                                   for i, m in sets])

        sets = [(i, members[i]) for i in use]
        for _ in range(3):       # points taken again by their 2theta about the fit
            sol = optimize.least_squares(resid, start, args=(sets,), x_scale="jac")
            start = sol.x
            c, d, t = unpack(sol.x)
            tth_all = two_theta(x, y, zoff, c, d, *t)
            new = []
            for i, m in sets:
                dev = tth_all - target[i]
                rms = max(float(np.sqrt(np.mean(dev[m] ** 2))), 1e-7)
                new.append((i, np.abs(dev) < 3 * rms))
            sets = [(i, m) for i, m in new if m.sum() >= min_points] or sets
        members_q = dict(sets)
        c, d, t = unpack(start)
        result = BeamCenter((float(c[0]), float(c[1])), float(d), float(t[0]), float(t[1]),
                            ebeam, pixel_size_um=p, origin_um=origin,
                            fitted="centre, distance" * fit_d + "centre" * (not fit_d)
                            + ", tilt" * fit_tilt)
        for i, m in enumerate(members):
            m = members_q.get(i, m)
            tth = two_theta(x[m], y[m], zoff[m], result.center_um, d, *t)
            known = i in target
            ring_tth = target[i] if known else float(np.mean(tth))
            dev_um = (tth - ring_tth) * d * 1e3 / np.cos(ring_tth) ** 2   # d(R)/d(2theta)
            r_um = float(np.hypot(x[m] - c[0], y[m] - c[1]).mean())
            result.rings.append(Ring(r_um, int(m.sum()), float(np.sqrt(np.mean(dev_um ** 2)) / p),
                                     math.degrees(ring_tth),
                                     float(q_of(ring_tth, wavelength_A(ebeam))), known))
            result.points.append((x[m], y[m]))
        return result

    if distance_mm is not None:       # the circles' centre is where the beam hits
        result.center_um = center_of_spot((xc, yc), distance_mm, tx, ty)
    for m, r in zip(members, radii):
        dev = np.hypot(x[m] - xc, y[m] - yc) - r
        ring = Ring(r, int(m.sum()), float(np.sqrt(np.mean(dev ** 2)) / p))
        if distance_mm is not None:
            tth = float(np.mean(two_theta(x[m], y[m], zoff[m], result.center_um, distance_mm,
                                          tx, ty)))
            ring.tth_deg, ring.q = math.degrees(tth), float(q_of(tth, wavelength_A(ebeam)))
        result.rings.append(ring)
        result.points.append((x[m], y[m]))
    return result


# ---- output -------------------------------------------------------------------------
def report(bc: BeamCenter, av: AvImage) -> str:
    row, col = av.to_image_px(*bc.center_um)
    lines = [f"{av.path.name}: {av.detector} ({av.attrs.get('type', '')}), "
             f"{len(bc.rings)} ring(s), fitted: {bc.fitted}",
             f"beam centre: x = {bc.center_um[0]:.1f} um, y = {bc.center_um[1]:.1f} um "
             f"(assembled image row {row:.2f}, column {col:.2f})"]
    if bc.distance_mm is not None:
        lines.append(f"distance: {bc.distance_mm:.3f} mm"
                     + (f", tilt tx = {bc.tx_deg:.4f} deg, ty = {bc.ty_deg:.4f} deg"
                        if bc.tx_deg or bc.ty_deg else ""))
        if bc.tx_deg or bc.ty_deg:
            sx, sy = spot_of_center(bc.center_um, bc.distance_mm, bc.tx_deg, bc.ty_deg)
            lines.append(f"direct beam on the detector: x = {sx:.1f} um, y = {sy:.1f} um")
    for i, r in enumerate(bc.rings):
        extra = ""
        if r.q is not None:
            extra = (f", 2theta {r.tth_deg:.4f} deg, q {r.q:.5f} 1/A"
                     + (" (known)" if r.q_known else ""))
        lines.append(f"  ring {i}: radius {r.radius_um:.1f} um ({r.radius_um / bc.pixel_size_um:.2f} px), "
                     f"{r.npoints} points, rms {r.rms_px:.2f} px{extra}")
    az = bc.azav()
    lines.append("config (azav): " + ", ".join(f"{k}: {v}" for k, v in az.items()))
    poni = bc.poni()
    if poni is None:
        lines.append("PONI: needs the distance (give --dis-to-sam, or --ring Q / --calibrant)")
    else:
        shape = av.assembled_shape
        lines.append(f"PONI (pyFAI; detector: the assembled image {shape[0]} x {shape[1]}, "
                     f"pixel {bc.pixel_size_um:g} um):")
        lines += [f"  Distance: {poni['dist']:.6g}", f"  Poni1: {poni['poni1']:.6g}",
                  f"  Poni2: {poni['poni2']:.6g}", f"  Rot1: {poni['rot1']:.6g}",
                  f"  Rot2: {poni['rot2']:.6g}", f"  Rot3: {poni['rot3']:.6g}",
                  f"  Wavelength: {poni['wavelength']:.6g}"]
    return "\n".join(lines)


def write_poni(bc: BeamCenter, av: AvImage, path, force: bool = False) -> Path:
    """A pyFAI PONI file (pyFAI's own writer) of the fit; the assembled image is its
    detector."""
    poni = bc.poni()
    if poni is None:
        raise GpusmdError(f"{path}: a PONI needs the distance (give --dis-to-sam, or "
                          f"--ring Q / --calibrant)")
    path = check_new_output(path, force)
    from pyFAI.detectors import Detector
    from pyFAI.geometry import Geometry
    shape = av.assembled_shape
    geometry = Geometry(dist=poni["dist"], poni1=poni["poni1"], poni2=poni["poni2"],
                        rot1=poni["rot1"], rot2=poni["rot2"], rot3=poni["rot3"],
                        wavelength=poni["wavelength"],
                        detector=Detector(poni["pixel1"], poni["pixel2"], max_shape=shape))
    with written_whole(path) as part:
        geometry.save(str(part))
    return path


def plot_fit(bc: BeamCenter, av: AvImage, path, force: bool = False) -> Path:
    """The assembled image with the ring points, the fitted rings (the 2theta of each
    ring, or its circle, over the whole image plane, gaps included) and the centre."""
    img = av.assembled()
    fig, ax = figure(img, f"{av.detector}: beam centre x = {bc.center_um[0]:.1f} um, "
                          f"y = {bc.center_um[1]:.1f} um"
                          + (f", distance {bc.distance_mm:.2f} mm" if bc.distance_mm else ""))
    rows, cols = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    gx, gy = av.to_um(rows, cols)
    if bc.distance_mm is not None and all(r.tth_deg is not None for r in bc.rings):
        level_map = np.degrees(two_theta(gx, gy, 0.0, bc.center_um, bc.distance_mm,
                                         bc.tx_deg, bc.ty_deg))
        levels = sorted(r.tth_deg for r in bc.rings)
    else:
        level_map = np.hypot(gx - bc.center_um[0], gy - bc.center_um[1])
        levels = sorted(r.radius_um for r in bc.rings)
    rng = np.random.default_rng(0)
    for px, py in bc.points:
        take = rng.choice(len(px), min(len(px), 3000), replace=False)
        pr, pc = av.to_image_px(px[take], py[take])
        ax.plot(pc, pr, ".", color="orange", markersize=1, alpha=0.5)
    if levels:
        ax.contour(cols, rows, level_map, levels=levels, colors="red", linewidths=1,
                   linestyles="dashed")
    crow, ccol = av.to_image_px(*bc.center_um)
    ax.plot([ccol], [crow], "+", color="magenta", markersize=14, mew=2)
    ax.set_xlim(min(-0.5, ccol - 20), max(img.shape[1] - 0.5, ccol + 20))
    ax.set_ylim(max(img.shape[0] - 0.5, crow + 20), min(-0.5, crow - 20))
    return save_figure(fig, path, force)
