"""Which engine runs the hot CPU stages, and on how many threads.

Two engines give the same numbers, bit for bit: ``numba`` (gpusmd.numba_kernels:
compiled loops over the raw frames and the group medians, on numba's threads) and
``numpy`` (array operations, the reference). As pyFAI picks its integrators, one call,
:func:`cpu_engine`, takes the best that is installed: ``auto`` (the default) is numba
when it imports, else NumPy with one warning naming the install that adds it; asking
for ``numba`` without it warns the same way and runs NumPy.

Which engine, first that applies: the command line's ``--cpu-engine``, the environment
variable ``GPUSMD_CPU_ENGINE`` (auto, numba or numpy), ``auto``. Threads: ``--threads``
(or ``GPUSMD_THREADS``), else every core this process may use; a service worker or an
MPI rank takes its share of its host's cores (:func:`share_of_cores`)."""
from __future__ import annotations

import functools
import os
import threading
import warnings

from .errors import GpusmdError

ENGINES = ("auto", "numba", "numpy")
ENV_VAR = "GPUSMD_CPU_ENGINE"
THREADS_VAR = "GPUSMD_THREADS"
INSTALL = "pip install 'gpusmd[fast]'"


class EngineFallbackWarning(RuntimeWarning):
    """The compiled CPU engine is not installed: the NumPy engine runs."""


@functools.cache
def numba_kernels():
    """gpusmd.numba_kernels, or None where numba does not import (then why, once).
    numba's threads are its own work queue unless NUMBA_THREADING_LAYER says otherwise:
    its OpenMP layer shares the process's OpenMP runtime, which an OMP_NUM_THREADS=1
    (usual under MPI, and set by the benchmarks for pyFAI) or a busy core slows down
    several fold on every parallel loop."""
    try:
        import numba
        if not os.environ.get("NUMBA_THREADING_LAYER"):
            numba.config.THREADING_LAYER = "workqueue"
        from . import numba_kernels as kernels
    except Exception as e:         # not installed, or a numba that does not fit this NumPy
        numba_kernels.why = f"{type(e).__name__}: {e}"
        return None
    return kernels


_launch = threading.Lock()


def launch(kernel: str, *args):
    """Run one compiled kernel: one at a time in a process (numba's work queue takes one
    caller at a time; several Python threads calibrating take turns)."""
    with _launch:
        return getattr(numba_kernels(), kernel)(*args)


def engine_name(command_line: str | None = None) -> str:
    """The engine asked for: the command line's, else $GPUSMD_CPU_ENGINE, else auto."""
    env = os.environ.get(ENV_VAR, "").strip() or None
    for where, value in (("--cpu-engine", command_line), (ENV_VAR, env)):
        if value:
            if value not in ENGINES:
                raise GpusmdError(f"unknown CPU engine {value!r} ({where}): choose one of "
                                  f"{', '.join(ENGINES)}")
            return value
    return "auto"


_warned = False                  # numba wanted and missing: said once a process
_threads: int | None = None      # the compiled engine's threads, once set


def cpu_engine(name: str | None = None) -> str:
    """The engine that runs ("numba" or "numpy") for the engine asked for (see
    engine_name); warns once a process when numba is wanted and missing."""
    global _warned
    asked = engine_name(name)
    if asked == "numpy":
        return "numpy"
    if numba_kernels() is not None:
        return "numba"
    if not _warned:
        warnings.warn(f"CPU engine {asked}: numba is not available "
                      f"({getattr(numba_kernels, 'why', 'not installed')}); the NumPy engine "
                      f"runs, with the same numbers, slower ({INSTALL} adds numba)",
                      EngineFallbackWarning, stacklevel=2)
        _warned = True
    return "numpy"


def compiled(asked: str | None = None) -> bool:
    """Whether the compiled engine runs for the engine asked for; the first time it does
    in a process, its threads are set (thread_count)."""
    if cpu_engine(asked) != "numba":
        return False
    if _threads is None:
        set_threads(thread_count())
    return True


def engine_label(asked: str | None = None) -> str:
    """The engine that runs and its threads, e.g. "numba, 8 threads" or "numpy"."""
    if not compiled(asked):
        return "numpy"
    return f"numba, {_threads} thread{'s' if _threads != 1 else ''}"


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:              # not Linux
        return os.cpu_count() or 1


def share_of_cores(sharing: int) -> int:
    """Threads for one of ``sharing`` processes on this host (workers, MPI ranks): an
    equal share of the usable cores, at least one."""
    return max(1, usable_cores() // max(1, sharing))


def take_share_of_cores(sharing: int, environ=os.environ) -> int:
    """For one of ``sharing`` processes of a host (a worker of a local chain, an MPI rank):
    its threads, $GPUSMD_THREADS where set, else an equal share of the cores, which is
    then set there (for this process, or for the environment of one to be started)."""
    if not environ.get(THREADS_VAR, "").strip():
        environ[THREADS_VAR] = str(share_of_cores(sharing))
    return int(environ[THREADS_VAR])


def thread_count(command_line: int | None = None) -> int:
    """Threads asked for: the command line's, else $GPUSMD_THREADS, else every usable core."""
    env = os.environ.get(THREADS_VAR, "").strip()
    value = command_line if command_line is not None else (env or None)
    if value is None:
        return usable_cores()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1 or str(n) != str(value).strip():
        where = "--threads" if command_line is not None else THREADS_VAR
        raise GpusmdError(f"{where} {value!r} is not a positive whole number of threads")
    return n


def sort_rows(rows):
    """Sort each row of a 2-D array in place, the rows shared among the engine's threads
    (NumPy's sort lets go of the GIL)."""
    n = min(_threads or 1, len(rows) // 64)
    if n <= 1:
        rows.sort(axis=-1)
        return
    from concurrent.futures import ThreadPoolExecutor
    edges = [len(rows) * k // n for k in range(n + 1)]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda k: rows[edges[k]:edges[k + 1]].sort(axis=-1), range(n)))


def set_threads(n: int) -> int:
    """Run the compiled engine on n threads (at most numba's pool, every core by
    default); the number set. A no-op for the NumPy engine."""
    kernels = numba_kernels()
    if kernels is None:
        return 1
    import numba
    global _threads
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    _threads = n
    return n
