"""The array backend: NumPy always, CuPy when asked for or when a usable device is found.

Which backend runs, first that applies:

1. the command line's ``--backend`` (or the name a caller passes to :func:`get_backend`);
2. the environment variable ``GPUSMD_BACKEND`` (``auto``, ``cpu`` or ``gpu``);
3. the config's ``backend:`` key;
4. ``auto``.

``auto`` takes the GPU only when CuPy compiles and runs a tiny kernel there; a GPU that
CuPy sees but cannot use (a CuPy built for another CUDA major version than the driver's,
NVRTC missing) gives one warning, saying why, and the CPU. ``gpu`` on such a machine is
an error with the same reason."""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .errors import GpusmdError

BACKEND_CHOICES = ("auto", "cpu", "gpu")
ENV_VAR = "GPUSMD_BACKEND"
CUPY_PACKAGES = {11: "cupy-cuda11x", 12: "cupy-cuda12x", 13: "cupy-cuda13x"}
GPU_EXTRAS = {12: "gpu-cuda12", 13: "gpu-cuda13"}   # pyproject extras, by CUDA major

PROBE_SOURCE = r"""
extern "C" __global__ void gpusmd_probe(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 2.0f * i + 1.0f;
}
"""


class BackendFallbackWarning(RuntimeWarning):
    """``auto`` found a GPU it cannot use and runs on the CPU."""


