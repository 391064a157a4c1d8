"""Pictures of a small-data file (``gpusmd plot``), drawn from the file alone.

Per detector, four pictures (:data:`PANELS`), each also a quarter of one overview:

- ``image``: the run's mean calibrated image, ``/Sums/<det>_calib`` over its attribute
  ``n_events`` (every event of the run, X-rays on or off), placed by the pixel coordinates
  of ``/UserDataCfg/<det>/{x, y}`` (gpusmd.geometry.assemble; the detector type's default
  grid when the file keeps none, and the title says so), in mm, on a diverging colour scale
  centred on 0 so that negative values show; the colour bar is in the file's units
  (``/UserDataCfg/<det>/units``: keV or ADU). The ROIs (``<roi>__bounds``) are outlined
  and every azimuthal integration's ``<azav>__center`` is marked.
- ``azav``: each azav's profile against q (``<azav>__q``, 1/A), the mean over the X-ray-on
  events of the phi bins weighted by their pixels (``<azav>__npix``), X-ray-off dashed.
- ``roi``: every ROI's ``_sum`` against the beam intensity (``--intensity``, else the
  first per-event scalar named like ipm / gmd / intensity, else the event index),
  X-ray-off events (``/lightStatus/xray == 0``) as crosses.
- ``counts``: the common-mode groups corrected and skipped per event
  (``/<det>/common_mode_corrected``, ``_skipped``), the events written beside the
  ``/errors`` rows by stage (a row "N more like: ..." counts N more), and the pixels of
  each status bit in any gain range (``/UserDataCfg/<det>/status``).

Figures are matplotlib ``Figure`` objects on the Agg canvas (no pyplot, no display).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..calib.dark import STATUS_BITS
from ..detectors import get_detector
from ..errors import GpusmdError
from ..features import canonical_kind
from ..geometry import assemble
from ..io.output import check_new_output, open_small_data, written_whole

DPI = 80
# per-event scalars that measure the beam, in order of preference
INTENSITY_NAMES = (r"ipm", r"x?gmd", r"intensity|i0|diode")
NOT_SCALARS = {"UserDataCfg", "Sums", "errors", "event_id", "timestamp", "lightStatus", "truth"}
MORE_LIKE = re.compile(r"^(\d+) more like: ")
ROI_COLOURS = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
               "tab:cyan", "tab:blue", "tab:red", "tab:gray")
AZAV_COLOURS = ("black", "tab:green", "tab:purple", "tab:brown", "tab:olive")


@dataclass
class DetectorData:
    """What the pictures of one detector need, read from the file."""
    name: str
    type: str
    units: str
    mean: np.ndarray | None        # raw-shaped mean image, None without /Sums/<det>_calib
    n_summed: int
    x: np.ndarray
    y: np.ndarray
    pixel_um: float
    coords_note: str
    rois: dict                     # name -> (bounds, sums (N,) or None)
    azavs: dict                    # name -> {q, profile (N, nq), center, eBeam, dis_to_sam}
    common_mode: dict              # "code", "pars", "corrected", "skipped"
    status: np.ndarray | None
    calib_mask: np.ndarray | None


@dataclass
class SmallData:
    path: Path
    n_events: int
    complete: bool
    xray: np.ndarray | None         # (N,) 1 = X-rays on, None when the file has no lightStatus
    intensity: tuple | None         # (name, (N,) values)
    errors: dict                    # stage -> events
    detectors: dict = field(default_factory=dict)

    @property
    def xray_on(self) -> np.ndarray:
        return np.ones(self.n_events, bool) if self.xray is None else self.xray != 0


# ---- reading ---------------------------------------------------------------------------
def _text(value) -> str:
    if isinstance(value, (h5py.Dataset, np.ndarray)):
        value = value[()]
    return value.decode() if isinstance(value, bytes) else str(value)


def pixel_pitch_um(x, y) -> float:
    """The pixel pitch of a detector's coordinates: the median step between neighbours
    along the raw rows (wide pixels are few)."""
    step = np.hypot(np.diff(x, axis=-1), np.diff(y, axis=-1)).ravel()
    step = step[step > 0]
    return float(np.round(np.median(step), 3)) if step.size else 1.0


def find_intensity(f: h5py.File, n: int, name: str | None = None):
    """(name, values) of the beam-intensity scalar: ``name``, else the first per-event
    scalar outside the detectors' groups whose name matches INTENSITY_NAMES (in that
    order); None when there is none."""
    if name:
        name = name.strip("/")
        if name not in f or not isinstance(f[name], h5py.Dataset) or f[name].shape != (n,):
            raise GpusmdError(f"{f.filename}: no per-event scalar /{name}")
        return name, f[name][()].astype(np.float64)
    scalars = []
    skip = NOT_SCALARS | set(f.get("UserDataCfg", ()))
    f.visititems(lambda key, obj: scalars.append(key)
                 if isinstance(obj, h5py.Dataset) and obj.shape == (n,)
                 and obj.dtype.kind in "biuf" and key.split("/")[0] not in skip
                 else None)
    for pattern in INTENSITY_NAMES:
        for key in scalars:
            if re.search(pattern, key, re.IGNORECASE):
                return key, f[key][()].astype(np.float64)
    return None


def error_counts(f: h5py.File) -> dict:
    """Events of /errors by stage (a row "N more like: ..." stands for N more)."""
    counts: dict = {}
    if "errors/stage" not in f:
        return counts
    for stage, reason in zip(f["errors/stage"][()], f["errors/reason"][()]):
        more = MORE_LIKE.match(_text(reason))
        stage = _text(stage)
        counts[stage] = counts.get(stage, 0) + (int(more.group(1)) if more else 1)
    return counts


def _azav_profile(values, npix):
    """(N, nphi, nq) -> (N, nq): the phi bins' means weighted by their pixels."""
    values = np.asarray(values, np.float64).reshape(len(values), -1, values.shape[-1])
    w = (np.ones(values.shape[1:]) if npix is None
         else np.asarray(npix, np.float64).reshape(values.shape[1:]))
    w = np.where(np.isfinite(values), w, 0.0)
    total = np.nansum(values * w, axis=1)
    weight = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def read_detector(f: h5py.File, det: str) -> DetectorData:
    cfg = f[f"UserDataCfg/{det}"]
    type_ = _text(cfg["type"]) if "type" in cfg else "camera"
    units = _text(cfg["units"]) if "units" in cfg else "ADU"
    sums = f.get(f"Sums/{det}_calib")
    mean, n_summed = None, 0
    if sums is not None:
        n_summed = int(sums.attrs.get("n_events", f.attrs.get("n_events", 0)))
        mean = sums[()].astype(np.float64) / max(1, n_summed)
    if "x" in cfg and "y" in cfg:
        x, y = cfg["x"][()].astype(np.float64), cfg["y"][()].astype(np.float64)
        source = _text(cfg["geometry_file"]) if "geometry_file" in cfg else ""
        note = f"pixels placed by {Path(source).name}" if source else "pixels on the regular grid"
    else:
        shape = mean.shape if mean is not None else None
        model = get_detector(type_, shape if type_ == "camera" else None)
        x, y, _ = model.coords_um()
        note = f"the file keeps no pixel coordinates: the default grid of a {type_}"
    if mean is not None and mean.shape != x.shape:
        mean = mean.reshape(x.shape)
    funcs = {}
    for key in cfg:
        if key.endswith("__kind"):
            funcs[key[:-len("__kind")]] = canonical_kind(_text(cfg[key]))
    rois, azavs = {}, {}
    for name, kind in funcs.items():
        if kind == "roi" and f"{name}__bounds" in cfg:
            sums_ds = f.get(f"{det}/{name}_sum")
            rois[name] = (cfg[f"{name}__bounds"][()],
                          None if sums_ds is None else sums_ds[()].astype(np.float64))
        elif kind == "azav" and f"{name}__q" in cfg and f"{det}/{name}_azav" in f:
            npix = cfg[f"{name}__npix"][()] if f"{name}__npix" in cfg else None
            azavs[name] = {"q": cfg[f"{name}__q"][()],
                           "profile": _azav_profile(f[f"{det}/{name}_azav"][()], npix),
                           **{k: cfg[f"{name}__{k}"][()] for k in ("center", "eBeam", "dis_to_sam")
                              if f"{name}__{k}" in cfg}}
    cm = {"code": int(cfg["common_mode"][()]) if "common_mode" in cfg else 0,
          "pars": cfg["common_mode_pars"][()] if "common_mode_pars" in cfg else None}
    for key in ("corrected", "skipped"):
        if f"{det}/common_mode_{key}" in f:
            cm[key] = f[f"{det}/common_mode_{key}"][()]
    return DetectorData(det, type_, units, mean, n_summed, x, y, pixel_pitch_um(x, y), note,
                        rois, azavs, cm,
                        cfg["status"][()] if "status" in cfg else None,
                        cfg["calib_mask"][()] if "calib_mask" in cfg else None)


