"""What the processing of a run needs to know before its first event: the run number,
the detectors (type and configuration) and the per-event scalars. The in-process replay
takes it from the run (any source of gpusmd.io.source); the services send it as the
``begin_run`` message."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .detectors import DetectorModel, get_detector
from .errors import GpusmdError


@dataclass
class RunInfo:
    run: int
    detectors: dict[str, DetectorModel]
    scalars: dict[str, str] = field(default_factory=dict)         # name -> dtype
    control_bits: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    experiment: str = ""
    source: str = ""
    n_events: int | None = None

    @classmethod
    def from_run(cls, run, scalars=None, detectors=None, experiment: str = "") -> "RunInfo":
        """From an open run; ``scalars``: the names to pass on (all when None);
        ``detectors``: the names whose control bits are needed (all when None);
        ``experiment``: the config's, which names the run's file (else the run's own)."""
        names = run.scalar_dtypes if scalars is None else scalars
        dets = run.detectors if detectors is None else detectors
        bits = {det: run.step_control_bits(det) for det in dets}
        return cls(run.run, dict(run.detectors), {n: run.scalar_dtypes[n].str for n in names},
                   {det: b for det, b in bits.items() if b}, experiment or run.experiment,
                   run.source,
                   run.n_events)

    def to_message(self) -> tuple[dict, dict[str, np.ndarray]]:
        header = {"kind": "begin_run", "run": self.run, "experiment": self.experiment,
                  "source": self.source, "n_events": self.n_events, "scalars": self.scalars,
                  "detectors": {n: {"type": m.type, "dtype": m.dtype, "shape": list(m.shape)}
                                for n, m in self.detectors.items()}}
        arrays = {f"{det}/control_bits/{step}": cb
                  for det, steps in self.control_bits.items() for step, cb in steps.items()}
        return header, arrays

    @classmethod
    def from_message(cls, header: dict, arrays: dict[str, np.ndarray]) -> "RunInfo":
        try:
            dets = {name: get_detector(d["type"], d["shape"] if d["type"] == "camera" else None)
                    for name, d in header["detectors"].items()}
            bits: dict[str, dict[int, np.ndarray]] = {}
            for key, cb in arrays.items():
                det, _, step = key.rpartition("/control_bits/")
                bits.setdefault(det, {})[int(step)] = cb
            return cls(int(header["run"]), dets, dict(header.get("scalars") or {}), bits,
                       str(header.get("experiment", "")), str(header.get("source", "")),
                       header.get("n_events"))
        except (KeyError, TypeError, ValueError, AttributeError, GpusmdError) as e:
            raise GpusmdError(f"bad begin_run message: {type(e).__name__}: {e}") from None
