"""What every MPI command of gpusmd shares (``replay --mpi``, ``dark --mpi``, ``cube
--mpi``): the world, the split of a run's events among the ranks, one GPU per rank,
refusals said once, and sums over the ranks."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from contextlib import contextmanager, nullcontext

import numpy as np

from .errors import GpusmdError


def world():
    """MPI's COMM_WORLD (mpi4py: pip install mpi4py, and an MPI such as the mpich wheel).
    psana, imported later, is told to read serially: the ranks share the events
    themselves (psana's own MPI mode would make its own roles of these ranks, and it
    starts with a collective call at import)."""
    os.environ["PS_PARALLEL"] = "none"
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise GpusmdError(f"--mpi needs mpi4py and an MPI library ({e}): pip install "
                          f"mpi4py mpich") from None
    return MPI.COMM_WORLD


def shared_type():
    from mpi4py import MPI
    return MPI.COMM_TYPE_SHARED


def local_rank(comm) -> int:
    """The rank's index among the ranks of its node."""
    return comm.Split_type(shared_type(), key=comm.Get_rank()).Get_rank()


def rank_blocks(n_events: int, batch_size: int, size: int) -> list[tuple[int, int]]:
    """[first, stop) of each rank: whole batches, as even as they can be, in order."""
    n_batches = -(-n_events // batch_size)
    edges = [min(n_events, (r * n_batches // size) * batch_size) for r in range(size + 1)]
    return list(zip(edges[:-1], edges[1:]))


def gpu_count() -> int:
    """GPUs on this node without initialising CUDA here (which would fix the device)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def pick_device(local_rank: int, environ=os.environ, count=gpu_count) -> str | None:
    """One GPU per rank on a node with several: CUDA_VISIBLE_DEVICES narrowed to the
    rank's share (of the devices it lists, else of the node's), before CUDA starts. A
    launcher that gave each rank one device already (SLURM --gpus-per-task) is left
    alone. The device chosen, or None."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([v for v in visible.split(",") if v.strip()] if visible is not None
           else [str(i) for i in range(count())])
    if len(ids) <= 1:
        return ids[0] if ids else None
    environ["CUDA_VISIBLE_DEVICES"] = ids[local_rank % len(ids)]
    return environ["CUDA_VISIBLE_DEVICES"]


class RankFailed(GpusmdError):
    pass


def fail_all(comm, rank: int, error: BaseException | None):
    """Every rank's setup error (or None); raise the first on every rank."""
    errors = comm.allgather(None if error is None else f"{type(error).__name__}: {error}"
                            if not isinstance(error, GpusmdError) else str(error))
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        r, e = bad[0]
        raise RankFailed(f"rank {r} of {len(errors)}: {e}" if rank == 0 else "")




def count_events(run, max_events: int | None) -> int:
    n = run.n_events if run.n_events is not None else run.count_events()
    return n if max_events is None else min(max_events, n)


def in_child(describe: str, work):
    """``work()``'s result, computed in a forked process that this rank watches, so that
    a rank whose work is killed (the kernel's OOM killer, a signal) is still there to
    say which rank it was before the job ends: raises GpusmdError saying "``describe``:
    ... killed by signal ..." then; an exception of ``work`` comes back as one too.
    ``work`` must not call MPI (the child leaves through os._exit, never finalising it)
    nor use a GPU context made before the fork."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                        # the child
        os.close(read)
        code = 0
        try:
            payload = ("ok", work())
        except BaseException as e:
            payload, code = ("error", f"{type(e).__name__}: {e}"), 1
        try:
            with os.fdopen(write, "wb") as f:
                pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        raise GpusmdError(f"{describe}: its process {pid} was killed by signal {sig} "
                          f"({signal.Signals(sig).name})")
    try:
        kind, value = pickle.loads(data)
    except Exception:
        raise GpusmdError(f"{describe}: its process {pid} ended (status "
                          f"{os.waitstatus_to_exitcode(status)}) without a result") from None
    if kind == "error":
        raise GpusmdError(f"{describe}: {value}")
    return value


@contextmanager
def abort_on_failure(comm, what: str):
    """A rank that fails inside says which rank it is and why, and ends the job (MPI
    Abort: no rank waits for it); a refusal said by fail_all goes through."""
    try:
        yield
    except RankFailed:
        raise
    except BaseException as e:
        why = str(e) if isinstance(e, GpusmdError) else f"{type(e).__name__}: {e}"
        print(f"gpusmd {what} --mpi: rank {comm.Get_rank()} of {comm.Get_size()} failed: "
              f"{why}", file=sys.stderr, flush=True)
        comm.Abort(1)           # ends every rank; nothing after it runs
        os._exit(1)


class RankShare:
    """One rank's share of a run read by every rank (dark, cube): its block of events and
    sums over the ranks. Integer-valued sums (counts, sums of ADC values) are exact in
    any order; the others are added in rank order on every rank."""

    def __init__(self, comm, batch_size: int = 1):
        from .cpu_engine import take_share_of_cores
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.batch_size = batch_size
        # the ranks of a node share its cores (unless --threads / GPUSMD_THREADS says)
        take_share_of_cores(comm.Split_type(shared_type(), key=self.rank).Get_size())

    def block(self, n_events: int) -> tuple[int, int]:
        return rank_blocks(n_events, self.batch_size, self.size)[self.rank]

    def union(self, keys) -> list:
        """The keys any rank has, sorted, on every rank."""
        return sorted(set().union(*self.comm.allgather(set(keys))))

    def sum_exact(self, a: np.ndarray) -> np.ndarray:
        """The sum of every rank's ``a`` where it is exact in any order (integers, or
        float64 sums of integers below 2**53): MPI's own reduction."""
        from mpi4py import MPI
        total = np.ascontiguousarray(a).copy()
        self.comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
        return total

    def sum_in_order(self, a: np.ndarray) -> np.ndarray:
        """The sum of every rank's ``a``, added in rank order on rank 0 (one part in
        memory at a time), on every rank: the same numbers run after run."""
        if self.rank:
            self.comm.send(np.ascontiguousarray(a), dest=0)
            return self.comm.bcast(None)
        total = np.array(a, copy=True)
        for r in range(1, self.size):
            total += self.comm.recv(source=r)
        return self.comm.bcast(total)

    def ok(self, error: BaseException | None):
        """After a step that can be refused: raise on every rank when any rank failed."""
        fail_all(self.comm, self.rank, error)


def rank_share(mpi: bool) -> RankShare | None:
    """This process's share of an MPI job (``--mpi``), or None."""
    return RankShare(world()) if mpi else None


def ranked(share: RankShare | None, what: str):
    """abort_on_failure for a rank of an MPI job; nothing without one."""
    return nullcontext() if share is None else abort_on_failure(share.comm, what)


def said_once(share: RankShare | None, step):
    """``step()``'s result; what it refuses raised as it is without MPI, and on every
    rank (said by rank 0 only) under it, when any rank refused."""
    if share is None:
        return step()
    try:
        result, error = step(), None
    except Exception as e:
        result, error = None, e
    share.ok(error)
    return result
