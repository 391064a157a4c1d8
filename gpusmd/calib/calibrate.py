"""The calibration pass (DESIGN §5): raw -> gain range -> (adc - pedestal) * mask / gain.

The constants are folded once per run into a look-up table ``lut`` of shape
(rows, npix, 2): lut[g, i] = (pedestal, mask / gain) for pixel i in gain range g, so
that one pass over the raw frame is one fused multiply-add per pixel. The NumPy
reference here and the CUDA kernel ``kernels/calibrate.cu`` compute the same thing;
tests compare them.

The rules are psana2's (psana/detector/UtilsEpix10ka.py calib_epix10ka_any,
UtilsJungfrau.py calib_jungfrau, AreaDetectorRaw.calib):

- The pedestal is the constants' pedestal; only the Jungfrau adds its offset (psana's
  ``pixel_offset``, which only calib_jungfrau adds). psana's epix10ka calibration has
  no offset: its ``pixel_offset`` constants (charge injection) are folded into the
  low-gain pedestals when they are deployed, so subtracting one again would count it
  twice. The other families' offsets are not used.
- A pixel whose gain bits name no gain range: the epix10k's undefined configuration
  (g set, ga not) gives its raw ADU x mask (psana's np.select defaults in
  event_constants_for_gmaps: pedestal 0, gain factor 1), held as the table's extra
  row ``ngain`` = (0, mask); the Jungfrau's gain bits 2 give 0 (the factor 0 of
  calib_jungfrau_single_panel), from no row.
"""
from __future__ import annotations

import numpy as np

from ..backend import Backend
from ..detectors import ADC_MASK, DetectorModel
from .constants import Constants

# family codes shared with kernels/calibrate.cu
FAMILY_SINGLE, FAMILY_JUNGFRAU, FAMILY_EPIX10K = 0, 1, 2
GAIN_CONVENTIONS = ("divide", "multiply", "none")
OFFSET_FAMILIES = ("jungfrau",)     # the families whose calibration subtracts the offset


def family_code(model: DetectorModel) -> int:
    return {"jungfrau": FAMILY_JUNGFRAU, "epix10k": FAMILY_EPIX10K}.get(model.family, FAMILY_SINGLE)


def lut_rows(model: DetectorModel) -> int:
    """Rows of the look-up table: the gain ranges, and for the epix10k one more, the
    entry of its pixels in no gain range."""
    return model.ngain + (family_code(model) == FAMILY_EPIX10K)


def build_lut(constants: Constants, pixel_mask: np.ndarray, convention: str = "divide") -> np.ndarray:
    """(lut_rows, npix, 2) float32 table of (pedestal, mask x gain factor) per gain range,
    and for the epix10k (0, mask) in row ngain (module docstring).

    convention: "divide" (psana2: value / pixel_gain, 0 where the gain is 0),
    "multiply" (psana1 single-gain detectors: value * pixel_gain), "none" (ADU)."""
    model = constants.model
    ngain = model.ngain
    ped = constants.pedestal.reshape(ngain, -1)
    if model.family in OFFSET_FAMILIES:
        ped = ped + constants.offset.reshape(ngain, -1)
    gain = constants.gain.reshape(ngain, -1).astype(np.float64)
    mask = np.broadcast_to(np.asarray(pixel_mask, np.float64).reshape(1, -1), gain.shape)
    if convention == "divide":
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(gain != 0, mask / gain, 0.0)
    elif convention == "multiply":
        scale = mask * gain
    elif convention == "none":
        scale = mask
    else:
        raise ValueError(f"unknown gain convention {convention!r}")
    lut = np.stack([ped, scale], axis=-1).astype(np.float32)
    if lut_rows(model) > ngain:
        no_range = np.stack([np.zeros_like(mask[0]), mask[0]], axis=-1).astype(np.float32)
        lut = np.concatenate([lut, no_range[None]])
    return lut


def entries(lut, g, model: DetectorModel, xp=np):
    """(pedestal, scale) of gain ranges g (-1: none) at every pixel (the last axis):
    row ngain of the table where there is none, (0, 0) where the table has no such row."""
    lut = xp.asarray(lut)
    if lut.shape[0] != lut_rows(model):
        raise ValueError(f"{model.type}: look-up table of {lut.shape[0]} rows, not {lut_rows(model)}")
    if lut.shape[0] == model.ngain:
        lut = xp.concatenate([lut, xp.zeros((1, *lut.shape[1:]), lut.dtype)])
    gi = xp.where(g >= 0, g, model.ngain).astype(xp.intp)
    entry = lut[gi, xp.arange(lut.shape[1])]
    return entry[..., 0], entry[..., 1]


def calibrate_reference(raw, control_bits, lut, model: DetectorModel, xp=np):
    """NumPy (or CuPy) reference of the calibration kernel.

    raw: (B, npix) uint16 (int16 for CsPad); control_bits: (npix,) uint8 for epix10k,
    else None; lut: (lut_rows, npix, 2) float32. Returns (B, npix) float32."""
    g = model.gain_index(raw, control_bits, xp)
    ped, scale = entries(lut, g, model, xp)
    return ((model.adc(raw, xp) - ped) * scale).astype(xp.float32)


