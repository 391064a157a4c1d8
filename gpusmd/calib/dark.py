"""Dark processing (DESIGN §5): pedestal, noise and pixel status from a dark run.

For each detector of the run, every event's gain range is decoded per pixel (epix10k
from the control bits of the event's configuration step and raw bit 14, Jungfrau from
raw bits 15-14), and per pixel and gain range the number of frames, the sum and the sum
of squares of the ADC value (float64, over batches of events so that memory stays
bounded) are accumulated, together with the frames that were saturated
(ADC >= :func:`adc_max`) or cold (ADC <= 0) and, over all ranges, the frames with invalid
gain bits. Then per pixel and gain range:

    pedestal = mean, rms = standard deviation (ddof 0)

optionally recomputed once without the frames further than ``outlier_sigma`` x rms from
the first-pass pedestal. Status bits (0 = good):

    1   rms too high            rms > c_rms + nsigma x s_rms
    2   rms too low             rms < c_rms - nsigma x s_rms, or rms == 0 (a stuck pixel)
    4   saturated               ADC >= adc_max in more than 10% of the pixel's frames
    8   cold                    ADC <= 0 in more than 10% of the pixel's frames
    16  mean too high           pedestal > c_ped + nsigma x s_ped
    32  mean too low            pedestal < c_ped - nsigma x s_ped
    64  invalid gain bits       in at least one frame (Jungfrau bits 15-14 = 2, or
                                epix10k control bits of no range); set in every range
    128 no data                 no frame of the pixel in that gain range

c and s are the robust centre and width of the distribution over the pixels that have
frames in that gain range: median and 1.4826 x MAD (nsigma = 6), so that the defects
themselves do not widen the limits. A simulated dead pixel (raw always 0) thus gets
2 | 8 | 32 = 42 (and, on a Jungfrau, 128 in G1 and G2: raw 0 decodes as G0).

epix10k AHL_L and AML_L are never seen in a dark run (only a pixel that switched on a
signal reaches them): their pedestal, rms and status are always copied from FL, and
frames found in them are not used. Every other gain range (epix10k FH, FM, FL, AHL_H,
AML_M; Jungfrau G0, G1, G2; the single range of the others) must have frames, or the dark
run is refused.

The gains are the model's defaults (``Constants.default``) or those of ``gain_path``
(an HDF5 file with /<det>/gain of shape (ngain, *shape)); offset 0, mask 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..detectors import ADC_MASK, DetectorModel
from ..errors import ConstantsError, RawFileError
from ..io.h5 import open_h5
from ..io.output import WriteError, check_new_output, written_whole
from ..io.source import open_run
from ..mpi import count_events, said_once
from .constants import RUN_ANY, Constants

RMS_HIGH, RMS_LOW, SATURATED, COLD, MEAN_HIGH, MEAN_LOW, BAD_GAIN, NO_DATA = (
    1, 2, 4, 8, 16, 32, 64, 128)
STATUS_BITS = {RMS_HIGH: "rms too high", RMS_LOW: "rms too low",
               SATURATED: "saturated in > 10% of frames", COLD: "cold (ADC <= 0) in > 10% of frames",
               MEAN_HIGH: "mean too high", MEAN_LOW: "mean too low",
               BAD_GAIN: "invalid gain bits", NO_DATA: "no frames in this gain range"}
BAD_FRACTION = 0.1
EPIX10K_COPY_FL = (5, 6)          # AHL_L, AML_L <- FL
EPIX10K_FL = 2
BATCH_VALUES = 8_000_000          # values per batch (B x npix)


def adc_max(model: DetectorModel) -> int:
    """The saturation ADC value: 0x3fff for the 14-bit ADCs (epix10k, Jungfrau, epix100,
    CsPad), the dtype maximum for cameras."""
    if model.family in ("epix10k", "jungfrau", "epix100", "cspad"):
        return ADC_MASK
    return int(np.iinfo(np.dtype(model.dtype)).max)


def required_gains(model: DetectorModel) -> tuple[int, ...]:
    """Gain ranges a dark run must have frames in."""
    if model.family == "epix10k":
        return (0, 1, 2, 3, 4)
    return tuple(range(model.ngain))


def robust_centre_sigma(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 x median absolute deviation (floored at 1e-6)."""
    c = float(np.median(values))
    s = 1.4826 * float(np.median(np.abs(values - c)))
    return c, max(s, 1e-6)


class _Acc:
    """Per gain range accumulators, allocated for the ranges that occur."""

    def __init__(self, model: DetectorModel):
        self.model = model
        self.n = {}
        self.s1 = {}
        self.s2 = {}
        self.nsat = {}
        self.ncold = {}
        self.ninvalid = np.zeros(model.npix, np.int32)

    def _get(self, g):
        if g not in self.n:
            npix = self.model.npix
            self.n[g] = np.zeros(npix, np.int32)
            self.s1[g] = np.zeros(npix, np.float64)
            self.s2[g] = np.zeros(npix, np.float64)
            self.nsat[g] = np.zeros(npix, np.int32)
            self.ncold[g] = np.zeros(npix, np.int32)
        return g


