"""The live services against malformed and forged messages.

First the checks themselves (protocol.py, common.py), then one chain on loopback (ingest,
two workers, the sink, without CurveZMQ keys) that takes several runs of a small
simulated camera while a local process sends it garbage and forged messages: no service
ends, every good event is written once with the values of the in-process replay, and
every refused event is one /errors row."""
import logging
import os
import signal
import textwrap
import threading
import time
from types import SimpleNamespace

import h5py
import msgpack
import numpy as np
import pytest
import zmq

from gpusmd.detectors import get_detector
from gpusmd.io.raw import RawRun
from gpusmd.runinfo import RunInfo
from gpusmd.services import common
from gpusmd.services.common import ErrorRecords, QuietLog
from gpusmd.services.local import LocalServices
from gpusmd.services.protocol import (ProtocolError, batch_token, check_result, decode,
                                      encode, end_token, event_entry, run_info)
from gpusmd.services.publish import publish
from gpusmd.simulate import simulate_run

from conftest import chain_config, in_thread, replay_reference, wait_for

DET = "camera"
N = 100
CONFIG = """\
    batch_size: 4
    detectors:
      camera:
        functions:
          - {kind: roi, bounds: [[2, 10], [3, 12]]}
        sums: [calib]
    services:
      heartbeat_s: 0.2
      worker_timeout_s: 1.0
      batch_timeout_s: 0.1
      flush_s: 0.2
      log_every_s: 1.0
      end_timeout_s: 2.0
      end_quiet_s: 0.5
      max_error_rows: 20
    """


def raw_message(header: dict, descriptors: list, *buffers) -> list:
    """A message as a peer may write it: any header, any descriptors, any frames."""
    return [msgpack.packb({"v": 1, **header, "arrays": descriptors}), *buffers]


# ---- the checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("frames, words", [
    (raw_message({"kind": "event"}, [[DET, "<u2", [3, 6148914691236517206]]], b"ab"), "shape"),
    (raw_message({"kind": "event"}, [[DET, "<u2", [-1, 16]]], b""), "shape"),
    (raw_message({"kind": "event"}, [[DET, "<u2", [1] * 9]], b"ab"), "shape"),
    (raw_message({"kind": "event"}, [[DET, "<u2", [0, 2**62, 2**62]]], b""), "shape"),
    (raw_message({"kind": "event"}, [[DET, "<u2", [True, 2]]], b"abcd"), "shape"),
    (raw_message({"kind": "event"}, [[DET, "<u2", [2]]], b"abcd", b"ab"), "2 frames sent"),
    (raw_message({"kind": "event"}, [[DET, "<u2", [2]]]), "0 frames sent"),
    (raw_message({"kind": "event"}, [[DET, "<u2", [4]]], b"abcd"), "truncated"),
    (raw_message({"kind": "event"}, [[DET, "|O", [1]]], b"12345678"), "not allowed"),
    (raw_message({"kind": "event"}, [[DET, "<U2", [1]]], b"12345678"), "not allowed"),
    (raw_message({"kind": "event"}, [["a", "<u2", [1]], ["a", "<u2", [1]]], b"ab", b"ab"), "twice"),
    (raw_message({"kind": "event"}, [[DET, "<u2"]], b"ab"), "descriptor"),
    (raw_message({"kind": "event"}, "abc"), "arrays declared"),
    (raw_message({"kind": "event", "v": 2}, []), "version"),
    (raw_message({"kind": "event", "v": True}, []), "version"),
    (raw_message({"kind": "event", "v": "1"}, []), "version"),
    (raw_message({"kind": ["event"]}, []), "kind"),
    ([b"\x93garbage"], "msgpack"),
    ([msgpack.packb([1, 2])], "not a map"),
    ([], "empty"),
])
def test_decode_refuses_what_it_cannot_use(frames, words):
    with pytest.raises(ProtocolError, match=words):
        decode(frames)


def test_decode_takes_a_good_message_and_keeps_a_readable_event_id():
    msg = decode(encode({"kind": "event", "event": 5}, {DET: np.arange(6, dtype=np.uint16)}))
    np.testing.assert_array_equal(msg.arrays[DET], np.arange(6))
    with pytest.raises(ProtocolError) as e:
        decode(raw_message({"kind": "event", "event": 7}, [[DET, "<u2", [3, 2**62]]], b"ab"))
    assert e.value.event == 7
    for event in ("abc", [1], 2.0, 2**64 - 1, -1, True):
        with pytest.raises(ProtocolError) as e:
            decode(raw_message({"kind": "event", "event": event, "v": 9}, []))
        assert e.value.event is None


