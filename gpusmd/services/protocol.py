"""The wire protocol (DESIGN §3): a msgpack header, then one frame per array.

    frame 0   msgpack map: {"v": 1, "kind": str, ..., "arrays": [[name, dtype, shape], ...]}
    frame i   the raw bytes of array i - 1 (C order), sent and received without copies

Kinds (what a service sends -> to whom):
    begin_run  publisher -> ingest -> workers, sink   run, experiment, source, n_events,
               detectors {name: {type, dtype, shape}}, scalars {name: dtype};
               arrays: epix10k control bits "<det>/control_bits/<step>"; from the
               publisher optionally end_token (a secret of its own, which its end
               echoes; never passed on); to the sink also key, the run's secret (see
               batch_token)
    event      publisher -> ingest    run, event, timestamp, scalars {name: value},
               steps {det: step}; arrays: one raw frame per detector, named by detector
    end        publisher -> ingest    run, n_events (the events sent), end_token (the
               begin_run's, when it had one)
               ingest -> sink, workers  run, key, n_batches, n_events, n_errors
    batch      ingest -> worker       run, batch, token, events [{event, timestamp,
               scalars, steps}]; arrays: the events' frames, named "<index>/<det>"; or,
               to a worker on the ingest's host, none and "shm": where the frames lie
               (services/shm.py)
    ready      worker -> ingest       worker, credit (batches it can take more), host (the
               shared memory it sees, services/shm.host_key), join (true: credit is all
               it can take, it holds no batch)
    heartbeat  worker -> ingest       worker
    rejoin     ingest -> worker       the ingest had dropped the worker: it says ready
               again (join)
    result     worker -> sink         run, batch, token, worker, events, timestamps,
               scalars {name: [values]}, errors [[event, reason]]; arrays: per-event
               columns "<det>/<field>" and per-batch sums "sums/<det>/<key>"
    errors     ingest -> sink         run, key, errors [[event, stage, reason]]
    heartbeat  ingest -> sink         run, key, n_batches (made so far), n_events: the
               ingest of the open run is alive (every heartbeat_s)
    ack        sink -> ingest         batch, token (the ack's, see batch_token)
    preview    sink -> monitors       a reduced-rate view of the open run (services/preview.py)
    hello      sink -> ingest         a sink has started: the ingest sends it the open
               run's begin_run (with its key) and the batches not yet acknowledged again

Never pickle: a message from the network is data. Array dtypes are restricted to plain
numbers, and every frame's size is checked against its declared dtype and shape (in
Python integers: no overflow). Every field a service uses is checked here first (type
and range): a message that fails is refused with the reason, never half used.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass
from functools import lru_cache

import msgpack
import numpy as np

from ..errors import GpusmdError
from ..features import RAGGED_SEP
from ..runinfo import RunInfo

VERSION = 1
KINDS = ("begin_run", "event", "end", "batch", "ready", "heartbeat", "rejoin", "result",
         "errors", "ack", "hello", "preview")
DTYPE_KINDS = "biuf"        # bool, signed, unsigned, float: no objects, no strings
MAX_NDIM = 8
MAX_ELEMENTS = 1 << 40      # of one array, its zero-length axes left out
MAX_NAME = 256              # characters of an array, detector or scalar name
MAX_DETECTORS = 64
MAX_SCALARS = 4096
MAX_PIXELS = 1 << 26        # of one detector (a declared camera shape)
REASON_CHARS = 200          # of a reason (what /errors keeps)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
EXPERIMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")   # part of a file name


class ProtocolError(ValueError):
    """A message that cannot be used; ``event`` is its event id when readable (an int64)."""

    def __init__(self, message: str, event: int | None = None):
        super().__init__(message[:REASON_CHARS])
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


def is_int(value, lo: int = 0, hi: int = INT64_MAX) -> bool:
    """An integer in [lo, hi] (a bool is not one)."""
    return type(value) is int and lo <= value <= hi


def short(value, n: int = 40) -> str:
    """A peer's value in a message: its repr, cut."""
    r = repr(value)
    return r if len(r) <= n else r[:n] + "..."