def read_small_data(path, detector: str | None = None, intensity: str | None = None) -> SmallData:
    """The parts of a small-data file the pictures show; ``detector`` None: all of them."""
    path = Path(path)
    with open_small_data(path) as f:
        dets = list(f["UserDataCfg"]) if "UserDataCfg" in f else []
        if not dets:
            raise GpusmdError(f"{path}: no /UserDataCfg: not a small-data file of a detector")
        if detector is not None:
            if detector not in dets:
                raise GpusmdError(f"{path}: no detector {detector!r} (it has: {', '.join(dets)})")
            dets = [detector]
        n = int(f["event_id"].shape[0]) if "event_id" in f else int(f.attrs.get("n_events", 0))
        xray = f["lightStatus/xray"][()] if "lightStatus/xray" in f else None
        smd = SmallData(path, n, int(f.attrs.get("complete", 0)) == 1, xray,
                        find_intensity(f, n, intensity), error_counts(f))
        for det in dets:
            smd.detectors[det] = read_detector(f, det)
    return smd


# ---- the panels ------------------------------------------------------------------------
def _nothing(fig, text):
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10,
            transform=ax.transAxes)
    ax.set_axis_off()
    return ax


def image_limits(img) -> tuple[float, float, bool]:
    """(low, high, diverging): where the 0.5 percentile is negative (over-subtracted
    pedestals, common mode), a diverging scale centred on 0 from it to the 99.5
    percentile, so that negative values show beside the signal; otherwise a plain scale
    between the two."""
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, (0.5, 99.5)) if finite.size else (-1.0, 1.0)
    lo, hi = float(lo), float(hi)
    if lo < 0:
        return lo, max(hi, 1e-3 * -lo), True
    return lo, hi if hi > lo else lo + 1, False