def _accumulate(run, det: str, model: DetectorModel, batch: int, reject=None,
                share=None) -> _Acc:
    """One pass over the run. reject: None or (pedestal, rms, k) per gain range (dicts).
    share (gpusmd.mpi.RankShare): this rank's block of the run, then the sums of every
    rank's, the same on every rank (the sums of integer ADC values are exact: the
    constants are those of one process)."""
    acc = _Acc(model)
    npix = model.npix
    amax = adc_max(model)
    cbits = {}
    first, stop = (0, None) if share is None else share.block(count_events(run, None))
    for b in run.batches(batch, stop, detectors=[det], one_step=True, first=first):
        if not len(b):
            continue
        raw = b.frames[det].reshape(len(b), npix)
        step = int(b.steps[det][0])
        cb = None
        if model.family == "epix10k":
            if step not in cbits:
                cbits[step] = run.control_bits(det, step).reshape(npix)
            cb = cbits[step]
        gi = model.gain_index(raw, cb)
        adc = model.adc(raw)
        acc.ninvalid += (gi < 0).sum(0)
        counts = np.bincount(gi.reshape(-1).astype(np.int16) + 1, minlength=model.ngain + 1)
        for g in np.flatnonzero(counts[1:]):
            if model.family == "epix10k" and g in EPIX10K_COPY_FL:
                continue
            acc._get(g)
            if counts[g + 1] == gi.size and reject is None:     # every value in range g
                a = adc.astype(np.float64)
                acc.n[g] += len(a)
                acc.nsat[g] += np.count_nonzero(adc >= amax, axis=0)
                acc.ncold[g] += np.count_nonzero(adc <= 0, axis=0)
            else:
                sel = gi == g
                if reject is not None:
                    ped, rms, k = reject
                    keep = np.abs(adc - ped[g]) <= k * rms[g]
                    sel &= keep | (rms[g] <= 0)
                a = np.where(sel, adc, 0).astype(np.float64)
                acc.n[g] += np.count_nonzero(sel, axis=0)
                acc.nsat[g] += np.count_nonzero(sel & (adc >= amax), axis=0)
                acc.ncold[g] += np.count_nonzero(sel & (adc <= 0), axis=0)
            acc.s1[g] += a.sum(0)
            acc.s2[g] += np.einsum("ij,ij->j", a, a)
    if share is not None:
        for g in share.union(acc.n):
            acc._get(g)
            for sums in (acc.n, acc.s1, acc.s2, acc.nsat, acc.ncold):
                sums[g] = share.sum_exact(sums[g])
        acc.ninvalid = share.sum_exact(acc.ninvalid)
    return acc


def _moments(acc: _Acc, g):
    n = acc.n[g]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, acc.s1[g] / np.maximum(n, 1), 0.0)
        var = np.where(n > 0, acc.s2[g] / np.maximum(n, 1) - mean * mean, 0.0)
    return mean, np.sqrt(np.clip(var, 0, None))