def check_int(value, what: str, lo: int = 0, hi: int = INT64_MAX, event=None) -> int:
    if not is_int(value, lo, hi):
        raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}], got {short(value)}",
                            event)
    return value


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
    event = head.get("event") if is_int(head.get("event")) else None
    if not is_int(head.get("v"), VERSION, VERSION):
        raise ProtocolError(f"bad header: protocol version {short(head.get('v'))}, expected "
                            f"{VERSION}", event)
    if not isinstance(head.get("kind"), str) or head["kind"] not in KINDS:
        raise ProtocolError(f"bad header: unknown kind {short(head.get('kind'))}", event)
    desc = head.get("arrays", [])
    if not isinstance(desc, list) or len(desc) != len(frames) - 1:
        n = len(desc) if isinstance(desc, list) else "?"
        raise ProtocolError(f"bad header: {n} arrays declared, {len(frames) - 1} frames sent",
                            event)
    arrays = {}
    for d, frame in zip(desc, frames[1:]):
        name, dtype, shape = check_descriptor(d, event)
        if name in arrays:
            raise ProtocolError(f"bad header: array {short(name)} declared twice", event)
        buf = frame_bytes(frame)
        expected = math.prod(shape) * dtype.itemsize
        if buf.nbytes != expected:
            raise ProtocolError(f"array {short(name)}: {buf.nbytes} bytes for {dtype} "
                                f"{tuple(shape)}, expected {expected} (truncated?)", event)
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if expected else \
            np.zeros(shape, dtype)
    return Message(head, arrays, list(frames))


def check_descriptor(d, event):
    """[name, dtype, shape] of an array -> (name, np.dtype, shape), or ProtocolError."""
    if not (isinstance(d, list) and len(d) == 3 and isinstance(d[0], str)
            and isinstance(d[1], str) and isinstance(d[2], list)):
        raise ProtocolError(f"bad header: array descriptor {short(d)}", event)
    name, dtype, shape = d
    try:
        dtype = np.dtype(dtype)
    except Exception:
        raise ProtocolError(f"bad header: array descriptor {short(d)}", event) from None
    if dtype.kind not in DTYPE_KINDS or len(name) > MAX_NAME:
        raise ProtocolError(f"bad header: array {short(name)} of dtype {dtype} is not allowed",
                            event)
    if (len(shape) > MAX_NDIM or not all(is_int(s) for s in shape)
            or math.prod(max(s, 1) for s in shape) > MAX_ELEMENTS):
        raise ProtocolError(f"bad header: array {short(name)} has shape {short(shape)}", event)
    return name, dtype, shape


def pack(header: dict, descriptors: list, frames: list) -> list:
    """A message from a header and already-received frames (with their descriptors
    [name, dtype, shape]), so that the frames travel on without copies."""
    head = {"v": VERSION, **header, "arrays": descriptors}
    return [msgpack.packb(head, use_bin_type=True), *frames]


def batch_token(key: str, run: int, batch: int, ack: bool = False) -> str:
    """A MAC of (run, batch) under the run's key, which only the ingest and the sink hold.
    The batch's token goes in the batch and the worker's result: a result from someone
    the batch was not sent to is refused. With ``ack``, the token of the sink's ack: the
    ingest takes an ack only from who holds the key (not even a worker can make it)."""
    what = "ack" if ack else "batch"
    return hmac.new(key.encode(), f"{what}/{run}/{batch}".encode(),
                    hashlib.sha256).hexdigest()[:32]


def file_token(key: str, run: int) -> str:
    """What a run's file holds of the run's key (a MAC, not the key): a sink started
    again knows the file of the run it is sent again by the same ingest."""
    return hmac.new(key.encode(), f"file/{run}".encode(), hashlib.sha256).hexdigest()[:32]


def same_secret(a, b) -> bool:
    """Two keys or tokens equal (in constant time); False unless both are strings."""
    return isinstance(a, str) and isinstance(b, str) and hmac.compare_digest(a.encode(),
                                                                             b.encode())


# ---- the fields of each kind ----------------------------------------------------------

def end_token(header: dict) -> str | None:
    """The begin_run's end_token (None when it has none): a string of 16 to MAX_NAME
    characters; ProtocolError otherwise."""
    token = header.get("end_token")
    if token is None:
        return None
    if not (isinstance(token, str) and 16 <= len(token) <= MAX_NAME):
        raise ProtocolError(f"begin_run: end_token must be a string of 16 to {MAX_NAME} "
                            f"characters, got {short(token)}")
    return token


