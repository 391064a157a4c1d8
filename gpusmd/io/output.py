"""The small-data output file (DESIGN §9).

Per-event datasets grow along the first axis, chunked along events and compressed;
once-per-run items are written before the first event (/UserDataCfg) or at the end
(/Sums); provenance goes in the root attributes. ``/errors/{event_id, stage, reason}``
records every event that could not be reduced (malformed input, a frame of the wrong
shape, ...).

Every file says whether it is complete: root attribute ``complete`` is 0 from the
moment the file is created and becomes 1 only when the run is over and written
(:meth:`SmallDataWriter.finish`); ``n_events`` and ``n_errors`` count the rows that a
flush has put on disk (all of them in a complete file). :func:`is_complete` reads it.
An existing file is never replaced unless asked (``force``).

The file is written in SWMR mode (readable while it grows with h5py ``swmr=True``) from
:meth:`SmallDataWriter.begin_swmr` on (called as soon as the file's first items are in:
the sink's file opens for SWMR readers from the moment its run begins), else from the
first batch on: the per-event and error datasets exist then and only grow (those of a
layout told to begin_swmr are made empty there; a column that comes later makes the
writer leave SWMR mode for a moment to add it). The run items come at the end, after
``end_swmr`` reopens the file normally.

A full disk is one error (:class:`WriteError`): before each write the free space is
checked, so that the file is closed cleanly, with the events written so far, before the
disk is full; a write that fails anyway (the disk filled by someone else) stops the
file at once, with nothing more written to it."""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import h5py

from ..errors import GpusmdError

CHUNK_BYTES = 1 << 20       # aim for ~1 MiB chunks
MAX_CHUNK_EVENTS = 4096
REASON_LEN = 200            # error reasons are stored as fixed-length strings (SWMR-safe)
ERROR_COLUMNS = {"errors/event_id": np.dtype(np.int64), "errors/stage": np.dtype("S16"),
                 "errors/reason": np.dtype(f"S{REASON_LEN}")}
DISK_RESERVE = 1 << 20      # free space kept for the metadata a clean close writes
H5_ERRORS = (OSError, RuntimeError)     # what h5py raises for a failed HDF5 call


class WriteError(GpusmdError):
    """An output that could not be written (full disk, I/O error): one line naming the
    file, the reason and, for a small-data file, how many events it holds."""

    def __init__(self, path, reason: str, n_events: int | None = None, detail: str = ""):
        self.path, self.reason, self.n_events, self.detail = Path(path), reason, n_events, detail
        after = "" if n_events is None else f" after {n_events} events"
        super().__init__(f"{path}: {reason}{after}{detail}")


@contextmanager
def written_whole(path):
    """A temporary name beside ``path`` to write a file under: renamed to ``path`` when the
    block ends without an error, removed otherwise, so that the file is whole or absent;
    its folder is made if need be. A failure to write it (an OSError about the temporary file or the folder: permission
    denied, a read-only file system, no space left) is one WriteError naming ``path``."""
    path = Path(path)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path, f"cannot make its folder {e.filename or path.parent} "
                               f"({failure_reason(e)})") from None
    try:
        yield part
        os.replace(part, path)
    except OSError as e:
        if not _about(e, part, path):
            raise
        raise WriteError(path, f"cannot write it ({failure_reason(e)})") from None
    finally:
        with suppress(OSError):           # nothing made (read-only), or not removable
            part.unlink(missing_ok=True)


WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                errno.EFBIG, errno.EIO}


def _about(error: OSError, *paths) -> bool:
    """Whether an OSError is a failure to write one of ``paths`` (its folder, or the file
    under a name HDF5 gives in its message), not one of reading an input."""
    names = {str(p) for p in paths} | {Path(p).name for p in paths}
    filename = getattr(error, "filename", None)
    if filename is not None:
        return str(filename) in names or Path(str(filename)).name in names
    text = str(error)
    return any(n in text for n in names) or getattr(error, "errno", None) in WRITE_ERRNOS


@contextmanager
def written_h5(path, nbytes: int = 0, **kw):
    """An HDF5 file (h5py.File(..., "w", **kw)) written whole or not at all: made under
    written_whole's temporary name, then given up (one WriteError, no file) unless its
    disk has room for about ``nbytes`` (what it will hold, as check_room takes it); a
    failed create or write abandons it (nothing more is written to it) and is one
    WriteError naming ``path``. The room is checked before anything is written because
    a write that fails in HDF5 (the disk filled by someone else meanwhile) may leave
    objects that HDF5 cannot close (a crash at exit)."""
    with written_whole(path) as part:
        try:
            f = h5py.File(part, "w", **kw)
        except OSError as e:
            raise WriteError(path, f"cannot create it ({failure_reason(e)})") from None
        errors: list = []
        try:
            check_room(path, nbytes)
            with _h5_errors_caught(errors):
                yield f
                f.flush()               # its last writes, the file still open: a failure
                f.close()               # abandons it (a failed close would crash)
        finally:
            if f.id.valid:              # stopped by an error: nothing more written
                abandon(f)
        if errors:
            raise WriteError(path, f"cannot write it ({failure_reason(errors[0])})")


