"""Helpers shared by the GPU launchers: the device's multiprocessor count, and the events
of a batch cut into launches of at most CM_MAX_GRID_Y (gridDim.y) events.
"""
from __future__ import annotations

import functools

from .compile import _cupy

CM_MAX_GRID_Y = 65535    # events per launch (gridDim.y)


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    cupy = _cupy()
    return int(cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])


def _event_chunks(nbatch: int):
    """The events of a batch by launches: (slice, count), at most CM_MAX_GRID_Y events each
    (gridDim.y)."""
    for b0 in range(0, nbatch, CM_MAX_GRID_Y):
        b1 = min(nbatch, b0 + CM_MAX_GRID_Y)
        yield slice(b0, b1), b1 - b0
