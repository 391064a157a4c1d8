"""The small-data output file (DESIGN §9).

Per-event datasets grow along the first axis, chunked along events and compressed;
once-per-run items (/UserDataCfg, /Sums) are written at the end; provenance goes in
the root attributes. ``/errors/{event_id, stage, reason}`` records every event that
could not be reduced (malformed input, a frame of the wrong shape, ...).

With ``start_swmr`` the file is readable while it grows (h5py ``swmr=True``): the
per-event and error datasets exist from the first batch on and only grow; the run
items come at the end, after ``end_swmr`` reopens the file normally."""
from __future__ import annotations

import numpy as np
import h5py

CHUNK_BYTES = 1 << 20       # aim for ~1 MiB chunks
MAX_CHUNK_EVENTS = 4096
REASON_LEN = 200            # error reasons are stored as fixed-length strings (SWMR-safe)
ERROR_COLUMNS = {"errors/event_id": np.dtype(np.int64), "errors/stage": np.dtype("S16"),
                 "errors/reason": np.dtype(f"S{REASON_LEN}")}


def compression_args(name: str) -> dict:
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    if name == "lz4":
        import hdf5plugin
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    return {}


def chunk_events(row_shape, dtype) -> int:
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return int(max(1, min(MAX_CHUNK_EVENTS, CHUNK_BYTES // row_bytes)))


def h5_value(value):
    """A value HDF5 can store: strings as UTF-8 strings, everything else as an array."""
    if isinstance(value, str):
        return value
    return np.asarray(value)


class SmallDataWriter:
    def __init__(self, path, compression: str = "gzip"):
        self.path = path
        self.f = h5py.File(path, "w", libver="latest")
        self.compression = compression_args(compression)
        self.n_events = 0
        self.n_errors = 0
        for name, dtype in ERROR_COLUMNS.items():
            self.f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))

    def add_errors(self, records):
        """Record events that could not be reduced: (event_id, stage, reason) each."""
        if not records:
            return
        n = len(records)
        columns = zip(*records)
        for (name, dtype), values in zip(ERROR_COLUMNS.items(), columns):
            ds = self.f[name]
            ds.resize(self.n_errors + n, axis=0)
            if dtype.kind == "S":
                values = [str(v).encode()[:dtype.itemsize] for v in values]
            ds[self.n_errors:] = np.array(values, dtype=dtype)
        self.n_errors += n

    def start_swmr(self):
        """From now on readers may open the file with swmr=True; no new datasets."""
        self.f.swmr_mode = True

    def end_swmr(self):
        """Close and reopen normally, so that the run items can be added."""
        self.f.close()
        self.f = h5py.File(self.path, "r+")

    def append(self, columns: dict):
        """Append one batch: every per-event dataset gets the same number of rows; a
        variable-length column (anything with ``lengths`` and ``fields``, see
        features.Ragged) goes to <path>/<field> (records) and <path>_len (per event)."""
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"per-event columns of different lengths: {lengths}")
        n = lengths.pop()
        for path, value in columns.items():
            if hasattr(value, "fields"):
                self._grow(f"{path}_len", np.asarray(value.lengths, np.int64))
                for field, records in value.fields.items():
                    self._grow(f"{path}/{field}", np.asarray(records))
            else:
                self._grow(path, np.asarray(value))
        self.n_events += n

    def _grow(self, path: str, value: np.ndarray):
        """Append rows to a dataset made on first sight, resizable along its first axis."""
        if path not in self.f:
            self.f.create_dataset(path, shape=(0, *value.shape[1:]),
                                  maxshape=(None, *value.shape[1:]), dtype=value.dtype,
                                  chunks=(chunk_events(value.shape[1:], value.dtype),
                                          *value.shape[1:]), **self.compression)
        ds = self.f[path]
        start = ds.shape[0]
        ds.resize(start + len(value), axis=0)
        ds[start:] = value

    def write(self, path: str, value):
        if path in self.f:
            del self.f[path]
        value = h5_value(value)
        if isinstance(value, str) or value.ndim == 0:
            self.f[path] = value
        else:
            self.f.create_dataset(path, data=value, **self.compression)

    def set_attrs(self, attrs: dict, path: str = "/"):
        for key, value in attrs.items():
            self.f[path].attrs[key] = h5_value(value)

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()
