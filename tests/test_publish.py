"""The publisher delivers a whole run, `end` included, also into a slow reader, and exits
cleanly; one stopped by an error or by its context does not wait for a reader that never
comes. The local chain starts from any folder and says why a service died; the metrics
endpoint listens where --metrics-host says."""
import subprocess
import sys
import time
from contextlib import contextmanager

import msgpack
import pytest
import zmq

from gpusmd.cli import build_parser, service_config
from gpusmd.config import load_config
from gpusmd.errors import GpusmdError
from gpusmd.services import publish as publish_module
from gpusmd.services.local import free_port
from gpusmd.services.metrics import Metrics
from gpusmd.services.publish import publish
from gpusmd.services.run import replay_via_services
from gpusmd.simulate import simulate_run

from conftest import in_thread

N_EVENTS = 200
RUN = ["begin_run"] + ["event"] * N_EVENTS + ["end"]
CONFIG = """\
detectors:
  camera:
    functions: []
services:
  hwm: 4
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("publish")
    # 64 KiB frames: zmq sends them without copies
    simulate_run(d / "run.h5", "camera", n_events=N_EVENTS, shape=(128, 256))
    (d / "run.yaml").write_text(CONFIG)
    return d


@pytest.fixture
def small_run(tmp_path):
    simulate_run(tmp_path / "run.h5", "camera", n_events=20, shape=(16, 32))
    (tmp_path / "run.yaml").write_text(CONFIG)
    return tmp_path


@contextmanager
def slow_reader(pause=0.001):
    """A PULL socket with a small high-water mark; read_run() pauses after every message."""
    with zmq.Context() as ctx:
        sock = ctx.socket(zmq.PULL)
        sock.rcvhwm = 2
        sock.linger = 0
        sock.bind("tcp://127.0.0.1:*")

        def read_run(silence=5.0):
            """The kinds of the messages up to the end, or up to a silence of ``silence`` s."""
            kinds = []
            while (not kinds or kinds[-1] != "end") and sock.poll(silence * 1000):
                kinds.append(msgpack.unpackb(sock.recv_multipart()[0])["kind"])
                time.sleep(pause)
            return kinds

        yield sock.last_endpoint.decode(), read_run
        sock.close()


def nobody():
    return f"tcp://127.0.0.1:{free_port()}"


def test_gpusmd_publish_delivers_every_message_every_time(run_dir):
    with slow_reader() as (address, read_run):
        for attempt in range(20):
            p = subprocess.Popen([sys.executable, "-m", "gpusmd.cli", "publish",
                                  str(run_dir / "run.h5"), "--config", str(run_dir / "run.yaml"),
                                  "--ingest-in", address],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            kinds = read_run()
            out = p.communicate(timeout=30)[0]
            assert p.returncode == 0, f"attempt {attempt}: status {p.returncode}\n{out}"
            assert kinds == RUN, (f"attempt {attempt}: {kinds.count('event')} events, "
                                  f"last {kinds[-1:]}")


def test_publish_with_a_given_context_leaves_it_open(run_dir):
    ctx = zmq.Context()
    try:
        with slow_reader() as (address, read_run):
            sent = in_thread(publish, run_dir / "run.h5", load_config(run_dir / "run.yaml"),
                             address=address, ctx=ctx)
            assert read_run() == RUN
            assert sent(10) == N_EVENTS and not ctx.closed
    finally:
        ctx.term()


def test_terminating_a_given_context_ends_a_blocked_publish(run_dir):
    ctx = zmq.Context()
    # nobody listens there: the sends block at the high-water mark
    sent = in_thread(publish, run_dir / "run.h5", load_config(run_dir / "run.yaml"),
                     address=nobody(), ctx=ctx)
    time.sleep(0.5)
    in_thread(ctx.term)(10)
    with pytest.raises(zmq.ContextTerminated):
        sent(1)


def test_a_publish_stopped_by_an_error_does_not_wait_for_a_reader(run_dir, monkeypatch):
    open_run = publish_module.open_run

    @contextmanager
    def unreadable_run(source, detectors):
        with open_run(source, detectors) as run:
            def batches(*args):
                raise OSError("unreadable")
                yield
            run.batches = batches
            yield run

    monkeypatch.setattr(publish_module, "open_run", unreadable_run)
    with pytest.raises(OSError, match="unreadable"):     # the begin_run stays queued
        in_thread(publish, run_dir / "run.h5", load_config(run_dir / "run.yaml"),
                  address=nobody())(10)


def test_the_chain_starts_from_a_folder_holding_another_gpusmd(small_run, monkeypatch):
    (small_run / "gpusmd").mkdir()
    (small_run / "gpusmd" / "__init__.py").write_text("")
    monkeypatch.chdir(small_run)
    summary = in_thread(replay_via_services, "run.h5", "run.yaml", "out.h5", 1, "cpu",
                        timeout=60)(90)
    assert summary.n_events == 20 and (small_run / "out.h5").stat().st_size > 0


def test_a_dead_sink_says_why(run_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    # the queues and the sockets' buffers hold less than the run: the publisher is left
    # blocked
    (tmp_path / "tight.yaml").write_text(
        CONFIG.replace("hwm: 4", "hwm: 1\n  max_pending_batches: 1\n  max_in_flight_batches: 1")
        + "batch_size: 2\n")
    with pytest.raises(GpusmdError) as e:
        in_thread(replay_via_services, run_dir / "run.h5", tmp_path / "tight.yaml",
                  tmp_path / "a_file" / "out.h5", 1, "cpu", timeout=60)(30)
    message = str(e.value)
    assert message.startswith("the sink exited with status 1; the last lines of its log:\n")
    assert "File exists" in message and message.endswith("may be incomplete")


def test_metrics_host(tmp_path, monkeypatch):
    monkeypatch.setattr(Metrics, "default_host", Metrics.default_host)
    (tmp_path / "run.yaml").write_text(CONFIG)
    args = ["ingest", "--config", str(tmp_path / "run.yaml")]
    for extra, host in (([], "127.0.0.1"), (["--metrics-host", "0.0.0.0"], "0.0.0.0")):
        service_config(build_parser().parse_args(args + extra))
        with Metrics("ingest", port=0) as m:
            assert m._server.server_address[0] == host
