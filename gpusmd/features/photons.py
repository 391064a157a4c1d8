"""Photon counting (DESIGN §8): droplet2photons and the psana-style photon finder.

droplet2photons
---------------
Finds droplets exactly like :mod:`gpusmd.features.droplet` (same parameters and
defaults; chained on a droplet, ``parent: droplet``, it takes that droplet's droplets and
must not repeat its parameters) and turns each into photons as smalldata_tools'
droplet2Photons does (smalldata_tools/ana_funcs/droplet2Photons.py, process; loopdrops):

- n photons per droplet from ``photpts``, the droplet-sum boundaries: n = k where
  photpts[k] <= data < photpts[k + 1], k >= 1; a droplet below photpts[1] or at or above
  the last boundary gives none. Default (smalldata's): photpts[k] = (k - 1/2) x
  aduspphot for k = 0 .. 999999, i.e. n = floor(data / aduspphot + 1/2);
- n = 1: one photon at the pixel nearest the droplet's centre of mass (row / col rounded
  half up, as smalldata's probability histogram bins them; for an odd-shaped droplet that
  pixel may lie just outside it);
- n >= 2: greedy placement: n times, put a photon on the droplet pixel with the largest
  remaining value and subtract aduspphot from it. Computed without a loop: the
  placements of the greedy are the n largest of the candidates v_p - j x aduspphot
  (j = 0, 1, ...) over the droplet's pixels p (each pixel's candidates decrease, so the
  greedy merges the sorted lists); only candidates above (sum - n x aduspphot) / npix
  can be among them, so about n + npix candidates per droplet are built, sorted and
  the first n kept (ties broken by pixel order). This puts floor(v_p / aduspphot)
  photons on every pixel and the rest on the largest remainders, as smalldata's
  greedyguess does; greedyguess also takes the part of a photon missing from a remainder
  off its largest neighbour's remainder and stores sub-pixel positions.

Fields: ``nPhotons`` (B,) (all photons), ``prob`` (B, 11): over the good pixels of the
mask, the fraction of pixels holding k = 0..10 photons (pixels with more than 10 count
in no bin), ``mean`` (B,): photons on good pixels per good pixel (speckle-contrast
input), and the photon records ``row, col, tile`` (integer pixel; one record per photon,
a pixel with k photons gives k records; ordered by raster position per event) as a
:class:`Ragged`, or fixed (B, nData) zero-padded arrays when ``nData`` is set.

photons
-------
The psana ImgAlgos photon finder ("photons", fractional-photon merging), as smalldata's
``photons`` function uses it: with u = value / ADU_per_photon on good pixels (<= 0 -> 0),

- whole photons: w = floor(u) per pixel, fractions f = u - w;
- a pixel whose fraction is a local maximum among its 4-neighbours in the segment
  (>= the down / right neighbours, > the up / left ones, so a plateau gives one maximum)
  is merged with its largest neighbouring fraction: if f + max(f_neighbours) >
  thr_fraction it gets one more photon (the neighbour's fraction is not removed, as in
  psana; a neighbour shared by two maxima may serve both).

Fields: ``nPhot`` (B,) and the pixels with >= 1 photon as a :class:`Ragged` of
``row, col, tile, nphot`` (or (B, nData) zero-padded arrays with ``nData``).
"""
from __future__ import annotations

import numpy as np

from ..config import check_type
from . import Feature, check_ndata, register
from .droplet import (
    DROPLET_KEYS,
    DropletFinder,
    check_common,
    counts,
    neighbours,
    pack,
    repeat_index,
    seg_shape,
)

NUMBER = (int, float)
NPROB = 11
NPHOTPTS = 1000000      # smalldata's default photpts: (arange(1000000) - 1/2) x aduspphot


def _positive(params, key, where, default=None):
    if key not in params:
        if default is None:
            raise (where / key).error("required key is missing")
        return default
    value = check_type(params[key], NUMBER, where / key, "a number")
    if not value > 0:
        raise (where / key).error(f"must be > 0, got {value}")
    return value


def _photpts(params, where):
    """photpts: null or a list of >= 3 increasing numbers (ADU) -> float64 array."""
    pts = params.get("photpts")
    if pts is None:
        return None
    w = where / "photpts"
    check_type(pts, (list, tuple), w, "a list of droplet-sum boundaries (ADU)")
    for i, value in enumerate(pts):
        check_type(value, NUMBER, w / i, "a number")
    pts = np.asarray(pts, np.float64)
    if pts.size < 3:
        raise w.error(f"needs at least 3 boundaries (0, 1 and 2 photons), got {pts.size}")
    if not np.all(np.isfinite(pts)) or not np.all(np.diff(pts) > 0):
        raise w.error("must be finite and increasing")
    return pts