def dark_constants(run, det: str, gain: np.ndarray | None = None, run_max: int = RUN_ANY,
                   outlier_sigma: float | None = None, nsigma: float = 6.0,
                   batch_events: int | None = None, share=None) -> Constants:
    """Constants of one detector of an open dark run (see the module docstring); share:
    this MPI rank's part of the run (see _accumulate)."""
    model = run.detectors[det]
    npix, ngain = model.npix, model.ngain
    batch = batch_events or max(1, min(64, BATCH_VALUES // npix))
    acc = _accumulate(run, det, model, batch, share=share)
    missing = [model.gain_names[g] for g in required_gains(model)
               if g not in acc.n or not acc.n[g].any()]
    if missing:
        raise RawFileError(
            f"{run.source}: {det}: no dark frames in gain range(s) {', '.join(missing)}; a dark "
            f"run needs frames in {', '.join(model.gain_names[g] for g in required_gains(model))}"
            f" (is this a dark run?)")
    ped = np.zeros((ngain, npix), np.float64)
    rms = np.zeros((ngain, npix), np.float64)
    seen = np.zeros((ngain, npix), bool)
    for g in acc.n:
        ped[g], rms[g] = _moments(acc, g)
        seen[g] = acc.n[g] > 0
    if outlier_sigma is not None:
        acc2 = _accumulate(run, det, model, batch, reject=(ped, rms, float(outlier_sigma)),
                           share=share)
        for g in acc2.n:
            m2, r2 = _moments(acc2, g)
            ok = acc2.n[g] > 0
            ped[g] = np.where(ok, m2, ped[g])
            rms[g] = np.where(ok, r2, rms[g])

    status = np.zeros((ngain, npix), np.int32)
    for g in range(ngain):
        if model.family == "epix10k" and g in EPIX10K_COPY_FL:
            continue
        if g not in acc.n:
            status[g] |= NO_DATA
            continue
        s = seen[g]
        status[g][~s] |= NO_DATA
        cp, sp = robust_centre_sigma(ped[g][s])
        cr, sr = robust_centre_sigma(rms[g][s])
        n = np.maximum(acc.n[g], 1)
        flags = ((RMS_HIGH * (rms[g] > cr + nsigma * sr))
                 | (RMS_LOW * ((rms[g] < cr - nsigma * sr) | (rms[g] <= 0)))
                 | (SATURATED * (acc.nsat[g] > BAD_FRACTION * n))
                 | (COLD * (acc.ncold[g] > BAD_FRACTION * n))
                 | (MEAN_HIGH * (ped[g] > cp + nsigma * sp))
                 | (MEAN_LOW * (ped[g] < cp - nsigma * sp)))
        status[g][s] |= flags[s].astype(np.int32)
        ped[g][~s] = 0
        rms[g][~s] = 0
    status[:, acc.ninvalid > 0] |= BAD_GAIN
    if model.family == "epix10k":
        for g in EPIX10K_COPY_FL:
            ped[g], rms[g], status[g] = ped[EPIX10K_FL], rms[EPIX10K_FL], status[EPIX10K_FL]

    full = (ngain, *model.shape)
    c = Constants.default(model, pedestal=ped.reshape(full).astype(np.float32),
                          rms=rms.reshape(full).astype(np.float32))
    c.status = status.reshape(full).astype(np.float32)
    if gain is not None:
        c.gain = np.asarray(gain, np.float32).reshape(full)
    c.run_min = run.run
    c.run_max = int(run_max)
    c.source = f"dark run {run.run} ({run.name})"
    frames = np.array([int(acc.n[g].max()) if g in acc.n else 0 for g in range(ngain)], np.int64)
    c.attrs = {"dark_frames": frames, "status_nsigma": float(nsigma),
               "outlier_sigma": float(outlier_sigma) if outlier_sigma is not None else -1.0,
               "experiment": run.experiment,
               "gain_source": "file" if gain is not None else "default"}
    return c


def _load_gain(gain_path, det: str, model: DetectorModel) -> np.ndarray:
    gain_path = Path(gain_path)
    with open_h5(gain_path, "gain file", ConstantsError) as f:
        key = f"{det}/gain"
        if key not in f:
            raise ConstantsError(f"{gain_path}: no /{key} (detector {det!r})")
        expected = (model.ngain, *model.shape)
        if f[key].shape != expected:
            raise ConstantsError(f"{gain_path}: /{key} has shape {f[key].shape}, "
                                 f"expected {expected}")
        gain = f[key][()].astype(np.float32)
    if not np.all(np.isfinite(gain)):
        raise ConstantsError(f"{gain_path}: /{key} has non-finite values")
    return gain


def process_dark(source, out_path, detectors=None, gain_path=None, run_max: int = RUN_ANY,
                 outlier_sigma: float | None = None, nsigma: float = 6.0,
                 force: bool = False, share=None) -> dict[str, Constants]:
    """Constants of every (or the named) detector of a dark run (any source of
    gpusmd.io.source), written to ``out_path`` with ``Constants.save``; returns
    {det: Constants}. An existing ``out_path`` is refused (before the run is read) unless
    ``force``. The file is written under a temporary name in the same folder and renamed
    when whole: a constants file is complete or absent (a full disk leaves none).
    share (gpusmd.mpi.RankShare): one rank of an MPI job, which reads its block of the
    run; every rank gets the constants, rank 0 writes them; a refusal is said once."""
    out = {}
    wanted = None if detectors is None else (
        [detectors] if isinstance(detectors, str) else list(detectors))

    def prepare():
        """Everything that can be refused, before the run is read."""
        path = check_new_output(out_path, force)
        if outlier_sigma is not None and not outlier_sigma > 0:
            raise ValueError(f"outlier_sigma must be > 0, got {outlier_sigma}")
        run = open_run(source, wanted).__enter__()
        try:
            if run.n_events == 0:
                raise RawFileError(f"{run.source}: the dark run has no events")
            if not run.detectors:
                raise RawFileError(f"{run.source}: no detector in the run")
            names = list(run.detectors) if wanted is None else wanted
            unknown = [d for d in names if d not in run.detectors]
            if unknown:
                raise RawFileError(f"{run.source}: no detector "
                                   f"{', '.join(map(repr, unknown))} "
                                   f"(has: {', '.join(run.detectors)})")
            gains = {d: _load_gain(gain_path, d, run.detectors[d]) if gain_path else None
                     for d in names}
        except BaseException:
            run.__exit__(None, None, None)
            raise
        return path, run, names, gains

    out_path, run, names, gains = said_once(share, prepare)
    try:
        for d in names:
            out[d] = dark_constants(run, d, gains[d], run_max, outlier_sigma, nsigma,
                                    share=share)
    finally:
        run.__exit__(None, None, None)
    if share is not None and share.rank != 0:
        return out
    try:
        with written_whole(out_path) as part:
            for d, c in out.items():
                c.save(part, d)
    except WriteError as e:
        raise WriteError(out_path, e.reason, detail=f"{e.detail}; no constants file written") from None
    return out
