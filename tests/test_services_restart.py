"""What survives what in the live chain: a sink killed and started again completes the
run with every event once (the same file as an uninterrupted run); a killed ingest
leaves a file the sink closes incomplete, saying what is missing; no shared-memory file
is left behind."""
import random
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from gpusmd.io.compare import diff_files
from gpusmd.io.output import is_complete, open_written
from gpusmd.services.local import RUN_CLI, LocalServices, address_args
from gpusmd.services.publish import publish
from gpusmd.services.shm import PREFIX, SHM_DIR, host_key
from gpusmd.simulate import simulate_run

from conftest import chain_config, in_thread, publish_in_thread, replay_reference, wait_for

N_EVENTS = 300
CONFIG = """\
    batch_size: 4
    detectors:
      camera:
        functions:
          - {kind: roi, bounds: [[0, 64], [0, 96]], writeArea: true}
          - {kind: roi, bounds: [[10, 100], [20, 120]], thresADU: [2.0, null]}
        sums: [calib, calib_max]
    services:
      heartbeat_s: 0.2
      worker_timeout_s: 1.0
      flush_s: 0.3
      log_every_s: 1.0
      ingest_timeout_s: 2.0
    """


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("restart")
    simulate_run(d / "run.h5", "camera", n_events=N_EVENTS, shape=(128, 128), run=5)
    (d / "run.yaml").write_text(textwrap.dedent(CONFIG))
    replay_reference(d)
    return d


def rows(path) -> int:
    try:
        with open_written(path) as f:
            return int(f.attrs["n_events"])
    except (OSError, KeyError):
        return 0


def start(d, name, out, **kw):
    chain = LocalServices(d / "run.yaml", out, 2, "cpu", log_dir=d / f"logs_{name}", **kw).start()
    publish_in_thread(chain, d / "run.h5")
    return chain


def slot_files(pid):
    """The shared-memory slot files of the ingest ``pid``."""
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}{pid}-*")) if host_key() else []


@pytest.mark.parametrize("kills", [1, 2])
def test_a_sink_killed_and_started_again_completes_the_run(d, kills):
    """SIGKILL of a slow sink mid-run (``kills`` times), a new one started each time: it
    takes up the run's file; the file ends complete, equal to the in-process one (every
    event once, the same run sums)."""
    out = d / f"sink_killed_{kills}.h5"
    chain = start(d, f"sink_{kills}", out, sink_args=["--delay-ms", "15"])
    try:
        for k in range(kills):
            wait_for(lambda: rows(out) >= 40 * (k + 1), "the sink wrote nothing")
            chain.sink.send_signal(signal.SIGKILL)
            chain.sink.wait(5)
            assert not is_complete(out)
            chain.sink = chain._start(f"sink_again{k}", "sink", "-o", str(out), "--no-progress",
                                      *chain.sink_args)
        assert chain.wait_sink(60) == 0
    finally:
        chain.stop()
    assert is_complete(out)
    assert diff_files(out, d / "reference.h5") == []
    with h5py.File(out, "r") as f:
        assert f.attrs["n_events"] == N_EVENTS and len(f["errors/event_id"]) == 0
        assert "sink_checkpoint" not in f
    assert not list(d.glob(f"{out.name}*_1.h5"))
    assert "taking up" in (d / f"logs_sink_{kills}" / "sink_again0.log").read_text()


