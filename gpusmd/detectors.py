"""Detector models: each detector's facts in one place (DESIGN §4, §5 masks, §7 grid).

A model knows its raw shape and dtype, how gain ranges are decoded from raw data and
configuration, its pixel size, default pixel coordinates and the geometric masks. It
knows nothing of events, files or backends.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError

ADC_MASK = 0x3FFF          # epix10k / Jungfrau: ADC value in the low 14 bits

# epix10k gain ranges, in the order of the constants' first axis.
EPIX10K_GAINS = ("FH", "FM", "FL", "AHL_H", "AML_M", "AHL_L", "AML_L")
EPIX10K_DEFAULT_GAIN = (16.4, 5.466, 0.164, 16.4, 5.466, 0.164, 0.164)   # ADU/keV
EPIX10K_CB_G, EPIX10K_CB_GA, EPIX10K_CB_TRBIT = 4, 8, 16      # raw bit 14 adds 32
EPIX10K_ASIC_ROWS, EPIX10K_ASIC_COLS = 176, 192

JUNGFRAU_GAINS = ("G0", "G1", "G2")
JUNGFRAU_DEFAULT_GAIN = (41.0, -1.39, -0.112)   # ADU/keV; G1/G2 count down from a high pedestal
# raw >> 14 -> gain index: 0 -> G0, 1 -> G1, 3 -> G2, 2 -> invalid
JUNGFRAU_GAINBITS_TO_INDEX = np.array([0, 1, -1, 2], dtype=np.int8)


@dataclass(frozen=True)
class DetectorModel:
    type: str                       # e.g. "epix10k2M"
    family: str                     # "epix10k" | "jungfrau" | "epix100" | "cspad" | "camera"
    shape: tuple[int, ...]          # raw shape of one event
    dtype: str                      # raw dtype
    pixel_size_um: float
    gain_names: tuple[str, ...]
    default_gain: tuple[float, ...]  # pixel gain per range (ADU per unit)
    units: str                      # what calibrated values are in, gain applied
    grid: tuple[int, int] = (1, 1)  # segments laid out as grid rows x cols (default geometry)
    central_rows: tuple[int, ...] = ()
    central_cols: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)

    # ---- shape helpers -------------------------------------------------------------
    @property
    def ngain(self) -> int:
        return len(self.gain_names)

    @property
    def multigain(self) -> bool:
        return self.family in ("epix10k", "jungfrau")

    @property
    def segmented(self) -> bool:
        """True when the raw shape has a leading segment (panel / module / 2x1) axis."""
        return len(self.shape) == 3

    @property
    def seg_shape(self) -> tuple[int, int, int]:
        """The raw shape as (nseg, rows, cols), with nseg = 1 for unsegmented cameras."""
        return self.shape if self.segmented else (1, *self.shape)

    @property
    def npix(self) -> int:
        return int(np.prod(self.shape))

    @property
    def raw_nbytes(self) -> int:
        return self.npix * np.dtype(self.dtype).itemsize

    # ---- gain decoding (NumPy reference) --------------------------------------------
    def adc(self, raw: np.ndarray, xp=np) -> np.ndarray:
        """ADC value of raw data as float32 (14 bits for multi-gain detectors)."""
        if self.multigain:
            return (raw & ADC_MASK).astype(xp.float32)
        return raw.astype(xp.float32)

    def gain_index(self, raw: np.ndarray, control_bits: np.ndarray | None = None, xp=np):
        """Gain range index per pixel (int8; -1 = invalid), broadcast over events.

        ``control_bits`` (epix10k only): per-pixel g / ga / trbit bits, see
        :func:`epix10k_control_bits`."""
        if self.family == "jungfrau":
            lut = xp.asarray(JUNGFRAU_GAINBITS_TO_INDEX)
            return lut[(raw >> 14) & 3]
        if self.family == "epix10k":
            if control_bits is None:
                raise ValueError(f"{self.type}: gain decoding needs the pixel control bits")
            cb = xp.asarray(control_bits, dtype=xp.uint8) | (((raw & 0x4000) >> 9).astype(xp.uint8))
            conds = [(cb & 28) == 28, (cb & 28) == 12, (cb & 12) == 8, (cb & 60) == 16,
                     (cb & 60) == 0, (cb & 60) == 48, (cb & 60) == 32]
            out = xp.full(cb.shape, -1, dtype=xp.int8)
            for g in reversed(range(7)):     # reversed so that the first match wins
                out = xp.where(conds[g], xp.int8(g), out)
            return out
        return xp.zeros(raw.shape, dtype=xp.int8)

    # ---- geometry ----------------------------------------------------------------------
    def coords_um(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Default pixel centres x, y, z (um) for every raw pixel: segments on a regular
        grid with a gap of 10 pixels, centred on the beam axis (x along rows, y along
        columns, z = 0). Real geometry files replace this."""
        nseg, rows, cols = self.seg_shape
        gap = 10
        grow, gcol = self.grid
        seg = np.arange(nseg)
        r0 = (seg // gcol) * (rows + gap)
        c0 = (seg % gcol) * (cols + gap)
        rr = r0[:, None, None] + np.arange(rows)[None, :, None] + np.zeros((1, 1, cols))
        cc = c0[:, None, None] + np.arange(cols)[None, None, :] + np.zeros((1, rows, 1))
        height = grow * (rows + gap) - gap
        width = gcol * (cols + gap) - gap
        p = self.pixel_size_um
        x = ((rr - (height - 1) / 2) * p).astype(np.float32).reshape(self.shape)
        y = ((cc - (width - 1) / 2) * p).astype(np.float32).reshape(self.shape)
        return x, y, np.zeros(self.shape, np.float32)

    # ---- geometric masks (1 = good) -------------------------------------------------
    def edges_mask(self) -> np.ndarray:
        m = np.ones(self.seg_shape, np.uint8)
        m[:, [0, -1], :] = 0
        m[:, :, [0, -1]] = 0
        return m.reshape(self.shape)

    def central_mask(self) -> np.ndarray:
        m = np.ones(self.seg_shape, np.uint8)
        m[:, list(self.central_rows), :] = 0
        m[:, :, list(self.central_cols)] = 0
        return m.reshape(self.shape)

    def unbond_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of the unbonded pixels of one CsPad 2x1: (p, p), (p, p + 194)."""
        if self.family != "cspad":
            return np.zeros(0, int), np.zeros(0, int)
        p = np.arange(0, 181, 10)
        return np.concatenate([p, p]), np.concatenate([p, p + 194])

    def unbond_mask(self, neighbours: int = 0) -> np.ndarray:
        """0 on unbonded pixels and, with neighbours = 4 or 8, on their neighbours."""
        m = np.ones(self.seg_shape, np.uint8)
        rows, cols = self.unbond_pixels()
        offsets = [(0, 0)]
        if neighbours >= 4:
            offsets += [(-1, 0), (1, 0), (0, -1), (0, 1)]
        if neighbours == 8:
            offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
        _, nr, nc = self.seg_shape
        for dr, dc in offsets:
            r, c = rows + dr, cols + dc
            ok = (r >= 0) & (r < nr) & (c >= 0) & (c < nc)
            m[:, r[ok], c[ok]] = 0
        return m.reshape(self.shape)

    def geometry_mask(self, edges=True, central=True, unbond=True, unbondnbrs=True,
                      unbondnbrs8=False) -> np.ndarray:
        """AND of the geometric masks psana offers (DESIGN §5)."""
        m = np.ones(self.shape, np.uint8)
        if edges:
            m &= self.edges_mask()
        if central:
            m &= self.central_mask()
        if unbond:
            m &= self.unbond_mask(0)
        if unbondnbrs:
            m &= self.unbond_mask(4)
        if unbondnbrs8:
            m &= self.unbond_mask(8)
        return m


def epix10k_control_bits(pixel_config: np.ndarray, trbit: np.ndarray) -> np.ndarray:
    """Per-pixel epix10k control bits: the pixel configuration's g (4) and ga (8) bits
    OR'ed with the trbit (16) of the pixel's ASIC.

    pixel_config: (nseg, 352, 384) uint8; trbit: (nseg, 4) per ASIC, where ASIC
    a = 2 * (row // 176) + (col // 192)."""
    pc = np.asarray(pixel_config, np.uint8) & (EPIX10K_CB_G | EPIX10K_CB_GA)
    nseg, rows, cols = pc.shape
    asic = (2 * (np.arange(rows)[:, None] // EPIX10K_ASIC_ROWS)
            + np.arange(cols)[None, :] // EPIX10K_ASIC_COLS)
    tr = (np.asarray(trbit).reshape(nseg, 4)[:, asic] != 0).astype(np.uint8) * EPIX10K_CB_TRBIT
    return pc | tr


def _epix10k(type_, nseg, grid):
    return DetectorModel(type_, "epix10k", (nseg, 352, 384), "uint16", 100.0, EPIX10K_GAINS,
                         EPIX10K_DEFAULT_GAIN, "keV", grid,
                         central_rows=(175, 176), central_cols=(191, 192))


def _jungfrau(type_, nseg, grid):
    return DetectorModel(type_, "jungfrau", (nseg, 512, 1024), "uint16", 75.0, JUNGFRAU_GAINS,
                         JUNGFRAU_DEFAULT_GAIN, "keV", grid,
                         central_rows=(255, 256),
                         central_cols=(255, 256, 511, 512, 767, 768))


DETECTORS: dict[str, DetectorModel] = {
    "epix10k2M": _epix10k("epix10k2M", 16, (4, 4)),
    "epix10kquad": _epix10k("epix10kquad", 4, (2, 2)),
    "jungfrau05M": _jungfrau("jungfrau05M", 1, (1, 1)),
    "jungfrau1M": _jungfrau("jungfrau1M", 2, (2, 1)),
    "jungfrau4M": _jungfrau("jungfrau4M", 8, (4, 2)),
    "epix100": DetectorModel("epix100", "epix100", (704, 768), "uint16", 50.0, ("single",),
                             (1.0,), "ADU", central_rows=(351, 352), central_cols=(383, 384)),
    "cspad": DetectorModel("cspad", "cspad", (32, 185, 388), "int16", 109.92, ("single",),
                           (1.0,), "ADU", (8, 4), central_cols=(193, 194)),
}
CAMERA_DEFAULT_SHAPE = (512, 512)


def get_detector(type_: str, shape=None) -> DetectorModel:
    """The model of a detector type; ``camera`` takes any 2-D shape (rows, cols)."""
    if type_ == "camera":
        shape = tuple(int(s) for s in (shape or CAMERA_DEFAULT_SHAPE))
        if len(shape) != 2 or min(shape) < 3:
            raise ConfigError(f"camera shape must be (rows, cols) with at least 3 each, got {shape}")
        return DetectorModel("camera", "camera", shape, "uint16", 50.0, ("single",), (1.0,), "ADU")
    try:
        return DETECTORS[type_]
    except KeyError:
        raise ConfigError(f"unknown detector type {type_!r}; known: "
                          f"{', '.join([*DETECTORS, 'camera'])}") from None
