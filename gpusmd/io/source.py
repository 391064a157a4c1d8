"""One interface over every source of raw events (DESIGN §2).

A run, whatever it is read from (gpusmd's raw HDF5 file, an XTC2 file or a psana2
DataSource), offers:

    source, name            what it was opened from (for messages), and a short name
    run, experiment         the run number and the experiment
    detectors               {name: DetectorModel}
    scalar_dtypes           {"<group>/<name>": numpy dtype} of the per-event scalars
    n_events                the number of events, or None where it is only known at the end
    control_bits(det, step) epix10k per-pixel control bits of a configuration step
    step_control_bits(det)  {step: control bits} of every step (epix10k; {} otherwise)
    batches(batch_size, max_events=None, detectors=None, one_step=False)
                            the events in order, as EventBatch objects

so that replay, dark, publish and the services never ask which one they have.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PSANA_SUFFIXES = (".xtc2", ".smd.xtc2")


@dataclass
class EventBatch:
    """Consecutive events of a run: ``start`` is the index of the first in the run."""
    start: int
    event_id: np.ndarray                     # (B,) int64
    timestamp: np.ndarray                    # (B,) int64 ns since the Unix epoch
    scalars: dict[str, np.ndarray]           # (B,) each
    frames: dict[str, np.ndarray]            # (B, *shape) raw, each detector asked for
    steps: dict[str, np.ndarray]             # (B,) configuration step of each event
    errors: list = field(default_factory=list)   # (event_id, stage, reason) skipped before it

    def __len__(self) -> int:
        return len(self.event_id)

    @property
    def stop(self) -> int:
        return self.start + len(self)


def is_psana_source(source) -> bool:
    """A psana2 DataSource string (``exp=...:run=...``, ``shmem=...``), an XTC2 file or a
    directory of them; everything else is taken for a raw HDF5 file."""
    s = str(source)
    if "=" in s and not Path(s).exists():
        return True
    p = Path(s)
    if p.is_dir():
        return True
    return s.endswith(PSANA_SUFFIXES)


def open_run(source, detectors=None):
    """Open a run for reading (see the module docstring). ``detectors``: the names a
    psana source must have and reads (all it can when None); a raw file has all its
    detectors at hand, and a missing one is refused by whoever needs it."""
    if is_psana_source(source):
        from .psana_run import PsanaRun
        return PsanaRun(source, detectors)
    from .raw import RawRun
    return RawRun(source)


def step_split(steps: dict[str, np.ndarray], start: int, stop: int) -> int:
    """The end of the stretch from ``start`` (before ``stop``) where no detector changes
    its configuration step."""
    end = stop
    for s in steps.values():
        change = np.flatnonzero(s[start + 1:stop] != s[start])
        if change.size:
            end = min(end, start + 1 + int(change[0]))
    return end
