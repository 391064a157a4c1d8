"""Droplets (DESIGN §8): connected regions of lit pixels, one record per droplet.

The rules are smalldata_tools' (smalldata_tools/ana_funcs/droplet.py, dropletFunc), per
event and per segment (no region ever crosses a segment or an event):

1. lit pixels: good pixels (mask ``mask``, default cmask) whose value is not 0 and, with
   ``pixmax`` set, not above pixmax (calibrated units: a cap that keeps hot or saturated
   pixels out of every droplet; smalldata's prepareImg);
2. seeds: lit pixels with value >= ``threshold`` (x rms per pixel when ``useRms``, else
   calibrated units). The rms is the noise in the frames' units: the dark run's rms (ADU)
   of gain range 0 converted as the calibration converts gain range 0 (/ gain with
   gain_convention ``divide``, x gain with ``multiply``, as is with ``none``), one map per
   run. This is smalldata_tools' rms[0] / gain[0]: a threshold decides on dim pixels,
   which are in the high gain; a pixel switched to a lower range holds a signal far above
   it. Seeds are labelled in 4-connected regions: one ``ndimage.label`` call per batch on
   the (B, nseg, rows, cols) stack, with a structure that connects only along rows and
   columns (scipy.ndimage on the CPU, cupyx.scipy.ndimage on the GPU; both number the
   regions in raster order of their first pixel);
3. growth, only when thresholdLow differs from threshold: a lit pixel with value >=
   ``thresholdLow`` (same units as threshold) that is a seed or touches one (4-neighbours;
   smalldata's maximum filter of the labels) is kept; growth is one step only.
   ``relabel`` (default true): the kept pixels are labelled again, so droplets that touch
   after growing merge into one. ``relabel: false``: no merge, the droplets are the
   seeds' regions and a grown pixel joins its neighbouring droplet of the largest label
   (smalldata's maximum filter), or with ``joinBrightest: true`` the droplet of its
   brightest seed neighbour (ties: first of up, down, left, right);
4. per droplet: data = sum of the values (calibrated units, "ADU"), npix, row / col =
   centre of mass weighted by the values, in the segment's pixel coordinates, tile =
   segment index (0 for unsegmented detectors);
5. with ``thresADU`` set, droplets whose sum is below it are dropped (kept: data >=
   thresADU); nDroplets_all counts them before that cut, nDroplets after it.

Defaults are smalldata's: threshold 5, thresholdLow = threshold, no thresADU, no pixmax,
useRms true, relabel true.

Records are ordered per event by their label (raster position of each droplet's first
pixel). Output: ``nDroplets``, ``nDroplets_all`` (B,) and either a :class:`Ragged`
(variable length, written as var_<name>/{data,npix,row,col,tile}) or, when ``nData`` is
set, fixed arrays ``data, npix, row, col, tile`` (B, nData) holding the first nData
droplets, zero-padded.

Memory (GPU): per pixel of a batch the finder holds a few bool maps and two int32 label
maps at its peak (the frames are a view of the float32 calibrated batch), plus per pixel
in a droplet its records; see :func:`droplet_bytes_per_pixel`.

Chaining: a droplet feeds its droplets to children (``parent: droplet``). Its
``output_shape`` is a :class:`DropletOutput` (its input shape, marked, carrying its
finder) and its ``child_data`` a :class:`Droplets` (the per-droplet records before any
nData cut, the label map, the frames). A ``droplet2photons`` chained on a droplet uses
them instead of finding droplets again -- same results as a standalone droplet2photons
with the droplet's parameters; it must then not set the droplet parameters itself
(DROPLET_KEYS: a config error naming the key). Other kinds cannot take a droplet's output.
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


# (destination, source) slices of (..., rows, cols): the up, down, left, right neighbour
_SHIFTS = tuple(
    ((Ellipsis, *d), (Ellipsis, *s)) for d, s in (
        ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
        ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))))


def neighbours(a, fill=0):
    """The up, down, left, right neighbours of (..., rows, cols) within each image
    (``fill`` outside)."""
    out = []
    for dst, src in _SHIFTS:
        n = a.copy()
        n[...] = fill
        n[dst] = a[src]
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


def counts(xp, x, n, weights=None):
    """bincount(x, weights, minlength=n)[:n], also for an empty x (CuPy refuses it)."""
    if not x.size:
        return xp.zeros(n, xp.int64 if weights is None else xp.float64)
    return xp.bincount(x, weights=weights, minlength=n)[:n]


def rank_in_event(xp, event, nevents):
    """For records sorted by event: their index within the event; and lengths (B,)."""
    lengths = counts(xp, event, nevents)
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


def _optional_number(params, key, where):
    """A number or null (not set); NaN refused."""
    value = params.get(key)
    if value is not None:
        check_type(value, NUMBER, where / key, "a number or null")
        if value != value:
            raise (where / key).error("expected a number or null, got NaN")
    return value


def check_common(params, where):
    """The droplet finder's parameters (DROPLET_KEYS), with smalldata's defaults."""
    for key in ("threshold", "thresholdLow"):
        if key in params:
            check_type(params[key], NUMBER, where / key, "a number")
    for key in ("useRms", "relabel", "joinBrightest"):
        if key in params:
            check_type(params[key], (bool,), where / key, "true or false")
    thr = params.get("threshold", 5.0)
    low = params.get("thresholdLow", thr)
    if not thr > 0:
        raise (where / "threshold").error(f"must be > 0, got {thr}")
    if not 0 <= low <= thr:
        raise (where / "thresholdLow").error(f"must be in [0, threshold = {thr}], got {low}")
    _optional_number(params, "thresADU", where)
    pixmax = _optional_number(params, "pixmax", where)
    if pixmax is not None and not pixmax > 0:
        raise (where / "pixmax").error(f"must be > 0 (pixels above it are left out), "
                                       f"got {pixmax}")
    if params.get("joinBrightest") and params.get("relabel", True):
        raise (where / "joinBrightest").error("chooses the droplet a grown pixel joins "
                                              "without merging: needs relabel: false")
    check_ndata(params, where)
    if "mask" in params:
        check_type(params["mask"], (str,), where / "mask", "a mask name")


DROPLET_KEYS = ("threshold", "thresholdLow", "thresADU", "useRms", "mask", "pixmax",
                "relabel", "joinBrightest")

def touching(a):
    """``a`` or any of its 4-neighbours, within each image of (..., rows, cols) bools."""
    out = a.copy()
    for dst, src in _SHIFTS:
        out[dst] |= a[src]
    return out


def join_neighbour(xp, labels, grown, key):
    """Labels for the grown pixels without merging: each unlabelled grown pixel takes the
    label of its labelled 4-neighbour of the largest ``key`` (ties: first of up, down,
    left, right). ``key`` > -1 on labelled pixels."""
    best_lab = xp.zeros_like(labels)
    if key is labels:          # the largest label: smalldata's maximum filter
        for dst, src in _SHIFTS:
            xp.maximum(best_lab[dst], labels[src], out=best_lab[dst])
    else:
        best_key = xp.full(labels.shape, -1, key.dtype)
        for dst, src in _SHIFTS:
            better = (labels[src] > 0) & (key[src] > best_key[dst])
            xp.copyto(best_key[dst], key[src], where=better)
            xp.copyto(best_lab[dst], labels[src], where=better)
        del best_key
    best_lab[labels != 0] = 0          # seeds keep their own label
    best_lab *= grown
    best_lab += labels
    return best_lab


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
    (B, nseg, rows, cols) int32: kept droplet index + 1, else 0; ``values``: the frames as
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
        self.threshold_low = float(params.get("thresholdLow", self.threshold))
        thres_adu, pixmax = params.get("thresADU"), params.get("pixmax")
        self.thres_adu = None if thres_adu is None else float(thres_adu)
        self.pixmax = None if pixmax is None else float(pixmax)
        self.use_rms = bool(params.get("useRms", True))
        self.relabel = bool(params.get("relabel", True))
        self.join_brightest = bool(params.get("joinBrightest", False))
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

    def config_items(self) -> dict:
        """The finder's parameters for /UserDataCfg (unset thresADU / pixmax left out,
        as smalldata leaves out its None parameters)."""
        items = {"threshold": self.threshold, "thresholdLow": self.threshold_low,
                 "useRms": int(self.use_rms), "relabel": int(self.relabel),
                 "joinBrightest": int(self.join_brightest), "mask": self.mask_name}
        if self.thres_adu is not None:
            items["thresADU"] = self.thres_adu
        if self.pixmax is not None:
            items["pixmax"] = self.pixmax
        return items

    def label_map(self, v):
        """(B, nseg, R, C) float32 frames -> (int32 labels 1..n, 0 elsewhere; n)."""
        xp = self.xp
        lit = (v != 0) & self.good
        if self.pixmax is not None:
            lit &= v <= xp.float32(self.pixmax)
        seeds = lit & (v >= self.thr)
        labels, n = self.ndi.label(seeds, structure=self.structure)
        if self.threshold_low == self.threshold:   # smalldata grows only then
            return labels, int(n)
        grown = lit                                # in place: lit is not needed again
        grown &= v >= self.thr_low                 # seeds included: thr_low <= thr
        grown &= touching(seeds)
        del seeds
        if self.relabel:
            del labels
            labels, n = self.ndi.label(grown, structure=self.structure)
            return labels, int(n)
        return join_neighbour(xp, labels, grown, v if self.join_brightest else labels), int(n)

    def __call__(self, calib):
        """-> dict of per-droplet arrays (kept droplets, sorted by event), the int32 label
        map (B, nseg, rows, cols) with dropped droplets set to 0 and the droplet index + 1
        of the kept ones, the values (B, nseg, rows, cols), nDroplets_all (B,).
        ``calib`` may be a parent droplet's :class:`Droplets` (returned unchanged)."""
        if isinstance(calib, Droplets):
            return calib.drops, calib.labels, calib.values, calib.n_all
        if self.chained:
            raise TypeError("a droplet-chained finder takes its parent's droplets")
        xp = self.xp
        B = calib.shape[0]
        nseg, R, C = self.seg
        v = xp.asarray(calib, xp.float32).reshape(B, nseg, R, C)
        labels, n = self.label_map(v)

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
        n_all = counts(xp, ev_of, B)
        # labels are numbered in raster order, events outermost: already sorted by event
        keep = xp.arange(n, dtype=xp.int64)
        if self.thres_adu is not None:
            keep = keep[adu >= self.thres_adu]
        # new ids: kept droplet k (in output order) -> k + 1, dropped -> 0
        new_id = xp.zeros(size, xp.int32)
        new_id[keep + 1] = xp.arange(1, keep.size + 1, dtype=xp.int32)
        labels = new_id[labels]
        drops = {"event": ev_of[keep], "data": adu[keep], "npix": npix[keep],
                 "row": com_r[keep], "col": com_c[keep], "tile": tile_of[keep]}
        return drops, labels, v, n_all


