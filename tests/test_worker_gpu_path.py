"""The worker's GPU path on the CPU: a fake device (from test_gpu_pipeline: copies run
only when waited for, pinned buffers poisoned and checked) and fake sockets drive the
real Worker.run loop. Checked: every batch is processed once, in order, with the good
events' frames of every detector; the copy of batch k + 1 starts before batch k is
processed when k + 1 is already waiting on the socket; the results equal the CPU path's."""
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import zmq
from conftest import gpu_available
from test_gpu_pipeline import FakeDevice

from gpusmd.backend import Backend
from gpusmd.config import ServicesConfig, load_config
from gpusmd.detectors import get_detector
from gpusmd.io.raw import RawRun
from gpusmd.runinfo import RunInfo
from gpusmd.services import worker as worker_mod
from gpusmd.services.protocol import decode, encode
from gpusmd.gpu_pipeline import DeviceBatches
from gpusmd.services.worker import GpuStager, Worker

CPU = Backend("cpu", np)
SHAPES = {"a": (3, 4), "b": (4, 3)}


# ---- fake sockets ----------------------------------------------------------------------------

class FakeWork:
    """The ingest side of the worker's DEALER. ``queued``: every message waits on the
    socket from the start; otherwise a batch arrives only for a credit (ready), so that
    the next batch is never waiting when the current one is processed."""

    def __init__(self, messages, queued, log):
        self.messages, self.queued, self.log = list(messages), queued, log
        self.pos, self.available, self.credits, self.idle = 0, 0, 0, 0
        self._release()

    def _release(self):
        if self.queued:
            self.available = len(self.messages)
            return
        while self.available < len(self.messages):
            if decode(self.messages[self.available]).kind == "batch":
                if self.credits == 0:
                    break
                self.credits -= 1
            self.available += 1

    def poll(self, timeout=None):
        ready = self.pos < self.available
        if not ready and timeout:
            self.idle += 1
            assert self.idle < 20, "the worker waits for a message that never comes"
        return ready

    def recv_multipart(self, copy=True):
        assert self.pos < self.available
        self.pos += 1
        msg = self.messages[self.pos - 1]
        head = decode(msg).header
        if head["kind"] == "batch":
            self.log.append(("recv", head["batch"]))
        return msg

    def send_multipart(self, parts, copy=True):
        msg = decode(parts)
        assert msg.kind == "ready"
        self.credits += msg.header["credit"]
        self._release()

    def close(self, linger=None):
        pass


class FakeSink:
    def __init__(self):
        self.results = []

    def send_multipart(self, parts, copy=True):
        msg = decode([bytes(p) for p in parts])
        self.results.append(msg)

    def close(self, linger=None):
        pass


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def make_worker(ctx, config, backend, messages, queued, device=None, credits=2):
    log = device.log if device is not None else []
    w = Worker(config, backend, name="w", once=True, ctx=ctx, device=device)
    w.work.close(linger=0)
    w.sink.close(linger=0)
    w.cfg.credits = credits
    w.work, w.sink = FakeWork(messages, queued, log), FakeSink()
    return w


def services_config():
    return ServicesConfig(ingest_work="inproc://nowhere-work", sink_in="inproc://nowhere-sink",
                          heartbeat_s=0.05, log_every_s=1000.0)


# ---- messages ----------------------------------------------------------------------------------

def frame(det, event, shape=None, dtype=np.uint16):
    shape = shape or SHAPES[det]
    n = int(np.prod(shape))
    return ((event * 100 + np.arange(n) + (50 if det == "b" else 0)) % 60000).astype(dtype) \
        .reshape(shape)


def batch_message(run, batch, events, arrays):
    head = {"kind": "batch", "run": run, "batch": batch, "token": f"token-{batch}",
            "events": [{"event": e, "timestamp": 1000 + e, "scalars": {}, "steps": {}}
                       for e in events]}
    return encode(head, arrays)


def two_detector_run(n_batches, B=3, bad=()):
    """begin_run (cameras a and b), n_batches batches of B events, end. ``bad``: event
    ids whose frame of b is malformed (wrong shape) or, when odd, whose frame of a is
    missing."""
    info = RunInfo(7, {det: get_detector("camera", s) for det, s in SHAPES.items()})
    msgs = [encode(*info.to_message())]
    for k in range(n_batches):
        events = list(range(k * B, (k + 1) * B))
        arrays = {}
        for i, e in enumerate(events):
            if e in bad and e % 2:
                arrays[f"{i}/b"] = frame("b", e)
            elif e in bad:
                arrays[f"{i}/a"] = frame("a", e)
                arrays[f"{i}/b"] = frame("b", e, shape=(3, 3))
            else:
                arrays[f"{i}/a"] = frame("a", e)
                arrays[f"{i}/b"] = frame("b", e)
        msgs.append(batch_message(7, k, events, arrays))
    msgs.append(encode({"kind": "end", "run": 7}))
    return msgs


class FakeSums:
    def take(self):
        return {}

    def reset(self):
        pass