def switch_states(model: DetectorModel) -> int:
    """How many states the raw gain-switch bits of one pixel can take: Jungfrau 4 (bits
    15-14), epix10k 2 (bit 14, the rest is per-pixel configuration), others 1."""
    return {FAMILY_JUNGFRAU: 4, FAMILY_EPIX10K: 2}.get(family_code(model), 1)


def switch_tables(lut: np.ndarray, control_bits, model: DetectorModel, cm_ranges=None,
                  vote_mask=None):
    """The look-up table unrolled by switch state: (pedestal, scale, cm_good) per state
    per pixel, the no-range entry where the state decodes to no gain range. cm_good marks the
    pixels that take part in the common-mode correction: valid, not masked, and in one of
    ``cm_ranges`` (all ranges when None); not masked is ``vote_mask`` (npix,), whatever
    the gain (psana's voters), or where it is None mask / gain != 0. With them the CPU
    pass needs no per-pixel
    gather: one select on the raw switch bits (the gain decoding of a pixel depends only
    on its configuration and these bits)."""
    lut = np.asarray(lut)
    nstate, npix = switch_states(model), lut.shape[1]
    ped = np.zeros((nstate, npix), np.float32)
    scale = np.zeros((nstate, npix), np.float32)
    good = np.zeros((nstate, npix), bool)
    for s in range(nstate):
        g = model.gain_index(np.full(npix, s << 14, np.uint16), control_bits)
        ped[s], scale[s] = entries(lut, g, model)
        unmasked = scale[s] != 0 if vote_mask is None else vote_mask
        good[s] = (g >= 0) & unmasked & (True if cm_ranges is None else np.isin(g, cm_ranges))
    return ped, scale, good


def switched(raw, nstate: int, xp=np):
    """(event, pixel) indices and states of the pixels whose raw switch bits are not 0:
    few in practice (Jungfrau G1 / G2, epix10k auto-ranged low gain), so the common
    state-0 case is one dense pass and the others a sparse fix-up."""
    flat = xp.flatnonzero(raw.view(xp.uint16) >= 0x4000)    # a bool scan: fast
    ev, pix = flat // raw.shape[1], flat % raw.shape[1]
    state = ((raw.view(xp.uint16)[ev, pix] >> 14) & (nstate - 1)).astype(xp.intp)
    return ev, pix, state


def calibrate_switch(raw, ped, scale, model: DetectorModel, xp=np, out=None):
    """The CPU pass: same numbers as calibrate_reference, from switch_tables, written
    into ``out`` (B, npix) float32 where given (else a new array), in place: no
    temporary of the frames' size but the ADC values."""
    if out is None:
        out = xp.empty(raw.shape, xp.float32)
    out[...] = (raw & ADC_MASK) if model.multigain else raw
    if ped.shape[0] > 1:
        ev, pix, state = switched(raw, ped.shape[0], xp)
        fixed = (out[ev, pix] - ped[state, pix]) * scale[state, pix]
    xp.subtract(out, ped[0], out=out)
    xp.multiply(out, scale[0], out=out)
    if ped.shape[0] > 1:
        out[ev, pix] = fixed
    return out


def calibrate_compiled(raw, ped, scale, model: DetectorModel, out=None):
    """calibrate_switch on the compiled CPU engine (gpusmd.numba_kernels), same numbers."""
    from ..cpu_engine import launch
    if out is None:
        out = np.empty(raw.shape, np.float32)
    launch("calibrate_switch", np.ascontiguousarray(raw), ped, scale,
           ADC_MASK if model.multigain else 0, out)
    return out


def split_compiled(raw, ped, good, model: DetectorModel):
    """split_switch on the compiled CPU engine: (adu, None, voting); the factor is applied
    by gain_compiled after the common mode."""
    from ..cpu_engine import launch
    raw = np.ascontiguousarray(raw)
    adu = np.empty(raw.shape, np.float32)
    voting = np.empty(raw.shape, bool)
    launch("split_switch", raw, ped, good, ADC_MASK if model.multigain else 0, adu, voting)
    return adu, None, voting


def gain_compiled(raw, scale, adu, out=None):
    """adu x the factor of each pixel's switch state, on the compiled CPU engine."""
    from ..cpu_engine import launch
    if out is None:
        out = np.empty(adu.shape, np.float32)
    launch("apply_scale", np.ascontiguousarray(raw), scale, adu, out)
    return out


def split_switch(raw, ped, scale, good, model: DetectorModel, xp=np):
    """For the common-mode path: ADU before the gain (B, npix), the factor that turns
    ADU into calibrated units, and the pixels that vote in the common mode."""
    adc = model.adc(raw, xp)
    adu = adc - ped[0]
    factor = xp.broadcast_to(scale[0], raw.shape).copy()
    voting = xp.broadcast_to(good[0], raw.shape).copy()
    if ped.shape[0] > 1:
        ev, pix, state = switched(raw, ped.shape[0], xp)
        adu[ev, pix] = adc[ev, pix] - ped[state, pix]
        factor[ev, pix] = scale[state, pix]
        voting[ev, pix] = good[state, pix]
    return adu, factor, voting


