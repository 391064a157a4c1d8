"""Compare two small-data files dataset by dataset (e.g. services against in-process)."""
from __future__ import annotations

import h5py
import numpy as np


def read_datasets(path) -> dict:
    """Every dataset of an HDF5 file, read into memory: {path: value}."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def diff_files(a, b, skip=()) -> list[str]:
    """The differences between two files' datasets (names, dtypes, shapes, values; NaN
    equals NaN); empty when they hold the same data. Attributes are not compared."""
    da, db = read_datasets(a), read_datasets(b)
    keys = sorted(k for k in set(da) | set(db) if not k.startswith(tuple(skip)))
    problems = []
    for k in keys:
        if k not in da or k not in db:
            problems.append(f"{k}: only in {a if k in da else b}")
            continue
        x, y = np.asarray(da[k]), np.asarray(db[k])
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{k}: {x.dtype} {x.shape} vs {y.dtype} {y.shape}")
        elif not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            problems.append(f"{k}: values differ")
    return problems
