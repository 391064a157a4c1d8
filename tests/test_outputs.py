"""Outputs: every file says whether it is complete, a finished file is never replaced,
a full disk is one line and leaves a file that opens (or no constants file), an
interrupted replay leaves the events written so far."""
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import h5py
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.calib.dark import process_dark
from gpusmd.config import load_config
from gpusmd.errors import GpusmdError
from gpusmd.io.output import is_complete
from gpusmd.replay import replay
from gpusmd.services.local import LocalServices, free_port
from gpusmd.services.publish import publish
from gpusmd.simulate import simulate_run

from conftest import chain_config, publish_in_thread, replay_reference, wait_for

N_EVENTS = 96
# a slow user function (to interrupt a replay) and one that fails at its third batch
USER_MODULE = """\
import time
calls = [0]

def slow(frames, delay=0.0):
    time.sleep(delay)
    return {"n": next(iter(frames.values())).sum(axis=(1, 2))}

def stalls(frames, after=2):
    # returns at once for the first `after` batches, then hangs (to be interrupted)
    calls[0] += 1
    if calls[0] > after:
        time.sleep(60)
    return {"n": next(iter(frames.values())).sum(axis=(1, 2))}

def third_fails(frames):
    calls[0] += 1
    if calls[0] == 3:
        raise RuntimeError("boom")
    return {"n": next(iter(frames.values())).sum(axis=(1, 2))}
"""


def config_text(function="slow", params="delay: 0.0"):
    return textwrap.dedent(f"""\
        batch_size: 8
        detectors:
          camera:
            functions:
              - {{kind: roi, bounds: [[0, 128], [0, 128]], writeArea: true}}
            sums: [calib]
        user_functions:
          - {{name: user, function: "outputs_user:{function}", params: {{{params}}}}}
        """)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """A camera run (128 x 128, its ROI area written), its configs, and the
    module of the user functions, importable in this process and in the commands."""
    d = tmp_path_factory.mktemp("outputs")
    simulate_run(d / "run.h5", "camera", n_events=N_EVENTS, shape=(128, 128), run=3)
    (d / "outputs_user.py").write_text(USER_MODULE)
    (d / "run.yaml").write_text(config_text())
    (d / "slow.yaml").write_text(config_text(params="delay: 0.2"))
    (d / "fails.yaml").write_text(config_text("third_fails", ""))
    (d / "stalls.yaml").write_text(config_text("stalls", "after: 2"))
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))


def gpusmd(d, *args, timeout=60):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "gpusmd.cli", *map(str, args)], cwd=d, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(r, *words):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpusmd: error: "), r.stderr
    for w in words:
        assert str(w) in lines[0], lines[0]
    return lines[0]


def reference(d):
    """The complete replay of the run."""
    out = d / "reference.h5"
    return out if out.exists() else replay_reference(d)


def assert_prefix_of_reference(d, path, swmr=False):
    """The file opens, and the events it says it holds (n_events) are the first ones of
    the complete replay; the number of them."""
    with h5py.File(path, "r", swmr=swmr) as f, h5py.File(reference(d), "r") as ref:
        n = int(f.attrs["n_events"])
        assert len(f["event_id"]) >= n
        for key in ("event_id", "camera/ROI_0_sum", "camera/ROI_0_area"):
            np.testing.assert_array_equal(f[key][:n], ref[key][:n])
        return n


# ---- 1. complete or not ------------------------------------------------------------------
def test_a_finished_replay_says_complete(d):
    with h5py.File(reference(d), "r") as f:
        assert f.attrs["complete"] == 1
        assert f.attrs["n_events"] == N_EVENTS and f.attrs["n_errors"] == 0
    assert is_complete(reference(d))
    assert not is_complete(d / "run.h5")          # a raw file has no mark: not a finished output
    assert not is_complete(d / "nothere.h5")


def test_an_exception_mid_run_leaves_an_incomplete_readable_file(d):
    out = d / "failed.h5"
    with pytest.raises(RuntimeError, match="boom"):
        replay(d / "run.h5", load_config(d / "fails.yaml"), out, get_backend("cpu"), progress=False)
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] == 0
        # the two batches before the failing one, on disk and counted
        assert len(f["event_id"]) == f.attrs["n_events"] == 16
    assert not is_complete(out)


