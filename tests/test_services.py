"""The live chain on loopback: publish -> ingest -> workers -> sink, as processes.

Each test runs the real commands; a reference file comes from the in-process replay of
the same run."""
import re
import signal
import textwrap
import time
import urllib.request

import h5py
import numpy as np
import pytest
import zmq

from gpusmd.io.raw import RawRun
from gpusmd.runinfo import RunInfo
from gpusmd.services.common import make_keys
from gpusmd.services.local import LocalServices, free_port
from gpusmd.services.protocol import encode
from gpusmd.services.shm import host_key

from conftest import assert_same_datasets, dark_and_run, publish_in_thread, replay_reference

DET = "jungfrau05M"          # 1 MB frames
N_EVENTS = 48
CONFIG = f"""\
    batch_size: 4
    detectors:
      {DET}:
        calib: constants.h5
        functions:
          - {{kind: roi, bounds: [[0, 1], [10, 300], [20, 600]], thresADU: [2.0, null]}}
          - {{kind: roi, bounds: [[0, 1], [300, 500], [600, 1000]]}}
        sums: [calib, calib_max]
    services:
      heartbeat_s: 0.2
      worker_timeout_s: 1.0
      flush_s: 0.2
      log_every_s: 1.0
    """


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("services")
    dark_and_run(d, DET, N_EVENTS)
    (d / "run.yaml").write_text(textwrap.dedent(CONFIG))
    replay_reference(d)
    return d


def run_chain(d, out, rate=0.0, workers=2, during=None, config="run.yaml", timeout=60,
              joined=False, **kw):
    """Start the chain, publish the run (in a thread), call during(chain), wait for the sink.
    With ``joined``, the run starts once every worker has joined the ingest."""
    chain = LocalServices(d / config, out, workers, "cpu", log_dir=d / f"logs_{out.stem}",
                          **kw).start()
    try:
        deadline = time.monotonic() + 30
        while joined and not all(f"worker{i} joined" in read_log(d, out, "ingest")
                                 for i in range(workers)):
            assert time.monotonic() < deadline, "the workers did not join"
            time.sleep(0.05)
        sender = publish_in_thread(chain, d / "run.h5", rate)
        if during is not None:
            during(chain)
        status = chain.wait_sink(timeout)
        sender.join(5)
        return chain, status
    finally:
        chain.stop()


def read_log(d, out, name):
    return (d / f"logs_{out.stem}" / f"{name}.log").read_text()


@pytest.mark.parametrize("shared_memory", [
    pytest.param(True, marks=pytest.mark.skipif(host_key() is None, reason="no /dev/shm")),
    False])
def test_services_equal_in_process(setup, shared_memory):
    """Batches to the workers through shared memory (the ingest's host) or over the link
    (as to workers on other hosts): the same file."""
    config = "run.yaml" if shared_memory else "link.yaml"
    (setup / "link.yaml").write_text(textwrap.dedent(CONFIG) + "  shared_memory: false\n")
    out = setup / f"services_{config[:-5]}.h5"
    chain, status = run_chain(setup, out, config=config, joined=True)
    assert status == 0
    assert_same_datasets(out, setup / "reference.h5")
    with h5py.File(out, "r") as f:
        assert f.attrs["via"] == "services" and len(f["errors/event_id"]) == 0
    assert ("batches through shared memory" in read_log(setup, out, "ingest")) == shared_memory
    workers = read_log(setup, out, "worker0") + read_log(setup, out, "worker1")
    assert ("frames from shared memory" in workers) == shared_memory


@pytest.mark.skipif(host_key() is None, reason="no /dev/shm")
def test_a_worker_over_the_link_beside_one_on_shared_memory(setup):
    """As a worker on another host: the ingest sends it the frames of the same
    shared-memory batches over the link. One file, equal to the in-process one."""
    out = setup / "mixed.h5"
    # the run arrives at once; slow workers (0.2 s a batch) both get batches
    chain, status = run_chain(setup, out, worker_args=["--delay-ms", "200"], joined=True,
                              per_worker_args={1: ["--no-shared-memory"]})
    assert status == 0
    assert_same_datasets(out, setup / "reference.h5")
    assert "frames from shared memory" in read_log(setup, out, "worker0")
    assert "frames over the link" not in read_log(setup, out, "worker0")
    assert "frames over the link" in read_log(setup, out, "worker1")
    ingest = read_log(setup, out, "ingest")
    assert "worker0: batches through shared memory" in ingest
    assert "worker1: batches through" not in ingest