def _records_from_photons(xp, at, seg, nevents, ndata):
    """Sorted batch pixel indices, one per photon -> records (row, col, tile), packed."""
    nseg, R, C = seg
    pix = at % (nseg * R * C)
    fields = {"row": ((pix // C) % R).astype(xp.int16), "col": (pix % C).astype(xp.int16),
              "tile": (pix // (R * C)).astype(xp.int16)}
    return pack(xp, at // (nseg * R * C), fields, nevents, ndata)


@register
class Droplet2Photons(Feature):
    kind = "droplet2photons"
    accepts_rms = True
    name_prefix = "droplet2photons"
    PARAMS = (*DROPLET_KEYS, "nData", "aduspphot", "photpts")

    @classmethod
    def takes(cls, parent) -> bool:         # frames, or a droplet parent's droplets
        return parent.output_shape is not None

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        check_common(params, where)
        _positive(params, "aduspphot", where)
        _photpts(params, where)

    def __init__(self, name, params, model, masks, backend, where, input_shape=None, rms=None):
        super().__init__(name, params, model, masks, backend, where, input_shape)
        # input_shape as given: a droplet parent's DropletOutput makes the finder reuse
        # that parent's droplets (gpusmd.features.droplet, "Chaining")
        self.finder = DropletFinder(params, input_shape or self.input_shape, masks, backend,
                                    where, rms)
        self.adu = float(_positive(params, "aduspphot", where))
        self.photpts = _photpts(params, where)
        self.ndata = params.get("nData")

    def photons_per_droplet(self, data):
        """n photons of droplets of sum ``data`` (see the module docstring)."""
        xp = self.backend.xp
        if self.photpts is None:
            k = xp.floor(data / self.adu + 0.5).astype(xp.int64)
            return xp.where((k >= 1) & (k < NPHOTPTS - 1), k, 0)
        pts = xp.asarray(self.photpts)
        k = xp.searchsorted(pts, data, side="right") - 1
        return xp.where((k >= 1) & (data < pts[-1]), k, 0)

    def process(self, calib):
        xp = self.backend.xp
        f = self.finder
        B = calib.shape[0]
        nseg, R, C = f.seg
        npix_ev = nseg * R * C
        drops, labels, v, _ = f(calib)
        nd = drops["data"].size
        nph = self.photons_per_droplet(drops["data"])                  # (ndrop,)
        # the batch pixel index of every photon (no per-pixel map: memory stays per photon)
        photons = [xp.zeros(0, xp.int64)]
        # single photons: at the pixel nearest the centre of mass
        one = xp.flatnonzero(nph == 1)
        if one.size:
            r = xp.clip(xp.floor(drops["row"][one] + 0.5), 0, R - 1).astype(xp.int64)
            c = xp.clip(xp.floor(drops["col"][one] + 0.5), 0, C - 1).astype(xp.int64)
            photons.append(drops["event"][one] * npix_ev + drops["tile"][one] * (R * C)
                           + r * C + c)
        # several photons: greedy on the brightest pixels (see the module docstring)
        if nd and int((nph >= 2).sum()):
            lab_flat = labels.reshape(-1)
            sel = xp.flatnonzero(lab_flat)
            d = lab_flat[sel] - 1                                       # droplet index
            multi = nph[d] >= 2
            sel, d = sel[multi], d[multi]
            u = v.reshape(-1)[sel].astype(xp.float64) / self.adu
            n_d = nph[d]
            lower = ((drops["data"] / self.adu - nph) / drops["npix"])[d]
            ncand = xp.clip(xp.ceil(u - lower), 0, None).astype(xp.int64)
            ncand = xp.minimum(ncand, n_d)
            which = repeat_index(xp, ncand)                             # candidate -> pixel
            starts = xp.cumsum(ncand) - ncand
            j = xp.arange(which.size, dtype=xp.int64) - starts[which]
            cand = u[which] - j
            cd = d[which]
            # sort by droplet, then candidate value descending
            o1 = xp.argsort(-cand, kind="stable") if xp is np else xp.argsort(-cand)
            o2 = (xp.argsort(cd[o1], kind="stable") if xp is np else xp.argsort(cd[o1]))
            order = o1[o2]
            cd_sorted = cd[order]
            first = xp.searchsorted(cd_sorted, cd_sorted, side="left")
            rank = xp.arange(order.size, dtype=xp.int64) - first
            chosen = order[rank < nph[cd_sorted]]
            photons.append(sel[which[chosen]].astype(xp.int64))
        at = xp.sort(xp.concatenate(photons))
        out = _records_from_photons(xp, at, f.seg, B, self.ndata)
        out["nPhotons"] = counts(xp, at // npix_ev, B).astype(xp.int32)
        # photons per good pixel: the pixels holding k >= 1, the rest hold 0
        pixel, k = xp.unique(at[f.good.reshape(-1)[at % npix_ev]], return_counts=True)
        pev = pixel // npix_ev
        inb = k < NPROB
        hist = counts(xp, pev[inb] * NPROB + k[inb], B * NPROB).reshape(B, NPROB)
        hist[:, 0] = f.ngood - counts(xp, pev, B)
        ngood = max(f.ngood, 1)
        out["prob"] = (hist / ngood).astype(xp.float32)
        out["mean"] = (counts(xp, pev, B, weights=k) / ngood).astype(xp.float32)
        return out

    def config_items(self):
        items = {**self.finder.config_items(), "aduspphot": self.adu,
                 "nData": -1 if self.ndata is None else int(self.ndata)}
        if self.photpts is not None:
            items["photpts"] = self.photpts
        return items


@register
class Photons(Feature):
    kind = "photons"
    accepts_rms = True          # accepted, unused
    name_prefix = "photons"
    PARAMS = ("ADU_per_photon", "thr_fraction", "nData", "mask")

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        _positive(params, "ADU_per_photon", where)
        thr = params.get("thr_fraction", 0.9)
        check_type(thr, NUMBER, where / "thr_fraction", "a number")
        if not 0 < thr < 2:
            raise (where / "thr_fraction").error(f"must be in (0, 2), got {thr}")
        check_ndata(params, where)
        if "mask" in params:
            check_type(params["mask"], (str,), where / "mask", "a mask name")

    def __init__(self, name, params, model, masks, backend, where, input_shape=None, rms=None):
        super().__init__(name, params, model, masks, backend, where, input_shape)
        self.adu = float(_positive(params, "ADU_per_photon", where))
        self.thr_fraction = float(params.get("thr_fraction", 0.9))
        self.ndata = params.get("nData")
        self.seg = seg_shape(self.input_shape)
        self.mask_name = params.get("mask", "cmask")
        if self.mask_name not in masks:
            raise (where / "mask").error(f"unknown mask {self.mask_name!r} "
                                         f"(known: {', '.join(masks)})")
        good = np.asarray(masks[self.mask_name]) != 0
        self.good = backend.xp.asarray(good.reshape(self.seg))

    def photon_map(self, calib):
        """(B, nseg, R, C) int32 photons per pixel."""
        xp = self.backend.xp
        B = calib.shape[0]
        u = xp.asarray(calib, xp.float32).reshape(B, *self.seg) / xp.float32(self.adu)
        u = xp.where(self.good & (u > 0), u, xp.float32(0))
        whole = xp.floor(u)
        frac = u - whole
        up, down, left, right = neighbours(frac)
        is_max = (frac > up) & (frac > left) & (frac >= down) & (frac >= right) & (frac > 0)
        best = xp.maximum(xp.maximum(up, down), xp.maximum(left, right))
        extra = is_max & (frac + best > self.thr_fraction)
        return (whole + extra).astype(xp.int32)

    def process(self, calib):
        xp = self.backend.xp
        B = calib.shape[0]
        nseg, R, C = self.seg
        count = self.photon_map(calib)
        flat = count.reshape(-1)
        nz = xp.flatnonzero(flat)
        pix = nz % (nseg * R * C)
        fields = {"row": ((pix // C) % R).astype(xp.int16), "col": (pix % C).astype(xp.int16),
                  "tile": (pix // (R * C)).astype(xp.int16), "nphot": flat[nz]}
        out = pack(xp, nz // (nseg * R * C), fields, B, self.ndata)
        out["nPhot"] = count.reshape(B, -1).sum(axis=1).astype(xp.int32)
        return out

    def config_items(self):
        return {"ADU_per_photon": self.adu, "thr_fraction": self.thr_fraction,
                "nData": -1 if self.ndata is None else int(self.ndata), "mask": self.mask_name}
