"""The array backend: NumPy always, CuPy when asked for or when a device is found."""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .errors import GpusmdError

BACKEND_CHOICES = ("auto", "cpu", "gpu")


def _cupy_with_device():
    """CuPy if it imports and sees at least one device, else None."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        pass
    return None


@dataclass(frozen=True)
class Backend:
    name: str            # "cpu" or "gpu"
    xp: ModuleType       # numpy or cupy

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


def get_backend(name: str | None = None) -> Backend:
    """Choose the backend once: ``auto`` takes the GPU when CuPy finds a device.

    The environment variable GPUSMD_BACKEND gives the default (used by the test suite
    to run everything again on a GPU)."""
    name = name or os.environ.get("GPUSMD_BACKEND", "auto")
    if name not in BACKEND_CHOICES:
        raise GpusmdError(f"unknown backend {name!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    if name == "cpu":
        return Backend("cpu", np)
    cupy = _cupy_with_device()
    if cupy is not None:
        return Backend("gpu", cupy)
    if name == "gpu":
        raise GpusmdError("backend 'gpu' asked for, but CuPy finds no CUDA device "
                          "(install with `pip install .[gpu]` on a machine with a GPU)")
    return Backend("cpu", np)
