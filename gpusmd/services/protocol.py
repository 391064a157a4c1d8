"""The wire protocol (DESIGN §3): a msgpack header, then one frame per array.

    frame 0   msgpack map: {"v": 1, "kind": str, ..., "arrays": [[name, dtype, shape], ...]}
    frame i   the raw bytes of array i - 1 (C order), sent and received without copies

Kinds (what a service sends -> to whom):
    begin_run  publisher -> ingest -> workers, sink   run, experiment, source, n_events,
               detectors {name: {type, dtype, shape}}, scalars {name: dtype};
               arrays: epix10k control bits "<det>/control_bits/<step>"
    event      publisher -> ingest    run, event, timestamp, scalars {name: value},
               steps {det: step}; arrays: one raw frame per detector, named by detector
    end        publisher -> ingest -> sink, workers   run (+ totals from the ingest)
    batch      ingest -> worker       run, batch, events [{event, timestamp, scalars, steps}];
               arrays: the events' frames, named "<index>/<det>"; or, to a worker on
               the ingest's host, none and "shm": where the frames lie (services/shm.py)
    ready      worker -> ingest       worker, credit (batches it can take), host (the
               shared memory it sees, services/shm.host_key)
    heartbeat  worker -> ingest       worker
    result     worker -> sink         run, batch, worker, events, timestamps, scalars
               {name: [values]}, errors [[event, reason]]; arrays: per-event columns
               "<det>/<field>" and per-batch sums "sums/<det>/<key>"
    errors     ingest -> sink         run, errors [[event, stage, reason]]
    ack        sink -> ingest         batch

Never pickle: a message from the network is data. Array dtypes are restricted to plain
numbers, and every frame's size is checked against its declared dtype and shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

VERSION = 1
KINDS = ("begin_run", "event", "end", "batch", "ready", "heartbeat", "result", "errors", "ack")
DTYPE_KINDS = "biuf"        # bool, signed, unsigned, float: no objects, no strings
MAX_NDIM = 8


class ProtocolError(ValueError):
    """A message that cannot be decoded; ``event`` is its event id when readable."""

    def __init__(self, message: str, event: int | None = None):
        super().__init__(message)
        self.event = event


@dataclass
class Message:
    header: dict
    arrays: dict[str, np.ndarray]
    frames: list | None = None     # the frames received, to forward without copying
    stacked: dict | None = None    # a batch from shared memory: {det: (n, *shape)}
    problem: str | None = None     # why a batch's frames could not be read

    @property
    def kind(self) -> str:
        return self.header["kind"]


def encode(header: dict, arrays: dict[str, np.ndarray] | None = None) -> list:
    """Frames of one message: the header, then each array's buffer (not copied)."""
    arrays = arrays or {}
    bufs = []
    desc = []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        desc.append([name, a.dtype.str, list(a.shape)])
        bufs.append(memoryview(a).cast("B") if a.size else b"")
    head = {"v": VERSION, **header, "arrays": desc}
    return [msgpack.packb(head, use_bin_type=True), *bufs]


def frame_bytes(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def decode(frames) -> Message:
    """Check and decode a multipart message; raises ProtocolError naming the problem."""
    if not frames:
        raise ProtocolError("empty message")
    try:
        head = msgpack.unpackb(frame_bytes(frames[0]), raw=False, strict_map_key=False)
    except Exception as e:      # msgpack raises several types on garbage
        raise ProtocolError(f"bad header: not msgpack ({type(e).__name__})") from None
    if not isinstance(head, dict):
        raise ProtocolError("bad header: not a map")
    event = head.get("event") if isinstance(head.get("event"), int) else None
    if head.get("v") != VERSION:
        raise ProtocolError(f"bad header: protocol version {head.get('v')!r}, expected {VERSION}",
                            event)
    if head.get("kind") not in KINDS:
        raise ProtocolError(f"bad header: unknown kind {head.get('kind')!r}", event)
    desc = head.get("arrays", [])
    if not isinstance(desc, list) or len(desc) != len(frames) - 1:
        n = len(desc) if isinstance(desc, list) else "?"
        raise ProtocolError(f"bad header: {n} arrays declared, {len(frames) - 1} frames sent",
                            event)
    arrays = {}
    for d, frame in zip(desc, frames[1:]):
        name, dtype, shape = check_descriptor(d, event)
        buf = frame_bytes(frame)
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if buf.nbytes != expected:
            raise ProtocolError(f"array {name!r}: {buf.nbytes} bytes for {dtype} {tuple(shape)}, "
                                f"expected {expected} (truncated?)", event)
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if expected else \
            np.zeros(shape, dtype)
    return Message(head, arrays, list(frames))


def check_descriptor(d, event):
    try:
        name, dtype, shape = d
        dtype = np.dtype(dtype)
        shape = [int(s) for s in shape]
    except Exception:
        raise ProtocolError(f"bad header: array descriptor {d!r}", event) from None
    if dtype.kind not in DTYPE_KINDS or not isinstance(name, str):
        raise ProtocolError(f"bad header: array {name!r} of dtype {dtype} is not allowed", event)
    if len(shape) > MAX_NDIM or any(s < 0 for s in shape):
        raise ProtocolError(f"bad header: array {name!r} has shape {shape}", event)
    return name, dtype, shape


def pack(header: dict, descriptors: list, frames: list) -> list:
    """A message from a header and already-received frames (with their descriptors
    [name, dtype, shape]), so that the frames travel on without copies."""
    head = {"v": VERSION, **header, "arrays": descriptors}
    return [msgpack.packb(head, use_bin_type=True), *frames]