def image_scale(img):
    """(colour map, norm) of ``image_limits``; masked pixels grey."""
    import matplotlib
    from matplotlib.colors import Normalize, TwoSlopeNorm
    lo, hi, diverging = image_limits(img)
    if diverging:
        cmap, norm = "RdBu_r", TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi)
    else:
        cmap, norm = "viridis", Normalize(lo, hi)
    return matplotlib.colormaps[cmap].with_extremes(bad="0.55"), norm


def roi_mask(bounds, shape) -> np.ndarray:
    """The raw-shaped mask of an ROI's bounds (one [lo, hi] per leading axis)."""
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(int(lo), int(hi)) for lo, hi in np.asarray(bounds).reshape(-1, 2))] = 1
    return mask


def draw_image(fig, smd: SmallData, d: DetectorData):
    if d.mean is None:
        return _nothing(fig, f"no /Sums/{d.name}_calib in the file\n(add calib to the "
                             f"detector's sums:)")
    from matplotlib import patheffects
    p = d.pixel_um
    img = assemble(d.mean, d.x, d.y, p)
    xmin, ymin = d.x.min() / 1e3, d.y.min() / 1e3
    pm = p / 1e3
    extent = (ymin - pm / 2, ymin + (img.shape[1] - 0.5) * pm,
              xmin + (img.shape[0] - 0.5) * pm, xmin - pm / 2)
    ax = fig.add_subplot()
    cmap, norm = image_scale(img)
    shown = ax.imshow(img, origin="upper", extent=extent, interpolation="antialiased", cmap=cmap,
                      norm=norm)
    bar = fig.colorbar(shown, ax=ax, shrink=0.85)
    bar.set_label(f"mean calibrated value [{d.units}]")
    for (name, (bounds, _)), colour in zip(d.rois.items(), ROI_COLOURS):
        inside = assemble(roi_mask(bounds, d.x.shape), d.x, d.y, p, fill=0)
        ax.contour(ymin + np.arange(img.shape[1]) * pm, xmin + np.arange(img.shape[0]) * pm,
                   inside, levels=[0.5], colors=[colour], linewidths=1.5)
        r, c = np.nonzero(inside)
        ax.text(ymin + c.min() * pm, xmin + r.min() * pm, f" {name}", color=colour,
                fontsize=9, va="top", ha="left", fontweight="bold")
    halo = [patheffects.withStroke(linewidth=4.5, foreground="white")]
    for (name, az), colour in zip(d.azavs.items(), AZAV_COLOURS):
        if "center" in az:
            xc, yc = (float(v) for v in az["center"])
            ax.plot(yc / 1e3, xc / 1e3, "+", ms=18, mew=2.5, color=colour, path_effects=halo,
                    label=f"{name} centre x = {xc:.1f} µm, y = {yc:.1f} µm")
    if d.azavs:
        ax.legend(loc="best", fontsize=8, framealpha=0.8)
        _include_centres(ax, extent, [az["center"] for az in d.azavs.values() if "center" in az])
    ax.set_xlabel("y [mm]")
    ax.set_ylabel("x [mm]")
    kind = "" if d.type == d.name else f" ({d.type})"
    ax.set_title(f"{d.name}{kind}: mean of {d.n_summed} events (/Sums/{d.name}_calib "
                 f"/ {d.n_summed})\n{d.coords_note}, pixel {p:g} µm"
                 + ("" if smd.complete else "; file incomplete"), fontsize=9)
    return ax


