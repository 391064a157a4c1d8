"""A psana2 run as a gpusmd run (the interface of gpusmd.io.source).

Opened from an XTC2 file, a directory of them, or a psana DataSource string
(``exp=mfx101332224:run=7[:dir=/path/xtc]``, ``shmem=NAME`` at the DAQ), always with
``skip_calib_load='all'``: psana's calibration database is only asked for where gpusmd
takes its constants from it (``calib_constants``).

- Detectors are found by their psana type (PSANA_TYPES): an epix10ka with 4 / 16
  panels is an epix10kquad / epix10k2M, a Jungfrau with 1 / 2 / 8 modules a jungfrau05M /
  1M / 4M, an epix100 an epix100. Frames are ``det.raw.raw(evt)``, segments in psana's
  order, which is gpusmd's raw order.
- Configuration steps are psana's steps, numbered 0, 1, ... ; an epix10ka's control
  bits of a step come from its configuration at that step (Configure, updated by the
  step's BeginStep), decoded with psana's ASIC order (psana_layout).
- Per-event scalars are the rank-0 numeric fields of every other detector of the run
  (generic containers, BLD such as ebeam or gmd): ``<det>/<field>`` (``<det>/<class>_<field>``
  for data classes other than raw). A value missing from an event is NaN (integers: 0),
  and counted.
- Event ids: those of the ``gpusmd`` detector where the run has one (runs written by
  gpusmd.io.xtc2), else the event's index in the run, 0, 1, 2, ...; timestamps are
  psana's, converted to ns since the Unix epoch.
- An event that lacks a frame (a segment missing, damage) is skipped and recorded in the
  next batch's ``errors``; events are only counted when the run has been read to its end.
- psana's C++ prints its read errors on stdout (fd 1): while psana opens the run and
  reads each datagram, fd 1 goes to a temporary file (psana_stdout). What it said is put
  in the error where opening fails (an unreadable file: "no XTC2 datagram at its start"),
  else logged; a run whose reading ends in a datagram read error (a file cut short: psana
  ends the run there as if it were complete) gets an ``errors`` row (event id -1, stage
  ``read``) and a warning.
- ``shmem=NAME``: psana waits, in C and deaf to signals, for the DAQ monitor's POSIX
  message queue ``/PdsFromMonitorDiscovery_NAME``; without it on this host the source is
  refused at once.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import io
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..detectors import DetectorModel, epix10k_control_bits, get_detector
from ..errors import RawFileError
from .psana_layout import (DETTYPE_ALIASES, EVENT_ID_DETECTOR, EVENT_ID_FIELD,
                           PSANA_TYPE_BY_DETTYPE, panel_from_psana_asics,
                           psana_time_to_ns, trbit_from_psana)
from .source import EventBatch

log = logging.getLogger("gpusmd.psana")

SOURCE_KEYS = {"exp": str, "run": int, "dir": str, "shmem": str}
# psana's own bookkeeping detectors, never per-event scalars
NOT_SCALARS = {"runinfo", "scan", "step_value", "step_docstring", "epicsinfo", "pvdetinfo",
               EVENT_ID_DETECTOR}
_NUMERIC_TYPES = {0: np.uint8, 1: np.uint16, 2: np.uint32, 3: np.uint64, 4: np.int8,
                  5: np.int16, 6: np.int32, 7: np.int64, 8: np.float32, 9: np.float64}


# ---- psana's stdout ------------------------------------------------------------------------
_STDOUT_LOCK = threading.RLock()     # one fd 1 per process: captures never overlap
_stdout_state = {"depth": 0, "tmp": None}
READ_ERROR_WORDS = ("read error", "Problem reading dgram")
_END = object()


def _c_fflush():
    try:
        return ctypes.CDLL(None).fflush
    except (OSError, AttributeError):
        return None


_FFLUSH = _c_fflush()


def _flush_stdout():
    """Python's and C's stdout buffers out to fd 1 (psana's C++ prints through C stdio)."""
    try:
        sys.stdout.flush()
    except Exception:            # a closed or odd sys.stdout: nothing of ours to flush
        pass
    if _FFLUSH is not None:
        _FFLUSH(None)


@contextlib.contextmanager
def psana_stdout(said: list):
    """fd 1 into a temporary file while psana works; what was written there meanwhile
    (psana's C++ and Python prints, one line, whitespace collapsed) is appended to
    ``said``. fd 1 is restored on every path; a capture inside another is the outer
    one's. Process-wide (one fd 1): another thread's print meanwhile lands in ``said``."""
    with _STDOUT_LOCK:
        st = _stdout_state
        outer = st["depth"] == 0
        st["depth"] += 1
        saved = py_stdout = buf = None
        try:
            if outer:
                _flush_stdout()
                if st["tmp"] is None:
                    st["tmp"] = tempfile.TemporaryFile()
                try:
                    saved = os.dup(1)
                except OSError:          # no fd 1 at all: nothing to keep clean
                    saved = None
                if saved is not None:
                    os.dup2(st["tmp"].fileno(), 1)
                # psana's Python prints go to sys.stdout, which need not be fd 1
                buf = io.StringIO()
                py_stdout, sys.stdout = sys.stdout, buf
            yield said
        finally:
            st["depth"] -= 1
            if outer:
                printed = buf.getvalue() if buf is not None else ""
                if buf is not None:
                    sys.stdout = py_stdout
                if saved is not None:
                    _flush_stdout()
                    os.dup2(saved, 1)
                    os.close(saved)
                text = " ".join(f"{_take(st['tmp'].fileno())} {printed}".split())
                if text:
                    said.append(text)


def _take(fd: int) -> str:
    """The text in the file ``fd`` (whitespace collapsed), the file emptied."""
    if not os.fstat(fd).st_size:
        return ""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    return " ".join(b"".join(chunks).decode(errors="replace").split())


def _psana_error(e: BaseException) -> BaseException:
    """The error psana raised: the one under psana's own failure to log it (its
    singlefile_ds calls a ``logger.exception`` its Logger lacks)."""
    while isinstance(e, AttributeError) and "'Logger' object" in str(e) \
            and e.__context__ is not None:
        e = e.__context__
    return e


# ---- the DAQ's shared memory ---------------------------------------------------------------
def daq_queue(name: str) -> str:
    """The POSIX message queue a psana shmem client waits for (psana's ShmemClient)."""
    return f"/PdsFromMonitorDiscovery_{name}"


def daq_queue_exists(name: str) -> bool | None:
    """Whether the DAQ monitor's discovery queue of ``name`` is on this host (None: it
    cannot be told here, no mq_open)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        mq_open = libc.mq_open
    except (OSError, AttributeError):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("rt"), use_errno=True)
            mq_open = libc.mq_open
        except (OSError, AttributeError, TypeError):
            return None
    mq_open.restype, mq_open.argtypes = ctypes.c_int, [ctypes.c_char_p, ctypes.c_int]
    fd = mq_open(daq_queue(name).encode(), os.O_RDONLY | os.O_NONBLOCK)
    if fd == -1:
        err = ctypes.get_errno()
        return False if err == errno.ENOENT else None
    libc.mq_close(fd)
    return True


def _import_psana():
    try:
        from psana import DataSource
    except ImportError as e:
        raise RawFileError(f"reading psana runs needs psana (pip install 'gpusmd[psana]', "
                           f"after apt-get install libkrb5-dev): {e}") from None
    return DataSource


def datasource_kwargs(source) -> dict:
    """psana DataSource arguments of a gpusmd source string; refused when it cannot be."""
    s = str(source)
    p = Path(s)
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.xtc2") if not f.name.endswith(".smd.xtc2"))
        if not files:
            raise RawFileError(f"{s}: no .xtc2 files in this directory")
        return {"files": files if len(files) > 1 else files[0]}
    if s.endswith(".xtc2"):
        if not p.exists():
            raise RawFileError(f"{s}: XTC2 file not found")
        return {"files": s}
    kwargs = {}
    for part in s.split(":"):
        key, eq, value = part.partition("=")
        if not eq or key not in SOURCE_KEYS:
            raise RawFileError(f"{s}: not a psana source: {part!r} is not one of "
                               f"{', '.join(k + '=...' for k in SOURCE_KEYS)}")
        try:
            kwargs[key] = SOURCE_KEYS[key](value)
        except ValueError:
            raise RawFileError(f"{s}: {key}={value!r} is not a number") from None
    if "shmem" not in kwargs and not {"exp", "run"} <= set(kwargs):
        raise RawFileError(f"{s}: a psana source needs exp= and run= (or shmem=)")
    return kwargs


class PsanaRun:
    """An open psana2 run (see the module docstring)."""

    def __init__(self, source, detectors=None, open_datasource=None):
        self.source = str(source)
        self.name = Path(self.source).name if "=" not in self.source else self.source
        self._kwargs = datasource_kwargs(self.source)
        self._open_datasource = open_datasource or _import_psana()
        self.live = "shmem" in self._kwargs
        self._ds, self._run = self._open()
        self._used = False            # the run has been iterated: a new pass opens it again
        self.run = int(self._run.runnum)
        self.experiment = str(self._run.expt or "")
        self.detectors: dict[str, DetectorModel] = {}
        self._dets = {}
        self._find_detectors(detectors)
        self._scalars = self._find_scalars()
        self.scalar_dtypes = {n: np.dtype(t) for n, (_, t) in self._scalars.items()}
        self.n_events: int | None = None
        self.missing_scalars: dict[str, int] = {}
        self._bits: dict[str, dict[int, np.ndarray]] = {d: {} for d in self.detectors}
        self._all_steps_known = False
        self.read_error: str | None = None     # psana's datagram read error (_read)
        self._said_cut = False
        self._said: set[str] = set()           # what psana printed, logged once

    # ---- opening -----------------------------------------------------------------------
    def _open(self):
        if self.live and daq_queue_exists(self._kwargs["shmem"]) is False:
            raise RawFileError(f"{self.source}: no DAQ shared memory "
                               f"{self._kwargs['shmem']!r} on this host (no "
                               f"{daq_queue(self._kwargs['shmem'])} queue): is the DAQ's "
                               f"monitor running?")
        said: list[str] = []         # psana's words: its error, what it printed
        failure = None
        with psana_stdout(said):
            try:
                ds = self._open_datasource(**self._kwargs, skip_calib_load="all")
                runs = ds.runs()
            except Exception as e:   # psana raises many kinds; each is one line here
                failure = self._unreadable(_psana_error(e), said)
            else:
                try:
                    run = next(runs)
                except StopIteration:
                    failure = "psana finds no run in it"
                except Exception as e:
                    failure = self._unreadable(_psana_error(e), said)
        if failure is not None:
            raise RawFileError(f"{self.source}: {failure}"
                               + (f" (psana: {'; '.join(said)})" if said else ""))
        if said:
            log.warning("%s: psana printed: %s", self.source, "; ".join(said))
        return ds, run

    def _unreadable(self, e: BaseException, said: list) -> str:
        """Why psana could not open the source, in plain words; psana's own in ``said``."""
        files = self._kwargs.get("files")
        files = [files] if isinstance(files, str) else files or []
        if isinstance(e, StopIteration):        # psana's "no datagram could be read"
            why = str(e).replace(" -- Success", "")     # errno 0 said as a reason
            if why:
                said.insert(0, why)
            if files and all(os.path.getsize(f) == 0 for f in files):
                return "psana cannot read it: the file is empty"
            return "psana cannot read it: no XTC2 datagram at its start"
        return f"psana cannot read it: {type(e).__name__}: {e}"

    def _find_detectors(self, wanted):
        names = sorted({name for name, drp in self._run.detinfo if drp == "raw"})
        for name in names if wanted is None else wanted:
            if name not in names:
                raise RawFileError(f"{self.source}: no detector {name!r} (area detectors "
                                   f"in the run: {', '.join(self._area_names(names)) or 'none'})")
            model = self._model(name, required=wanted is not None)
            if model is not None:
                self.detectors[name] = model

    def _area_names(self, names):
        return [n for n in names if self._dettype(n) in PSANA_TYPE_BY_DETTYPE]

    def _dettype(self, name):
        try:
            raw = self._psana_det(name).raw
        except Exception:
            return None
        dettype = str(getattr(raw, "_dettype", ""))
        return DETTYPE_ALIASES.get(dettype, dettype)

    def _psana_det(self, name):
        if name not in self._dets:
            self._dets[name] = self._run.Detector(name)
        return self._dets[name]

    def _model(self, name, required: bool) -> DetectorModel | None:
        dettype = self._dettype(name)
        kind = PSANA_TYPE_BY_DETTYPE.get(dettype)
        if kind is None:
            if required:
                raise RawFileError(f"{self.source}: detector {name!r} is a {dettype!r}; gpusmd "
                                   f"reads {', '.join(PSANA_TYPE_BY_DETTYPE)} detectors")
            return None
        nseg = len(self._psana_det(name).raw._sorted_segment_inds)
        type_ = kind.types_by_nseg.get(nseg)
        if type_ is None:
            raise RawFileError(f"{self.source}: detector {name!r}: an {dettype} with {nseg} "
                               f"segments is not a gpusmd detector (known: " + ", ".join(
                                   f"{n} = {t}" for n, t in kind.types_by_nseg.items()) + ")")
        return get_detector(type_)

    def _find_scalars(self) -> dict[str, tuple]:
        """{name: ((det, class, field), dtype)} of the per-event scalars."""
        out = {}
        softwares = [getattr(c, "software", None) for c in self._run.configs]   # one a stream
        for det, drp in sorted(self._run.detinfo):
            if det in self.detectors or det in NOT_SCALARS or drp == "raw" and \
                    self._dettype(det) in PSANA_TYPE_BY_DETTYPE:
                continue
            segments = next((getattr(sw, det) for sw in softwares if hasattr(sw, det)), {})
            for seg in segments.values() if isinstance(segments, dict) else ():
                fields = getattr(seg, drp, None)
                for field, desc in (vars(fields).items() if fields is not None else ()):
                    t = _NUMERIC_TYPES.get(getattr(desc, "_type", None))
                    if t is None or getattr(desc, "_rank", None) != 0:
                        continue
                    name = f"{det}/{field}" if drp in ("raw", "container_xtc1dump") \
                        else f"{det}/{drp}_{field}"
                    out[name] = ((det, drp, field), t)
                break
        return out

    # ---- configuration steps -----------------------------------------------------------
    def _record_step(self, step: int):
        """Decode the epix10k control bits of the step psana is at now."""
        for det, model in self.detectors.items():
            if model.family != "epix10k" or step in self._bits[det]:
                continue
            configs = self._psana_det(det).raw._seg_configs()
            segs = self._psana_det(det).raw._sorted_segment_inds
            try:
                pc = np.stack([panel_from_psana_asics(configs[s].config.asicPixelConfig)
                               for s in segs])
                tr = np.stack([trbit_from_psana(configs[s].config.trbit) for s in segs])
            except (AttributeError, KeyError, ValueError) as e:
                raise RawFileError(f"{self.source}: {det}: no usable epix10ka configuration "
                                   f"at step {step} ({type(e).__name__}: {e})") from None
            self._bits[det][step] = epix10k_control_bits(pc, tr)

    def control_bits(self, det: str, step: int = 0) -> np.ndarray | None:
        if self.detectors[det].family != "epix10k":
            return None
        if step not in self._bits[det]:
            if step == 0 and not self._bits[det]:
                self._record_step(0)      # the Configure transition's configuration
            else:
                self.step_control_bits(det)
        if step not in self._bits[det]:
            raise RawFileError(f"{self.source}: {det}: the run has no configuration step {step}")
        return self._bits[det][step]

    def step_control_bits(self, det: str) -> dict[int, np.ndarray]:
        """Every step's control bits, read with one pass over the run's transitions (a
        live shmem source has only what Configure says: step 0)."""
        if self.detectors[det].family != "epix10k":
            return {}
        if not self._all_steps_known:
            if self.live:
                self._record_step(0)
            else:
                for k, _ in enumerate(self._read(self._fresh_run().steps())):
                    self._record_step(k)
            self._all_steps_known = True
        return dict(self._bits[det])

    # ---- events --------------------------------------------------------------------------
    def _fresh_run(self):
        """The psana run at its start, opened again if it has been iterated."""
        if self._used:
            if self.live:
                raise RawFileError(f"{self.source}: a live source is read once")
            self._ds, self._run = self._open()
            self._dets = {}
        self._used = True
        return self._run

    def _events(self, run):
        """(step, evt) of every event, from the start of the run."""
        self.read_error = None
        for k, step in enumerate(self._read(run.steps())):
            self._record_step(k)
            for evt in self._read(step.events()):
                yield k, evt

    def _read(self, items):
        """The items of one of psana's iterators, each read with psana's stdout captured
        (psana_stdout): a datagram read error it prints is kept in ``read_error`` (psana
        ends the run there as if it were whole), anything else it prints is logged (each
        text once)."""
        items = iter(items)
        while True:
            said: list[str] = []
            with psana_stdout(said):
                item = next(items, _END)
            for text in said:
                if any(w in text for w in READ_ERROR_WORDS):
                    self.read_error = self.read_error or text
                elif text not in self._said:
                    self._said.add(text)
                    log.warning("%s: psana printed: %s", self.source, text)
            if item is _END:
                return
            yield item

    def _cut_short(self, n: int) -> str | None:
        """Why the run read to its end is cut short (a datagram read error), said once."""
        if self.read_error is None:
            return None
        why = (f"psana's reading ended in a datagram read error after {n} events: the run "
               f"is cut short there (psana: {self.read_error})")
        if not self._said_cut:
            log.warning("%s: %s", self.source, why)
            self._said_cut = True
        return why

    def _scalar(self, name, evt):
        (det, drp, field), t = self._scalars[name]
        value = getattr(getattr(self._psana_det(det), drp), field)(evt)
        if value is None:
            self.missing_scalars[name] = self.missing_scalars.get(name, 0) + 1
            return np.nan if np.dtype(t).kind == "f" else 0
        return value

    def count_events(self) -> int:
        """The run's events, counted by reading it through once (frames not read)."""
        if self.n_events is None:
            self.n_events = sum(1 for _ in self._events(self._fresh_run()))
            self._cut_short(self.n_events)
        return self.n_events

    def batches(self, batch_size: int, max_events: int | None = None, detectors=None,
                one_step: bool = False, first: int = 0):
        """The events from the ``first`` to the ``max_events``-th (the end when None)."""
        dets = list(self.detectors) if detectors is None else list(detectors)
        run = self._fresh_run()
        event_id_det = self._event_id_getter(run)
        pending, errors = [], []
        index = 0
        start = first

        def flush():
            nonlocal pending, errors, start
            if not pending and not errors:
                return None
            b = EventBatch(
                start, np.array([p[0] for p in pending], np.int64),
                np.array([p[1] for p in pending], np.int64),
                {n: np.array([p[2][n] for p in pending], self.scalar_dtypes[n])
                 for n in self._scalars},
                {d: (np.stack([p[3][d] for p in pending]) if pending else
                     np.zeros((0, *self.detectors[d].shape), self.detectors[d].dtype))
                 for d in dets},
                {d: np.array([p[4] for p in pending], np.int64) for d in dets}, errors)
            start += len(pending)
            pending, errors = [], []
            return b

        for step, evt in self._events(run):
            if max_events is not None and index >= max_events:
                break
            if index < first:           # another's share (an MPI rank's block)
                index += 1
                continue
            eid = int(event_id_det(evt)) if event_id_det else index
            index += 1
            if one_step and pending and pending[0][4] != step:
                yield flush()
            frames = {}
            for d in dets:
                f = self._psana_det(d).raw.raw(evt)
                if f is None:
                    errors.append((eid, "read", f"{d}: no frame (segments missing)"))
                    break
                frames[d] = np.asarray(f).reshape(self.detectors[d].shape)
            else:
                pending.append((eid, psana_time_to_ns(evt.timestamp),
                                {n: self._scalar(n, evt) for n in self._scalars}, frames, step))
            if len(pending) >= batch_size:
                yield flush()
        else:
            self.n_events = index
            why = self._cut_short(index)
            if why is not None:
                errors.append((-1, "read", why))
        last = flush()
        if last is not None:
            yield last
        if self.missing_scalars:
            log.warning("%s: scalars missing from events (NaN / 0 written): %s", self.source,
                        ", ".join(f"{n} {c}" for n, c in sorted(self.missing_scalars.items())))

    def _event_id_getter(self, run):
        if (EVENT_ID_DETECTOR, "container_xtc1dump") not in run.detinfo:
            return None
        return getattr(self._psana_det(EVENT_ID_DETECTOR).container_xtc1dump, EVENT_ID_FIELD)

    def close(self):
        self._ds = self._run = None
        self._dets = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
