"""The calibration pass (DESIGN §5): raw -> gain range -> (adc - pedestal) * mask / gain.

The constants are folded once per run into a look-up table ``lut`` of shape
(ngain, npix, 2): lut[g, i] = (pedestal + offset, mask / gain) for pixel i in gain
range g, so that one pass over the raw frame is one fused multiply-add per pixel.
The NumPy reference here and the CUDA kernel ``kernels/calibrate.cu`` compute the
same thing; tests compare them.
"""
from __future__ import annotations

import numpy as np

from ..backend import Backend
from ..detectors import DetectorModel
from .constants import Constants

# family codes shared with kernels/calibrate.cu
FAMILY_SINGLE, FAMILY_JUNGFRAU, FAMILY_EPIX10K = 0, 1, 2
GAIN_CONVENTIONS = ("divide", "multiply", "none")


def family_code(model: DetectorModel) -> int:
    return {"jungfrau": FAMILY_JUNGFRAU, "epix10k": FAMILY_EPIX10K}.get(model.family, FAMILY_SINGLE)


def build_lut(constants: Constants, pixel_mask: np.ndarray, convention: str = "divide") -> np.ndarray:
    """(ngain, npix, 2) float32 table of (pedestal + offset, mask x gain factor).

    convention: "divide" (psana2: value / pixel_gain, 0 where the gain is 0),
    "multiply" (psana1 single-gain detectors: value * pixel_gain), "none" (ADU)."""
    ngain = constants.model.ngain
    ped = (constants.pedestal + constants.offset).reshape(ngain, -1)
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
    return np.stack([ped, scale.astype(np.float32)], axis=-1).astype(np.float32)


def calibrate_reference(raw, control_bits, lut, model: DetectorModel, xp=np):
    """NumPy (or CuPy) reference of the calibration kernel.

    raw: (B, npix) uint16 (int16 for CsPad); control_bits: (npix,) uint8 for epix10k,
    else None; lut: (ngain, npix, 2) float32. Returns (B, npix) float32, 0 where the
    gain bits are invalid."""
    g = model.gain_index(raw, control_bits, xp)
    adc = model.adc(raw, xp)
    valid = g >= 0
    gi = xp.where(valid, g, 0).astype(xp.intp)
    pix = xp.arange(raw.shape[-1])[None, :]
    entry = lut[gi, pix]                            # (B, npix, 2)
    out = (adc - entry[..., 0]) * entry[..., 1]
    return xp.where(valid, out, xp.float32(0)).astype(xp.float32)


class Calibrator:
    """Calibrates batches of one detector's raw frames on the chosen backend.

    Holds the look-up table (and the epix10k control bits) resident on the backend,
    built once per run."""

    def __init__(self, model: DetectorModel, constants: Constants, pixel_mask: np.ndarray,
                 backend: Backend, convention: str = "divide"):
        self.model = model
        self.backend = backend
        self.family = family_code(model)
        self.lut = backend.asarray(build_lut(constants, pixel_mask, convention))
        self._control_bits = {}

    def set_control_bits(self, step: int, control_bits: np.ndarray | None):
        """epix10k: the per-pixel control bits of a config step."""
        if control_bits is not None:
            self._control_bits[step] = self.backend.asarray(control_bits.reshape(-1), np.uint8)

    def __call__(self, raw, step: int = 0):
        """raw: (B, *shape) on the host or the device -> (B, *shape) float32 on the backend."""
        xp = self.backend.xp
        raw = xp.asarray(raw)
        flat = raw.reshape(raw.shape[0], -1)
        cb = self._control_bits.get(step)
        if self.family == FAMILY_EPIX10K and cb is None:
            raise ValueError(f"{self.model.type}: no control bits for config step {step}")
        if self.backend.is_gpu:
            from ..cuda import calibrate_gpu
            out = calibrate_gpu(flat, cb, self.lut, self.family)
        else:
            out = calibrate_reference(flat, cb, self.lut, self.model, xp)
        return out.reshape(raw.shape)