def run_info(msg: Message) -> RunInfo:
    """The RunInfo of a begin_run message, every field checked; ProtocolError otherwise."""
    h = msg.header
    check_int(h.get("run"), "begin_run: run")
    dets = h.get("detectors")
    if not isinstance(dets, dict) or not 0 < len(dets) <= MAX_DETECTORS:
        raise ProtocolError(f"begin_run: detectors must be a map of 1 to {MAX_DETECTORS} "
                            f"detectors, got {short(dets)}")
    for name, d in dets.items():
        if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME and isinstance(d, dict)
                and isinstance(d.get("type"), str) and isinstance(d.get("shape", []), list)
                and all(is_int(s, 1, MAX_PIXELS) for s in d.get("shape", []))):
            raise ProtocolError(f"begin_run: detector {short(name)}: {short(d)}")
    scalars = h.get("scalars") or {}
    if not isinstance(scalars, dict) or len(scalars) > MAX_SCALARS:
        raise ProtocolError(f"begin_run: scalars must be a map name -> dtype, got {short(scalars)}")
    for name, dtype in scalars.items():
        if not (isinstance(name, str) and len(name) <= MAX_NAME and isinstance(dtype, str)
                and scalar_kind(dtype) is not None):
            raise ProtocolError(f"begin_run: scalar {short(name)} of dtype {short(dtype)}")
    if h.get("n_events") is not None:
        check_int(h["n_events"], "begin_run: n_events")
    for key in ("experiment", "source"):
        if not isinstance(h.get(key, ""), str) or len(h.get(key, "")) > 4096:
            raise ProtocolError(f"begin_run: {key} must be a string, got {short(h.get(key))}")
    experiment = h.get("experiment", "")
    if experiment and not EXPERIMENT.fullmatch(experiment):
        raise ProtocolError(f"begin_run: experiment {short(experiment)} is not a name "
                            f"(letters, digits, _ . -)")
    for key in msg.arrays:
        det, _, step = key.rpartition("/control_bits/")
        if det not in dets or not step.isdigit() or len(step) > 18:
            raise ProtocolError(f"begin_run: array {short(key)} is not "
                                f"<detector>/control_bits/<step>")
    try:
        info = RunInfo.from_message(h, msg.arrays)
    except GpusmdError as e:
        raise ProtocolError(str(e)) from None
    for det, model in info.detectors.items():
        if model.npix > MAX_PIXELS:
            raise ProtocolError(f"begin_run: {det}: {model.npix} pixels, at most {MAX_PIXELS}")
        for step, cb in info.control_bits.get(det, {}).items():
            if cb.dtype != np.uint8 or cb.size != model.npix:
                raise ProtocolError(f"begin_run: {det}: control bits of step {step} are "
                                    f"{cb.dtype} {cb.shape}, a {model.type} takes uint8 "
                                    f"{model.shape}")
    return info


@lru_cache(maxsize=64)
def scalar_kind(dtype: str):
    """(kind, lo, hi) of a scalar dtype ("b", "i", "u", "f"), None when not allowed."""
    try:
        dt = np.dtype(dtype)
    except Exception:
        return None
    if dt.kind in "iu":
        return "i", int(np.iinfo(dt).min), int(np.iinfo(dt).max)
    if dt.kind == "f" and dt.itemsize <= 8:
        return "f", -float(np.finfo(dt).max), float(np.finfo(dt).max)
    if dt.kind == "b":
        return "b", 0, 1
    return None


def fits(value, dtype: str) -> bool:
    """A scalar value fits its declared dtype: an int in the integer's range, a number
    a float can hold (or inf, nan), 0 or 1 for a bool. A bool is 0 or 1 in any of them
    (unlike an id, a count or a step, where a bool is refused)."""
    kind, lo, hi = scalar_kind(dtype)
    if type(value) is bool:
        return True
    if kind == "b":
        return is_int(value, 0, 1)
    if kind == "i":
        return is_int(value, lo, hi)
    if type(value) is int:
        return lo <= value <= hi       # compared exactly: no float conversion overflows
    return type(value) is float and (not math.isfinite(value) or lo <= value <= hi)


def event_entry(msg: Message, info: RunInfo) -> dict:
    """An event message's entry in its batch ({event, timestamp, scalars, steps}, every
    field checked against the run); ProtocolError naming the first problem."""
    h = msg.header
    event = h.get("event") if is_int(h.get("event")) else None
    if not is_int(h.get("run"), info.run, info.run):
        raise ProtocolError(f"event of run {short(h.get('run'))}, but run {info.run} is open",
                            event)
    check_int(h.get("event"), "event id")
    check_int(h.get("timestamp"), "timestamp", INT64_MIN, event=event)
    unknown = set(msg.arrays) - set(info.detectors)
    if unknown:
        raise ProtocolError(f"unknown detector(s) {short(sorted(unknown))}", event)
    for det, model in info.detectors.items():
        a = msg.arrays.get(det)
        if a is None:
            raise ProtocolError(f"no frame of detector {det!r}", event)
        if a.shape != model.shape or a.dtype != np.dtype(model.dtype):
            raise ProtocolError(f"{det}: frame {a.dtype} {a.shape}, a {model.type} sends "
                                f"{model.dtype} {model.shape}", event)
    scalars = h.get("scalars") or {}
    if not isinstance(scalars, dict):
        raise ProtocolError(f"scalars must be a map, got {short(scalars)}", event)
    missing = [n for n in info.scalars if n not in scalars]
    if missing:
        raise ProtocolError(f"missing scalar(s) {short(missing)}", event)
    for name, dtype in info.scalars.items():
        if not fits(scalars[name], dtype):
            raise ProtocolError(f"scalar {name}: {short(scalars[name])} does not fit its "
                                f"dtype {np.dtype(dtype)}", event)
    steps = h.get("steps") or {}
    if not isinstance(steps, dict) or not set(steps) <= set(info.detectors):
        raise ProtocolError(f"steps must be a map detector -> config step, got {short(steps)}",
                            event)
    steps = {det: steps.get(det, 0) for det in info.detectors}
    for det, step in steps.items():
        check_int(step, f"{det}: config step", event=event)
        if info.detectors[det].family == "epix10k" and step not in info.control_bits.get(det, {}):
            raise ProtocolError(f"{det}: no control bits for config step {step}", event)
    return {"event": h["event"], "timestamp": h["timestamp"],
            "scalars": {n: scalars[n] for n in info.scalars}, "steps": steps}