RUN_FILE = "{experiment}_Run{run:04d}.h5"      # smalldata_tools' name of a run's file


def run_output(output, experiment: str, run: int) -> Path:
    """The small-data file of ``run``: ``output`` as given ({experiment} and {run} filled
    in), or, when it is a directory (existing, or ending in /) or None, smalldata_tools'
    name <experiment>_Run<NNNN>.h5 in it (here)."""
    template = RUN_FILE if output is None else str(output)
    if output is not None and (Path(output).is_dir() or template.endswith(("/", os.sep))):
        template = str(Path(output) / RUN_FILE)
    try:
        return Path(template.format(run=run, experiment=experiment or "run"))
    except (KeyError, IndexError, ValueError) as e:
        raise GpusmdError(f"output {output!r}: only {{experiment}} and {{run}} can be filled "
                          f"in ({e})") from None


def check_new_output(path, force: bool = False) -> Path:
    """An output path that may be written: an existing file is refused unless ``force``."""
    path = Path(path)
    if path.is_dir():
        raise GpusmdError(f"{path}: is a directory, not an output file")
    if path.exists() and not force:
        raise GpusmdError(f"{path} exists (give --force to replace it)")
    return path


def check_room(path, nbytes: int, n_events: int | None = None):
    """Refuse to write about ``nbytes`` to ``path`` where its disk has less free than that
    and DISK_RESERVE: the file is still whole then, and can be closed."""
    free = shutil.disk_usage(Path(path).parent).free
    if free < nbytes + DISK_RESERVE:
        raise WriteError(path, "no space left on device", n_events,
                         f" ({free / 2**20:.1f} MiB free, {(nbytes + DISK_RESERVE) / 2**20:.1f}"
                         f" MiB needed to go on)")


def failure_reason(error: BaseException) -> str:
    """The cause of a failed HDF5 write in a few words (the system's, where it gave one)."""
    errno = getattr(error, "errno", None)
    text = str(error)
    found = re.search(r"error message = '([^']+)'", text)
    if found:
        return found.group(1).lower()
    if errno:
        return os.strerror(errno).lower()
    return text.splitlines()[0] if text else type(error).__name__


def abandon(f: h5py.File):
    """Close ``f`` writing nothing more to its file, after a failed write: whatever HDF5
    still has to write goes to an in-memory file put in its place, so that the close
    succeeds (a failed close leaves HDF5 objects that crash the interpreter at exit)."""
    if not f.id.valid:
        return
    with _h5_errors_caught([]):
        fd = f.id.get_vfd_handle()
        void = (os.memfd_create("gpusmd-abandoned") if hasattr(os, "memfd_create")
                else os.open(os.devnull, os.O_WRONLY))
        os.dup2(void, fd)
        os.close(void)
        f.close()


