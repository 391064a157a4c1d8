"""Batches through shared memory between the ingest node and the workers of its host.

A worker that sees the same shared memory as the ingest (same kernel boot, same
/dev/shm, same user: ``host_key``) reads its batches straight from files in /dev/shm
that the ingest filled as the events came in: the link carries only the header, and
the worker neither receives the frames through a socket nor stacks them (each
detector's frames lie as one (B, *shape) array, the batch the processing takes). That
is what keeps the services' cost low for large frames. Workers on other hosts get the
same frames over the link, one frame per event, as before.

The ingest keeps a batch's slot until the sink has acknowledged the batch, as it kept
its frames; a re-sent batch is the same slot. Slot files are named
``gpusmd-ingest-<pid>-<n>``: removed when the ingest closes, and at the start of an
ingest when their pid is gone (an ingest that was killed)."""
from __future__ import annotations

import logging
import math
import mmap
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .protocol import ProtocolError, check_descriptor

log = logging.getLogger("gpusmd.shm")

SHM_DIR = Path("/dev/shm")
PREFIX = "gpusmd-ingest-"
ALIGN = 64
# pages mapped in one call, not one fault per 4 KB page on first touch (Linux)
POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def host_key(directory: Path = SHM_DIR) -> str | None:
    """Who sees the same shared memory: the boot, the /dev/shm mount and the user; None
    where there is no /dev/shm."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        st = os.stat(directory)
    except OSError:
        return None
    return f"{boot}:{st.st_dev}:{st.st_ino}:{os.getuid()}"


def _unmap(m: mmap.mmap):
    try:
        m.close()
    except BufferError:          # a view still in use (a frame queued for sending): the
        pass                     # mapping goes with it


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Slot:
    """One batch's frames in a shared file: one (capacity, *shape) array per detector,
    filled event by event (``add``)."""

    def __init__(self, path: Path, layout: dict, capacity: int):
        self.path, self.layout, self.capacity = path, dict(layout), int(capacity)
        offsets, size = {}, 0
        for det, (dtype, shape) in self.layout.items():
            offsets[det] = size
            size += _aligned(math.prod(shape) * np.dtype(dtype).itemsize * self.capacity)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # the pages are taken now: a full /dev/shm is an error here (ENOSPC), not a
            # SIGBUS at the first write into an unbacked page
            os.posix_fallocate(fd, 0, max(size, 1))
            self.map = mmap.mmap(fd, max(size, 1), flags=mmap.MAP_SHARED | POPULATE)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self.offsets = offsets
        self.arrays = {det: np.ndarray((self.capacity, *shape), dtype, buffer=self.map,
                                       offset=offsets[det])
                       for det, (dtype, shape) in self.layout.items()}
        self.n = 0

    def fits(self, layout: dict, capacity: int) -> bool:
        return self.layout == layout and self.capacity >= capacity

    def add(self, frames: dict):
        for det, frame in frames.items():
            self.arrays[det][self.n] = frame
        self.n += 1

    def describe(self) -> dict:
        """What a worker needs to find the batch: the file and each array's place."""
        return {"path": self.path.name,
                "arrays": [[det, np.dtype(dtype).str, [self.n, *shape], self.offsets[det]]
                           for det, (dtype, shape) in self.layout.items()]}

    def event_frames(self, i: int) -> dict:
        """Event i's frames (views), for a worker on another host."""
        return {det: a[i] for det, a in self.arrays.items()}

    def close(self):
        self.arrays = {}
        _unmap(self.map)
        self.path.unlink(missing_ok=True)


class SlotPool:
    """The ingest's slots: reused once their batch is acknowledged; as many exist as
    batches are held at once (bounded by the ingest's backpressure)."""

    def __init__(self, directory: Path = SHM_DIR):
        self.directory = Path(directory)
        self.tag = f"{PREFIX}{os.getpid()}-"
        self.count = 0
        self.free: list[Slot] = []
        self.all: list[Slot] = []
        remove_stale(self.directory)
        for path in self.directory.glob(f"{self.tag}*"):   # a dead ingest had this pid
            path.unlink(missing_ok=True)

    def take(self, layout: dict, capacity: int) -> Slot:
        for i in reversed(range(len(self.free))):       # the last freed: still in cache
            if self.free[i].fits(layout, capacity):
                slot = self.free.pop(i)
                slot.n = 0
                return slot
        if self.free:                # a new run's detectors: the old slots will not fit
            for slot in self.free:
                self.all.remove(slot)
                slot.close()
            self.free = []
        self.count += 1               # a name that failed is not tried again
        slot = Slot(self.directory / f"{self.tag}{self.count - 1}", layout, capacity)
        self.all.append(slot)
        return slot

    def give(self, slot: Slot):
        self.free.append(slot)

    def close(self):
        for slot in self.all:
            slot.close()
        self.all, self.free = [], []


def remove_stale(directory: Path = SHM_DIR):
    """Remove the slot files of ingest processes that no longer run."""
    for path in Path(directory).glob(f"{PREFIX}*"):
        try:
            pid = int(path.name[len(PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:      # another user's live process
            continue


class SlotReader:
    """The worker's side: maps the ingest's files read-only (a few kept open) and gives
    a batch's arrays, checked against the file like a message's frames."""

    KEEP = 64

    def __init__(self, directory: Path = SHM_DIR):
        self.directory = Path(directory)
        self.maps: OrderedDict[str, mmap.mmap] = OrderedDict()

    def _map(self, name: str) -> mmap.mmap:
        if name in self.maps:
            self.maps.move_to_end(name)
            return self.maps[name]
        # a new file: let go of the files the ingest removed (their memory with them)
        for gone in [n for n in self.maps if not (self.directory / n).exists()]:
            self._unmap(gone)
        with open(self.directory / name, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | POPULATE, prot=mmap.PROT_READ)
        self.maps[name] = m
        while len(self.maps) > self.KEEP:
            self._unmap(next(iter(self.maps)))
        return m

    def _unmap(self, name: str):
        _unmap(self.maps.pop(name))

    def arrays(self, desc) -> dict[str, np.ndarray]:
        """{det: (n, *shape) read-only array} of a batch header's "shm" entry; raises
        ProtocolError naming the problem."""
        try:
            name, entries = desc["path"], desc["arrays"]
        except (TypeError, KeyError):
            raise ProtocolError(f"bad shared-memory batch descriptor {desc!r}") from None
        if not isinstance(entries, list):
            raise ProtocolError(f"bad shared-memory batch descriptor {desc!r}")
        if not isinstance(name, str) or not name.startswith(PREFIX) or "/" in name:
            raise ProtocolError(f"shared-memory batch: {name!r} is not a slot file")
        try:
            m = self._map(name)
        except (OSError, ValueError) as e:
            raise ProtocolError(f"shared-memory batch: cannot map {self.directory / name}: "
                                f"{e}") from None
        out = {}
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[3], int):
                raise ProtocolError(f"shared-memory batch: bad array entry {entry!r}")
            det, dtype, shape = check_descriptor(entry[:3], None)
            offset = entry[3]
            nbytes = math.prod(shape) * dtype.itemsize          # Python integers
            if offset < 0 or offset + nbytes > len(m):
                raise ProtocolError(f"shared-memory batch: array {det!r} ({nbytes} bytes at "
                                    f"{offset}) lies outside {name} ({len(m)} bytes)")
            out[det] = np.ndarray(shape, dtype, buffer=m, offset=offset)
        return out

    def close(self):
        for name in list(self.maps):
            self._unmap(name)
