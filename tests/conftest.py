"""Shared fixtures: small simulated raw runs (cached per session, treat them as read-only)."""
import os
import threading
import time

import pytest

# The suite runs the reference CPU engine (NumPy) unless told otherwise: the compiled one
# costs every process that calibrates a second or two to load (the services' workers,
# the CLI tests), and is compared with NumPy's bit for bit in tests/test_cpu_engine.py
# and through a whole chain in test_all_functions.py. Set it before the test modules
# make their backends at import.
os.environ.setdefault("GPUSMD_CPU_ENGINE", "numpy")

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



def backend_or_skip():
    """The backend a test module runs on (GPUSMD_BACKEND=gpu: the device); the module is
    skipped where that backend cannot be had (no device)."""
    from gpusmd.backend import get_backend
    from gpusmd.errors import GpusmdError
    try:
        return get_backend()
    except GpusmdError as e:
        pytest.skip(str(e), allow_module_level=True)


def wait_for(condition, what: str, timeout: float = 30):
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def dark_and_run(d, det: str, n_events: int, dark_events: int = 5):
    """d/dark.h5 (run 1), d/run.h5 (run 2, ``n_events``) of a simulated ``det`` and
    d/constants.h5 from the dark."""
    from gpusmd.calib.dark import process_dark
    simulate_run(d / "dark.h5", det, n_events=dark_events, dark=True, run=1)
    simulate_run(d / "run.h5", det, n_events=n_events, run=2)
    process_dark(d / "dark.h5", d / "constants.h5")


def replay_reference(d, out="reference.h5"):
    """d/<out>: the in-process replay (CPU) of d/run.h5 with d/run.yaml, what the files of
    the services are compared with."""
    from gpusmd.backend import get_backend
    from gpusmd.config import load_config
    from gpusmd.replay import replay
    replay(d / "run.h5", load_config(d / "run.yaml"), d / out, get_backend("cpu"),
           progress=False)
    return d / out


def chain_config(chain, config_path=None):
    """The config of a LocalServices chain (or the one at ``config_path``) with the
    chain's addresses: what a publisher into the chain is given."""
    from gpusmd.config import load_config
    cfg = load_config(config_path or chain.config_path)
    cfg.services.__dict__.update(chain.addresses)
    return cfg


def in_thread(fn, *args, **kwargs):
    """Start fn(*args, **kwargs) in a thread; returns result(timeout): what fn returned,
    or raised, failing the test when fn takes longer."""
    box = []

    def run():
        try:
            box.append((fn(*args, **kwargs), None))
        except BaseException as e:
            box.append((None, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result(timeout):
        thread.join(timeout)
        assert box, f"{fn.__name__} did not return within {timeout} s"
        value, error = box[0]
        if error is not None:
            raise error
        return value

    return result


def publish_in_thread(chain, raw, rate: float = 0.0, config_path=None) -> threading.Thread:
    """Publish the run ``raw`` into the chain from a daemon thread (started)."""
    from gpusmd.services.publish import publish
    sender = threading.Thread(target=publish, args=(raw, chain_config(chain, config_path), rate),
                              daemon=True)
    sender.start()
    return sender


def assert_same_datasets(a, b, skip=()):
    """Two output files hold the same datasets with the same values."""
    from gpusmd.io.compare import diff_files
    assert diff_files(a, b, skip) == []


@pytest.fixture(autouse=True, scope="session")
def _private_kernel_cache(tmp_path_factory):
    """Host builds of the kernels go to a per-session cache, not the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GPUSMD_CACHE", str(tmp_path_factory.getbasetemp() / "gpusmd-cache"))
    yield
    mp.undo()


def gpu_available() -> bool:
    """CuPy imports and sees a CUDA device (the @pytest.mark.gpu tests need one)."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