# ---- 2. never replaced -----------------------------------------------------------------
def test_replay_refuses_an_existing_output_unless_forced(d):
    out = d / "twice.h5"
    config = load_config(d / "run.yaml")
    replay(d / "run.h5", config, out, get_backend("cpu"), progress=False, max_events=8)
    before = out.read_bytes()
    with pytest.raises(GpusmdError, match="twice.h5 exists"):
        replay(d / "run.h5", config, out, get_backend("cpu"), progress=False)
    assert out.read_bytes() == before
    for extra in ([], ["--via-services"]):
        one_error_line(gpusmd(d, "replay", "run.h5", "--config", "run.yaml", "-o", out, *extra),
                       out, "exists", "--force")
    assert out.read_bytes() == before
    replay(d / "run.h5", config, out, get_backend("cpu"), progress=False, force=True)
    with h5py.File(out, "r") as f:
        assert len(f["event_id"]) == N_EVENTS and f.attrs["complete"] == 1


def test_dark_and_simulate_refuse_an_existing_output(d, tmp_path):
    dark = simulate_run(tmp_path / "dark.h5", "epix100", n_events=3, dark=True)
    process_dark(dark, tmp_path / "c.h5")
    assert os.listdir(tmp_path) == ["dark.h5", "c.h5"] or sorted(os.listdir(tmp_path)) == [
        "c.h5", "dark.h5"]                        # no temporary file left
    before = (tmp_path / "c.h5").read_bytes()
    # refused before the run is read: a missing source is not even looked at
    one_error_line(gpusmd(tmp_path, "dark", "missing.h5", "-o", "c.h5"), "c.h5 exists", "--force")
    one_error_line(gpusmd(tmp_path, "simulate", "--detector", "epix100", "-o", "c.h5"),
                   "c.h5 exists", "--force")
    assert (tmp_path / "c.h5").read_bytes() == before
    r = gpusmd(tmp_path, "dark", "dark.h5", "-o", "c.h5", "--force")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert "epix100/pedestal" in f


# ---- 4. a full disk ---------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only)."""
    disk = tmp_path / "small"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_replay_and_dark_on_a_full_disk(d, small_disk):
    out = small_disk / "out.h5"
    line = one_error_line(gpusmd(d, "replay", "run.h5", "--config", "run.yaml", "-o", out, "-q"),
                          out, "no space left on device after")
    n = assert_prefix_of_reference(d, out)
    assert 0 < n < N_EVENTS and f"after {n} events" in line
    assert not is_complete(out)
    out.unlink()
    dark = simulate_run(d / "dark_jungfrau.h5", "jungfrau05M", n_events=2, dark=True)
    one_error_line(gpusmd(d, "dark", dark, "-o", small_disk / "c.h5"),
                   small_disk / "c.h5", "no space left on device", "no constants file")
    assert os.listdir(small_disk) == []


def test_a_write_that_fails_anyway_stops_the_file(d, small_disk):
    """With the free space not checked first (as when another writer fills the disk), a
    flush fails in HDF5 mid-run: still one line and exit 2 (no crash), and the file opens
    as a live file (SWMR), with the events flushed before."""
    (small_disk / "other").write_bytes(os.urandom(2_800_000))    # another writer's file
    out = small_disk / "out.h5"
    script = ("import sys, gpusmd.io.output as o; o.check_room = lambda *a, **k: None; "
              "from gpusmd.cli import main; "
              f"sys.exit(main(['replay', 'run.h5', '--config', 'slow.yaml', '-o', {str(out)!r}, "
              "'-q']))")
    env = {**os.environ, "PYTHONPATH": str(d)}
    r = subprocess.run([sys.executable, "-c", script], cwd=d, env=env, capture_output=True,
                       text=True, timeout=60)
    line = one_error_line(r, out, "no space left on device after")
    n = assert_prefix_of_reference(d, out, swmr=True)
    assert 0 < n < N_EVENTS and f"after {n} events" in line
    with h5py.File(out, "r", swmr=True) as f:
        assert f.attrs["complete"] == 0
    assert not is_complete(out)