@pytest.fixture(scope="module")
def info():
    cam, epix = get_detector(DET, (4, 5)), get_detector("epix10kquad")
    return RunInfo(2, {DET: cam, "epix": epix},
                   {"laser": "|i1", "ipm": "<f4", "flag": "|b1"},
                   {"epix": {0: np.zeros(epix.shape, np.uint8)}})


def event_message(info, **fields):
    header = {"kind": "event", "run": 2, "event": 5, "timestamp": 1700000000000000000,
              "scalars": {"laser": 1, "ipm": 0.5, "flag": True}, "steps": {"epix": 0}}
    header.update(fields)
    arrays = header.pop("arrays", None)
    if arrays is None:
        arrays = {d: np.zeros(m.shape, m.dtype) for d, m in info.detectors.items()}
    return decode(encode(header, arrays))


@pytest.mark.parametrize("fields, words", [
    ({"event": "abc"}, "event id"), ({"event": [1]}, "event id"), ({"event": 1.5}, "event id"),
    ({"event": 2e62}, "event id"), ({"event": 2**64 - 1}, "event id"),
    ({"event": -1}, "event id"), ({"event": True}, "event id"),
    ({"timestamp": 2**64 - 1}, "timestamp"), ({"timestamp": "now"}, "timestamp"),
    ({"run": 3}, "run 3"), ({"run": True}, "run True"),
    ({"scalars": {"laser": 1000, "ipm": 0.5, "flag": True}}, "laser"),
    ({"scalars": {"laser": -129, "ipm": 0.5, "flag": True}}, "laser"),
    ({"scalars": {"laser": 1.0, "ipm": 0.5, "flag": True}}, "laser"),
    ({"scalars": {"laser": 1, "ipm": 1e300, "flag": True}}, "ipm"),
    ({"scalars": {"laser": 1, "ipm": "x", "flag": True}}, "ipm"),
    ({"scalars": {"laser": 1, "ipm": 0.5, "flag": 2}}, "flag"),
    ({"scalars": {"laser": 1, "ipm": 0.5}}, "missing scalar"),
    ({"scalars": "abc"}, "scalars must be a map"),
    ({"steps": "abc"}, "steps"), ({"steps": ["epix"]}, "steps"),
    ({"steps": {"epix": "abc"}}, "config step"), ({"steps": {"epix": -1}}, "config step"),
    ({"steps": {"nosuch": 0}}, "steps"),
    ({"steps": {"epix": 1}}, "no control bits for config step 1"),
    ({"steps": {}, "arrays": {DET: np.zeros((4, 5), np.uint16)}}, "no frame of detector 'epix'"),
    ({"arrays": {DET: np.zeros((4, 5), np.int32)}}, "camera: frame"),
])
def test_event_fields_are_checked(info, fields, words):
    with pytest.raises(ProtocolError, match=words):
        event_entry(event_message(info, **fields), info)


def test_a_good_event_entry(info):
    entry = event_entry(event_message(info, steps={}, scalars={"laser": True, "ipm": float("nan"),
                                                                "flag": 0, "extra": "x"}), info)
    assert entry["event"] == 5 and entry["steps"] == {DET: 0, "epix": 0}
    assert set(entry["scalars"]) == {"laser", "ipm", "flag"}
    with pytest.raises(ProtocolError, match="no control bits"):    # the camera has no steps
        event_entry(event_message(info, steps={DET: 3, "epix": 2}), info)
    assert event_entry(event_message(info, steps={DET: 3}), info)["steps"] == {DET: 3, "epix": 0}