@contextmanager
def _h5_errors_caught(errors: list):
    """Collect HDF5 failures into ``errors``: raised ones, and those h5py only reports as
    "Exception ignored" (a write that fails when h5py frees an object)."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: (errors.append(u.exc_value)
                                    if isinstance(u.exc_value, H5_ERRORS) else previous(u))
    try:
        yield
    except H5_ERRORS as e:
        errors.append(e)
    finally:
        sys.unraisablehook = previous


@contextmanager
def h5_writes(f: h5py.File, path, n_events: int | None = None):
    """Writes to the open file ``f``: a failure abandons the file (nothing more is written
    to it) and raises one WriteError."""
    errors: list = []
    with _h5_errors_caught(errors):
        yield
    if errors:
        abandon(f)
        raise WriteError(path, failure_reason(errors[0]), n_events)


def open_written(path) -> h5py.File:
    """A small-data file opened for reading, also one left by a writer that died (it
    opens only with SWMR reading, or after ``h5clear -s``); raises OSError."""
    try:
        return h5py.File(path, "r")
    except OSError:
        return h5py.File(path, "r", swmr=True)


def open_small_data(path) -> h5py.File:
    """open_written for a command's input: a missing or unreadable file is one
    GpusmdError that names it."""
    path = Path(path)
    if not path.exists():
        raise GpusmdError(f"{path}: small-data file not found")
    try:
        return open_written(path)
    except OSError as e:
        raise GpusmdError(f"{path}: cannot read it as HDF5 ({e})") from None


def is_complete(path) -> bool:
    """Whether the small-data file ``path`` was finished (root attribute complete = 1);
    False for one that was interrupted, killed or stopped by a full disk, and for one
    that does not open."""
    try:
        with open_written(path) as f:
            return int(f.attrs.get("complete", 0)) == 1
    except OSError:
        return False


def compression_args(name: str) -> dict:
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    if name == "lz4":
        import hdf5plugin
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    return {}


def row_bytes(row_shape, dtype) -> int:
    return max(1, int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)


def chunk_events(row_shape, dtype) -> int:
    return int(max(1, min(MAX_CHUNK_EVENTS, CHUNK_BYTES // row_bytes(row_shape, dtype))))


def chunk_bytes(row_shape, dtype) -> int:
    return chunk_events(row_shape, dtype) * row_bytes(row_shape, dtype)


def h5_value(value):
    """A value HDF5 can store: strings as UTF-8 strings, everything else as an array."""
    if isinstance(value, str):
        return value
    return np.asarray(value)


def column_rows(columns: dict) -> dict[str, np.ndarray]:
    """A batch's per-event columns as the datasets' rows: a variable-length column
    (anything with ``lengths`` and ``fields``, see features.Ragged) as <path>_len (per
    event) and <path>/<field> (records), every other one as it is."""
    rows = {}
    for path, value in columns.items():
        if hasattr(value, "fields"):
            rows[f"{path}_len"] = np.asarray(value.lengths, np.int64)
            for field, records in value.fields.items():
                rows[f"{path}/{field}"] = np.asarray(records)
        else:
            rows[path] = np.asarray(value)
    return rows


def rows_layout(rows: dict) -> dict[str, tuple]:
    """{path: (row shape, dtype)} of the rows of column_rows: what begin_swmr makes."""
    return {path: (tuple(v.shape[1:]), v.dtype) for path, v in rows.items()}


class SmallDataWriter:
    """One small-data file. ``force``: replace an existing file (else refused).
    ``flush_s``: flush at least this often while events are appended (None: only when
    told, as the sink does, which acknowledges what a flush has put on disk)."""

    def __init__(self, path, compression: str = "gzip", force: bool = False,
                 flush_s: float | None = 1.0):
        self.path = check_new_output(path, force)
        self.compression = compression_args(compression)
        self.flush_s = flush_s
        self.n_events = 0
        self.n_errors = 0
        self.n_flushed = 0          # events on disk for sure: those of the last flush
        self.last_flush = time.monotonic()
        self.unflushed = 0          # bytes appended since (held in HDF5's caches until) then
        self.datasets: dict[str, h5py.Dataset] = {}     # kept open: see _grow
        self.failed: WriteError | None = None
        check_room(self.path, 0)
        self.f = self._create(force)
        with self.writing():
            self.f.attrs.update({"complete": 0, "n_events": 0, "n_errors": 0})
            for name, dtype in ERROR_COLUMNS.items():
                self.datasets[name] = self.f.create_dataset(
                    name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
            self.f.flush()

    def _create(self, force: bool) -> h5py.File:
        """The new file, made under a hidden name and given its own once HDF5 holds it
        (locked): a reader that looks for the file meanwhile (a poll of is_complete)
        never opens it before its writer does, which would keep the writer out."""
        part = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
        try:
            f = h5py.File(part, "w", libver="latest")
        except OSError as e:
            raise WriteError(self.path, f"cannot create it ({failure_reason(e)})") from None
        try:
            if force:
                os.replace(part, self.path)
            else:
                try:
                    os.link(part, self.path)        # never replaces a file
                except FileExistsError:
                    raise
                except OSError:                     # no hard links here
                    if self.path.exists():
                        raise FileExistsError(self.path) from None
                    os.rename(part, self.path)
        except OSError as e:
            f.close()
            reason = "exists" if isinstance(e, FileExistsError) else \
                f"cannot create it ({failure_reason(e)})"
            raise WriteError(self.path, reason) from None
        finally:
            part.unlink(missing_ok=True)
        return f

    @classmethod
    def reopen(cls, path, n_events: int, n_errors: int, compression: str = "gzip",
               flush_s: float | None = 1.0) -> "SmallDataWriter":
        """An incomplete file written on: its first ``n_events`` rows and ``n_errors``
        error rows (those a flush had put on disk, as its writer recorded), and its other
        items as they are, are copied into a new file that then takes its name; what a
        killed writer left beyond them is dropped. (HDF5 opens a file whose writer died
        for reading only; the copy is also whole whatever the kill interrupted.)"""
        path = Path(path)
        temp = path.with_name(f".{path.name}.reopened")
        self = cls(temp, compression, force=True, flush_s=flush_s)
        try:
            with open_written(path) as src, self.writing():
                self._copy(src, n_events, n_errors)
                self.f.flush()
            os.replace(temp, path)
        except BaseException:
            if self.f.id.valid:
                self.f.close()
            temp.unlink(missing_ok=True)
            raise
        self.path = path
        return self

    def _copy(self, src: h5py.File, n_events: int, n_errors: int):
        """What ``reopen`` keeps of ``src``: the growing datasets cut to their rows (those of
        a variable-length column to its first n_events events' records)."""
        items = []
        src.visititems(lambda name, obj: items.append((name, obj)))
        self.f.attrs.update(src.attrs)
        for name, obj in items:
            if isinstance(obj, h5py.Group):
                self.f.require_group(name).attrs.update(obj.attrs)
                continue
            if not (obj.maxshape and obj.maxshape[0] is None):      # a run item
                self.f.copy(obj, name)
                continue
            parent, _, field = name.rpartition("/")
            if name in ERROR_COLUMNS:
                n = n_errors
            elif parent and f"{parent}_len" in src:            # a column's records
                n = int(src[f"{parent}_len"][:n_events].sum())
            else:
                n = n_events
            if obj.shape[0] < n:
                raise WriteError(self.path, f"{name} holds {obj.shape[0]} rows, not the {n} "
                                            f"its writer recorded")
            if name in ERROR_COLUMNS:
                self.datasets[name].resize(n, axis=0)
                self.datasets[name][:] = obj[:n]
            else:
                self._grow(name, obj[:n])
        self.n_events = self.n_flushed = n_events
        self.n_errors = n_errors
        self.f.attrs.update({"complete": 0, "n_events": n_events, "n_errors": n_errors})

    @contextmanager
    def writing(self):
        """The context of every write: a failure stops the file (see h5_writes), which is
        not touched again."""
        if self.failed is not None:
            raise self.failed
        try:
            with h5_writes(self.f, self.path, self.n_flushed):
                yield
        except WriteError as e:
            self.failed = e
            raise

    @contextmanager
    def whole(self):
        """Rows go in whole or not at all: interrupted half way (Ctrl-C, SIGTERM), every
        dataset goes back to its length before them."""
        lengths = {path: ds.shape[0] for path, ds in self.datasets.items()}
        try:
            yield
        except BaseException as e:
            if not isinstance(e, H5_ERRORS):
                for path, ds in self.datasets.items():
                    ds.resize(lengths.get(path, 0), axis=0)
            raise

    def add_errors(self, records):
        """Record events that could not be reduced: (event_id, stage, reason) each."""
        if not records:
            return
        n = len(records)
        columns = zip(*records)
        with self.writing(), self.whole():
            for (name, dtype), values in zip(ERROR_COLUMNS.items(), columns):
                ds = self.datasets[name]
                ds.resize(self.n_errors + n, axis=0)
                if dtype.kind == "S":
                    values = [str(v).encode()[:dtype.itemsize] for v in values]
                ds[self.n_errors:] = np.array(values, dtype=dtype)
        self.n_errors += n

    def end_swmr(self):
        """Close and reopen normally, so that the run items can be added. Readers may
        have the file open (SWMR readers of the growing file, or one that opened it just
        now): they do not keep the writer out (no file lock taken)."""
        self.close()
        with self.writing():
            self.f = h5py.File(self.path, "r+", locking=False)

    def append(self, columns: dict):
        """Append one batch: every per-event dataset gets the same number of rows; a
        variable-length column (anything with ``lengths`` and ``fields``, see
        features.Ragged) goes to <path>/<field> (records) and <path>_len (per event).
        The first batch switches the file to SWMR mode (unless begin_swmr did) and is
        flushed at once."""
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"per-event columns of different lengths: {lengths}")
        n = lengths.pop()
        rows = column_rows(columns)
        nbytes = sum(v.nbytes for v in rows.values())
        # what the next flush writes: these rows, those still in the caches, and a rewrite
        # of each dataset's partly filled chunk
        check_room(self.path, self.unflushed + nbytes + sum(
            chunk_bytes(v.shape[1:], v.dtype) for v in rows.values()), self.n_events)
        first = self.n_events == 0
        if self.f.swmr_mode:
            self._add_columns(rows_layout(rows))
        with self.writing(), self.whole():
            for path, value in rows.items():
                self._grow(path, value)
            if not self.f.swmr_mode:
                self.f.swmr_mode = True
        self.n_events += n
        self.unflushed += nbytes
        if first or (self.flush_s is not None
                     and time.monotonic() - self.last_flush > self.flush_s):
            self.flush()

    def begin_swmr(self, layout: dict | None = None):
        """Make the per-event datasets of ``layout`` ({path: (row shape, dtype)}, see
        rows_layout) empty, then switch the file to SWMR mode and flush it: from now on
        a reader opens it with ``swmr=True`` (no new group nor run item can be added
        before end_swmr). The first batch's columns are then written into these
        datasets; one of another row shape or type, or not in ``layout``, is made then
        (see _add_columns)."""
        with self.writing():
            for path, (row_shape, dtype) in (layout or {}).items():
                if path not in self.datasets:
                    self._make(path, tuple(row_shape), np.dtype(dtype))
            self.f.swmr_mode = True
        self.flush()

    def _add_columns(self, layout: dict):
        """In SWMR mode, where datasets cannot be made: the datasets of ``layout`` that
        are missing, or still empty and of another row shape or type, made after the
        file is closed and opened again normally (a moment when a new SWMR reader is
        refused), and SWMR mode switched on again."""
        def fits(path, row_shape, dtype):
            ds = self.datasets.get(path)
            return ds is not None and (ds.shape[0] > 0 or (ds.shape[1:] == row_shape
                                                           and ds.dtype == dtype))
        todo = {p: v for p, v in layout.items() if not fits(p, *v)}
        if not todo:
            return
        self.close()
        with self.writing():
            self.f = h5py.File(self.path, "r+", libver="latest", locking=False)
            self.f.visititems(self._keep_growing)
            for path, (row_shape, dtype) in todo.items():
                if path in self.datasets:
                    del self.datasets[path]
                    del self.f[path]
                self._make(path, row_shape, dtype)
            self.f.swmr_mode = True

    def _keep_growing(self, name, obj):
        """visititems: a per-event (resizable) dataset into ``datasets``."""
        if isinstance(obj, h5py.Dataset) and obj.maxshape and obj.maxshape[0] is None:
            self.datasets[name] = obj

    def _make(self, path: str, row_shape: tuple, dtype: np.dtype):
        """An empty per-event dataset, resizable along its first axis, kept open."""
        self.datasets[path] = self.f.create_dataset(
            path, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
            chunks=(chunk_events(row_shape, dtype), *row_shape), **self.compression)

    def _grow(self, path: str, value: np.ndarray):
        """Append rows to a dataset made on first sight, resizable along its first axis.
        The dataset stays open: its chunks are then written when the file is flushed,
        where a failure is raised (h5py only prints one raised while it closes one)."""
        if path not in self.datasets:
            self._make(path, tuple(value.shape[1:]), value.dtype)
        ds = self.datasets[path]
        start = ds.shape[0]
        ds.resize(start + len(value), axis=0)
        ds[start:] = value

    def write(self, path: str, value):
        value = h5_value(value)
        check_room(self.path, self.unflushed + (len(value) if isinstance(value, str)
                                                else value.nbytes), self.n_events)
        with self.writing():
            if path in self.f:
                del self.f[path]
            if isinstance(value, str) or value.ndim == 0:
                self.f[path] = value
            else:
                self.f.create_dataset(path, data=value, **self.compression)

    def set_attrs(self, attrs: dict, path: str = "/"):
        with self.writing():
            for key, value in attrs.items():
                self.f[path].attrs[key] = h5_value(value)

    def flush(self):
        """Put what was written on disk, then say so: root attributes ``n_events`` and
        ``n_errors`` count the rows a flush has put there, so that a file whose writer
        stopped (killed, full disk) tells which of its rows are whole. Raises WriteError
        where it could not."""
        with self.writing():
            self.f.flush()
            self.f.attrs.modify("n_events", self.n_events)
            self.f.attrs.modify("n_errors", self.n_errors)
            self.f.flush()
        self.n_flushed = self.n_events
        self.last_flush = time.monotonic()
        self.unflushed = 0

    def finish(self):
        """Mark the file complete (``complete`` = 1) and close it: the last step of a run,
        after its events and its run items."""
        self.flush()
        self.set_attrs({"complete": 1})
        self.close()

    def close(self):
        """Close the file as it is (``complete`` stays 0 unless finish came first). It is
        flushed first, with the datasets open: a write that fails then is raised and the
        file abandoned (a close that fails half way cannot be undone)."""
        if self.failed is None and self.f.id.valid:
            self.flush()
            with self.writing():
                self.datasets.clear()
                self.f.close()
