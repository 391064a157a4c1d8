"""Offline replay in one process: a run (any source of gpusmd.io.source) -> per-detector
processing -> output file.

Everything that can be refused (an existing output, config, detectors missing from the
run, constants, ROI bounds, passthrough names) is checked before the output file is
created, most of it while the processors are built. The file says whether it is complete (root attribute
``complete``, see gpusmd.io.output): an interrupted replay (an exception, Ctrl-C,
SIGTERM, a full disk) leaves it at 0, with the events written so far."""
from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__
from .backend import Backend, get_backend
from .config import Config
from .errors import ConfigError, GpusmdError
from .io.output import SmallDataWriter, check_new_output, run_output
from .io.source import EventBatch, is_psana_source, open_run
from .features import concat_columns
from .processor import DetectorProcessor
from .runinfo import RunInfo


@dataclass
class ReplaySummary:
    output: Path
    n_events: int
    seconds: float
    backend: str
    datasets: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.n_events / self.seconds if self.seconds > 0 else float("inf")


def build_processors(config: Config, info: RunInfo, backend: Backend) -> dict[str, DetectorProcessor]:
    """The processors of the config's detectors. A detector of a psana run whose config
    names no ``calib`` file takes psana's own constants (its calibration database)."""
    procs = {}
    for name, dcfg in config.detectors.items():
        if name not in info.detectors:
            raise (dcfg.where).error(f"detector {name!r} is not in {info.source or 'the run'} "
                                     f"(it has: {', '.join(info.detectors) or 'none'})")
        constants = None
        if dcfg.calib is None and is_psana_source(info.source):
            from .calib.psana_constants import from_run
            constants = from_run(info.source, name, info.detectors[name])
        proc = DetectorProcessor(dcfg, info.detectors[name], backend, info.run, constants)
        for step, control_bits in info.control_bits.get(name, {}).items():
            proc.set_control_bits(step, control_bits)
        procs[name] = proc
    return procs


def passthrough_names(config: Config, run) -> list[str]:
    if config.passthrough is True:
        return sorted(run.scalar_dtypes)
    if config.passthrough is False:
        return []
    missing = [n for n in config.passthrough if n not in run.scalar_dtypes]
    if missing:
        raise ConfigError(f"{config.source}: passthrough: {missing} not in {run.source} "
                          f"(it has: {', '.join(sorted(run.scalar_dtypes)) or 'none'})")
    return list(config.passthrough)