@pytest.mark.parametrize("fields, words", [
    ({"run": "x"}, "run"), ({"run": -1}, "run"), ({"detectors": []}, "detectors"),
    ({"detectors": {}}, "detectors"), ({"detectors": {DET: "camera"}}, "detector"),
    ({"detectors": {DET: {"type": "camera", "shape": [2**27, 3]}}}, "detector"),
    ({"detectors": {DET: {"type": "camera", "shape": [100000, 100000]}}}, "pixels"),
    ({"detectors": {DET: {"type": "camera", "shape": [8000, 9000]}}}, "pixels"),
    ({"detectors": {DET: {"type": "nosuch"}}}, "unknown detector type"),
    ({"scalars": {"a": "|O"}}, "scalar"), ({"scalars": {"a": "<U4"}}, "scalar"),
    ({"scalars": ["a"]}, "scalars"), ({"n_events": -1}, "n_events"),
    ({"experiment": "../../home"}, "experiment"), ({"experiment": 5}, "experiment"),
    ({"arrays": {"epix/control_bits/0": np.zeros(3, np.uint8)}}, "control bits"),
    ({"arrays": {"epix/control_bits/x": np.zeros(3, np.uint8)}}, "control_bits"),
    ({"arrays": {"junk": np.zeros(3, np.uint8)}}, "control_bits"),
])
def test_begin_run_fields_are_checked(info, fields, words):
    header, arrays = info.to_message()
    fields = dict(fields)
    arrays = fields.pop("arrays", {} if "detectors" in fields else arrays)
    header.update(fields)
    with pytest.raises(ProtocolError, match=words):
        run_info(decode(encode(header, arrays)))


@pytest.mark.parametrize("token", ["short", 5, ["t" * 32], "t" * 257])
def test_a_begin_run_end_token_is_checked(token):
    with pytest.raises(ProtocolError, match="end_token"):
        end_token({"end_token": token})
    assert end_token({}) is None and end_token({"end_token": "t" * 16}) == "t" * 16


def test_a_good_begin_run(info):
    got = run_info(decode(encode(*info.to_message())))
    assert got.detectors == info.detectors and got.scalars == info.scalars
    assert list(got.control_bits["epix"]) == [0]


def test_results_fields_are_checked(info):
    def result(**fields):
        header = {"kind": "result", "run": 2, "batch": 0, "events": [1, 2],
                  "timestamps": [3, 4], "errors": [[7, "worker", "x"]],
                  "scalars": {"laser": [1, 2], "ipm": [0.5, 0.5], "flag": [True, False]}}
        arrays = {f"{DET}/ROI_0_sum": np.zeros(2, np.float32),
                  f"{DET}/var_d#len": np.array([1, 2]), f"{DET}/var_d#x": np.zeros(3),
                  f"sums/{DET}/calib": np.zeros((4, 5))}
        arrays.update(fields.pop("arrays", {}))
        header.update(fields)
        return decode(encode(header, arrays))

    sums = {f"sums/{DET}/calib": (4, 5)}
    assert check_result(result(), info, sums) is None
    for fields in ({"events": ["a", 2]}, {"events": [1, 2**64 - 1]}, {"events": 5},
                   {"timestamps": [3]}, {"timestamps": [3, 2**64 - 1]},
                   {"scalars": {"laser": [1, 1000], "ipm": [0, 0], "flag": [1, 1]}},
                   {"scalars": {"laser": [1]}}, {"scalars": []},
                   {"errors": [[1, 2, 3]]}, {"errors": "abc"}, {"n_sum_events": "x"},
                   {"arrays": {f"{DET}/ROI_0_sum": np.zeros(3, np.float32)}},
                   {"arrays": {f"{DET}/ROI_0_sum": np.zeros((), np.float32)}},
                   {"arrays": {f"{DET}/var_d#x": np.zeros(2)}},
                   {"arrays": {f"{DET}/var_d#len": np.array([1, -1])}},
                   {"arrays": {f"sums/{DET}/calib": np.zeros((5, 4))}},
                   {"arrays": {f"sums/{DET}/nosuch": np.zeros((4, 5))}}):
        assert check_result(result(**fields), info, sums) is not None, fields


