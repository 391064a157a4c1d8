"""Write a raw run as an LCLS-II XTC2 file with psana's own writer (psana.dgramedit).

The file is what an LCLS-II DAQ records, so that psana2 reads it with its real detector
classes: Configure (the names, the epix10ka configuration of the first step), BeginRun
(``runinfo``: experiment and run number), per configuration step BeginStep (``scan``:
step value and docstring, the step's epix10ka configuration), Enable, the L1Accepts,
Disable and EndStep, and EndRun. Per-event scalars go in psana's generic containers
(``<group>/<name>`` becomes field ``name`` of detector ``group``), and the event ids in
the ``gpusmd`` detector, so a psana replay of the file equals the replay of the raw
file. Used by ``gpusmd convert`` and by the tests that take psana as the reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import RawFileError
from .output import written_whole
from .psana_layout import (EVENT_ID_DETECTOR, EVENT_ID_FIELD, PSANA_TYPES, SCALAR_ALG,
                           SCALAR_DETTYPE, SCALAR_VERSION, ns_to_psana_time,
                           psana_asics_from_panel, trbit_to_psana)
from .raw import RawRun

TRANSITION_BUFSIZE = 64 * 1024 * 1024


def _psana():
    try:
        from psana.dgramedit import AlgDef, DetectorDef, DgramEdit
        from psana.psexp import TransitionId
    except ImportError as e:
        raise RawFileError(f"writing XTC2 needs psana (pip install 'gpusmd[psana]'): {e}") from None
    return AlgDef, DetectorDef, DgramEdit, TransitionId


class _Writer:
    """The open file, one buffer for the dgrams and the Names of the run."""

    def __init__(self, path: Path, event_nbytes: int):
        self.AlgDef, self.DetectorDef, self.DgramEdit, self.T = _psana()
        self.f = open(path, "wb")
        self.bufsize = max(TRANSITION_BUFSIZE, 2 * event_nbytes + (1 << 20))
        self.buf = bytearray(self.bufsize)
        self.config = self.DgramEdit(transition_id=self.T.Configure, bufsize=self.bufsize)
        self.names_id = 0
        self.ts = 0

    def detector(self, name: str, dettype: str, alg: str, version, fields: dict,
                 segment: int = 0, serial: str = ""):
        handle = self.config.Detector(self.DetectorDef(name, dettype, serial or f"{name}_serial"),
                                      self.AlgDef(alg, *version), fields, nodeId=1,
                                      namesId=self.names_id, segment=segment)
        self.names_id += 1
        return getattr(handle, alg)

    def save(self, dgram):
        dgram.save(self.buf)
        self.f.write(self.buf[:dgram.size])

    def transition(self, tid, ts: int, data=()):
        d = self.DgramEdit(transition_id=tid, config_dgramedit=self.config, ts=ts,
                           bufsize=self.bufsize)
        for item in data:
            d.adddata(item)
        self.save(d)

    def close(self):
        self.f.close()


def _step_runs(steps: np.ndarray):
    edges = np.flatnonzero(np.diff(steps)) + 1
    return list(zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(steps)]])))


def write_xtc2(raw_path, out_path, events_per_read: int = 16) -> Path:
    """Write the raw run ``raw_path`` (gpusmd's HDF5 raw format) as XTC2 ``out_path``.

    Every detector of the run must be one psana2 reads (epix10k quad / 2M, Jungfrau
    0.5M / 1M / 4M, epix100); its raw frames are written as they are, one segment per
    panel / module. The configuration steps must be those of the run's detectors
    together (psana's steps belong to the run, not to a detector)."""
    out_path = Path(out_path)
    with RawRun(raw_path) as run:
        kinds = {}
        for det, model in run.detectors.items():
            if model.family not in PSANA_TYPES:
                raise RawFileError(f"{run.path}: /{det} is a {model.type}; XTC2 can be written "
                                   f"for {', '.join(PSANA_TYPES)} detectors")
            kinds[det] = PSANA_TYPES[model.family]
        steps = None
        for det in run.detectors:
            s = run.steps(det)
            if steps is not None and not np.array_equal(s, steps):
                raise RawFileError(f"{run.path}: the detectors' configuration steps differ; "
                                   f"XTC2 steps belong to the whole run")
            steps = s
        steps = np.zeros(run.n_events, np.int64) if steps is None else steps
        if len(steps) and np.any(np.diff(steps) < 0):
            raise RawFileError(f"{run.path}: configuration steps go back; XTC2 steps follow "
                               f"each other")
        event_nbytes = sum(m.raw_nbytes for m in run.detectors.values()) + 4096
        with written_whole(out_path) as part:
            w = _Writer(part, event_nbytes)
            try:
                _write(w, run, kinds, steps, events_per_read)
            finally:
                w.close()
    return out_path


def _write(w: _Writer, run: RawRun, kinds: dict, steps: np.ndarray, events_per_read: int):
    raw_alg, cfg_alg = {}, {}
    for det, model in run.detectors.items():
        k = kinds[det]
        nseg = model.seg_shape[0] if model.family != "epix100" else 1
        dtype = np.dtype(model.dtype).type
        raw_alg[det] = [w.detector(det, k.dettype, "raw", k.raw_version,
                                   {"raw": (dtype, len(k.segment_shape))}, segment=s,
                                   serial=f"{det}_{s}")
                        for s in range(nseg)]
        if k.config_version is not None:
            cfg_alg[det] = [w.detector(det, k.dettype, "config", k.config_version,
                                       {"asicPixelConfig": (np.uint8, 3), "trbit": (np.uint8, 1)},
                                       segment=s, serial=f"{det}_{s}")
                            for s in range(nseg)]
    runinfo = w.detector("runinfo", "runinfo", "runinfo", (0, 0, 1),
                         {"expt": (str, 1), "runnum": (np.uint32, 0)})
    scan = w.detector("scan", "scan", "raw", (2, 0, 0),
                      {"step_value": (np.float64, 0), "step_docstring": (str, 1)})
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, values in run.scalars.items():
        group, _, field = name.partition("/")
        groups.setdefault(group, {})[field] = values
    groups.setdefault(EVENT_ID_DETECTOR, {})[EVENT_ID_FIELD] = run.event_id
    scalar_alg = {g: w.detector(g, SCALAR_DETTYPE, SCALAR_ALG, SCALAR_VERSION,
                                {f: (v.dtype.type, 0) for f, v in fields.items()})
                  for g, fields in groups.items()}

    def set_config(step: int) -> list:
        items = []
        for det, segs in cfg_alg.items():
            pc, tr = run.epix10k_config(det, step)
            for s, alg in enumerate(segs):
                alg.asicPixelConfig = np.ascontiguousarray(psana_asics_from_panel(pc[s]))
                alg.trbit = np.ascontiguousarray(trbit_to_psana(tr[s]).astype(np.uint8))
                items.append(alg)
        return items

    n = run.n_events
    first_ts = ns_to_psana_time(run.timestamp[0]) if n else ns_to_psana_time(10**18)
    # transitions take the clock ticks just before the event that follows them
    w.config.updatetimestamp(first_ts - 8)
    for item in set_config(int(steps[0]) if n else 0):
        w.config.adddata(item)
    w.save(w.config)
    runinfo.expt, runinfo.runnum = run.experiment, int(run.run)
    w.transition(w.T.BeginRun, first_ts - 7, [runinfo])
    last_ts = first_ts - 7
    for a, b in _step_runs(steps) if n else []:
        step = int(steps[a])
        step_ts = ns_to_psana_time(run.timestamp[a])
        scan.step_value = float(step)
        scan.step_docstring = json.dumps({"step": step, "detname": ",".join(run.detectors),
                                          "scantype": "gpusmd"})
        w.transition(w.T.BeginStep, step_ts - 4, [scan, *set_config(step)])
        w.transition(w.T.Enable, step_ts - 3)
        for start in range(a, b, events_per_read):
            stop = min(b, start + events_per_read)
            frames = {det: run.read(det, start, stop) for det in run.detectors}
            for i in range(start, stop):
                ts = ns_to_psana_time(run.timestamp[i])
                d = w.DgramEdit(transition_id=w.T.L1Accept, config_dgramedit=w.config, ts=ts,
                                bufsize=w.bufsize)
                for det, segs in raw_alg.items():
                    frame = frames[det][i - start]
                    for s, alg in enumerate(segs):
                        alg.raw = np.ascontiguousarray(
                            frame if len(segs) == 1 and frame.ndim == 2 else
                            frame[s].reshape(kinds[det].segment_shape))
                        d.adddata(alg)
                for g, fields in groups.items():
                    alg = scalar_alg[g]
                    for f, values in fields.items():
                        setattr(alg, f, values[i])
                    d.adddata(alg)
                w.save(d)
                last_ts = ts
        w.transition(w.T.Disable, last_ts + 1)
        w.transition(w.T.EndStep, last_ts + 2)
        last_ts += 2
    w.transition(w.T.EndRun, last_ts + 1)
