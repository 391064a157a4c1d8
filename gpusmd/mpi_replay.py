"""Offline replay across MPI ranks (``mpiexec -n N gpusmd replay RUN ... --mpi``, or
``srun`` under SLURM), as psana2 spreads a run over a cluster.

The run's events are split in contiguous blocks of whole batches (the batches of a
one-process replay: event k*batch_size starts one), one block per rank in rank order.
Each rank reduces its block on its own backend (on a node with several GPUs, the rank's
index on its node picks the device) into its own part file, ``<run file>_parts/
part<rank>.h5`` (a small-data file of its events, complete when its block is). Rank 0
then writes the run file: every per-event dataset (and /errors) an HDF5 virtual dataset
over the parts in rank order, which is event order; /UserDataCfg once; /Sums from every
rank's partial sums, added in rank order (the sums of a one-process replay, up to the
rounding of the float64 accumulators between blocks, far below the float32 written);
the provenance names the ranks and their hosts. The run file is read with plain h5py
as any small-data file, as long as its parts directory stays beside it.

Everything that can be refused is refused on every rank before any event is reduced;
the first rank's reason is said by rank 0. Each rank then says which events it has
(its pid, host and part file). A block that fails is said by rank 0 (which rank,
which events, why) once every rank is done, and every rank exits with an error. On the
CPU the block is reduced in a child process the rank watches (gpusmd.mpi.in_child), so
that work killed outright is named the same way; on a GPU, where a forked child cannot
use the rank's CUDA context, a killed rank is reported by the launcher. Either way the
run file stays marked incomplete (``complete`` = 0, no per-event data)."""
from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from .backend import get_backend
from .config import Config
from .errors import GpusmdError
from .io.output import SmallDataWriter, check_new_output, run_output
from .io.source import open_run
from .replay import (ReplaySummary, build_processors, passthrough_names, provenance,
                     reduce_events, write_run_end, write_user_data_cfg)
from .mpi import (RankFailed, RankShare, abort_on_failure, count_events, in_child,
                  local_rank, pick_device, said_once, world)
from .runinfo import RunInfo


def parts_dir(out_path: Path) -> Path:
    return out_path.with_name(f"{out_path.stem}_parts")


def part_path(out_path: Path, rank: int) -> Path:
    return parts_dir(out_path) / f"part{rank:04d}.h5"


def replay_mpi(source, config: Config, out_path, backend_name: str | None = None,
               batch_size: int | None = None, max_events: int | None = None,
               force: bool = False, comm=None) -> ReplaySummary:
    """The MPI replay (see the module docstring); every rank calls it. Rank 0 returns the
    run file's summary, the others their part's."""
    share = RankShare(comm or world(), batch_size or config.batch_size)
    comm, rank, size, batch = share.comm, share.rank, share.size, share.batch_size
    device = pick_device(local_rank(comm))
    writer = None

    def prepare():
        """Everything that can be refused, before any rank starts work."""
        backend = get_backend(backend_name, config=config.backend)
        run = open_run(source, list(config.detectors)).__enter__()
        try:
            info = RunInfo.from_run(run, detectors=[d for d in config.detectors
                                                    if d in run.detectors],
                                    experiment=config.experiment)
            path = run_output(out_path, info.experiment, info.run)
            procs = build_processors(config, info, backend)
            scalars = passthrough_names(config, run)
            if rank == 0:
                path = check_new_output(path, force)
                parts = parts_dir(path)
                if parts.exists():
                    if not force:
                        raise GpusmdError(f"{parts} exists (the parts of an earlier run "
                                          f"file; never replaced unless --force)")
                    shutil.rmtree(parts)
                parts.mkdir(parents=True)
        except BaseException:
            run.__exit__(None, None, None)
            raise
        return backend, run, info, path, procs, scalars

    backend, run, info, out_path, procs, scalars = said_once(share, prepare)
    try:
        with abort_on_failure(comm, "replay"):
            n_events = comm.bcast(count_events(run, max_events) if rank == 0 else None)
            out_path = comm.bcast(out_path if rank == 0 else None)
            if rank == 0:           # the run file, marked incomplete, closed until the end
                writer = SmallDataWriter(out_path, config.compression, force=force)
                write_user_data_cfg(writer, procs)
                writer.close()
            comm.Barrier()          # no rank starts before the run file is there and closed
            first, stop = share.block(n_events)
            # which process has which events: a launcher that reports a killed rank by its
            # pid (mpich's "BAD TERMINATION ... PID") is read with this line
            print(f"gpusmd replay --mpi: rank {rank} of {size} (pid {os.getpid()} on "
                  f"{socket.gethostname()}{', GPU ' + device if device else ''}): events "
                  f"{first}-{stop - 1} of {n_events} -> {part_path(out_path, rank)}",
                  file=sys.stderr, flush=True)
            t0 = time.perf_counter()

            def work():
                return _reduce_block(run, procs, scalars, config, backend, batch, first,
                                     stop, part_path(out_path, rank), rank, size)
            # on the CPU the block is reduced in a child this rank watches: a killed one
            # is named here (a GPU context made here would not work in a forked child).
            # A failed block is said by rank 0 with the others' (an MPI Abort can cut
            # off what the failing rank printed last)
            where = f"events {first}-{stop - 1} (pid {os.getpid()})"
            try:
                part = work() if backend.is_gpu else in_child(where, work)
            except Exception as e:
                part = {"error": str(e) if isinstance(e, GpusmdError) else
                        f"{where}: {type(e).__name__}: {e}"}
            seconds = time.perf_counter() - t0
    finally:
        run.__exit__(None, None, None)
    part.update(host=socket.gethostname(), backend=backend.name, device=device,
                seconds=seconds)
    parts = comm.gather(part)
    failed = comm.bcast([f"rank {r} of {size} failed: {p['error']}"
                         for r, p in enumerate(parts) if "error" in p] if rank == 0 else None)
    if failed:                  # no run file completed; rank 0 says why, the others exit
        raise RankFailed("\n".join(failed) if rank == 0 else "")
    if rank != 0:
        return ReplaySummary(part_path(out_path, rank), part["n_events"], seconds, backend.name)
    try:
        datasets = write_run_file(writer, out_path, procs, parts, {
            **provenance(config, "+".join(sorted({p["backend"] for p in parts})),
                         run.source, info.experiment, run.run),
            "mpi_ranks": size, "mpi_hosts": " ".join(p["host"] for p in parts),
            "mpi_parts": str(parts_dir(out_path).relative_to(out_path.parent))})
    finally:
        writer.close()
    return ReplaySummary(out_path, sum(p["n_events"] for p in parts),
                         max(p["seconds"] for p in parts), backend.label, datasets)


