"""Simulated raw runs with known ground truth (seeded, deterministic).

``simulate_run`` writes a raw run in the format of :mod:`gpusmd.io.raw` for one
detector, plus the ground truth under ``/truth``. The detector itself (pedestals per gain
range, noise, gains, defective pixels) depends only on (detector type, seed, shape for
cameras): a dark run and a data run simulated with the same seed see the same detector.
The events use another random stream (seeded by seed, dark/data and run number).

The detector
------------
- Pedestals per gain range: a level per range, a level per bank (rows/2 x cols/nbanks:
  epix10k 176x48, Jungfrau 256x64, epix100 352x96; a whole 2x1 for CsPad, the whole frame
  for cameras) and a per-pixel spread. epix10k AHL_L and AML_L, never seen in a dark run,
  have FL's pedestal, noise and gain (dark processing copies FL into them too).
- Noise rms per pixel per gain range (a few ADU; see ``FAMILY`` below), x10 for noisy
  pixels.
- Defects, disjoint, each a fraction ``defect_fraction`` (1e-4) of the pixels (at least
  one each): hot pixels (pedestal raised by 2000-2500 ADU in every gain range), dead
  pixels (raw always 0, gain bits included; truth pedestal and rms 0), noisy pixels.
- Gains (ADU/keV): the model's defaults for epix10k and Jungfrau (x (1 + gain_spread x
  N(0,1)) per pixel; gain_spread defaults to 0 so the nominal constants are exact). The
  single-gain detectors have constants whose default gain is 1 (calibrated values in
  ADU), but the simulator needs a physical conversion: epix100 16 ADU/keV, CsPad 3.7,
  cameras 2. The truth's ``gain`` holds what was used.
- CsPad unbonded pixels (p, p), (p, p+194) read pedestal + noise + common mode but no
  photon signal (the truth deposits still list the energy deposited there).

An event
--------
raw = clip(rint(pedestal[g] + E x gain[g] + rms[g] x N(0,1) + cm), 0, adc_max) | gain bits,
where E is the deposited energy (keV) of the pixel and cm the common-mode offset of the
event: a sum of a per-bank, a per bank-row-segment and a per half-panel-column offset
(sigmas per family in ``FAMILY`` x ``common_mode_scale``; CsPad one offset per 2x1,
cameras one per frame). The
common mode is added only in the high and medium gain ranges (epix10k FH, FM, AHL_H,
AML_M, Jungfrau G0, single-gain detectors), the ranges in which it is corrected.
adc_max = 0x3fff (14-bit ADCs: epix10k, Jungfrau, epix100, CsPad) or the dtype maximum
(cameras), see :func:`gpusmd.calib.dark.adc_max`.

Gain switching in data runs: epix10k runs in AML (g = ga = trbit = 0): AML_M, switching to
AML_L (raw bit 14 set) where the noiseless AML_M value would exceed
``epix10k_switch_adc`` (12000). Jungfrau: G0 while the G0 value stays <=
``jungfrau_g0_max_adc`` (12000), else G1 while the G1 value (counting down) stays >=
``jungfrau_g1_min_adc`` (2000), else G2; raw bits 15-14 = 0, 1, 3.

X-rays (data runs): per event the beam intensity /ipm2/sum (gamma distributed, mean 1;
~0 for X-ray-off shots, every 10th event starting at index 3); photons of energy
``photon_energy_kev``: Poisson(photons_per_pixel x npix x ipm2) placed in lab coordinates
(model.coords_um()), a fraction ``ring_fraction`` on a ring around the beam (0, 0) and the
rest uniform over the detector's bounding box (photons in gaps are lost), plus
Poisson(``bragg_spots``) Bragg spots of log-uniform(``bragg_photons``) x ipm2 photons
spread over a Gaussian of 0.3-0.8 pixel. Charge sharing: each photon's energy is split
between its pixel and the neighbours towards its sub-pixel position by a Gaussian charge
cloud of ``charge_sigma_um``, shares below ``min_share`` given back to the others, so
droplets of 1-4 pixels form.

Dark runs: no photons, /lightStatus/xray = 0. epix10k: ``n_events`` frames in each of
5 configuration steps FH, FM, FL, AHL (-> AHL_H), AML (-> AML_M); Jungfrau ``n_events``
frames in each of G0, forced G1, forced G2; single-gain detectors ``n_events`` frames.

The truth (``/truth``; attrs photon_energy_kev, adu_per_kev (nominal, per gain range),
seed, detector, dark, run, parameters):

    /truth/<det>/pedestal, rms, gain    (ngain, *shape) float32  mean dark value, noise
                                        (without common mode), ADU/keV actually used
    /truth/<det>/hot, dead, noisy       (*shape) uint8
    /truth/<det>/nphotons               (N,) int64   photons that hit a pixel
    /truth/<det>/deposit_event          (M,) int32   event index (0..N-1)
    /truth/<det>/deposit_pixel          (M,) int64   flat pixel index in the raw shape
    /truth/<det>/deposit_keV            (M,) float32 energy deposited in the pixel
    /truth/<det>/common_mode_bank       (N, nseg, nhalf, nbank) float32  ADU
    /truth/<det>/common_mode_row        (N, nseg, rows, nbank) float32  per bank row segment
    /truth/<det>/common_mode_col        (N, nseg, nhalf, cols) float32  per half-panel column
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .detectors import DetectorModel, get_detector
from .errors import ConfigError
from .io import output
from .io.raw import FORMAT, FORMAT_VERSION

EPIX10K_DARK_STEPS = (  # (name, pixel_config g|ga bits, trbit, gain range index)
    ("FH", 12, 1, 0), ("FM", 12, 0, 1), ("FL", 8, 0, 2), ("AHL", 0, 1, 3), ("AML", 0, 0, 4))

# Per family: bank (rows, cols) (None: whole segment), pedestal level per measured gain
# range, bank-level and per-pixel pedestal sigma per range, noise rms per range, common
# mode sigmas (bank, row segment, column), simulated ADU/keV for single-gain detectors.
# epix10k measured ranges: FH, FM, FL, AHL_H, AML_M (AHL_L and AML_L copy FL).
FAMILY = {
    "epix10k": dict(bank=(176, 48), ped=(2700, 2500, 2300, 2600, 2400),
                    ped_bank=(80,) * 5, ped_pix=(30,) * 5, rms=(3.5, 2.0, 1.5, 3.5, 2.0),
                    cm=(4.0, 2.0, 2.0), high=(1, 1, 0, 1, 1, 0, 0)),
    "jungfrau": dict(bank=(256, 64), ped=(1500, 12000, 13000), ped_bank=(80, 100, 100),
                     ped_pix=(30, 50, 50), rms=(4.0, 2.0, 1.5), cm=(4.0, 2.0, 2.0),
                     high=(1, 0, 0)),
    "epix100": dict(bank=(352, 96), ped=(1000,), ped_bank=(80,), ped_pix=(30,), rms=(3.5,),
                    cm=(5.0, 2.0, 2.0), high=(1,), adu_per_kev=16.0),
    "cspad": dict(bank=None, ped=(1200,), ped_bank=(80,), ped_pix=(30,), rms=(3.5,),
                  cm=(5.0, 0.0, 0.0), high=(1,), adu_per_kev=3.7),
    "camera": dict(bank=None, ped=(100,), ped_bank=(0,), ped_pix=(5,), rms=(2.0,),
                   cm=(1.0, 0.0, 0.0), high=(1,), adu_per_kev=2.0),
}

DEFAULTS = {
    # detector
    "defect_fraction": 1e-4,      # fraction of hot, of dead and of noisy pixels
    "hot_adu": (2000.0, 2500.0),  # pedestal excess of hot pixels
    "noisy_factor": 10.0,
    "gain_spread": 0.0,           # relative per-pixel gain spread
    # events
    "common_mode_scale": 1.0,     # x the common-mode sigmas of FAMILY (0: none)
    "photons_per_pixel": 0.005,   # mean photons per pixel per event at ipm2 = 1
    "ring_fraction": 0.5,
    "ring_radius": 0.4,           # fraction of the detector's half extent
    "ring_width": 0.02,           # sigma, fraction of the half extent
    "bragg_spots": 4.0,           # mean Bragg spots per X-ray event
    "bragg_photons": (200.0, 5000.0),
    "bragg_sigma_px": (0.3, 0.8),
    "charge_sigma_um": 5.0,     # sigma of the charge cloud
    "min_share": 0.02,          # smaller shares of a photon go to the others
    "xray_off_every": 10,         # every 10th event (index 3, 13, ...) has no X-rays
    "laser_fraction": 0.5,
    "epix10k_switch_adc": 12000.0,
    "jungfrau_g0_max_adc": 12000.0,
    "jungfrau_g1_min_adc": 2000.0,
}
DETECTOR_KEYS = ("defect_fraction", "hot_adu", "noisy_factor", "gain_spread")
PERIOD_NS_NUM, PERIOD_NS_DEN = 10**9, 120       # 120 Hz
T0_NS = 1_700_000_000 * 10**9


def _params(kw: dict) -> dict:
    unknown = sorted(set(kw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"simulate: unknown parameter(s) {', '.join(unknown)}; "
                          f"known: {', '.join(DEFAULTS)}")
    return {**DEFAULTS, **kw}


def _det_key(model: DetectorModel) -> int:
    return zlib.crc32(f"{model.type}{model.shape}".encode())


def _phi(z):
    """Standard normal CDF (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7)."""
    x = np.abs(z) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    return 0.5 * (1.0 + np.sign(z) * erf)


def _bank_shape(model: DetectorModel, fam: dict) -> tuple[int, int]:
    _, rows, cols = model.seg_shape
    return fam["bank"] or (rows, cols)


@dataclass
class SimDetector:
    """The simulated detector: every per-pixel array is flat (ngain, npix) / (npix,)."""
    model: DetectorModel
    seed: int
    pedestal: np.ndarray      # (ngain, npix) float32, mean dark value (0 for dead pixels)
    rms: np.ndarray           # (ngain, npix) float32, noise without common mode
    gain: np.ndarray          # (ngain, npix) float32, ADU/keV used
    hot: np.ndarray           # (npix,) bool
    dead: np.ndarray
    noisy: np.ndarray
    no_signal: np.ndarray     # (npix,) bool: dead or (CsPad) unbonded
    adu_per_kev: tuple
    cm_sigma: tuple           # (bank, row segment, column) ADU
    high_gain: tuple          # per gain range: 1 where the common mode is added
    bank: tuple               # (rows, cols) of a bank
    adc_max: int


def make_detector(detector: str = "epix10kquad", seed: int = 0, shape=None, **kw) -> SimDetector:
    """The simulated detector of (detector type, seed); depends on nothing else but the
    detector parameters of ``kw`` (defect_fraction, hot_adu, noisy_factor, gain_spread)."""
    from .calib.dark import adc_max
    p = _params(kw)
    model = _model(detector, shape)
    fam = FAMILY[model.family]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _det_key(model), 0]))
    nseg, rows, cols = model.seg_shape
    npix = model.npix
    br, bc = _bank_shape(model, fam)
    nh, nb = rows // br, cols // bc
    nmeas = len(fam["ped"])

    # pedestals: level + bank level + pixel spread, per measured gain range
    bank_lv = rng.standard_normal((nmeas, nseg, nh, 1, nb, 1)).astype(np.float32)
    pix = rng.standard_normal((nmeas, nseg, nh, br, nb, bc), dtype=np.float32)
    lv = np.asarray(fam["ped"], np.float32).reshape(-1, 1, 1, 1, 1, 1)
    sb = np.asarray(fam["ped_bank"], np.float32).reshape(-1, 1, 1, 1, 1, 1)
    sp = np.asarray(fam["ped_pix"], np.float32).reshape(-1, 1, 1, 1, 1, 1)
    ped = (lv + sb * bank_lv + sp * pix).reshape(nmeas, npix)
    del pix
    rms = (np.asarray(fam["rms"], np.float32)[:, None]
           * np.exp(0.05 * rng.standard_normal((nmeas, npix), dtype=np.float32)))
    gspread = rng.standard_normal((nmeas, npix), dtype=np.float32)
    # defects: disjoint sets of hot, dead, noisy pixels
    ndef = max(1, int(round(p["defect_fraction"] * npix)))
    ndef = min(ndef, npix // 3)
    picks = rng.choice(npix, 3 * ndef, replace=False)
    hot_excess = rng.uniform(*p["hot_adu"], ndef).astype(np.float32)
    hot, dead, noisy = (np.zeros(npix, bool) for _ in range(3))
    hot[picks[:ndef]] = True
    dead[picks[ndef:2 * ndef]] = True
    noisy[picks[2 * ndef:]] = True

    if model.multigain:
        nominal = np.asarray(model.default_gain, np.float32)
    else:
        nominal = np.asarray([fam["adu_per_kev"]], np.float32)
    if model.family == "epix10k":          # AHL_L, AML_L copy FL
        full = [0, 1, 2, 3, 4, 2, 2]
        ped, rms, gspread = ped[full], rms[full], gspread[full]
    gain = nominal[:, None] * (1 + np.float32(p["gain_spread"]) * gspread)
    ped[:, picks[:ndef]] += hot_excess
    ped[:, dead] = 0
    rms[:, dead] = 0
    rms[:, noisy] *= np.float32(p["noisy_factor"])

    no_signal = dead.copy()
    if model.family == "cspad":
        r, c = model.unbond_pixels()
        unb = np.zeros(model.seg_shape, bool)
        unb[:, r, c] = True
        no_signal |= unb.reshape(-1)
    return SimDetector(model, int(seed), ped.astype(np.float32), rms.astype(np.float32),
                       gain.astype(np.float32), hot, dead, noisy, no_signal,
                       tuple(float(g) for g in nominal), tuple(fam["cm"]), tuple(fam["high"]),
                       (br, bc), adc_max(model))


def _model(detector, shape) -> DetectorModel:
    if detector == "camera":
        return get_detector("camera", shape)
    model = get_detector(detector)
    if shape is not None and tuple(shape) != model.shape:
        raise ConfigError(f"simulate: shape is for detector 'camera' only "
                          f"({detector} frames are {model.shape})")
    return model


class _Events:
    """Per-event content: photons, deposits, common mode and raw frames."""

    def __init__(self, sim: SimDetector, rng: np.random.Generator, p: dict, energy: float):
        self.sim, self.rng, self.p, self.energy = sim, rng, p, float(energy)
        m = sim.model
        self.model = m
        nseg, self.rows, self.cols = m.seg_shape
        x, y, _ = m.coords_um()
        self.x, self.y = x.reshape(-1).astype(np.float64), y.reshape(-1).astype(np.float64)
        pitch = m.pixel_size_um
        self.pitch = pitch
        xs, ys = x.reshape(m.seg_shape), y.reshape(m.seg_shape)
        self.origin = np.stack([xs[:, 0, 0], ys[:, 0, 0]], 1).astype(np.float64)
        # unit vectors along rows and columns of each segment
        self.u = np.stack([xs[:, 1, 0] - xs[:, 0, 0], ys[:, 1, 0] - ys[:, 0, 0]], 1) / pitch
        self.v = np.stack([xs[:, 0, 1] - xs[:, 0, 0], ys[:, 0, 1] - ys[:, 0, 0]], 1) / pitch
        half = pitch / 2
        self.box = (self.x.min() - half, self.x.max() + half, self.y.min() - half,
                    self.y.max() + half)
        self.extent = max(abs(v) for v in self.box)
        br, bc = sim.bank
        self.nh, self.nb = self.rows // br, self.cols // bc
        self.bank = (br, bc)

    # ---- photons ----------------------------------------------------------------------
    def photon_positions(self, ipm: float) -> tuple[np.ndarray, np.ndarray]:
        rng, p = self.rng, self.p
        n = rng.poisson(p["photons_per_pixel"] * self.model.npix * ipm)
        nring = rng.binomial(n, p["ring_fraction"])
        r = rng.normal(p["ring_radius"] * self.extent, p["ring_width"] * self.extent, nring)
        phi = rng.uniform(0, 2 * np.pi, nring)
        xb = rng.uniform(self.box[0], self.box[1], n - nring)
        yb = rng.uniform(self.box[2], self.box[3], n - nring)
        xs, ys = [r * np.cos(phi), xb], [r * np.sin(phi), yb]
        nspots = rng.poisson(p["bragg_spots"])
        lo, hi = p["bragg_photons"]
        for _ in range(nspots):
            i = rng.integers(self.model.npix)
            cx = self.x[i] + rng.uniform(-0.5, 0.5) * self.pitch
            cy = self.y[i] + rng.uniform(-0.5, 0.5) * self.pitch
            nph = rng.poisson(np.exp(rng.uniform(np.log(lo), np.log(hi))) * ipm)
            s = rng.uniform(*p["bragg_sigma_px"]) * self.pitch
            xs.append(cx + s * rng.standard_normal(nph))
            ys.append(cy + s * rng.standard_normal(nph))
        return np.concatenate(xs), np.concatenate(ys)

    def deposit(self, px, py) -> tuple[int, np.ndarray]:
        """(photons that hit a pixel, per-pixel deposited energy (npix,) float64)."""
        nseg = self.origin.shape[0]
        seg = np.full(px.shape, -1, np.int64)
        rf = np.zeros(px.shape)
        cf = np.zeros(px.shape)
        for s in range(nseg):
            dx, dy = px - self.origin[s, 0], py - self.origin[s, 1]
            r = (dx * self.u[s, 0] + dy * self.u[s, 1]) / self.pitch
            c = (dx * self.v[s, 0] + dy * self.v[s, 1]) / self.pitch
            inside = ((seg < 0) & (r >= -0.5) & (r < self.rows - 0.5)
                      & (c >= -0.5) & (c < self.cols - 0.5))
            seg[inside], rf[inside], cf[inside] = s, r[inside], c[inside]
        hit = seg >= 0
        seg, rf, cf = seg[hit], rf[hit], cf[hit]
        nphot = int(hit.sum())
        r0 = np.clip(np.floor(rf + 0.5), 0, self.rows - 1)
        c0 = np.clip(np.floor(cf + 0.5), 0, self.cols - 1)
        dr, dc = rf - r0, cf - c0
        sig = self.p["charge_sigma_um"] / self.pitch
        fr = _phi((np.abs(dr) - 0.5) / sig)
        fc = _phi((np.abs(dc) - 0.5) / sig)
        rn = np.clip(r0 + np.where(dr >= 0, 1, -1), 0, self.rows - 1)
        cn = np.clip(c0 + np.where(dc >= 0, 1, -1), 0, self.cols - 1)
        w = np.stack([(1 - fr) * (1 - fc), fr * (1 - fc), (1 - fr) * fc, fr * fc])
        w[w < self.p["min_share"]] = 0
        w /= w.sum(0)
        base = seg * (self.rows * self.cols)
        pix = np.stack([base + r0 * self.cols + c0, base + rn * self.cols + c0,
                        base + r0 * self.cols + cn, base + rn * self.cols + cn]).astype(np.int64)
        e = np.bincount(pix.reshape(-1), weights=(w * self.energy).reshape(-1),
                        minlength=self.model.npix)
        return nphot, e

    # ---- common mode ------------------------------------------------------------------
    def common_mode(self):
        nseg = self.model.seg_shape[0]
        br, bc = self.bank
        sb, sr, sc = (s * self.p["common_mode_scale"] for s in self.sim.cm_sigma)
        bank = (sb * self.rng.standard_normal((nseg, self.nh, self.nb))).astype(np.float32)
        row = (sr * self.rng.standard_normal((nseg, self.rows, self.nb))).astype(np.float32)
        col = (sc * self.rng.standard_normal((nseg, self.nh, self.cols))).astype(np.float32)
        cm = np.broadcast_to(bank[:, :, None, :, None], (nseg, self.nh, br, self.nb, bc)).copy()
        cm += row.reshape(nseg, self.nh, br, self.nb, 1)
        cm += col.reshape(nseg, self.nh, 1, self.nb, bc)
        return cm.reshape(-1), bank, row, col

    # ---- raw --------------------------------------------------------------------------
    def raw(self, g, energy_kev, cm):
        """One raw frame (flat). g: fixed gain range (dark) or None (auto ranging)."""
        sim, m = self.sim, self.model
        noise = self.rng.standard_normal(m.npix, dtype=np.float32)
        sig = None if energy_kev is None else np.where(sim.no_signal, 0, energy_kev).astype(np.float32)
        bits = None
        if g is not None:
            val = sim.pedestal[g] + sim.rms[g] * noise
            if sig is not None:
                val += sig * sim.gain[g]
            if sim.high_gain[g]:
                val += cm
            if m.family == "jungfrau":
                bits = np.uint16((0, 1, 3)[g] << 14) if g else None
        elif m.family == "epix10k":
            gm, gl = 4, 6
            low = sim.pedestal[gm] + sig * sim.gain[gm] > self.p["epix10k_switch_adc"]
            val = np.where(low, sim.pedestal[gl] + sig * sim.gain[gl] + sim.rms[gl] * noise,
                           sim.pedestal[gm] + sig * sim.gain[gm] + sim.rms[gm] * noise + cm)
            bits = np.where(low, np.uint16(0x4000), np.uint16(0))
        elif m.family == "jungfrau":
            a0 = sim.pedestal[0] + sig * sim.gain[0]
            a1 = sim.pedestal[1] + sig * sim.gain[1]
            in0 = a0 <= self.p["jungfrau_g0_max_adc"]
            in1 = ~in0 & (a1 >= self.p["jungfrau_g1_min_adc"])
            in2 = ~in0 & ~in1
            a2 = sim.pedestal[2] + sig * sim.gain[2]
            val = np.where(in0, a0 + sim.rms[0] * noise + cm,
                           np.where(in1, a1 + sim.rms[1] * noise, a2 + sim.rms[2] * noise))
            bits = (in1.astype(np.uint16) << 14) | (in2.astype(np.uint16) * np.uint16(0xC000))
        else:
            val = sim.pedestal[0] + sig * sim.gain[0] + sim.rms[0] * noise + cm
        out = np.clip(np.rint(val), 0, sim.adc_max).astype(m.dtype)
        if bits is not None:
            out |= bits
        out[sim.dead] = 0
        return out


def simulate_run(path, detector: str = "epix10kquad", n_events: int = 20, dark: bool = False,
                 seed: int = 0, shape=None, run=None, experiment: str = "sim",
                 photon_energy_kev: float = 9.5, **kw) -> Path:
    """Write a simulated raw run (and its truth) to ``path``; see the module docstring.

    n_events: events of a data run; for a dark run frames per gain range / config step
    (epix10k 5 x n_events, Jungfrau 3 x n_events frames in all). run: the run number
    (default 1 for a dark run, 2 for a data run). ``kw``: the parameters of ``DEFAULTS``;
    the detector ones (``DETECTOR_KEYS``) must match between a dark and a data run."""
    p = _params(kw)
    n_events = int(n_events)
    if n_events < 1:
        raise ConfigError(f"simulate: n_events must be >= 1, got {n_events}")
    sim = make_detector(detector, seed, shape, **{k: p[k] for k in DETECTOR_KEYS})
    m = sim.model
    run = (1 if dark else 2) if run is None else int(run)
    rng = np.random.default_rng(np.random.SeedSequence(
        [int(seed), _det_key(m), 1 if dark else 2, run]))
    ev = _Events(sim, rng, p, photon_energy_kev)

    # configuration steps: (gain range index or None for auto ranging, pc, trbit)
    if dark and m.family == "epix10k":
        steps = [(g, pc, tr) for _, pc, tr, g in EPIX10K_DARK_STEPS]
    elif dark and m.family == "jungfrau":
        steps = [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    elif dark:
        steps = [(0, 0, 0)]
    else:
        steps = [(None, 0, 0)]
    step = np.repeat(np.arange(len(steps), dtype=np.int32), n_events)
    n = len(step)
    idx = np.arange(n)

    if dark:
        xray = np.zeros(n, np.int8)
        laser = np.zeros(n, np.int8)
    else:
        every = int(p["xray_off_every"])
        xray = np.ones(n, np.int8) if every <= 0 else (idx % every != 3 % every).astype(np.int8)
        laser = (rng.random(n) < p["laser_fraction"]).astype(np.int8)
    ipm = np.where(xray == 1, rng.gamma(8.0, 1 / 8.0, n),
                   np.abs(rng.normal(0, 0.002, n))).astype(np.float32)

    path = Path(path)
    name = m.type
    nphot = np.zeros(n, np.int64)
    dep_e, dep_p, dep_k = [], [], []
    nseg = m.seg_shape[0]
    cm_bank = np.zeros((n, nseg, ev.nh, ev.nb), np.float32)
    cm_row = np.zeros((n, nseg, ev.rows, ev.nb), np.float32)
    cm_col = np.zeros((n, nseg, ev.nh, ev.cols), np.float32)
    # room for the raw frames at least: else one WriteError (a failed write: one too), no file
    with output.written_h5(path, n * m.raw_nbytes) as f:
        f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                        "experiment": experiment, "run": run})
        f.create_dataset("event_id", data=1000 * run + idx.astype(np.int64))
        f.create_dataset("timestamp", data=T0_NS + run * 3600 * 10**9
                         + idx.astype(np.int64) * PERIOD_NS_NUM // PERIOD_NS_DEN)
        f.create_dataset("ipm2/sum", data=ipm)
        f.create_dataset("lightStatus/xray", data=xray)
        f.create_dataset("lightStatus/laser", data=laser)
        g = f.create_group(name)
        ds = g.create_dataset("raw", shape=(n, *m.shape), dtype=m.dtype, chunks=(1, *m.shape))
        ds.attrs["type"] = m.type
        if m.family == "camera":
            ds.attrs["shape"] = np.asarray(m.shape)
        if m.family == "epix10k":
            pc = np.stack([np.full(m.shape, s[1], np.uint8) for s in steps])
            tr = np.stack([np.full((nseg, 4), s[2], np.uint8) for s in steps])
            g.create_dataset("config/pixel_config", data=pc, compression="gzip",
                             compression_opts=1)
            g.create_dataset("config/trbit", data=tr)
        if m.family in ("epix10k", "jungfrau"):
            g.create_dataset("config/step", data=step)

        for i in range(n):
            gfix = steps[step[i]][0]
            energy = None
            if xray[i]:
                px, py = ev.photon_positions(float(ipm[i]))
                nphot[i], energy = ev.deposit(px, py)
                nz = np.flatnonzero(energy)
                dep_e.append(np.full(nz.size, i, np.int32))
                dep_p.append(nz.astype(np.int64))
                dep_k.append(energy[nz].astype(np.float32))
            cm, cm_bank[i], cm_row[i], cm_col[i] = ev.common_mode()
            if energy is None and gfix is None:
                energy = np.zeros(m.npix)
            ds[i] = ev.raw(gfix, energy, cm).reshape(m.shape)

        t = f.create_group("truth")
        t.attrs.update({"photon_energy_kev": float(photon_energy_kev), "seed": int(seed),
                        "adu_per_kev": np.asarray(sim.adu_per_kev, np.float64),
                        "detector": m.type, "dark": bool(dark), "run": run,
                        "common_mode_sigma": np.asarray(sim.cm_sigma, np.float64)
                        * p["common_mode_scale"],
                        "high_gain_ranges": np.asarray(sim.high_gain, np.int8),
                        "adc_max": int(sim.adc_max)})
        for k, v in p.items():
            t.attrs[f"param_{k}"] = np.asarray(v, np.float64)
        td = t.create_group(name)
        z = {"compression": "gzip", "compression_opts": 1}
        full = (m.ngain, *m.shape)
        td.create_dataset("pedestal", data=sim.pedestal.reshape(full), **z)
        td.create_dataset("rms", data=sim.rms.reshape(full), **z)
        td.create_dataset("gain", data=sim.gain.reshape(full), **z)
        for key in ("hot", "dead", "noisy"):
            td.create_dataset(key, data=getattr(sim, key).reshape(m.shape).astype(np.uint8), **z)
        td.create_dataset("nphotons", data=nphot)
        cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
        td.create_dataset("deposit_event", data=cat(dep_e, np.int32), **z)
        td.create_dataset("deposit_pixel", data=cat(dep_p, np.int64), **z)
        td.create_dataset("deposit_keV", data=cat(dep_k, np.float32), **z)
        td.create_dataset("common_mode_bank", data=cm_bank, **z)
        td.create_dataset("common_mode_row", data=cm_row, **z)
        td.create_dataset("common_mode_col", data=cm_col, **z)
    return path