def test_batch_tokens():
    key = "k" * 32
    token = batch_token(key, 2, 5)
    assert token == batch_token(key, 2, 5) and len(token) == 32
    assert token not in (batch_token(key, 2, 6), batch_token(key, 3, 5),
                         batch_token("j" * 32, 2, 5), batch_token(key, 2, 5, ack=True))


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_quiet_log_says_each_kind_once_an_interval_with_counts(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(common, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    logger = logging.getLogger("gpusmd.test.quiet")
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    quiet = QuietLog(logger, every_s=1.0)
    for i in range(10000):
        quiet.warning(f"event {i} skipped: bad header")
        quiet.warning(f"message skipped: {'x' * 10000}")       # long: cut
        quiet.warning(f"event {i} skipped: unknown kind 'k{i}'")
    assert len(handler.lines) == 3 and max(len(line) for line in handler.lines) <= 400
    clock[0] += 0.5
    quiet.tick()
    assert len(handler.lines) == 3
    clock[0] += 0.6
    quiet.tick()
    assert len(handler.lines) == 6
    assert sorted(int(line.split()[0]) for line in handler.lines[3:]) == [9999] * 3
    quiet.warning("event 1 skipped: bad header")              # a new interval
    assert len(handler.lines) == 7
    for i in range(200):        # more kinds than are told apart: the rest are "other"
        quiet.warning(f"worker w{chr(65 + i % 26)}{chr(65 + i // 26)} joined")
    assert len(handler.lines) == 7 + 49 + 1


def test_error_records_keep_a_number_of_each_kind_and_count_the_rest():
    records = ErrorRecords(keep=3)
    for i in range(10):
        records.add(i, "ingest", f"event id {i} is not after {i + 5}")
    records.add(-1, "ingest", "bad header: not msgpack (ExtraData)")
    records.add(12, "ingest", "x" * 1000)
    assert [r[0] for r in records.take(100)] == [0, 1, 2, -1, 12]
    records.close()
    records.close()
    assert records.take(100) == [[-1, "ingest", "7 more like: event id 3 is not after 8"]]


# ---- the chain ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One chain for the runs of this module (each test its own run number); worker0
    takes 0.2 s a batch, so that it holds batches while a run flows."""
    d = tmp_path_factory.mktemp("robust")
    simulate_run(d / "run.h5", DET, n_events=N, shape=(16, 16))
    (d / "run.yaml").write_text(textwrap.dedent(CONFIG))
    replay_reference(d)
    c = LocalServices(d / "run.yaml", d / "run{run}.h5", 2, "cpu", once=False,
                      log_dir=d / "logs", per_worker_args={0: ["--delay-ms", "200"]})
    c.start()
    c.dir = d
    try:
        wait_for(lambda: all(f"worker{i} joined" in log_text(c, "ingest") for i in range(2)),
                 "the workers did not join", 30)
        yield c
    finally:
        c.stop()


def log_text(chain, name: str) -> str:
    return (chain.dir / "logs" / f"{name}.log").read_text()


def written(chain, run: int, timeout: float = 30):
    """The output of run ``run``, once the sink has closed it."""
    wait_for(lambda: f"run {run} written to" in log_text(chain, "sink"),
             f"run {run} was not written", timeout)
    return chain.dir / f"run{run}.h5"


def all_alive(chain):
    assert [p.poll() for p in chain.processes] == [None] * 4
    for name in ("ingest", "sink", "worker0", "worker1"):
        assert "could not be handled" not in log_text(chain, name)
        assert "Traceback" not in log_text(chain, name)


def run_messages(chain, run: int, end_token: str | None = None):
    """The simulated run as run ``run``: (its begin_run, with ``end_token`` when given,
    [(event header, arrays)])."""
    with RawRun(chain.dir / "run.h5") as r:
        info = RunInfo.from_run(r)
        info.run = run
        frames = r.read(DET, 0, r.n_events)
        events = [({"kind": "event", "run": run, "event": int(r.event_id[i]),
                    "timestamp": int(r.timestamp[i]),
                    "scalars": {s: r.scalars[s][i].item() for s in info.scalars}},
                   {DET: frames[i]}) for i in range(r.n_events)]
    header, arrays = info.to_message()
    if end_token is not None:
        header["end_token"] = end_token
    return encode(header, arrays), events


def begin_header(chain, run: int) -> dict:
    return decode(run_messages(chain, run)[0]).header


class Peer:
    """A local process's socket to one of the chain's addresses (no keys)."""

    def __init__(self, ctx, chain, address: str, kind=zmq.PUSH, identity: bytes | None = None):
        self.sock = ctx.socket(kind)
        if identity is not None:
            self.sock.identity = identity
        self.sock.linger = 10000
        self.sock.connect(chain.addresses[address])

    def send(self, frames):
        self.sock.send_multipart(frames)


def assert_rows(out, chain, only=None):
    """The output holds the reference's rows (all, or those of the indices ``only``), each
    once; and its sums, when every event is there."""
    ref = chain.dir / "reference.h5"
    names = []
    with h5py.File(ref, "r") as g:
        g.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset)
                     and obj.shape[:1] == (N,) and not name.startswith(("errors", "UserDataCfg",
                                                                       "Sums")) else None)
        rows = np.arange(N) if only is None else np.asarray(only)
        with h5py.File(out, "r") as f:
            assert len(names) >= 5 and f"{DET}/ROI_0_sum" in names
            for name in names:
                np.testing.assert_array_equal(f[name][()], g[name][()][rows], err_msg=name)
            if only is None:
                for name in g["Sums"]:
                    np.testing.assert_allclose(f["Sums"][name][()], g["Sums"][name][()],
                                               rtol=1e-12, err_msg=name)


def error_rows(out) -> list:
    with h5py.File(out, "r") as f:
        return list(zip(f["errors/event_id"][()].tolist(),
                        [s.decode() for s in f["errors/stage"][()]],
                        [r.decode() for r in f["errors/reason"][()]]))


def test_malformed_events_are_recorded_one_row_each(chain):
    run = 10
    begin, events = run_messages(chain, run)
    head, arrays = events[0]
    frame = arrays[DET]
    desc = [[DET, "<u2", list(frame.shape)]]
    bad = [     # (words of the reason, the message)
        ("shape", raw_message({**head, "event": 10**12}, [[DET, "<u2", [3, 6148914691236517206]]],
                              b"\0\0")),
        ("shape", raw_message({**head, "event": 10**12}, [[DET, "<u2", [-1, 16]]], b"")),
        ("shape", raw_message({**head, "event": 10**12}, [[DET, "<u2", [1] * 9]], b"\0\0")),
        ("frames sent", raw_message(head, desc, frame.tobytes(), b"\0\0")),
        ("version", raw_message({**head, "v": 2}, desc, frame.tobytes())),
        ("version", raw_message({**head, "v": True}, desc, frame.tobytes())),
        ("event id", encode({**head, "event": "abc"}, arrays)),
        ("event id", encode({**head, "event": [1]}, arrays)),
        ("event id", encode({**head, "event": 2e62}, arrays)),
        ("event id", encode({**head, "event": 2**64 - 1}, arrays)),
        ("timestamp", encode({**head, "event": 10**12, "timestamp": 2**64 - 1}, arrays)),
        ("lightStatus/laser", encode({**head, "event": 10**12,
                                      "scalars": {**head["scalars"], "lightStatus/laser": 1000}},
                                     arrays)),
        ("scalars must be a map", encode({**head, "event": 10**12, "scalars": "abc"}, arrays)),
        ("missing scalar", encode({**head, "event": 10**12, "scalars": {}}, arrays)),
        ("steps", encode({**head, "event": 10**12, "steps": "abc"}, arrays)),
        ("config step", encode({**head, "event": 10**12, "steps": {DET: "abc"}}, arrays)),
        ("steps", encode({**head, "event": 10**12, "steps": {"nosuch": 0}}, arrays)),
        ("camera: frame", encode({**head, "event": 10**12}, {DET: frame.astype(np.int32)})),
        ("not msgpack", [b"\x93garbage"]),
        ("while run 10 is open", run_messages(chain, 998)[0]),
        ("end of run 997", encode({"kind": "end", "run": 997, "n_events": 1})),
    ]
    ctx = zmq.Context()
    try:
        source = Peer(ctx, chain, "ingest_in")
        source.send(begin)
        for i, (h, a) in enumerate(events):
            source.send(encode(h, a))
            if i < len(bad):
                source.send(bad[i][1])
        source.send(encode({"kind": "end", "run": run, "n_events": N + len(bad) - 2}))
        out = written(chain, run)
    finally:
        ctx.destroy(linger=5000)
    all_alive(chain)
    assert_rows(out, chain)
    rows = error_rows(out)
    assert len(rows) == len(bad), rows
    for (words, _), (event, stage, reason) in zip(bad, rows):
        assert words in reason and stage == "ingest", (words, reason)
        assert event in (-1, 10**12, head["event"]), (event, reason)


def memory_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_flood_of_garbage_mid_run(chain):
    """100,000 malformed messages to the ingest between the events of a run, and some to
    each other socket: every event written, a bounded number of rows and log lines, the
    workers kept (their heartbeats served), the sink's memory flat."""
    run, n_garbage = 11, 100_000
    begin, events = run_messages(chain, run)
    head, arrays = events[0]
    kinds = [[b"\x93garbage"],
             encode({**head, "v": 7, "event": 10**12}, arrays),
             encode({**head, "event": 10**12})]          # no frame
    lines_before = {n: len(log_text(chain, n).splitlines()) for n in ("ingest", "sink")}
    rss, sampling = [memory_mb(chain.sink.pid)], threading.Event()

    def sample():
        while not sampling.wait(0.1):
            rss.append(memory_mb(chain.sink.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ctx = zmq.Context()
    try:
        source = Peer(ctx, chain, "ingest_in")
        others = [Peer(ctx, chain, "ingest_ack"), Peer(ctx, chain, "sink_in"),
                  Peer(ctx, chain, "ingest_work", zmq.DEALER, b"flood")]
        source.send(begin)
        for h, a in events[:N // 2]:
            source.send(encode(h, a))
        for i in range(n_garbage):
            source.send(kinds[i % 3])
            if i % 20 == 0:
                others[i // 20 % 3].send(kinds[i // 20 % 2])
        for h, a in events[N // 2:]:
            source.send(encode(h, a))
        source.send(encode({"kind": "end", "run": run, "n_events": N + n_garbage}))
        out = written(chain, run, timeout=90)
    finally:
        sampling.set()
        ctx.destroy(linger=5000)
    all_alive(chain)
    assert_rows(out, chain)
    rows = error_rows(out)
    counts = [len(range(k, n_garbage, 3)) for k in range(3)]
    assert len(rows) == 3 * 20 + 3
    summaries = [r for r in rows if " more like: " in r[2]]
    assert sorted(int(r[2].split()[0]) for r in summaries) == sorted(c - 20 for c in counts)
    for words in ("not msgpack", "protocol version 7", "no frame of detector"):
        assert sum(words in r[2] for r in rows) == 21
    for name in ("ingest", "sink"):
        assert len(log_text(chain, name).splitlines()) - lines_before[name] < 300
    assert "silent" not in log_text(chain, "ingest")
    assert max(rss) - rss[0] < 64, rss


def test_forged_control_messages_change_nothing(chain):
    """A local process without keys forges credits, heartbeats, acks (of batches in flight,
    whose shared-memory slots must not be reused), results, errors, ends and begin_runs
    while a run flows: refused; the run is written right, the refused begin_run at the
    ingest is its one /errors row."""
    run = 12
    begin, events = run_messages(chain, run)
    head = events[0][0]
    ctx = zmq.Context()
    forged = []

    def forge():
        acks, sink = Peer(ctx, chain, "ingest_ack"), Peer(ctx, chain, "sink_in")
        source = Peer(ctx, chain, "ingest_in")
        mallory = Peer(ctx, chain, "ingest_work", zmq.DEALER, b"mallory")
        mallory_hb = Peer(ctx, chain, "ingest_work", zmq.DEALER, b"mallory/hb")
        for frames in (encode({"kind": "ready", "worker": "worker0", "credit": 5, "join": True}),
                       encode({"kind": "ready", "worker": "mallory", "credit": "abc"}),
                       encode({"kind": "ready", "worker": "mallory", "credit": -1}),
                       encode({"kind": "ready", "worker": ["mallory"], "credit": 1}),
                       encode({"kind": "ack", "worker": "mallory", "batch": 0}),
                       encode({"kind": "heartbeat", "worker": "worker1"})):
            mallory.send(frames)
        # a worker that takes batches and never answers: dropped, its batches re-sent
        mallory.send(encode({"kind": "ready", "worker": "mallory", "credit": 10**9, "join": True}))
        mallory_hb.send(encode({"kind": "heartbeat", "worker": "mallory"}))
        source.send(run_messages(chain, 998)[0])            # recorded, not obeyed
        sink.send(encode({**begin_header(chain, 999), "key": "k" * 32}))
        for _ in range(40):
            for b in range(30):
                acks.send(encode({"kind": "ack", "batch": b, "token": "0" * 32}))
                acks.send(encode({"kind": "ack", "batch": b}))
                sink.send(encode({"kind": "result", "run": run, "batch": b, "token": "0" * 32,
                                  "worker": "mallory", "events": [head["event"] + 4 * b],
                                  "timestamps": [0], "errors": [], "n_sum_events": 1,
                                  "scalars": {s: [0] for s in head["scalars"]}},
                                 {f"{DET}/ROI_0_sum": np.full(1, 1e9, np.float32)}))
            acks.send(encode({"kind": "ack", "batch": [1]}))
            acks.send(encode({"kind": "ack", "batch": "x", "token": 5}))
            for frames in (encode({"kind": "end", "run": run, "n_batches": 0}),
                           encode({"kind": "end", "run": run, "n_batches": 0, "key": "k" * 32}),
                           encode({"kind": "errors", "run": run, "errors": [[1, "x", "forged"]]}),
                           encode({"kind": "errors", "run": run, "key": None, "errors": "abc"}),
                           encode({"kind": "result", "run": run, "batch": "x"}),
                           encode({"kind": "result", "run": [run], "batch": 0}),
                           encode({"kind": "result", "run": run, "batch": 2**64 - 1}),
                           [b"\x93garbage"]):
                sink.send(frames)
            time.sleep(0.05)
        forged.append(True)

    try:
        source = Peer(ctx, chain, "ingest_in")
        source.send(begin)
        wait_for(lambda: f"run {run} ->" in log_text(chain, "sink"), "the run did not begin", 10)
        forger = threading.Thread(target=forge, daemon=True)
        forger.start()
        for h, a in events:
            source.send(encode(h, a))
            time.sleep(0.02)
        source.send(encode({"kind": "end", "run": run, "n_events": N}))
        forger.join(30)
        out = written(chain, run)
    finally:
        ctx.destroy(linger=5000)
    assert forged
    all_alive(chain)
    assert_rows(out, chain)
    rows = error_rows(out)
    assert len(rows) == 1 and "begin_run of run 998 while run 12 is open" in rows[0][2], rows
    assert not (chain.dir / "run999.h5").exists()
    ingest, sink = log_text(chain, "ingest"), log_text(chain, "sink")
    assert "in the name of worker 'worker0': refused" in ingest
    assert "without the sink's token: refused" in ingest
    assert "mallory silent" in ingest
    assert "without its token: refused" in sink and "not the run's key" in sink
    assert "begin_run of run 999 while run 12 is open: refused" in sink


def test_an_early_end_loses_nothing_and_a_late_one_is_waited_for(chain):
    """Ends injected by another local process (no keys), after 31 events with a short
    count, with none and with malformed ones, after 61 with the full count: a run whose begin_run carries an
    end_token (as gpusmd publish sends it) refuses them, even while its source pauses
    longer than end_quiet_s; a run without (an older source) takes them as lower bounds
    and ends once every event came and its source is quiet. Either way every event is
    written, the file complete. An end announcing more than come ends the run
    end_timeout_s after the last one, with one row saying how many never came."""
    ctx = zmq.Context()
    try:
        source, other = Peer(ctx, chain, "ingest_in"), Peer(ctx, chain, "ingest_in")
        for run, token, pause in ((13, None, 0.2), (17, "t" * 32, 0.8)):
            begin, events = run_messages(chain, run, token)
            source.send(begin)
            for i, (h, a) in enumerate(events):
                source.send(encode(h, a))
                if i in (30, 60):
                    time.sleep(0.2)
                    forged = ([{"n_events": 31}, {}, {"n_events": 31, "end_token": "x" * 32},
                               *({"n_events": bad} for bad in ("abc", -1, 2 ** 64 - 1, 1.5,
                                                               True, [31]))]
                              if i == 30 else [{"n_events": N}])
                    for fields in forged:
                        other.send(encode({"kind": "end", "run": run, **fields}))
                    time.sleep(pause)     # the tokenless source: less than end_quiet_s
            end = {"kind": "end", "run": run, "n_events": N}
            source.send(encode(end if token is None else {**end, "end_token": token}))
            out = written(chain, run)
            assert_rows(out, chain)
            # a malformed end is one /errors row where it is read (a tokened run refuses
            # every end without its token before reading it)
            assert [row[2] for row in error_rows(out)] == ([] if token else [
                f"end: n_events must be a count, got {bad!r}"
                for bad in ("abc", -1, 2 ** 64 - 1, 1.5, True, [31])])
            with h5py.File(out, "r") as f:
                assert f.attrs["complete"] == 1 and f.attrs["n_events"] == N
        assert log_text(chain, "ingest").count("without its begin_run's end_token: refused")

        run = 14
        begin, events = run_messages(chain, run)
        source.send(begin)
        for h, a in events:
            source.send(encode(h, a))
        t0 = time.monotonic()
        source.send(encode({"kind": "end", "run": run, "n_events": N + 5}))
        out = written(chain, run)
        assert time.monotonic() - t0 > 1.5            # end_timeout_s: 2
        assert_rows(out, chain)
        rows = error_rows(out)
        assert len(rows) == 1 and "5 of the 105 events" in rows[0][2] and rows[0][0] == -1
    finally:
        ctx.destroy(linger=5000)
    all_alive(chain)


def test_idle_workers_stopped_then_resumed_take_the_next_run(chain):
    """Workers stopped (SIGSTOP) for longer than worker_timeout_s while they hold nothing
    are dropped; resumed, they rejoin with their credits and the next run (gpusmd
    publish, run 2) completes."""
    def count(words):
        return log_text(chain, "ingest").count(words)

    drops = [count(f"worker{i} silent") for i in range(2)]
    before = count("asked to rejoin")
    for w in chain.workers:
        os.kill(w.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: all(count(f"worker{i} silent") > drops[i] for i in range(2)),
                 "the stopped workers were not dropped", 10)
    finally:
        for w in chain.workers:
            os.kill(w.pid, signal.SIGCONT)
    wait_for(lambda: count("asked to rejoin") >= before + 2,
             "the workers were not asked to rejoin", 10)
    assert in_thread(publish, chain.dir / "run.h5", chain_config(chain))(60) == N
    out = written(chain, 2)
    all_alive(chain)
    assert_rows(out, chain)
    assert error_rows(out) == []
    assert log_text(chain, "worker0").count("joining again") >= 1


def test_a_worker_stopped_while_it_holds_batches_then_resumed(chain):
    """worker0 (slow) stopped while it holds batches: dropped, its batches re-sent;
    resumed, it sends its results of them too: the sink keeps each batch once."""
    run = 15
    begin, events = run_messages(chain, run)
    drops = log_text(chain, "ingest").count("worker0 silent")
    ctx = zmq.Context()
    try:
        source = Peer(ctx, chain, "ingest_in")
        source.send(begin)
        for h, a in events[:20]:       # at once: both workers take batches
            source.send(encode(h, a))
        time.sleep(0.05)
        os.kill(chain.workers[0].pid, signal.SIGSTOP)
        for h, a in events[20:]:
            source.send(encode(h, a))
            time.sleep(0.015)
        wait_for(lambda: log_text(chain, "ingest").count("worker0 silent") > drops,
                 "worker0 was not dropped", 10)
        os.kill(chain.workers[0].pid, signal.SIGCONT)
        source.send(encode({"kind": "end", "run": run, "n_events": N}))
        out = written(chain, run)
    finally:
        os.kill(chain.workers[0].pid, signal.SIGCONT)
        ctx.destroy(linger=5000)
    resent = log_text(chain, "ingest").split("worker0 silent")[-1].split("\n")[0]
    assert not resent.endswith("re-sending batches []"), resent
    sink = lambda: log_text(chain, "sink")      # noqa: E731
    wait_for(lambda: "duplicates=" in sink() or f"late result of run {run}" in sink(),
             "the batches worker0 held did not come twice", 10)
    all_alive(chain)
    assert_rows(out, chain)
    assert error_rows(out) == []


def test_a_begin_run_forged_ahead_of_the_real_one_does_not_keep_it_out(chain):
    """A begin_run sent to the idle sink before the real run's: the real one is refused
    while the forged run is open, then taken once that run has been silent for
    end_timeout_s, with the results that came meanwhile."""
    run = 16
    begin, events = run_messages(chain, run)
    ctx = zmq.Context()
    try:
        Peer(ctx, chain, "sink_in").send(encode({**begin_header(chain, 996), "key": "k" * 32}))
        wait_for(lambda: "run 996 ->" in log_text(chain, "sink"), "no forged run", 10)
        source = Peer(ctx, chain, "ingest_in")
        source.send(begin)
        for h, a in events:
            source.send(encode(h, a))
        source.send(encode({"kind": "end", "run": run, "n_events": N}))
        out = written(chain, run)
    finally:
        ctx.destroy(linger=5000)
    sink = log_text(chain, "sink")
    assert "begin_run of run 16 while run 996 is open: refused" in sink
    assert "run 16 begins while run 996 is open, silent for 2 s: closing it incomplete" in sink
    all_alive(chain)
    assert_rows(out, chain)
    assert error_rows(out) == []
