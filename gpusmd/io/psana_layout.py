"""How gpusmd's detectors and runs look in LCLS-II XTC2 data, as psana2 reads them.

One place for the facts both directions need (the reader of psana runs and the writer
of XTC2 runs): psana's detector types and data versions, the epix10ka ASIC order of its
configuration, and the clock. Nothing here imports psana.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..detectors import EPIX10K_ASIC_COLS, EPIX10K_ASIC_ROWS

# psana2 timestamps: (seconds since 1990-01-01 UTC) << 32 | nanoseconds.
LCLS_EPOCH_UNIX_S = 631152000
NS = 10**9


def psana_time_to_ns(ts: int) -> int:
    """A psana2 timestamp as gpusmd's int64 ns since the Unix epoch."""
    ts = int(ts)
    return ((ts >> 32) + LCLS_EPOCH_UNIX_S) * NS + (ts & 0xFFFFFFFF)


def ns_to_psana_time(ns: int) -> int:
    sec, nsec = divmod(int(ns), NS)
    sec -= LCLS_EPOCH_UNIX_S
    if not 0 <= sec < 2**32:
        raise ValueError(f"timestamp {ns} ns is outside psana's clock (1990 to 2126)")
    return (sec << 32) | nsec


@dataclass(frozen=True)
class PsanaType:
    """One of gpusmd's detector families as LCLS-II DAQs write it."""
    family: str                     # gpusmd family
    dettype: str                    # psana detector type
    raw_version: tuple[int, int, int]
    segment_shape: tuple[int, ...]  # raw shape of one segment in the XTC2 data
    types_by_nseg: dict             # number of segments -> gpusmd detector type
    config_version: tuple[int, int, int] | None = None


# The versions are those of real LCLS-II files, so psana dispatches to its own
# detector classes (epix10ka_raw_2_0_1, jungfrau_raw_0_2_0, epix100_raw_2_0_1).
PSANA_TYPES = {
    "epix10k": PsanaType("epix10k", "epix10ka", (2, 0, 1), (352, 384),
                         {4: "epix10kquad", 16: "epix10k2M"}, config_version=(2, 0, 0)),
    "jungfrau": PsanaType("jungfrau", "jungfrau", (0, 2, 0), (1, 512, 1024),
                          {1: "jungfrau05M", 2: "jungfrau1M", 8: "jungfrau4M"}),
    "epix100": PsanaType("epix100", "epix100", (2, 0, 1), (704, 768), {1: "epix100"}),
}
# psana's older name of the epix10ka type (ueddaq and early quads)
DETTYPE_ALIASES = {"epix": "epix10ka"}
PSANA_TYPE_BY_DETTYPE = {t.dettype: t for t in PSANA_TYPES.values()}

# A gpusmd-written run keeps its event ids in this detector's field; other runs number
# their events 0, 1, 2, ... in the order psana gives them.
EVENT_ID_DETECTOR, EVENT_ID_FIELD = "gpusmd", "event_id"
# psana's class for generic per-event values (its type for XTC1 dumps): every field is
# a method of det.raw.
SCALAR_DETTYPE, SCALAR_ALG, SCALAR_VERSION = "generic", "container_xtc1dump", (0, 1, 0)


# ---- epix10ka configuration, psana's ASIC order ----------------------------------------
# psana builds a panel's pixel configuration from its 4 ASIC arrays pca as
#   vstack(hstack(rot180(pca[2]), rot180(pca[1])), hstack(pca[3], pca[0]))
# and its trbit are per ASIC in the same numbering: (bottom right, top right, top left,
# bottom left). gpusmd numbers the ASICs of a panel a = 2 * (row // 176) + col // 192:
# (top left, top right, bottom left, bottom right).
PSANA_ASIC_OF_GPUSMD = (2, 1, 3, 0)     # gpusmd ASIC a is psana's ASIC PSANA_ASIC_OF_GPUSMD[a]
_R, _C = EPIX10K_ASIC_ROWS, EPIX10K_ASIC_COLS
_QUADRANTS = ((slice(0, _R), slice(0, _C), True), (slice(0, _R), slice(_C, 2 * _C), True),
              (slice(_R, 2 * _R), slice(0, _C), False), (slice(_R, 2 * _R), slice(_C, 2 * _C), False))


def panel_from_psana_asics(pca: np.ndarray) -> np.ndarray:
    """One panel's (352, 384) pixel configuration from psana's (4, >=176, 192) ASIC
    arrays (the DAQ may append rows beyond 176: they are not pixels)."""
    pca = np.asarray(pca)
    out = np.empty((2 * _R, 2 * _C), pca.dtype)
    for a, (rows, cols, rotated) in enumerate(_QUADRANTS):
        block = pca[PSANA_ASIC_OF_GPUSMD[a], :_R, :_C]
        out[rows, cols] = block[::-1, ::-1] if rotated else block
    return out


def psana_asics_from_panel(panel: np.ndarray) -> np.ndarray:
    """The inverse of :func:`panel_from_psana_asics`: (4, 176, 192) in psana's order."""
    panel = np.asarray(panel)
    out = np.empty((4, _R, _C), panel.dtype)
    for a, (rows, cols, rotated) in enumerate(_QUADRANTS):
        block = panel[rows, cols]
        out[PSANA_ASIC_OF_GPUSMD[a]] = block[::-1, ::-1] if rotated else block
    return out


def trbit_from_psana(trbit) -> np.ndarray:
    """Per-ASIC trbit of a panel in gpusmd's order from psana's."""
    trbit = np.asarray(trbit).reshape(4)
    return trbit[list(PSANA_ASIC_OF_GPUSMD)].copy()


def trbit_to_psana(trbit) -> np.ndarray:
    trbit = np.asarray(trbit).reshape(4)
    out = np.empty_like(trbit)
    out[list(PSANA_ASIC_OF_GPUSMD)] = trbit
    return out