def test_simulate_on_a_full_disk(d, small_disk):
    """Refused before writing (the raw frames do not fit), and, with the free space not
    checked first, a write that fails in HDF5: one line and exit 2 both times (no crash),
    no file left."""
    out = small_disk / "sim.h5"
    one_error_line(gpusmd(d, "simulate", "--detector", "camera", "--shape", "128", "128",
                          "--events", "200", "-o", out), out, "no space left on device")
    assert os.listdir(small_disk) == []
    script = ("import sys, gpusmd.io.output as o; o.check_room = lambda *a, **k: None; "
              "from gpusmd.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", script, "simulate", "--detector", "camera",
                        "--shape", "128", "128", "--events", "200", "-o", str(out)],
                       cwd=d, capture_output=True, text=True, timeout=60)
    one_error_line(r, out, "no space left on device")
    assert os.listdir(small_disk) == []


@pytest.fixture
def read_only(tmp_path):
    """A folder that cannot be written: a read-only tmpfs (root, whom permissions do not
    stop), else one of mode 555. Returns (folder, the reason a write there fails)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro, "permission denied"
        ro.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.strip()}")
    yield ro, "read-only file system"
    subprocess.run(["umount", str(ro)], check=True)


@pytest.fixture(scope="module")
def dark_run(d):
    return simulate_run(d / "dark_camera.h5", "camera", n_events=4, shape=(128, 128),
                        dark=True)


@pytest.mark.parametrize("args, out", [
    (["simulate", "--detector", "camera", "--shape", "16", "16", "--events", "2"], "s.h5"),
    (["plot", "{smd}", "--png"], "p.png"),
    (["plot", "{smd}", "-o"], "plots/camera_image.png"),
    (["cube", "{smd}", "--bin", "ipm2/sum:0,1,2", "-q"], "c.h5"),
    (["avimage", "run.h5", "--config", "run.yaml", "-n", "8", "-q"], "a.h5"),
    (["dark", "{dark}"], "k.h5"),
], ids=["simulate", "plot", "plot-dir", "cube", "avimage", "dark"])
def test_a_read_only_folder_is_one_line(d, dark_run, read_only, args, out):
    """Every writer on a folder it cannot write: one line naming the file and the
    reason, exit 2, nothing left there."""
    ro, reason = read_only
    smd = reference(d)
    args = [a.format(smd=smd, dark=dark_run) for a in args]
    target = ro / out
    given = target.parent if args[-1] == "-o" else target
    if args[-1] not in ("-o", "--png"):
        args.append("-o")
    one_error_line(gpusmd(d, *args, given), target, reason)
    assert os.listdir(ro) == []


# ---- 5. interrupted ---------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_replay_leaves_the_events_so_far(d, sig):
    """Interrupted while its third batch hangs: exit 130, the two batches before it kept,
    the file closed and marked incomplete."""
    out = d / f"interrupted_{sig.name}.h5"
    env = {**os.environ, "PYTHONPATH": str(d)}
    p = subprocess.Popen([sys.executable, "-m", "gpusmd.cli", "replay", "run.h5", "--config",
                          "stalls.yaml", "-o", str(out), "-q"], cwd=d, env=env,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        n = 0
        while n < 8:                    # the first batch is flushed at once
            assert time.monotonic() < deadline and p.poll() is None, "no events written"
            time.sleep(0.1)
            try:
                with h5py.File(out, "r", swmr=True) as f:
                    n = len(f["event_id"]) if "event_id" in f else 0
            except (OSError, KeyError):
                n = 0
        time.sleep(0.5)                 # into the third batch's hang
        p.send_signal(sig)
        assert p.wait(20) == 130
        assert "interrupted" in p.stderr.read()
    finally:
        p.kill()
    n = assert_prefix_of_reference(d, out)          # closed: opens without swmr
    assert 16 <= n < N_EVENTS
    assert not is_complete(out)


# ---- the sink ---------------------------------------------------------------------------
SERVICES_CONFIG = """\
    batch_size: 4
    detectors:
      camera:
        functions:
          - {kind: roi, bounds: [[0, 128], [0, 128]], writeArea: true}
        sums: [calib]
    services:
      heartbeat_s: 0.2
      worker_timeout_s: 2.0
      flush_s: 1.0
      log_every_s: 1.0
    """
FRAME_BYTES = 128 * 128 * 2


def chain_of(d, name, output, **kw):
    """The services (ingest, one worker, sink, serving until stopped) with the config of
    SERVICES_CONFIG, their logs in d/logs_<name>."""
    (d / "svc.yaml").write_text(textwrap.dedent(SERVICES_CONFIG))
    return LocalServices(d / "svc.yaml", output, 1, "cpu", once=False,
                         log_dir=d / f"logs_{name}", **kw).start()


READER = """\
import sys, time, h5py
while True:
    try:
        f = h5py.File(sys.argv[1], "r", swmr=True)
        break
    except OSError:             # not there yet, or not yet in SWMR mode
        time.sleep(0.02)
