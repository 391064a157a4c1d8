"""Service metrics: counters, gauges, the Prometheus text, the log line, the HTTP endpoint."""
import logging
import re
import threading
import urllib.error
import urllib.request

import pytest

from gpusmd.services.metrics import Metrics, sanitize_name

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def parse(text):
    """Prometheus text -> ({metric: type}, {metric: value}); checks the syntax on the way."""
    types, values = {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, metric, kind = line.split(" ")
            assert NAME.match(metric) and kind in ("counter", "gauge")
            assert metric not in types, f"duplicate TYPE line for {metric}"
            types[metric] = kind
        elif line.startswith("#") or not line:
            continue
        else:
            metric, value = line.split(" ")
            assert NAME.match(metric), metric
            assert metric in types, f"{metric} has no TYPE line before it"
            assert metric not in values
            values[metric] = float(value)
    return types, values


def test_counters_gauges_render():
    m = Metrics("ingest", log_every=60)
    m.inc("events")
    m.inc("events", 9)
    m.inc("bytes_in", 2.5e6)
    m.set("queue_pending", 3)
    m.set("workers", 2)
    m.set("workers", 4)                    # gauges are overwritten
    m.inc("bad name-with.dots")            # sanitized
    m.inc("frames_total", 2)               # no "_total_total"
    m.inc("0weird")
    assert m.get("events") == 10 and m.get("workers") == 4 and m.get("nothing", -1) == -1
    types, values = parse(m.render())
    assert types["gpusmd_ingest_events_total"] == "counter"
    assert values["gpusmd_ingest_events_total"] == 10
    assert values["gpusmd_ingest_errors_total"] == 0           # present from the start
    assert values["gpusmd_ingest_bytes_in_total"] == 2.5e6
    assert types["gpusmd_ingest_queue_pending"] == "gauge"
    assert values["gpusmd_ingest_queue_pending"] == 3
    assert values["gpusmd_ingest_workers"] == 4
    assert values["gpusmd_ingest_bad_name_with_dots_total"] == 1
    assert values["gpusmd_ingest_frames_total"] == 2
    assert values["gpusmd_ingest__0weird_total"] == 1
    assert types["gpusmd_ingest_events_per_second"] == "gauge"
    assert values["gpusmd_ingest_events_per_second"] == 0      # no interval elapsed yet
    snap = m.snapshot()
    assert snap["counters"]["events"] == 10 and snap["gauges"]["workers"] == 4
    m.close()


def test_service_name_sanitized():
    m = Metrics("worker-1", log_every=None)
    types, _ = parse(m.render())
    assert "gpusmd_worker_1_events_total" in types
    assert sanitize_name("a.b-c") == "a_b_c" and sanitize_name("1x") == "_1x"


def test_log_line_and_rate(caplog):
    m = Metrics("ingest", log_every=0)
    caplog.set_level(logging.INFO, logger="gpusmd.ingest")
    m.inc("events", 1000)
    m.inc("bytes_in", 50e6)
    m.set("pending", 3)
    m.set("in_flight", 4)
    m.set("workers", 2)
    m.tick()
    records = [r for r in caplog.records if r.name == "gpusmd.ingest"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    line = records[0].getMessage()
    match = re.fullmatch(r"ingest: ([\d.]+) events/s, ([\d.]+) MB/s, "
                         r"pending=3 in_flight=4 workers=2, errors=0", line)
    assert match, line
    assert float(match.group(1)) > 0 and float(match.group(2)) > 0
    _, values = parse(m.render())
    assert values["gpusmd_ingest_events_per_second"] > 0
    # the next interval has no new events: its rate is 0
    caplog.clear()
    m.tick()
    assert caplog.records[0].getMessage().startswith("ingest: 0.0 events/s, 0.0 MB/s")
    m.close()


def test_tick_waits_for_interval(caplog):
    m = Metrics("sink", log_every=3600)
    caplog.set_level(logging.INFO, logger="gpusmd.sink")
    m.inc("events")
    for _ in range(1000):
        m.tick()
    assert not [r for r in caplog.records if r.name == "gpusmd.sink"]
    quiet = Metrics("sink", log_every=None)
    quiet._next_t = 0                      # interval elapsed: rates updated, nothing logged
    quiet.inc("events", 5)
    quiet.tick()
    assert not [r for r in caplog.records if r.name == "gpusmd.sink"]
    assert quiet.snapshot()["rates"]["events"] > 0


def test_custom_logger(caplog):
    log = logging.getLogger("test.metrics.custom")
    caplog.set_level(logging.INFO, logger="test.metrics.custom")
    m = Metrics("worker", log_every=0, logger=log)
    m.tick()
    assert [r.getMessage() for r in caplog.records if r.name == "test.metrics.custom"] == \
        ["worker: 0.0 events/s, errors=0"]


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, None, None


def test_http_endpoint(capfd):
    m = Metrics("worker", log_every=60, port=0)
    try:
        assert isinstance(m.port, int) and m.port > 0
        m.inc("events", 7)
        m.set("batch_size", 32)
        status, ctype, body = _get(f"http://127.0.0.1:{m.port}/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        _, values = parse(body)
        assert values["gpusmd_worker_events_total"] == 7
        assert values["gpusmd_worker_batch_size"] == 32
        assert _get(f"http://127.0.0.1:{m.port}/")[0] == 404
        assert _get(f"http://127.0.0.1:{m.port}/other")[0] == 404
        assert _get(f"http://127.0.0.1:{m.port}/metrics?x=1")[0] == 200
    finally:
        m.close()
    assert "GET /metrics" not in capfd.readouterr().err      # no request log on stderr


def test_close_stops_server():
    m = Metrics("sink", port=0)
    port = m.port
    assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    m.close()
    assert m.port is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert not [t for t in threading.enumerate() if t.name == "gpusmd-sink-metrics"]
    m.close()                              # idempotent


def test_concurrent_writes_and_reads():
    m = Metrics("ingest", log_every=None, port=0)
    try:
        def writer():
            for _ in range(2000):
                m.inc("events")
                m.set("pending", 1)

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(5):
            assert _get(f"http://127.0.0.1:{m.port}/metrics")[0] == 200
        for t in threads:
            t.join()
        assert m.get("events") == 8000
    finally:
        m.close()


def test_a_port_in_use_or_a_bad_host_is_one_error():
    from gpusmd.errors import GpusmdError
    with Metrics("sink", port=0) as busy:
        with pytest.raises(GpusmdError, match=f"127.0.0.1:{busy.port}: cannot listen .*"
                                              f"another service running there"):
            Metrics("ingest", port=busy.port)
    with pytest.raises(GpusmdError, match="nosuch.invalid:0: cannot listen"):
        Metrics("ingest", port=0, host="nosuch.invalid")


@pytest.mark.parametrize("service", ["ingest", "sink"])
def test_a_service_on_a_metrics_port_in_use_says_one_line(tmp_path, service):
    """`gpusmd ingest|sink --metrics-port` on a port in use, or `--metrics-host` a name
    that does not resolve: one line naming host:port, exit 2 (no traceback)."""
    import subprocess
    import sys
    from gpusmd.services.local import free_port
    (tmp_path / "run.yaml").write_text("detectors:\n  camera: {}\n")
    addresses = [a for key in ("--ingest-in", "--ingest-work", "--ingest-ack", "--sink-in")
                 for a in (key, f"tcp://127.0.0.1:{free_port()}")]
    with Metrics("other", port=0) as busy:
        for args, words in ((["--metrics-port", str(busy.port)],
                             f"127.0.0.1:{busy.port}: cannot listen"),
                            (["--metrics-port", "0", "--metrics-host", "nosuch.invalid"],
                             "nosuch.invalid:0: cannot listen")):
            r = subprocess.run([sys.executable, "-m", "gpusmd.cli", service, "--config",
                                "run.yaml", "-o" if service == "sink" else "--once",
                                *(["out.h5"] if service == "sink" else []), *addresses, *args],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1, r.stderr
            assert lines[0].startswith("gpusmd: error: metrics endpoint ") and words in lines[0]