def _include_centres(ax, extent, centres_um):
    """Limits that hold the image and, with a margin, every centre off it."""
    left, right, bottom, top = extent              # x grows downwards: bottom > top
    ys = [left, right, *(float(c[1]) / 1e3 for c in centres_um)]
    xs = [top, bottom, *(float(c[0]) / 1e3 for c in centres_um)]
    pad = 0.0
    if min(ys) < left or max(ys) > right or min(xs) < top or max(xs) > bottom:
        pad = 0.04 * max(max(ys) - min(ys), max(xs) - min(xs))
    ax.set_xlim(min(ys) - pad, max(ys) + pad)
    ax.set_ylim(max(xs) + pad, min(xs) - pad)


def draw_azav(fig, smd: SmallData, d: DetectorData):
    if not d.azavs:
        return _nothing(fig, f"{d.name}: no azimuthal integration (azav) in the file")
    ax = fig.add_subplot()
    on = smd.xray_on
    for (name, az), colour in zip(d.azavs.items(), AZAV_COLOURS):
        q, prof = az["q"], az["profile"]
        for keep, style, what in ((on, "-", "X-rays on"), (~on, "--", "X-rays off")):
            if keep.any() and np.isfinite(prof[keep]).any():
                with warnings.catch_warnings():     # bins empty in every event: NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    ax.plot(q, np.nanmean(prof[keep], axis=0), style, color=colour, lw=1.3,
                            label=f"{name}, {what} ({int(keep.sum())} events)")
    ax.axhline(0, color="0.6", lw=0.6)
    first = next(iter(d.azavs.values()))
    setup = ", ".join(f"{label} {float(first[k]):g} {unit}" for k, label, unit in
                      (("eBeam", "E", "keV"), ("dis_to_sam", "distance", "mm")) if k in first)
    ax.set_xlabel("q [1/Å]")
    ax.set_ylabel(f"mean per pixel [{d.units}]")
    ax.set_title(f"{d.name}: azimuthal average\n{setup}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def draw_roi(fig, smd: SmallData, d: DetectorData):
    rois = {name: s for name, (_, s) in d.rois.items() if s is not None}
    if not rois:
        return _nothing(fig, f"{d.name}: no ROI sums in the file")
    ax = fig.add_subplot()
    on = smd.xray_on
    if smd.intensity is None:
        xname, xvals = "event index [#]", np.arange(smd.n_events, dtype=np.float64)
    else:
        xname, xvals = f"{smd.intensity[0]} [arb. units]", smd.intensity[1]
    for (name, s), colour in zip(rois.items(), ROI_COLOURS):
        r = (np.corrcoef(xvals[on], s[on])[0, 1]
             if on.sum() > 2 and np.std(xvals[on]) > 0 and np.std(s[on]) > 0 else np.nan)
        ax.plot(xvals[on], s[on], "o", ms=4, color=colour, alpha=0.8,
                label=f"{name}, X-rays on" + ("" if np.isnan(r) else f" (r = {r:.2f})"))
        if (~on).any():
            ax.plot(xvals[~on], s[~on], "x", ms=7, mew=1.5, color="k",
                    label=f"{name}, X-rays off" if name == next(iter(rois)) else None)
    ax.set_xlabel(xname)
    ax.set_ylabel(f"ROI sum [{d.units}]")
    ax.set_title(f"{d.name}: ROI sums against the beam intensity"
                 + ("" if smd.xray is not None else "\n(no /lightStatus/xray: all taken as on)"),
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def _barh(ax, labels, values, colour):
    y = np.arange(len(labels))
    ax.barh(y, values, color=colour)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    top = max(max(values, default=0), 1)
    ax.set_xlim(0, top * 1.25)
    for yi, v in zip(y, values):
        ax.text(v + top * 0.01, yi, f"{int(v)}", va="center", fontsize=8)


def draw_counts(fig, smd: SmallData, d: DetectorData):
    axes = fig.subplot_mosaic([["cm", "cm"], ["errors", "status"]])
    ax = axes["cm"]
    events = np.arange(smd.n_events)
    if "corrected" in d.common_mode:
        for key, style in (("corrected", "o-"), ("skipped", "s-")):
            ax.plot(events, d.common_mode[key], style, ms=3, lw=1, label=key)
        ax.legend(fontsize=8)
        pars = d.common_mode["pars"]
        ax.set_title(f"{d.name}: common mode {d.common_mode['code']} = cmpars "
                     f"{[float(v) if v % 1 else int(v) for v in np.ravel(pars)]}: groups per "
                     f"event", fontsize=9)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, f"no common-mode counts (common_mode: {d.common_mode['code']})",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{d.name}: common mode", fontsize=9)
    ax.set_xlabel("event index [#]")
    ax.set_ylabel("groups [count]")

    ax = axes["errors"]
    labels = ["written"] + [f"error: {stage}" for stage in smd.errors]
    _barh(ax, labels, [smd.n_events, *smd.errors.values()], "tab:red")
    ax.get_children()[0].set_color("tab:blue")
    n_err = sum(smd.errors.values())
    ax.set_title(f"events: {n_err} in /errors, file "
                 f"{'complete' if smd.complete else 'incomplete'}", fontsize=9)
    ax.set_xlabel("events [count]")

    ax = axes["status"]
    if d.status is not None:
        status = np.asarray(d.status).astype(np.int64)
        anygain = np.bitwise_or.reduce(status.reshape(-1, *d.x.shape), axis=0)
        labels, values = [], []
        for bit, what in STATUS_BITS.items():
            labels.append(f"{bit}: {what}")
            values.append(int(np.count_nonzero(anygain & bit)))
        if d.calib_mask is not None:
            labels.append("masked by the calibration")
            values.append(int(np.count_nonzero(np.asarray(d.calib_mask) == 0)))
        _barh(ax, labels, values, "tab:gray")
        ax.set_title(f"pixel status: {int(np.count_nonzero(anygain))} of {anygain.size} "
                     f"flagged", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no pixel status in the file", ha="center", transform=ax.transAxes)
    ax.set_xlabel("pixels [count]")
    return axes


PANELS = {"image": draw_image, "azav": draw_azav, "roi": draw_roi, "counts": draw_counts}
PANEL_SIZE = {"image": (7.5, 6.5), "azav": (7.5, 5), "roi": (7.5, 5), "counts": (9, 6.5)}


# ---- figures and files -----------------------------------------------------------------
def _figure(size, layout="constrained"):
    """A matplotlib Figure on the Agg canvas (no pyplot: a caller's own backend is left
    as it is)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def panel_figure(smd: SmallData, det: str, panel: str):
    """One picture (a key of PANELS) of one detector, as a matplotlib Figure."""
    fig = _figure(PANEL_SIZE[panel])
    PANELS[panel](fig, smd, smd.detectors[det])
    return fig


def overview_figure(smd: SmallData, det: str):
    """The four pictures of one detector in one Figure."""
    fig = _figure((15, 11))
    for sub, draw in zip(fig.subfigures(2, 2).ravel(), PANELS.values()):
        draw(sub, smd, smd.detectors[det])
    fig.suptitle(f"{smd.path.name}: {smd.n_events} events", fontsize=11)
    return fig


def save(fig, path: Path, dpi: int = DPI) -> Path:
    """A PNG of 256 colours at most: pixel noise of an image in full colour makes files
    of a few hundred kB; in a palette a third of that (what an elog takes)."""
    from PIL import Image
    fig.set_dpi(dpi)
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    with written_whole(path) as part:
        rgb.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
            part, format="png", optimize=True)
    return path


def output_paths(smd_path, detectors, outdir=None, png=None) -> dict:
    """{(detector, panel or "overview"): path}: ``png`` the overview (``<stem>_<det>.png``
    for each of several detectors), ``outdir`` every picture as ``<det>_<panel>.png``;
    neither: the overview beside the small-data file."""
    smd_path = Path(smd_path)
    if outdir is None and png is None:
        png = smd_path.with_suffix(".png")
    paths = {}
    for det in detectors:
        if png is not None:
            png = Path(png)
            paths[det, "overview"] = (png if len(detectors) == 1
                                      else png.with_name(f"{png.stem}_{det}{png.suffix or '.png'}"))
        if outdir is not None:
            for panel in PANELS:
                paths[det, panel] = Path(outdir) / f"{det}_{panel}.png"
    return paths


def plot_small_data(smd_path, outdir=None, png=None, detector: str | None = None,
                    intensity: str | None = None, force: bool = False,
                    dpi: int = DPI) -> list[Path]:
    """Draw the pictures of a small-data file (module docstring); returns their paths.
    Existing pictures are refused before any drawing unless ``force``."""
    smd = read_small_data(smd_path, detector, intensity)
    paths = output_paths(smd_path, list(smd.detectors), outdir, png)
    for path in paths.values():
        check_new_output(path, force)
    written = []
    for (det, panel), path in paths.items():
        fig = overview_figure(smd, det) if panel == "overview" else panel_figure(smd, det, panel)
        written.append(save(fig, path, dpi))
    return written