print("open", flush=True)
time.sleep(60)
"""


def test_the_sink_marks_its_file_and_never_replaces_one(d):
    """A run published twice: the first file stays as it was, the second take goes to
    <name>_1.h5; both complete, with the same events; nothing hangs. A reader holding the
    growing file open does not keep the sink from finishing it."""
    first, second = d / "sink_Run0003.h5", d / "sink_Run0003_1.h5"
    chain = chain_of(d, "twice", d / "sink_Run{run:04d}.h5", sink_args=["--delay-ms", "20"])
    try:
        publish_in_thread(chain, d / "run.h5")
        # another process watching the growing file, open until the run is over
        reader = subprocess.Popen([sys.executable, "-c", READER, str(first)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([reader.stdout], [], [], 60)
            assert ready, "the growing file never opened for a reader"
            assert reader.stdout.readline().strip() == "open"
            wait_for(lambda: is_complete(first), "the first take was not written")
        finally:
            reader.kill()
            reader.wait()
        before = first.read_bytes()
        publish(d / "run.h5", chain_config(chain))
        wait_for(lambda: is_complete(second), "the second take was not written")
    finally:
        chain.stop()
    assert first.read_bytes() == before
    for path in (first, second):
        with h5py.File(path, "r") as f:
            assert f.attrs["complete"] == 1 and f.attrs["n_events"] == N_EVENTS
        assert assert_prefix_of_reference(d, path) == N_EVENTS
    assert "sink_Run0003.h5 exists (never replaced)" in (d / "logs_twice" / "sink.log").read_text()


def metrics(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_a_killed_sink_had_acknowledged_only_what_is_in_its_file(d):
    """SIGKILL of a slow sink mid-run, just after the ingest has let go of (had
    acknowledged) some events: every event acknowledged is in the file, among the rows it
    says it holds (n_events); the file is incomplete."""
    out = d / "killed_sink.h5"
    port = free_port()
    chain = chain_of(d, "killed", out, sink_args=["--delay-ms", "100"],
                          ingest_args=["--metrics-port", str(port)])

    def acknowledged():
        try:
            m = metrics(port)
        except OSError:
            return 0
        return (m.get("gpusmd_ingest_events_total", 0)
                - m.get("gpusmd_ingest_held_bytes", 0) / FRAME_BYTES)
    try:
        publish_in_thread(chain, d / "run.h5")
        wait_for(lambda: acknowledged() >= 24, "nothing acknowledged")
        chain.sink.send_signal(signal.SIGKILL)
        chain.sink.wait(5)
        time.sleep(0.5)                 # acknowledgements still on their way are counted
        n_acknowledged = acknowledged()
    finally:
        chain.stop()
    n = assert_prefix_of_reference(d, out, swmr=True)
    assert 24 <= n_acknowledged <= n < N_EVENTS, (n_acknowledged, n)
    assert not is_complete(out)


def test_the_sink_on_a_full_disk_stops_in_one_line(d, small_disk):
    out = small_disk / "sink.h5"
    chain = chain_of(d, "full", out)
    try:
        publish_in_thread(chain, d / "run.h5")
        wait_for(lambda: chain.sink.poll() is not None, "the sink went on")
    finally:
        chain.stop()
    assert chain.sink.returncode == 2
    errors = [line for line in (d / "logs_full" / "sink.log").read_text().splitlines()
              if "gpusmd: error" in line or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith(f"gpusmd: error: {out}: no space left "
                                                     f"on device after"), errors
    n = assert_prefix_of_reference(d, out)
    assert 0 < n < N_EVENTS and f"after {n} events" in errors[0]
    assert not is_complete(out)