@pytest.fixture
def fake_processing(monkeypatch):
    """Processors that only record: reduce_frames keeps (batch's first event, {det: host
    copy of the frames}) in ``seen``, appends ('process', first event) to ``log`` when
    set, and returns one column per detector."""
    rec = SimpleNamespace(seen=[], log=None)

    def build(config, info, backend):
        return {det: SimpleNamespace(sums=FakeSums()) for det in info.detectors}

    def reduce(procs, frames, steps, user_functions=()):
        host = {det: np.array(f) for det, f in frames.items()}
        first = int(host["a"][0].reshape(-1)[0]) // 100
        rec.seen.append((first, host))
        if rec.log is not None:
            rec.log.append(("process", first))
        return {f"{det}/total": f.reshape(len(f), -1).sum(1, dtype=np.int64)
                for det, f in host.items()}

    monkeypatch.setattr(worker_mod, "build_processors", build)
    monkeypatch.setattr(worker_mod, "reduce_frames", reduce)
    return rec


def config_of(batch_size=3):
    return SimpleNamespace(services=services_config(), batch_size=batch_size,
                           user_functions=())


# ---- the loop ----------------------------------------------------------------------------------

@pytest.mark.parametrize("queued", [True, False])
@pytest.mark.parametrize("bad", [(), (1, 4, 5, 9, 10, 11)])
def test_every_batch_once_in_order_with_its_frames(ctx, fake_processing, queued, bad):
    n, B = 5, 3
    dev = FakeDevice()
    # queued: every batch waits on the socket; else one credit, one batch at a time
    w = make_worker(ctx, config_of(B), CPU, two_detector_run(n, B, bad), queued, device=dev,
                    credits=2 if queued else 1)
    fake_processing.log = dev.log            # one timeline: copies and processing
    w.run()

    good_batches = [g for g in ([e for e in range(k * B, (k + 1) * B) if e not in bad]
                                for k in range(n)) if g]
    # every batch with a good event: processed once, in order, with the good events'
    # frames of a and b, in their raw dtype
    seen = fake_processing.seen
    assert [first for first, _ in seen] == [g[0] for g in good_batches]
    for (_, host), good in zip(seen, good_batches):
        for det in SHAPES:
            assert host[det].dtype == np.uint16
            np.testing.assert_array_equal(host[det], np.stack([frame(det, e) for e in good]))
    # the results: one per batch, in order, the bad events as errors
    res = w.sink.results
    assert [r.header["batch"] for r in res] == list(range(n))
    assert [e for r in res for e in r.header["events"]] == [e for g in good_batches for e in g]
    assert sorted(err[0] for r in res for err in r.header["errors"]) == sorted(bad)
    for r in res:
        for det in SHAPES:
            expect = [int(frame(det, e).sum(dtype=np.int64)) for e in r.header["events"]]
            assert r.arrays.get(f"{det}/total", np.zeros(0)).tolist() == expect

    # the ordering; a copy of detector a's frames (streams copy1, copy2) logs its first
    # pixel, 100 x the batch's first good event
    copies = [e for e in dev.log if e[0] == "copy" and e[1] in ("copy1", "copy2")]
    assert [c[1] for c in copies] == ["copy1", "copy2"] * (len(good_batches) // 2) + \
        ["copy1"] * (len(good_batches) % 2)                 # alternating buffers
    assert [c[2] // 100 for c in copies] == [g[0] for g in good_batches]   # each once
    order = [("copy", e[2] // 100) if e[0] == "copy" else e for e in dev.log
             if e in copies or e[0] == "process"]
    for i, good in enumerate(good_batches):
        p = order.index(("process", good[0]))
        assert order.index(("copy", good[0])) < p
        if i + 1 < len(good_batches):
            c_next = order.index(("copy", good_batches[i + 1][0]))
            nxt = good_batches[i + 1][0] // B == good[0] // B + 1
            if queued and nxt:   # batch k + 1 was waiting: its copy started before k ran
                assert c_next < p
            elif queued:     # one message ahead: k + 1 (all bad) staged nothing, k + 2 waits
                assert c_next > p
            else:            # it came only for the credit sent after batch k
                assert c_next > p


def test_the_cpu_backend_stages_nothing(ctx, fake_processing):
    w = make_worker(ctx, config_of(), CPU, two_detector_run(3), queued=True)
    assert w.stager is None
    w.run()
    assert [r.header["batch"] for r in w.sink.results] == [0, 1, 2]
    assert [first for first, _ in fake_processing.seen] == [0, 3, 6]
    for first, host in fake_processing.seen:
        np.testing.assert_array_equal(host["a"], np.stack([frame("a", e)
                                                           for e in range(first, first + 3)]))


def test_processing_failure_releases_the_batch(ctx, fake_processing, monkeypatch):
    """A batch that fails is reported as errors; its buffers are released, so that the
    following batches still go through both slots."""
    calls = []

    def flaky(procs, frames, steps, user_functions=()):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return {}
    monkeypatch.setattr(worker_mod, "reduce_frames", flaky)
    w = make_worker(ctx, config_of(), CPU, two_detector_run(5), queued=True, device=FakeDevice())
    w.run()
    res = w.sink.results
    assert [len(r.header["events"]) for r in res] == [3, 0, 3, 3, 3]
    assert [len(r.header["errors"]) for r in res] == [0, 3, 0, 0, 0]
    assert "boom" in res[1].header["errors"][0][2]


# ---- the staging pieces ----------------------------------------------------------------------

def test_put_of_frames_is_put_of_the_stack():
    dev = FakeDevice()
    db = DeviceBatches(2, dev)
    fs = [frame("a", e) for e in range(3)]                 # larger than the capacity
    db.put(0, fs)
    db.put(1, [frame("a", 9)])
    np.testing.assert_array_equal(db.get(0), np.stack(fs))
    np.testing.assert_array_equal(db.get(1), frame("a", 9)[None])
    with pytest.raises(RuntimeError, match="not released"):
        db.put(2, fs)
    db.release(0)
    with pytest.raises(TypeError):                         # raw dtype kept: no casting
        db.put(2, [frame("a", 1), frame("a", 2, dtype=np.int32)])
    db.release(1)
    db.close()


def test_stager_several_detectors():
    dev = FakeDevice()
    st = GpuStager(4, dev)
    ks = []
    for k in range(4):
        ev = range(2 * k, 2 * k + 2)
        ks.append(st.stage({det: [frame(det, e) for e in ev] for det in SHAPES}))
        if k:
            got = st.get(k - 1)
            for det in SHAPES:
                np.testing.assert_array_equal(
                    got[det], np.stack([frame(det, e) for e in range(2 * k - 2, 2 * k)]))
            st.release(k - 1)
    assert ks == [0, 1, 2, 3]
    assert len(dev.streams) == 4                            # two copy streams per detector
    st.close()


# ---- with real processors: the GPU path's results are the CPU path's -------------------------

def epix100_run(simulated, tmp_path):
    """(config path, messages) of a simulated epix100 run in batches of 4, one event of
    batch 1 malformed."""
    data = simulated("epix100", n_events=14)
    (tmp_path / "run.yaml").write_text(textwrap.dedent("""\
        batch_size: 4
        detectors:
          epix100:
            common_mode: [7, 3, 100, 10]
            functions:
              - {kind: roi, bounds: [[10, 100], [20, 200]]}
            sums: [calib]
        """))
    with RawRun(data) as run:
        info = RunInfo.from_run(run, scalars=())
        raw = run.read("epix100", 0, run.n_events)
        msgs = [encode(*info.to_message())]
        for k, a in enumerate(range(0, run.n_events, 4)):
            events = list(range(a, min(a + 4, run.n_events)))
            arrays = {f"{i}/epix100": raw[e] for i, e in enumerate(events)}
            if k == 1:                                      # a malformed event
                arrays["2/epix100"] = raw[events[2]][:, :10]
            msgs.append(batch_message(run.run, k, [int(run.event_id[e]) for e in events],
                                      arrays))
        msgs.append(encode({"kind": "end", "run": run.run}))
    return tmp_path / "run.yaml", msgs


def worker_results(ctx, config_path, msgs, backend, device, name):
    config = load_config(config_path)
    config.services.__dict__.update(ingest_work=f"inproc://w-{name}",
                                    sink_in=f"inproc://s-{name}", heartbeat_s=0.05)
    w = make_worker(ctx, config, backend, msgs, queued=True, device=device)
    assert (w.stager is None) == (device is None and not backend.is_gpu)
    w.run()
    return w.sink.results


def assert_same_results(a, b, exact=True):
    assert len(a) == len(b) == 4
    assert len(a[1].header["errors"]) == 1
    for x, y in zip(a, b):
        assert {**x.header, "backend": None} == {**y.header, "backend": None}
        assert x.arrays.keys() == y.arrays.keys()
        for key in x.arrays:
            if exact:
                np.testing.assert_array_equal(x.arrays[key], y.arrays[key], err_msg=key)
            else:
                np.testing.assert_allclose(x.arrays[key], y.arrays[key], rtol=1e-5, atol=1e-3,
                                           err_msg=key)


def test_real_processors_same_results(ctx, simulated, tmp_path):
    config, msgs = epix100_run(simulated, tmp_path)
    dev = FakeDevice()
    cpu = worker_results(ctx, config, msgs, CPU, None, "cpu")
    fake = worker_results(ctx, config, msgs, CPU, dev, "fake-gpu")
    assert sum(e[0] == "copy" for e in dev.log) == 4       # the frames went by the device
    assert_same_results(cpu, fake)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA device")
def test_gpu_worker_equals_cpu(ctx, simulated, tmp_path):
    """On a device: pinned buffers, real copy streams, processing on CuPy."""
    import cupy
    config, msgs = epix100_run(simulated, tmp_path)
    cpu = worker_results(ctx, config, msgs, CPU, None, "cpu")
    gpu = worker_results(ctx, config, msgs, Backend("gpu", cupy), None, "gpu")
    assert all(r.header["backend"] == "gpu" for r in gpu)
    assert_same_results(cpu, gpu, exact=False)