def test_worker_killed_mid_run(setup):
    out = setup / "killed_worker.h5"

    def kill_one(chain):
        deadline = time.monotonic() + 30
        while "processors for" not in (setup / f"logs_{out.stem}" / "worker0.log").read_text():
            assert time.monotonic() < deadline, "worker0 never got to work"
            time.sleep(0.1)
        time.sleep(0.3)
        chain.workers[0].send_signal(signal.SIGKILL)

    # the run arrives at once and slow workers (0.6 s a batch) each hold two batches
    # (their credits) from the start: worker0 dies holding batches to re-send
    chain, status = run_chain(setup, out, during=kill_one, worker_args=["--delay-ms", "600"])
    assert status == 0
    assert chain.workers[0].returncode == -signal.SIGKILL
    log = read_log(setup, out, "ingest")
    # its batches go to the other worker: when it is found silent, or earlier when the
    # acknowledgements stop (a slow machine)
    assert "worker0 silent" in log
    assert re.search(r"re-sending batches \[\d|not acknowledged \[\d", log)
    assert_same_datasets(out, setup / "reference.h5")


def test_sink_killed_leaves_a_readable_prefix(setup):
    out = setup / "killed_sink.h5"
    written = []

    def kill_sink(chain):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.3)
            try:
                with h5py.File(out, "r", swmr=True) as f:
                    n = len(f["event_id"]) if "event_id" in f else 0
            except OSError:
                n = 0
            if n >= 8:
                break
        written.append(n)
        chain.sink.send_signal(signal.SIGKILL)

    chain = LocalServices(setup / "run.yaml", out, 2, "cpu", sink_args=["--delay-ms", "100"],
                          log_dir=setup / "logs_killed_sink").start()
    try:
        publish_in_thread(chain, setup / "run.h5")
        kill_sink(chain)
        chain.sink.wait(5)
    finally:
        chain.stop()
    assert written[0] >= 8
    with h5py.File(out, "r", swmr=True) as f, RawRun(setup / "run.h5") as raw:
        ids = f["event_id"][()]
        assert 0 < len(ids) < N_EVENTS
        np.testing.assert_array_equal(ids, raw.event_id[:len(ids)])
        roi = f[f"{DET}/ROI_0_sum"][()]
        assert len(roi) == len(ids)
    ref = h5py.File(setup / "reference.h5", "r")
    np.testing.assert_array_equal(roi, ref[f"{DET}/ROI_0_sum"][:len(ids)])