@register
class Droplet(Feature):
    kind = "droplet"
    accepts_rms = True          # the builder passes the noise in the frames' units
    name_prefix = "droplet"
    PARAMS = (*DROPLET_KEYS, "nData")

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
        out["nDroplets"] = counts(xp, drops["event"], B).astype(xp.int32)
        out["nDroplets_all"] = n_all.astype(xp.int32)
        return out

    def config_items(self):
        return {**self.finder.config_items(),
                "nData": -1 if self.ndata is None else int(self.ndata)}


# ---- device memory ------------------------------------------------------------------------
# What the droplet path (a droplet, a droplet2photons on it or on its own) holds at its
# peak, measured with tracemalloc on the CPU path and rounded up (tests/test_droplet_memory):
DROPLET_PIXEL_BYTES = 18    # per pixel of a batch: bool maps and two int32 label maps (the
                            # growth; 10 with relabel, 16 with joinBrightest, + slack)
DROPLET_RECORD_BYTES = 128  # per pixel in a droplet: its index, label, value, coordinates
PHOTON_BYTES = 160          # per photon of droplet2photons: the greedy's candidates, sorted


def droplet_bytes_per_pixel(occupancy: float) -> float:
    """Device bytes per pixel of a batch for droplets, when at most ``occupancy`` of the
    pixels are in droplets and they hold at most ``occupancy`` photons per pixel."""
    return DROPLET_PIXEL_BYTES + occupancy * (DROPLET_RECORD_BYTES + PHOTON_BYTES)
