"""Shared fixtures: small simulated raw runs (cached per session, treat them as read-only)."""
import pytest

from gpusmd.simulate import simulate_run


@pytest.fixture(scope="session")
def simulated(tmp_path_factory):
    """simulated(detector, dark=False, n_events=20, seed=0, **kw) -> Path of a simulated raw
    run, made once per session for each set of arguments. Copy it before modifying it."""
    cache = {}
    base = tmp_path_factory.mktemp("sim")

    def make(detector="epix10kquad", dark=False, n_events=20, seed=0, **kw):
        key = (detector, bool(dark), int(n_events), int(seed),
               tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            name = f"{detector}_{'dark' if dark else 'data'}_{len(cache)}.h5"
            cache[key] = simulate_run(base / name, detector, n_events=n_events, dark=dark,
                                      seed=seed, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def epix10k_pair(simulated):
    """(dark, data) raw runs of one simulated epix10kquad (seed 0): 30 dark frames in each of
    the 5 config steps (run 1), 20 data events (run 2)."""
    return simulated("epix10kquad", dark=True, n_events=30), simulated("epix10kquad", n_events=20)


def h5_datasets(path) -> dict:
    """Every dataset of an HDF5 file, read into memory: {path: value}."""
    import h5py
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_datasets(a, b, skip=()):
    """Two output files hold the same datasets with the same values (NaN == NaN)."""
    import numpy as np
    da, db = h5_datasets(a), h5_datasets(b)
    keys = sorted(k for k in set(da) | set(db) if not k.startswith(tuple(skip)))
    assert [k for k in keys if k not in da or k not in db] == []
    for k in keys:
        x, y = np.asarray(da[k]), np.asarray(db[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), k