def test_a_killed_ingest_leaves_a_file_closed_incomplete_with_what_is_missing(d):
    """kill -9 of the ingest at a random moment of the run (once the sink has a random
    number of rows): within ingest_timeout_s the sink closes the file, incomplete, with
    the reason and the missing batch ranges in /errors (stage "missing"); every event it
    holds is the in-process file's. No slot file is left."""
    out = d / "ingest_killed.h5"
    seed = time.time_ns()
    at = random.Random(seed).randrange(1, 2 * N_EVENTS // 3)
    print(f"killing the ingest once the sink has {at} rows (seed {seed})")
    chain = start(d, "ingest", out, worker_args=["--delay-ms", "40"])
    try:
        wait_for(lambda: rows(out) >= at, f"the sink wrote fewer than {at} rows")
        chain.ingest.send_signal(signal.SIGKILL)
        chain.ingest.wait(5)
        killed = time.monotonic()
        wait_for(lambda: chain.sink.poll() is not None, "the sink did not close the run", 20)
        assert time.monotonic() - killed < 10
        assert chain.sink.returncode == 0
        # its slot files go when its workers stop (checked before chain.stop(), which
        # removes stale ones too)
        assert slot_files(chain.ingest.pid) or not host_key()
        for w in chain.workers:
            w.send_signal(signal.SIGTERM)
        for w in chain.workers:
            w.wait(10)
        assert slot_files(chain.ingest.pid) == []
    finally:
        chain.stop()
    assert not is_complete(out)
    with h5py.File(out, "r") as f, h5py.File(d / "reference.h5", "r") as ref:
        assert "went silent" in f.attrs["incomplete_reason"]
        ids = f["event_id"][()]
        assert at <= len(ids) < N_EVENTS, f"killed at {at} rows (seed {seed})"
        index = np.searchsorted(ref["event_id"][()], ids)
        np.testing.assert_array_equal(ref["event_id"][()][index], ids)
        np.testing.assert_array_equal(f["camera/ROI_1_sum"][()], ref["camera/ROI_1_sum"][()][index])
        stages = [s.decode() for s in f["errors/stage"][()]]
        reasons = [r.decode() for r in f["errors/reason"][()]]
        assert set(stages) == {"missing"}
        # the batches that never came, and what the source announced beyond them
        assert all("never came" in r or "the source announced" in r for r in reasons)
        assert any(f"{len(ids)} of the {N_EVENTS} events the source announced" in r
                   for r in reasons)


def test_a_new_ingest_of_the_same_run_goes_to_a_new_file(d):
    """The ingest killed mid-run and a new one started at once, the run published again:
    the sink closes the first file incomplete and writes the new ingest's run to
    <name>_1.h5 (another key: never mixed into the first), complete and whole."""
    out, again = d / "new_ingest.h5", d / "new_ingest_1.h5"
    chain = LocalServices(d / "run.yaml", out, 2, "cpu", once=False,
                          worker_args=["--delay-ms", "20"], log_dir=d / "logs_new_ingest").start()
    # the first source a process, killed with the ingest (what it had not sent is lost)
    source = subprocess.Popen([sys.executable, "-c", RUN_CLI, "publish", str(d / "run.h5"),
                               "--config", str(d / "run.yaml"), *address_args(chain.addresses)])
    try:
        wait_for(lambda: rows(out) >= 40, "the sink wrote nothing")
        for p in (source, chain.ingest):
            p.send_signal(signal.SIGKILL)
            p.wait(5)
        chain.ingest = chain._start("ingest_again", "ingest")
        publish_in_thread(chain, d / "run.h5")
        wait_for(lambda: is_complete(again), "the new ingest's run was not written", 60)
    finally:
        source.kill()
        chain.stop()
    assert not is_complete(out)
    with h5py.File(out, "r") as f:
        assert "went silent" in f.attrs["incomplete_reason"]
        assert len(f["event_id"]) < N_EVENTS
    assert diff_files(again, d / "reference.h5") == []


@pytest.mark.parametrize("slow_sink", [False, True], ids=["sink", "slow sink"])
def test_a_run_published_twenty_times_gives_twenty_complete_files(tmp_path, slow_sink):
    """The same 200-event run published 20 times in a row into one chain (a slow sink:
    backpressure all the way to the publisher): every take is a complete file with every
    event, the first under the run's name and the others numbered, none replaced."""
    n, takes = 200, 20
    simulate_run(tmp_path / "run.h5", "camera", n_events=n, shape=(32, 32), run=7)
    (tmp_path / "run.yaml").write_text(textwrap.dedent("""\
        batch_size: 8
        detectors:
          camera:
            functions:
              - {kind: roi, bounds: [[0, 16], [0, 32]]}
        services: {heartbeat_s: 0.2, flush_s: 0.2, hwm: 8}
        """))
    out = tmp_path / "take_Run{run:04d}.h5"
    chain = LocalServices(tmp_path / "run.yaml", out, 1, "cpu", once=False,
                          log_dir=tmp_path / "logs",
                          sink_args=["--delay-ms", "2"] if slow_sink else []).start()
    try:
        cfg = chain_config(chain)
        files = [tmp_path / "take_Run0007.h5"] + [tmp_path / f"take_Run0007_{k}.h5"
                                                  for k in range(1, takes)]
        for k in range(takes):
            assert in_thread(publish, tmp_path / "run.h5", cfg)(60) == n
            wait_for(lambda: files[k].exists() and is_complete(files[k]),
                     f"take {k} was not completed", timeout=60)
    finally:
        chain.stop()
    for path in files:
        with h5py.File(path, "r") as f:
            assert f.attrs["complete"] == 1 and len(f["event_id"]) == n
            np.testing.assert_array_equal(f["event_id"][()], 1000 * 7 + np.arange(n))
    assert not (tmp_path / f"take_Run0007_{takes}.h5").exists()