def test_malformed_messages_are_recorded_and_skipped(setup):
    out = setup / "malformed.h5"
    bad_ids = {}

    def send_with_garbage(chain):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(chain.addresses["ingest_in"])
        with RawRun(setup / "run.h5") as run:
            info = RunInfo.from_run(run)
            sock.send_multipart(encode(*info.to_message()))
            frames = run.read(DET, 0, run.n_events)
            for i in range(run.n_events):
                head = {"kind": "event", "run": run.run, "event": int(run.event_id[i]),
                        "timestamp": int(run.timestamp[i]),
                        "scalars": {s: run.scalars[s][i].item() for s in info.scalars}}
                frame = frames[i]
                parts = encode(head, {DET: frame})
                kind = i % 8
                if kind == 2:
                    parts = [b"\x93not-a-header", parts[1]]
                    bad_ids[-1] = "bad header"
                elif kind == 4:
                    parts = [parts[0], bytes(parts[1])[:1000]]
                    bad_ids[head["event"]] = "truncated"
                elif kind == 5:
                    parts = encode(head, {DET: frame[:, :256]})
                    bad_ids[head["event"]] = "frame"
                elif kind == 6:
                    parts = encode(head, {DET: frame, "nosuchdet": frame[:, :2, :2]})
                    bad_ids[head["event"]] = "unknown detector"
                elif kind == 7 and i < 20:
                    parts = encode(head, {DET: frame.astype(np.int32)})
                    bad_ids[head["event"]] = "frame"
                sock.send_multipart(parts)
            sock.send_multipart(encode({"kind": "end", "run": run.run}))
        sock.close(linger=5000)
        ctx.term()

    chain = LocalServices(setup / "run.yaml", out, 2, "cpu", log_dir=setup / "logs_malformed")
    with chain:
        send_with_garbage(chain)
        assert chain.wait_sink(60) == 0
        time.sleep(0.5)
        assert chain.ingest.poll() is None or chain.ingest.returncode == 0
    with h5py.File(out, "r") as f, RawRun(setup / "run.h5") as raw:
        written = set(f["event_id"][()].tolist())
        err_ids = f["errors/event_id"][()].tolist()
        reasons = [r.decode() for r in f["errors/reason"][()]]
        ref = h5py.File(setup / "reference.h5", "r")
        good = [i for i, e in enumerate(raw.event_id) if e not in bad_ids and i % 8 != 2]
        assert written == {int(raw.event_id[i]) for i in good}
        np.testing.assert_array_equal(f[f"{DET}/ROI_1_sum"][()], ref[f"{DET}/ROI_1_sum"][good])
    assert sorted(e for e in err_ids if e != -1) == sorted(e for e in bad_ids if e != -1)
    assert err_ids.count(-1) == sum(1 for i in range(N_EVENTS) if i % 8 == 2)
    for event, words in bad_ids.items():
        if event != -1:
            assert words in reasons[err_ids.index(event)], (event, reasons[err_ids.index(event)])


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_slow_sink_keeps_ingest_memory_bounded(setup):
    out = setup / "slow_sink.h5"
    text = (setup / "run.yaml").read_text().replace(
        "services:\n", "services:\n  max_pending_batches: 2\n  max_in_flight_batches: 2\n"
                        "  credits: 1\n  hwm: 2\n")
    (setup / "slow.yaml").write_text(text)
    port = free_port()
    held = []

    def watch(chain):
        chain.ingest_port = port
        while chain.sink.poll() is None:
            try:
                held.append(scrape(port)["gpusmd_ingest_held_bytes"])
            except Exception:
                pass
            time.sleep(0.05)

    chain = LocalServices(setup / "slow.yaml", out, 1, "cpu", sink_args=["--delay-ms", "60"],
                          log_dir=setup / "logs_slow", ingest_args=["--metrics-port", str(port)])
    with chain:
        sender = publish_in_thread(chain, setup / "run.h5")
        watch(chain)
        sender.join(10)
        assert chain.sink.returncode == 0
    frame_bytes = 512 * 1024 * 2
    bound = (2 + 2 + 1) * 4 * frame_bytes           # pending + in flight + the open batch
    assert len(held) > 10 and 0 < max(held) <= bound
    assert bound < N_EVENTS * frame_bytes / 2       # the bound means something
    assert_same_datasets(out, setup / "reference.h5")


def test_wrong_curve_keys_are_refused(setup):
    keys, other = make_keys(setup / "keys"), make_keys(setup / "other_keys")
    base = (setup / "run.yaml").read_text()
    (setup / "curve.yaml").write_text(base.replace("services:\n", f"services:\n  curve_keys: {keys}\n"))
    (setup / "wrong.yaml").write_text(base.replace("services:\n", f"services:\n  curve_keys: {other}\n"))
    out = setup / "curve_wrong.h5"
    with LocalServices(setup / "curve.yaml", out, 1, "cpu", log_dir=setup / "logs_curve") as chain:
        publish_in_thread(chain, setup / "run.h5", config_path=setup / "wrong.yaml")
        time.sleep(3)
        assert chain.sink.poll() is None and not out.exists()     # nothing got through
    out = setup / "curve_right.h5"
    chain, status = run_chain(setup, out, config="curve.yaml", workers=1)
    assert status == 0
    assert_same_datasets(out, setup / "reference.h5")