# ---- which CUDA, which extra ----------------------------------------------------------
def driver_cuda_major() -> int | None:
    """The CUDA major version the installed NVIDIA driver supports (13 for a 13.0
    driver), or None when no driver loads."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        version = ctypes.c_int(0)
        try:
            if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
                return version.value // 1000
        except AttributeError:
            pass
    return None


def cupy_package() -> tuple[str, int | None] | None:
    """(distribution name, CUDA major it is built for) of the installed CuPy, or None."""
    for major, dist in CUPY_PACKAGES.items():
        try:
            importlib.metadata.version(dist)
            return dist, major
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        importlib.metadata.version("cupy")      # a source build: CUDA version unknown
        return "cupy", None
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_extra(major: int | None = None) -> str | None:
    """The install extra for a CUDA major (default: the driver's), e.g. ``gpu-cuda13``;
    None when the major is not known."""
    major = driver_cuda_major() if major is None else major
    if major is None or major < min(GPU_EXTRAS):
        return None
    return GPU_EXTRAS[min(major, max(GPU_EXTRAS))]


def _install(extra: str | None) -> str:
    if extra:
        return f"pip install 'gpusmd[{extra}]'"
    return " or ".join(f"pip install 'gpusmd[{x}]' (CUDA {m} driver)" for m, x in GPU_EXTRAS.items())


def install_hint() -> str:
    """What the GPU backend needs on this machine, as a clause naming the extra for the
    driver's CUDA major version."""
    driver = driver_cuda_major()
    have = cupy_package()
    if driver is None:
        return "no NVIDIA driver was found here" + ("" if have else f"; with one, {_install(None)}")
    extra = gpu_extra(driver)
    if have is None:
        return f"the driver supports CUDA {driver}: {_install(extra)}"
    dist, major = have
    if major is None:
        return f"the driver supports CUDA {driver}; {dist} is a source build of CuPy"
    if major > driver:
        return (f"{dist} needs a CUDA {major} driver but the driver supports CUDA {driver}: "
                f"pip uninstall {dist} && {_install(extra)}")
    if gpu_extra(major) != extra:
        return (f"the driver supports CUDA {driver}, {dist} is for CUDA {major}: "
                f"{_install(gpu_extra(major))} adds its NVRTC, or pip uninstall {dist} && "
                f"{_install(extra)}")
    return f"the driver supports CUDA {driver}; {_install(extra)} adds the NVRTC {dist} needs"


def nvrtc_hint() -> str:
    """What gives CuPy's NVRTC bindings their library, after the installed CuPy."""
    have = cupy_package()
    if have is None:
        return f"install CuPy with its NVRTC: {_install(gpu_extra())}"
    if have[1] is None:
        return "install the CUDA toolkit's NVRTC that CuPy was built against"
    nvrtc = "nvidia-cuda-nvrtc-cu12" if have[1] == 12 else f"nvidia-cuda-nvrtc=={have[1]}.*"
    return (f"{have[0]} needs NVRTC {have[1]}: pip install '{nvrtc}' "
            f"(or the extra gpu-cuda{have[1]})")


# ---- the device check -----------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def probe_gpu() -> tuple[ModuleType | None, str, int]:
    """(cupy, "", devices) when CuPy compiles and runs a tiny kernel on the current
    device; else (None, why, devices): devices is how many CuPy sees (0 with no CuPy or
    no driver). Done once per process."""
    try:
        import cupy
    except Exception as e:   # no CuPy, or one that does not import
        return None, f"CuPy does not import ({type(e).__name__}: {e})", 0
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:   # no driver
        return None, f"CuPy finds no CUDA driver ({_one_line(e)})", 0
    if n < 1:
        return None, "CuPy finds no CUDA device", 0
    try:
        from .cuda import NVRTC_STD
        module = cupy.RawModule(code=PROBE_SOURCE, options=(NVRTC_STD,), backend="nvrtc")
        out = cupy.full(64, -1, dtype=cupy.float32)
        module.get_function("gpusmd_probe")((1,), (64,), (out, np.int32(64)))
        got = cupy.asnumpy(out)
    except Exception as e:
        return None, (f"CuPy sees {n} CUDA device(s) but cannot compile and run a kernel "
                      f"there ({type(e).__name__}: {_one_line(e)}); {install_hint()}"), n
    if not np.array_equal(got, 2 * np.arange(64, dtype=np.float32) + 1):
        return None, f"CuPy sees {n} CUDA device(s) but a test kernel gave wrong results", n
    return cupy, "", n


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


_warned = False


def _forget_probe():
    """Probe again at the next get_backend (tests)."""
    global _warned
    probe_gpu.cache_clear()
    _warned = False


# ---- the backend ----------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    name: str            # "cpu" or "gpu"
    xp: ModuleType       # numpy or cupy
    cpu_engine: str = "numpy"   # on the CPU, the engine asked for (gpusmd.cpu_engine)

    @property
    def label(self) -> str:
        """The backend as the summaries say it: "gpu", "cpu (numba, 8 threads)" or
        "cpu (numpy)"."""
        if self.is_gpu:
            return self.name
        from .cpu_engine import engine_label
        return f"cpu ({engine_label(self.cpu_engine)})"

    @property
    def compiled(self) -> bool:
        """Whether the hot CPU stages run on the compiled engine (numba, imported here,
        at the first calibration: a process that never calibrates never loads it)."""
        if self.is_gpu:
            return False
        from .cpu_engine import compiled
        return compiled(self.cpu_engine)

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def to_host(self, a):
        """A NumPy array, whatever the backend."""
        if self.is_gpu and not isinstance(a, np.ndarray):
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def to_host_all(self, arrays: dict) -> dict:
        """{name: NumPy array} of many small results: on a GPU every copy is queued on
        the current stream, into pinned memory, and the host waits once for them all."""
        if not self.is_gpu:
            return {key: np.asarray(a) for key, a in arrays.items()}
        import cupyx
        stream = self.xp.cuda.get_current_stream()
        out = {}
        for key, a in arrays.items():
            if isinstance(a, np.ndarray):
                out[key] = a
                continue
            a = self.xp.ascontiguousarray(a)
            out[key] = cupyx.empty_pinned(a.shape, a.dtype)
            a.get(stream=stream, out=out[key], blocking=False)
        stream.synchronize()
        return out


def backend_name(command_line: str | None = None, config: str | None = None) -> str:
    """The backend asked for: the command line's, else ``$GPUSMD_BACKEND``, else the
    config's, else ``auto``."""
    env = os.environ.get(ENV_VAR, "").strip() or None
    for where, value in (("--backend", command_line), (ENV_VAR, env), ("config backend", config)):
        if value:
            if value not in BACKEND_CHOICES:
                raise GpusmdError(f"unknown backend {value!r} ({where}): choose one of "
                                  f"{', '.join(BACKEND_CHOICES)}")
            return value
    return "auto"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3       # glibc's mallopt parameters
KEEP_FREED_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """On the CPU, let freed arrays of up to 1 GiB go back to the heap and be reused
    instead of each large array being a fresh mapping whose pages the kernel zeroes on
    first touch: glibc maps arrays over 32 MB (a batch of 8 frames of 2 Mpixels) anew
    each time, which made batches of 8 slower per frame than single frames (epix10k2M
    calibration: 3.6 against 2.3 ms a frame; 2.2-2.5 against 1.9-2.2 after this). glibc
    only (elsewhere nothing is changed); False where it could not be set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
                    and libc.mallopt(M_TRIM_THRESHOLD, 2 * KEEP_FREED_BYTES))
    except (OSError, AttributeError):
        return False


def cpu_backend() -> Backend:
    """The CPU backend, with the CPU engine asked for (or the best installed) running on
    the threads asked for (gpusmd.cpu_engine)."""
    from .cpu_engine import engine_name
    keep_freed_memory()
    return Backend("cpu", np, engine_name())


def get_backend(name: str | None = None, *, config: str | None = None) -> Backend:
    """The backend to run on; ``name`` (the command line's) wins over
    ``$GPUSMD_BACKEND``, which wins over ``config`` (the config's ``backend:``); ``auto``
    when none says. ``auto`` takes the GPU when CuPy compiles and runs a kernel there."""
    global _warned
    name = backend_name(name, config)
    if name == "cpu":
        return cpu_backend()
    cupy, why, devices = probe_gpu()
    if cupy is not None:
        return Backend("gpu", cupy)
    if name == "gpu":
        if devices == 0 and "install" not in why:
            why += f" ({install_hint()})"
        raise GpusmdError(f"backend 'gpu' asked for, but {why}")
    if devices > 0 and not _warned:     # a GPU is there and cannot be used: say so once
        _warned = True
        warnings.warn(f"backend auto: using the CPU: {why}", BackendFallbackWarning,
                      stacklevel=2)
    return cpu_backend()
