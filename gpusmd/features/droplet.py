"""Droplets (DESIGN §8): connected regions of lit pixels, one record per droplet.

Algorithm (per event and per segment; no region ever crosses a segment or an event):

1. seeds: good pixels (mask ``mask``, default cmask) with value > ``threshold``
   (x rms per pixel when ``useRms``, else calibrated units). The rms is the noise in
   the frames' units: the dark run's rms (ADU) of gain range 0 converted as the
   calibration converts gain range 0 (/ gain with gain_convention ``divide``, x gain
   with ``multiply``, as is with ``none``), one map per run. This is smalldata_tools'
   rms[0] / gain[0]: a threshold decides on dim pixels, which are in the high gain; a
   pixel switched to a lower range holds a signal far above it. (An epix10k auto
   ranging in AML starts in AML_M, noisier in keV than FH: 5 FH rms are fewer AML_M
   rms there, more noise seeds, which the thresADU cut on the droplet sum removes.)
2. label the 4-connected regions of seeds: one ``ndimage.label`` call per batch on the
   (B, nseg, rows, cols) stack, with a structure that connects only along rows and
   columns (scipy.ndimage on the CPU, cupyx.scipy.ndimage on the GPU);
3. grow every region by one pixel: an unlabelled good pixel with value > ``thresholdLow``
   (same units as threshold) that touches a region (4-neighbours) joins it. A pixel
   touching two droplets joins the one of its **brightest labelled neighbour** (ties:
   first of up, down, left, right) -- deterministic and the same on both backends;
   growth is one step only (grown pixels do not grow further);
4. per droplet: data = sum of the values (calibrated units, "ADU"), npix, row / col =
   centre of mass weighted by the values (all > thresholdLow >= 0, so positive), in the
   segment's pixel coordinates, tile = segment index (0 for unsegmented detectors);
5. droplets whose sum is below ``thresADU`` are dropped (kept: data >= thresADU);
   nDroplets_all counts them before that cut, nDroplets after it.

Records are ordered per event by the raster position (segment, row, col) of each
droplet's first seed pixel. Output: ``nDroplets``, ``nDroplets_all`` (B,) and either a
:class:`Ragged` (variable length, written as var_<name>/{data,npix,row,col,tile}) or,
when ``nData`` is set, fixed arrays ``data, npix, row, col, tile`` (B, nData) holding the
first nData droplets, zero-padded.

Defaults follow smalldata_tools (threshold 5, thresholdLow 3, thresADU 10, useRms true).
``pixmax`` (smalldata's cap on stored pixels per droplet, for the pixel-level droplet
output) is not implemented: this function stores no per-pixel lists.

Chaining: a droplet feeds its droplets to children (``parent: droplet``). Its
``output_shape`` is a :class:`DropletOutput` (its input shape, marked, carrying its
finder) and its ``child_data`` a :class:`Droplets` (the per-droplet records before any
nData cut, the label map, the frames). A ``droplet2photons`` chained on a droplet uses
them instead of finding droplets again -- same results as a standalone droplet2photons
with the droplet's parameters; it must then not set the droplet parameters itself
(threshold, thresholdLow, thresADU, useRms, mask: a config error naming the key). Other
kinds cannot take a droplet's output.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import check_type
from . import Feature, Ragged, check_ndata, register

NUMBER = (int, float)


# ---- helpers shared with photons.py ------------------------------------------------------
def ndimage_for(backend):
    if backend.is_gpu:
        import cupyx.scipy.ndimage as ndi
    else:
        import scipy.ndimage as ndi
    return ndi


def seg_shape(input_shape) -> tuple[int, int, int]:
    if len(input_shape) == 2:
        return (1, *input_shape)
    if len(input_shape) == 3:
        return tuple(input_shape)
    raise ValueError(f"expected a (rows, cols) or (nseg, rows, cols) frame, got {input_shape}")


def structure_4conn() -> np.ndarray:
    """(3, 3, 3, 3): connected along rows and columns only (not events, not segments)."""
    s = np.zeros((3, 3, 3, 3), bool)
    s[1, 1, :, 1] = True
    s[1, 1, 1, :] = True
    return s


def neighbours(a, fill=0):
    """The up, down, left, right neighbours of (..., rows, cols) within each image
    (``fill`` outside)."""
    out = []
    for axis, step in ((-2, 1), (-2, -1), (-1, 1), (-1, -1)):
        n = a.copy()
        n[...] = fill
        src = [slice(None)] * a.ndim
        dst = [slice(None)] * a.ndim
        if step == 1:      # neighbour at index - 1 (up / left)
            dst[axis], src[axis] = slice(1, None), slice(None, -1)
        else:              # neighbour at index + 1 (down / right)
            dst[axis], src[axis] = slice(None, -1), slice(1, None)
        n[tuple(dst)] = a[tuple(src)]
        out.append(n)
    return out


def repeat_index(xp, counts):
    """np.repeat(arange(len(counts)), counts), also on CuPy (array repeats)."""
    counts = counts.astype(xp.int64)
    total = int(counts.sum())
    if total == 0:
        return xp.zeros(0, xp.int64)
    ends = xp.cumsum(counts)
    return xp.searchsorted(ends, xp.arange(total, dtype=xp.int64), side="right")


def rank_in_event(xp, event, nevents):
    """For records sorted by event: their index within the event; and lengths (B,)."""
    lengths = xp.bincount(event, minlength=nevents)[:nevents] if event.size else \
        xp.zeros(nevents, xp.int64)
    starts = xp.cumsum(lengths) - lengths
    return xp.arange(event.size, dtype=xp.int64) - starts[event], lengths


def pack(xp, event, fields: dict, nevents: int, ndata):
    """Records (sorted by event) -> Ragged, or fixed (B, nData) zero-padded arrays."""
    rank, lengths = rank_in_event(xp, event, nevents)
    if ndata is None:
        return {"var": Ragged(lengths, fields)}
    keep = rank < ndata
    out = {}
    for key, value in fields.items():
        a = xp.zeros((nevents, ndata), value.dtype)
        a[event[keep], rank[keep]] = value[keep]
        out[key] = a
    return out


def check_common(params, where, extra_numbers=()):
    for key in ("threshold", "thresholdLow", "thresADU", *extra_numbers):
        if key in params:
            check_type(params[key], NUMBER, where / key, "a number")
    check_type(params.get("useRms", True), (bool,), where / "useRms", "true or false")
    thr = params.get("threshold", 5.0)
    low = params.get("thresholdLow", 3.0)
    if not thr > 0:
        raise (where / "threshold").error(f"must be > 0, got {thr}")
    if not 0 <= low <= thr:
        raise (where / "thresholdLow").error(f"must be in [0, threshold = {thr}], got {low}")
    check_ndata(params, where)
    if "mask" in params:
        check_type(params["mask"], (str,), where / "mask", "a mask name")


DROPLET_KEYS = ("threshold", "thresholdLow", "thresADU", "useRms", "mask")


class DropletOutput(tuple):
    """A droplet's ``output_shape``: its input shape, marked as droplets, with the finder
    that made them (a child's constructor sees it as its ``input_shape``)."""

    def __new__(cls, shape, finder):
        self = super().__new__(cls, shape)
        self.finder = finder
        return self


@dataclass
class Droplets:
    """A droplet's ``child_data`` for one batch: what :meth:`DropletFinder.__call__`
    returns (``drops``: kept droplets sorted by event, all fields, before nData; ``labels``
    (B, nseg, rows, cols): kept droplet index + 1, else 0; ``values``: the frames as
    (B, nseg, rows, cols) float32; ``n_all`` (B,))."""
    drops: dict
    labels: object
    values: object
    n_all: object

    @property
    def shape(self) -> tuple:        # (B, nseg, rows, cols): a batch of B events
        return tuple(self.values.shape)

    def __len__(self) -> int:
        return int(self.values.shape[0])


class DropletFinder:
    """The droplet algorithm of this module, set up for one detector.

    With ``input_shape`` a :class:`DropletOutput` (chained on a droplet) it takes the
    parent's settings, refuses its own droplet parameters, and, called on the parent's
    :class:`Droplets`, returns them as they are."""

    def __init__(self, params, input_shape, masks, backend, where, rms=None):
        if isinstance(input_shape, DropletOutput):
            for key in DROPLET_KEYS:
                if key in params:
                    raise (where / key).error(
                        "chained on a droplet (parent:), the droplets are the parent's: "
                        "set this parameter on the parent, not here")
            parent = input_shape.finder
            self.__dict__.update(parent.__dict__)
            self.chained = True
            parent.feeds_children = True      # the parent keeps its batch's droplets
            return
        self.chained = False
        self.feeds_children = False
        xp = backend.xp
        self.backend, self.xp, self.ndi = backend, xp, ndimage_for(backend)
        self.shape = tuple(input_shape)
        self.seg = seg_shape(self.shape)
        self.threshold = float(params.get("threshold", 5.0))
        self.threshold_low = float(params.get("thresholdLow", 3.0))
        self.thres_adu = float(params.get("thresADU", 10.0))
        self.use_rms = bool(params.get("useRms", True))
        self.mask_name = params.get("mask", "cmask")
        if self.mask_name not in masks:
            raise (where / "mask").error(f"unknown mask {self.mask_name!r} "
                                         f"(known: {', '.join(masks)})")
        good = np.asarray(masks[self.mask_name]) != 0
        if good.shape != self.shape:
            raise (where / "mask").error(f"mask has shape {good.shape}, the input {self.shape}")
        self.good_host = good.reshape(self.seg)
        self.good = xp.asarray(self.good_host)
        self.ngood = int(good.sum())
        if self.use_rms:
            if rms is None:
                raise (where / "useRms").error("thresholds in rms units need the detector "
                                               "noise (rms), which is not available here")
            rms = np.asarray(rms, np.float32)
            if rms.shape != self.shape:
                raise (where / "useRms").error(f"rms has shape {rms.shape}, the input "
                                               f"{self.shape}")
            rms = rms.reshape(self.seg)
            self.thr = xp.asarray(self.threshold * rms)
            self.thr_low = xp.asarray(self.threshold_low * rms)
        else:
            self.thr, self.thr_low = xp.float32(self.threshold), xp.float32(self.threshold_low)
        self.structure = xp.asarray(structure_4conn())

    def __call__(self, calib):
        """-> dict of per-droplet arrays (kept droplets, sorted by event), the label map
        (B, nseg, rows, cols) with dropped droplets set to 0 and the droplet index + 1 of
        the kept ones, the values (B, nseg, rows, cols), nDroplets_all (B,).
        ``calib`` may be a parent droplet's :class:`Droplets` (returned unchanged)."""
        if isinstance(calib, Droplets):
            return calib.drops, calib.labels, calib.values, calib.n_all
        if self.chained:
            raise TypeError("a droplet-chained finder takes its parent's droplets")
        xp = self.xp
        B = calib.shape[0]
        nseg, R, C = self.seg
        v = xp.asarray(calib, xp.float32).reshape(B, nseg, R, C)
        seeds = (v > self.thr) & self.good
        labels, n = self.ndi.label(seeds, structure=self.structure)
        labels = labels.astype(xp.int64)
        n = int(n)
        # grow by one pixel into good unlabelled pixels above thresholdLow
        low = (v > self.thr_low) & self.good & (labels == 0)
        best_lab = xp.zeros_like(labels)
        best_val = xp.full(v.shape, -xp.inf, xp.float32)
        for nl, nv in zip(neighbours(labels), neighbours(v)):
            better = (nl > 0) & (nv > best_val)
            best_lab = xp.where(better, nl, best_lab)
            best_val = xp.where(better, nv, best_val)
        labels = xp.where(low & (best_lab > 0), best_lab, labels)

        flat = labels.reshape(-1)
        vf = v.reshape(-1)
        sel = xp.flatnonzero(flat)
        lab = flat[sel]
        w = vf[sel].astype(xp.float64)
        pix = sel % (nseg * R * C)
        row = (pix // C) % R
        col = pix % C
        size = n + 1
        adu = xp.bincount(lab, weights=w, minlength=size)[1:]
        npix = xp.bincount(lab, minlength=size)[1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            com_r = xp.bincount(lab, weights=w * row, minlength=size)[1:] / adu
            com_c = xp.bincount(lab, weights=w * col, minlength=size)[1:] / adu
        ev_of = xp.zeros(size, xp.int64)
        tile_of = xp.zeros(size, xp.int64)
        ev_of[lab] = sel // (nseg * R * C)
        tile_of[lab] = pix // (R * C)
        ev_of, tile_of = ev_of[1:], tile_of[1:]
        n_all = xp.bincount(ev_of, minlength=B)[:B] if n else xp.zeros(B, xp.int64)
        # order by (event, label): the label order of the backend may not be raster order
        order = xp.argsort(ev_of * size + xp.arange(1, size, dtype=xp.int64))
        keep = order[adu[order] >= self.thres_adu]
        # new ids: kept droplet k (in output order) -> k + 1, dropped -> 0
        new_id = xp.zeros(size, xp.int64)
        new_id[keep + 1] = xp.arange(1, keep.size + 1, dtype=xp.int64)
        labels = new_id[labels]
        drops = {"event": ev_of[keep], "data": adu[keep], "npix": npix[keep],
                 "row": com_r[keep], "col": com_c[keep], "tile": tile_of[keep]}
        return drops, labels, v, n_all


@register
class Droplet(Feature):
    kind = "droplet"
    accepts_rms = True          # the builder passes the noise in the frames' units
    name_prefix = "droplet"
    PARAMS = ("threshold", "thresholdLow", "thresADU", "useRms", "nData", "mask")

    @classmethod
    def check_params(cls, params, where):
        super().check_params(params, where)
        check_common(params, where)

    def __init__(self, name, params, model, masks, backend, where, input_shape=None, rms=None):
        if isinstance(input_shape, DropletOutput):
            raise (where / "parent").error("a droplet takes frames or an image, not another "
                                           "droplet's droplets")
        super().__init__(name, params, model, masks, backend, where, input_shape)
        self.finder = DropletFinder(params, self.input_shape, masks, backend, where, rms)
        self.ndata = params.get("nData")
        self.output_shape = DropletOutput(self.input_shape, self.finder)

    def process(self, calib):
        xp = self.backend.xp
        self.child_data = None               # free the last batch's label map first
        drops, labels, values, n_all = self.finder(calib)
        if self.finder.feeds_children:       # only when a child was built on this droplet
            self.child_data = Droplets(drops, labels, values, n_all)
        B = calib.shape[0]
        fields = {"data": drops["data"].astype(xp.float32),
                  "npix": drops["npix"].astype(xp.int32),
                  "row": drops["row"].astype(xp.float32),
                  "col": drops["col"].astype(xp.float32),
                  "tile": drops["tile"].astype(xp.int16)}
        out = pack(xp, drops["event"], fields, B, self.ndata)
        ev = drops["event"]
        out["nDroplets"] = (xp.bincount(ev, minlength=B)[:B] if ev.size
                            else xp.zeros(B, xp.int64)).astype(xp.int32)
        out["nDroplets_all"] = n_all.astype(xp.int32)
        return out

    def config_items(self):
        f = self.finder
        return {"threshold": f.threshold, "thresholdLow": f.threshold_low,
                "thresADU": f.thres_adu, "useRms": int(f.use_rms),
                "nData": -1 if self.ndata is None else int(self.ndata), "mask": f.mask_name}