def check_batch(header: dict, infos: dict):
    """A batch header's fields (the worker's check: the ingest made them); ``infos``: the
    runs the worker knows, {run: RunInfo}."""
    info = infos.get(check_int(header.get("run"), "batch: run"))
    check_int(header.get("batch"), "batch: batch")
    if not isinstance(header.get("token"), str):
        raise ProtocolError("batch: no token")
    events = header.get("events")
    if not isinstance(events, list):
        raise ProtocolError("batch: events must be a list")
    for e in events:
        if not (isinstance(e, dict) and is_int(e.get("event")) and is_int(e.get("timestamp"),
                                                                            INT64_MIN)
                and isinstance(e.get("scalars"), dict) and isinstance(e.get("steps"), dict)
                and all(is_int(s) for s in e["steps"].values())
                and (info is None or all(n in e["scalars"] for n in info.scalars))):
            raise ProtocolError(f"batch: bad event entry {short(e)}")


def check_records(records) -> str | None:
    """Error records [[event (-1: unknown), stage, reason], ...]: None when well formed."""
    if not isinstance(records, list):
        return f"error records must be a list, got {short(records)}"
    for r in records:
        if not (isinstance(r, list) and len(r) == 3 and is_int(r[0], -1)
                and isinstance(r[1], str) and isinstance(r[2], str)):
            return f"bad error record {short(r)}"
    return None


def check_result(msg: Message, info: RunInfo, sum_shapes: dict) -> str | None:
    """Why a worker's result cannot be written (None when it can): its events, timestamps
    and scalars, one row each; its per-event columns, one row per event (variable-length
    ones as many records as their lengths say); its sums ``sum_shapes`` {name: shape}."""
    h = msg.header
    events, timestamps = h.get("events"), h.get("timestamps")
    if not isinstance(events, list) or not all(is_int(e) for e in events):
        return f"event ids must be integers in [0, {INT64_MAX}]"
    n = len(events)
    if (not isinstance(timestamps, list) or len(timestamps) != n
            or not all(is_int(t, INT64_MIN) for t in timestamps)):
        return f"timestamps must be {n} int64"
    scalars = h.get("scalars")
    if not isinstance(scalars, dict):
        return "scalars must be a map"
    for name, dtype in info.scalars.items():
        values = scalars.get(name)
        if not isinstance(values, list) or len(values) != n or not all(fits(v, dtype)
                                                                       for v in values):
            return f"scalar {name}: {n} values of dtype {np.dtype(dtype)} expected"
    problem = check_records(h.get("errors", []))
    if problem:
        return problem
    if not is_int(h.get("n_sum_events", n)) or not isinstance(h.get("backend", ""), str):
        return "n_sum_events must be an integer, backend a string"
    ragged: dict[str, dict] = {}
    for name, a in msg.arrays.items():
        if name.startswith("sums/"):
            if name not in sum_shapes or a.shape != sum_shapes[name]:
                return f"sum {short(name)}: {a.shape}, expected {sum_shapes.get(name)}"
        elif RAGGED_SEP in name:
            column, field = name.split(RAGGED_SEP, 1)
            ragged.setdefault(column, {})[field] = a
        elif a.ndim == 0 or len(a) != n:
            return f"column {short(name)}: shape {a.shape} for {n} events"
    for column, parts in ragged.items():
        lengths = parts.pop("len", None)
        if lengths is None or lengths.shape != (n,) or lengths.dtype.kind not in "iu" or \
                (n and lengths.min() < 0):
            return f"column {short(column)}: no per-event lengths"
        total = sum(lengths.tolist())          # Python integers: no overflow
        if any(a.ndim == 0 or len(a) != total for a in parts.values()):
            return f"column {short(column)}: records of {total} expected"
    return None


def result_layout(msg: Message) -> dict:
    """What must stay the same from batch to batch of a run: the per-event arrays' names
    and row shapes."""
    return {name: a.shape[1:] for name, a in msg.arrays.items() if not name.startswith("sums/")}