def step_runs(steps: np.ndarray):
    """(step, start, stop) for each stretch of equal config steps."""
    edges = np.flatnonzero(np.diff(steps)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(steps)]])
    return [(int(steps[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def reduce_frames(procs, frames: dict, steps: dict, user_functions=()) -> dict[str, np.ndarray]:
    """One batch of every detector's raw frames (B, *shape) and config steps (B,) ->
    the per-event columns "<det>/<func>_<field>", then "<name>/<field>" of the user
    functions, which see the calibrated frames of their detectors."""
    columns, calibrated = {}, {}
    for det, proc in procs.items():
        parts: dict[str, list] = {}
        frames_parts = []
        for step, a, b in step_runs(steps[det]):
            for key, value in proc.process(frames[det][a:b], step).items():
                parts.setdefault(key, []).append(value)
            frames_parts.append(proc.last_calib)
        for key, values in parts.items():
            columns[f"{det}/{key}"] = concat_columns(values)
        if user_functions:
            xp = proc.backend.xp
            calibrated[det] = frames_parts[0] if len(frames_parts) == 1 else xp.concatenate(frames_parts)
    for uf in user_functions:
        result = uf.function({d: calibrated[d] for d in uf.detectors}, **uf.params)
        n = len(next(iter(frames.values())))
        for key, value in result.items():
            value = procs[uf.detectors[0]].backend.to_host(value)
            if len(value) != n:
                raise GpusmdError(f"user function {uf.name!r}: field {key!r} has "
                                  f"{len(value)} rows for {n} events")
            columns[f"{uf.name}/{key}"] = value
    return columns


def process_batch(procs, batch: EventBatch, scalars, config: Config,
                  frames: dict | None = None) -> dict[str, np.ndarray]:
    """The output columns of a batch of events. frames: the batch's raw frames where
    they are elsewhere (on the device, by gpu_pipeline.stream_batches); else the batch's
    own."""
    columns = {"event_id": batch.event_id, "timestamp": batch.timestamp}
    for name in scalars:
        columns[name] = batch.scalars[name]
    frames = batch.frames if frames is None else frames
    steps = {det: batch.steps[det] for det in procs}
    return {**columns, **reduce_frames(procs, frames, steps, config.user_functions)}


def provenance(config: Config, backend: str, source, experiment: str, run: int) -> dict:
    return {"gpusmd_version": __version__, "config": config.text, "config_file": config.source,
            "backend": backend, "host": socket.gethostname(), "raw_file": str(source),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
            "experiment": experiment, "run": run}


def write_user_data_cfg(writer: SmallDataWriter, procs):
    """/UserDataCfg: constants, masks, parameters. Known before the first event, written
    first (a reader of the growing file sees them, and the end of a run is shorter)."""
    for det, proc in procs.items():
        for key, value in proc.user_data_cfg().items():
            writer.write(f"UserDataCfg/{det}/{key}", value)


def write_run_end(writer: SmallDataWriter, procs, attrs: dict):
    """/Sums and the provenance attributes, once the run is over."""
    for det, proc in procs.items():
        for key, value in proc.run_sums().items():
            writer.write(f"Sums/{det}_{key}", value)
            writer.set_attrs({"n_events": proc.sums.n_events}, f"Sums/{det}_{key}")
    writer.set_attrs(attrs)


def reduce_events(writer: SmallDataWriter, run, procs, scalars, config: Config,
                  backend: Backend, batch: int, stop: int | None = None, first: int = 0,
                  on_batch=None) -> int:
    """The run's events ``first`` to ``stop`` (the end when None) reduced and appended to
    ``writer``, their errors recorded; the number of events read. ``on_batch(n)`` after
    each batch of n events."""
    from .gpu_pipeline import stream_batches
    n = 0

    def consume(b: EventBatch, frames):
        nonlocal n
        if b.errors:
            writer.add_errors(b.errors)
        if len(b):
            writer.append(process_batch(procs, b, scalars, config, frames))
        n += len(b)
        if on_batch is not None:
            on_batch(len(b))
    # on a GPU, batch k+1 crosses the bus while k is processed
    stream_batches(procs, ((b, b.frames) for b in run.batches(
        batch, stop, detectors=list(procs), first=first)), batch, backend, consume)
    return n


def replay(source, config: Config, out_path, backend: Backend | None = None,
           batch_size: int | None = None, progress: bool = True,
           max_events: int | None = None, force: bool = False) -> ReplaySummary:
    """Reduce the run ``source`` (a raw HDF5 file, an XTC2 file or directory, a psana
    DataSource string) into ``out_path`` (a file, or a directory or None for
    <experiment>_Run<NNNN>.h5 there: see run_output; an existing file is refused unless
    ``force``).
    Without ``backend``: ``$GPUSMD_BACKEND``, else the config's, else auto."""
    backend = backend or get_backend(config=config.backend)
    batch = batch_size or config.batch_size
    with open_run(source, list(config.detectors)) as run:
        info = RunInfo.from_run(run, detectors=[d for d in config.detectors if d in run.detectors],
                                experiment=config.experiment)
        out_path = check_new_output(run_output(out_path, info.experiment, info.run), force)
        procs = build_processors(config, info, backend)
        scalars = passthrough_names(config, run)
        total = run.n_events if max_events is None or run.n_events is None \
            else min(max_events, run.n_events)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        writer = SmallDataWriter(out_path, config.compression, force=force)
        t0 = time.perf_counter()
        try:
            write_user_data_cfg(writer, procs)
            with tqdm(total=total, unit="ev", disable=not progress, desc=out_path.name) as bar:
                n = reduce_events(writer, run, procs, scalars, config, backend, batch,
                                  max_events, on_batch=bar.update)
            seconds = time.perf_counter() - t0
            write_run_end(writer, procs, {**provenance(config, backend.name, run.source,
                                                       info.experiment, run.run),
                                          "n_errors": writer.n_errors})
            datasets = []
            writer.f.visititems(lambda name, obj: datasets.append(name)
                                if hasattr(obj, "shape") else None)
            writer.finish()
        finally:
            writer.close()
    return ReplaySummary(out_path, n, seconds, backend.label, datasets)
