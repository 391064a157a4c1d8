"""Logs a person can use: worker lines that name the worker, the progress bar of
``gpusmd up``, and a growing file that SWMR readers open from the moment its run begins."""
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.config import load_config
from gpusmd.io.output import is_complete
from gpusmd.services.local import PACKAGE_ROOT, RUN_CLI, LocalServices, free_port
from gpusmd.services.metrics import Metrics, RunProgress
from gpusmd.services.run import RunBar
from gpusmd.services.worker import Worker

from conftest import dark_and_run, publish_in_thread, wait_for

DET = "jungfrau05M"
N_EVENTS = 24
CONFIG = f"""\
    batch_size: 4
    detectors:
      {DET}:
        calib: constants.h5
        functions:
          - {{kind: roi, bounds: [[0, 1], [10, 300], [20, 600]], thresADU: [2.0, null]}}
        sums: [calib]
    services:
      heartbeat_s: 0.2
      worker_timeout_s: 2.0
      flush_s: 0.2
      log_every_s: 0.5
    """


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("service_logs")
    dark_and_run(d, DET, N_EVENTS)
    (d / "run.yaml").write_text(textwrap.dedent(CONFIG))
    return d


def test_worker_lines_name_the_worker(setup, caplog):
    config = load_config(setup / "run.yaml")
    config.services.log_every_s = 0.0
    w = Worker(config, get_backend("cpu"), name="w7")
    try:
        with caplog.at_level(logging.INFO, logger="gpusmd.worker"):
            w.log.info("run %d ended", 3)
            w.metrics.inc("events", 10)
            w.metrics.tick()
    finally:
        w.close()
    here = f"{socket.gethostname()}-{os.getpid()}"
    lines = [r.getMessage() for r in caplog.records if r.name == "gpusmd.worker"]
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(f"worker w7 (cpu, {here}): "), line
    assert "events/s" in lines[1] and "worker: " not in lines[1]


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("out", [Terminal(), io.StringIO()], ids=["terminal", "pipe"])
def test_run_bar_follows_the_sinks_gauges(out):
    metrics = Metrics("sink", None, port=0)
    bar = RunBar(f"http://127.0.0.1:{metrics.port}/metrics", file=out)
    assert bar.plain is not isinstance(out, Terminal)
    try:
        bar.poll()                      # no run yet: no bar
        assert bar.bar is None
        progress = RunProgress(_NoBar(), metrics, run=5, total=40)
        progress.update(12)
        bar.poll()
        assert bar.bar is not None and bar.bar.n == 12 and bar.bar.total == 40
        progress.update(28)
        progress.close()
        bar.poll()                      # the run closed: its bar is complete and closed
        assert bar.bar is None
        # a run that opened and closed between two polls still gets its bar
        quick = RunProgress(_NoBar(), metrics, run=6, total=None)
        quick.update(7)
        quick.close()
        bar.poll()
    finally:
        bar.close()
        metrics.close()
    text = out.getvalue()
    assert "run 5" in text and "40/40" in text
    if isinstance(out, Terminal):
        assert "run 6" in text and "7ev" in text.replace(" ", "")
    else:               # lines, one at the end of each run at least
        assert "run 5: 40/40 events written (file closed)\n" in text
        assert "run 6: 7 events written (file closed)\n" in text


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def test_up_shows_a_progress_bar_and_the_workers_lines(setup):
    ports = {k: f"tcp://127.0.0.1:{free_port()}"
             for k in ("ingest_in", "ingest_work", "ingest_ack", "sink_in", "preview")}
    text = textwrap.dedent(CONFIG) + "".join(f"  {k}: {v}\n" for k, v in ports.items())
    (setup / "up.yaml").write_text(text)
    out = setup / "up.h5"
    up = subprocess.Popen([sys.executable, "-c", RUN_CLI, "up", "--config", str(setup / "up.yaml"),
                           "-o", str(out), "--workers", "2", "--backend", "cpu", "--monitor", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=PACKAGE_ROOT)
    try:
        head = [up.stdout.readline().decode() for _ in range(2)]
        assert head[0].startswith("gpusmd up: ingest at"), head
        url = head[1].removeprefix("gpusmd up: the live monitor at ").strip()
        assert url.startswith("http://127.0.0.1:"), head
        from gpusmd.services.publish import publish
        publish(setup / "run.h5", load_config(setup / "up.yaml"))
        wait_for(lambda: is_complete(out), "the run's file was not completed")
        time.sleep(1.0)                 # a poll of the bar and of the logs after the end
        # the page beside the services hears the sink's preview (idle after the run)
        import json
        import urllib.request

        def state():
            with urllib.request.urlopen(f"{url}/state.json", timeout=5) as r:
                return json.loads(r.read())
        wait_for(lambda: state()["reason"] == "the sink is up, no run is open",
                 "the monitor of gpusmd up --monitor heard no preview")
    finally:
        up.send_signal(signal.SIGINT)
        stdout, stderr = up.communicate(timeout=20)
    err = stderr.decode()
    if os.environ.get("SHOW_UP"):
        print(err)
    # stderr is a pipe here: the bar is plain lines between the services' lines
    assert f"run 2: {N_EVENTS}/{N_EVENTS} events written (file closed)\n" in err, err[-3000:]
    assert "gpusmd.worker INFO worker worker0 (cpu, " in err, err[-3000:]
    assert "gpusmd.ingest INFO ingest: " in err and "served worker" in err, err[-3000:]


def test_swmr_reader_opens_the_file_as_the_run_begins(setup):
    out = setup / "swmr.h5"
    logs = setup / "logs_swmr"
    with LocalServices(setup / "run.yaml", out, 2, "cpu", worker_args=["--delay-ms", "400"],
                       log_dir=logs) as chain:
        publish_in_thread(chain, setup / "run.h5")
        wait_for(lambda: (logs / "sink.log").exists()
                 and f"-> {out}" in (logs / "sink.log").read_text(), "the run did not begin")
        with h5py.File(out, "r", swmr=True) as f:          # early in the run
            assert int(f.attrs["complete"]) == 0
            # rows so far (none, unless a late sink found the first results waiting)
            n0 = len(f["event_id"])
            assert n0 < N_EVENTS and len(f[f"{DET}/ROI_0_sum"]) == n0   # made ahead
            ids = f["event_id"]

            def grown():
                ids.refresh()
                return len(ids) > n0
            wait_for(grown, "the reader saw no row")
        chain.wait_sink(60)
    with h5py.File(out, "r") as f:
        assert int(f.attrs["complete"]) == 1
        assert len(f["event_id"]) == N_EVENTS
        assert len(f[f"{DET}/ROI_0_sum"]) == N_EVENTS
        assert np.all(np.diff(f["event_id"][()]) > 0)