class Calibrator:
    """Calibrates batches of one detector's raw frames on the chosen backend.

    Holds the look-up table (and the epix10k control bits) resident on the backend,
    built once per run."""

    def __init__(self, model: DetectorModel, constants: Constants, pixel_mask: np.ndarray,
                 backend: Backend, convention: str = "divide", cm_ranges=None,
                 cm_gain_zero_votes: bool = True):
        self.model = model
        self.backend = backend
        self.family = family_code(model)
        self.cm_ranges = cm_ranges
        # common-mode voters: the unmasked pixels, whatever their gain (psana), or not
        self.cm_vote_mask = (np.asarray(pixel_mask).reshape(-1) != 0
                             if cm_gain_zero_votes else None)
        self._device_vote_mask = (None if self.cm_vote_mask is None
                                  else backend.asarray(self.cm_vote_mask.astype(np.uint8)))
        self.host_lut = build_lut(constants, pixel_mask, convention)
        self.lut = backend.asarray(self.host_lut)
        self._control_bits = {}
        self._tables = {}           # step -> switch tables, for the CPU pass

    def set_control_bits(self, step: int, control_bits: np.ndarray | None):
        """epix10k: the per-pixel control bits of a config step."""
        if control_bits is not None:
            self._control_bits[step] = self.backend.asarray(control_bits.reshape(-1), np.uint8)

    def control_bits(self, step: int):
        """The epix10k control bits of a config step on the backend (None for others)."""
        cb = self._control_bits.get(step)
        if self.family == FAMILY_EPIX10K and cb is None:
            raise ValueError(f"{self.model.type}: no control bits for config step {step}")
        return cb

    def __call__(self, raw, step: int = 0, out=None):
        """raw: (B, *shape) on the host or the device -> (B, *shape) float32 on the backend
        (on the CPU written into ``out`` where given)."""
        xp = self.backend.xp
        raw = xp.asarray(raw)
        flat = raw.reshape(raw.shape[0], -1)
        cb = self.control_bits(step)
        if self.backend.is_gpu:
            from ..cuda import calibrate_gpu
            result = calibrate_gpu(flat, cb, self.lut, self.family)
        else:
            ped, scale, _ = self.tables(step)
            out = None if out is None else out.reshape(flat.shape)
            if self.backend.compiled:
                result = calibrate_compiled(flat, ped, scale, self.model, out)
            else:
                result = calibrate_switch(flat, ped, scale, self.model, xp, out)
        return result.reshape(raw.shape)

    def tables(self, step: int):
        """The switch tables of a config step, on the backend (built once)."""
        if step not in self._tables:
            cb = self._control_bits.get(step)
            host_cb = None if cb is None else self.backend.to_host(cb)
            self._tables[step] = tuple(self.backend.asarray(t) for t in switch_tables(
                self.host_lut, host_cb, self.model, self.cm_ranges, self.cm_vote_mask))
        return self._tables[step]

    @property
    def vote_ranges(self) -> int:
        """The gain ranges that vote in the common mode, as bits (kernels/calibrate_cm.cu)."""
        if self.cm_ranges is None:
            return 0xFF
        return sum(1 << g for g in self.cm_ranges)

    def with_common_mode(self, raw, step: int, common_mode):
        """Calibrated frames and the per-event common-mode statistics, the correction fused
        into the calibration pass (``common_mode.fused``)."""
        xp = self.backend.xp
        raw = xp.asarray(raw)
        cb = self.control_bits(step)
        calib, stats = common_mode.calibrate(raw.reshape(raw.shape[0], -1), cb, self.lut,
                                             self.family, self.vote_ranges,
                                             self._device_vote_mask)
        return calib.reshape(raw.shape), stats

    def split(self, raw, step: int = 0):
        """(adu, scale, good), each (B, npix) on the backend, for the common-mode path:
        calibrated = adu (after the common mode) * scale, which ``apply_gain`` does (on
        the compiled engine scale is None: the factor is looked up again there)."""
        xp = self.backend.xp
        raw = xp.asarray(raw)
        flat = raw.reshape(raw.shape[0], -1)
        ped, scale, good = self.tables(step)
        if self.backend.compiled:
            return split_compiled(flat, ped, good, self.model)
        return split_switch(flat, ped, scale, good, self.model, xp)

    def apply_gain(self, raw, adu, scale, step: int = 0, out=None):
        """The calibrated frames (B, npix) from split's adu and scale, into ``out``
        (B, npix) where given."""
        if self.backend.compiled:
            return gain_compiled(np.asarray(raw).reshape(adu.shape), self.tables(step)[1],
                                 adu, out)
        if out is None:
            return adu * scale
        return self.backend.xp.multiply(adu, scale, out=out)