def _reduce_block(run, procs, scalars, config, backend, batch, first, stop, path, rank, size):
    """One rank's events [first, stop) into its part file; what rank 0 needs of it."""
    writer = SmallDataWriter(path, config.compression, force=True)
    n = 0
    try:
        if stop > first:
            n = reduce_events(writer, run, procs, scalars, config, backend, batch, stop, first)
        layout = {}
        writer.f.visititems(lambda name, obj: layout.__setitem__(
            name, (obj.shape, obj.dtype.str)) if isinstance(obj, h5py.Dataset) else None)
        writer.set_attrs({"mpi_rank": rank, "mpi_ranks": size, "first_event": first,
                          "stop_event": stop})
        n_errors = writer.n_errors
        writer.finish()
    finally:
        writer.close()
    sums = {}
    for det, proc in procs.items():
        n_summed = proc.sums.n_events          # read before take(), which resets it
        sums[det] = (proc.sums.take(), n_summed)
    return {"n_events": n, "n_errors": n_errors, "layout": layout, "sums": sums,
            "first": first, "stop": stop}


def write_run_file(writer: SmallDataWriter, out_path: Path, procs, parts: list[dict],
                   attrs: dict) -> list[str]:
    """Rank 0: the run file from the parts (per-event datasets as virtual datasets in
    rank order, the sums added in rank order), marked complete; its dataset names."""
    writer.end_swmr()                   # open again (closed while the ranks worked)
    for det, proc in procs.items():
        proc.sums.reset()
        for p in parts:
            part, n = p["sums"][det]
            proc.sums.merge(part, n)
    names = {}
    for p in parts:
        for name, (shape, dtype) in p["layout"].items():
            names.setdefault(name, (tuple(shape[1:]), dtype))
    with writer.writing():
        if "errors" in writer.f:            # the parts' errors, as the rest
            for name in list(writer.datasets):
                if name.startswith("errors/"):
                    del writer.datasets[name]
            del writer.f["errors"]
        for name, (row, dtype) in sorted(names.items()):
            _virtual(writer.f, name, row, dtype, parts, out_path)
    writer.n_events = sum(p["n_events"] for p in parts)
    writer.n_errors = sum(p["n_errors"] for p in parts)
    write_run_end(writer, procs, {**attrs, "n_errors": writer.n_errors})
    datasets = []
    writer.f.visititems(lambda name, obj: datasets.append(name) if hasattr(obj, "shape")
                        else None)
    writer.finish()
    return datasets


def _virtual(f: h5py.File, name: str, row: tuple, dtype: str, parts: list[dict],
             out_path: Path):
    """One per-event dataset over the parts, in rank order."""
    sources = []
    for r, p in enumerate(parts):
        got = p["layout"].get(name)
        if got is None:
            if p["n_events"] or p["n_errors"]:
                raise GpusmdError(f"{name}: not in the part of rank {r} (events "
                                  f"{p['first']}-{p['stop'] - 1}), which has events")
            continue
        shape, part_dtype = tuple(got[0]), got[1]
        if shape[1:] != row or part_dtype != dtype:
            raise GpusmdError(f"{name}: {part_dtype} rows of {shape[1:]} in the part of rank "
                              f"{r}, {dtype} rows of {row} in another")
        if shape[0]:
            sources.append((str(part_path(out_path, r).relative_to(out_path.parent)), shape))
    total = sum(s[0] for _, s in sources)
    layout = h5py.VirtualLayout(shape=(total, *row), dtype=np.dtype(dtype),
                                maxshape=(total, *row))
    at = 0
    for path, shape in sources:
        layout[at:at + shape[0]] = h5py.VirtualSource(path, name, shape=shape)
        at += shape[0]
    f.create_virtual_dataset(name, layout)
