"""The sink's live preview (services/preview.py) and ``gpusmd monitor`` (gpusmd/monitor.py):
rate-limited, never blocking the sink, checked by the monitor; the page's state and data
after a run through the services on loopback, "no data" once they stop, or while a
killed sink is down and live again once a new one takes up the run; the page drawn in a
headless browser where Chromium is installed."""
import base64
import gzip
import json
import shutil
import signal
import textwrap
import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from gpusmd.monitor import Monitor, MonitorState
from gpusmd.services.local import LocalServices, free_port
from gpusmd.services.preview import PREVIEW_HWM, Preview
from gpusmd.services.protocol import encode

from conftest import dark_and_run, publish_in_thread, wait_for

DET = "jungfrau05M"
N_EVENTS = 24


def fake_sink(run=7, experiment="xpp00123"):
    """What the preview reads of a sink: its open run (no detectors) and metrics."""
    info = SimpleNamespace(run=run, experiment=experiment, scalars={"ipm2/sum": "<f4"},
                           n_events=None)
    writer = SimpleNamespace(info=info, procs={}, n_written=0, n_errors=0, results={})
    return SimpleNamespace(current=writer, metrics=SimpleNamespace(get=lambda k, d=0: 0))


def result(first, n=4):
    events = list(range(first, first + n))
    return SimpleNamespace(header={"events": events, "scalars": {"ipm2/sum": [1.0] * n}},
                           arrays={f"{DET}/ROI_0_sum": np.arange(n, dtype=np.float64)})


def subscriber(ctx, address, rcvhwm=1000):
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = rcvhwm
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(address)
    return sub


def test_preview_rate_limited():
    """Thousands of results in about a second: at most preview_hz messages a second."""
    ctx = zmq.Context()
    address = f"tcp://127.0.0.1:{free_port()}"
    preview = Preview(ctx, address, hz=2.0)
    sub = subscriber(ctx, address)
    try:
        sink = fake_sink()
        time.sleep(0.3)                     # the subscription reaches the PUB
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.2:
            preview.result(sink, result(4 * n))
            sink.current.n_written += 4
            n += 1
        got = []
        while sub.poll(300):
            got.append(sub.recv_multipart())
        assert n > 1000
        assert 1 <= len(got) <= 4 and preview.sent == len(got)
    finally:
        preview.close()
        sub.close()
        ctx.term()


def test_preview_send_never_blocks():
    """No subscriber: sends go nowhere at once. A subscriber that never reads: the
    send high-water mark fills, the rest are dropped and counted, no send waits."""
    ctx = zmq.Context()
    address = f"tcp://127.0.0.1:{free_port()}"
    preview = Preview(ctx, address, hz=2.0)
    big = {"image": np.zeros((1024, 1024), np.float32)}        # 4 MB a message
    try:
        assert preview.socket.sndhwm == PREVIEW_HWM
        t0 = time.monotonic()
        for _ in range(100):
            assert preview.send({"kind": "preview"}, big)
        assert time.monotonic() - t0 < 5
        sub = subscriber(ctx, address, rcvhwm=1)                # connected, never reads
        time.sleep(0.3)
        slowest = 0.0
        for _ in range(200):
            t = time.monotonic()
            preview.send({"kind": "preview"}, big)
            slowest = max(slowest, time.monotonic() - t)
        assert preview.dropped > 100 and preview.sent + preview.dropped == 300
        assert slowest < 0.5
        sub.close()
    finally:
        preview.close()
        ctx.term()


def test_preview_address_taken_turns_it_off():
    """An address that cannot be bound: no preview, the sink goes on."""
    ctx = zmq.Context()
    address = f"tcp://127.0.0.1:{free_port()}"
    first = Preview(ctx, address, 2.0)
    second = Preview(ctx, address, 2.0)
    try:
        assert first.socket is not None and second.socket is None
        second.tick(fake_sink())            # nothing to send to: no error
        second.result(fake_sink(), result(0))
    finally:
        first.close()
        ctx.term()


# ---- the monitor, fed messages directly --------------------------------------------------
def preview_message(run=3, seq=0, experiment="xpp00123"):
    """A preview message as the sink makes one: one detector, an azav, two strips."""
    q = np.linspace(0.1, 3.0, 50)
    img = np.add.outer(np.arange(64.0), np.arange(96.0)).astype(np.float32)
    header = {"kind": "preview", "seq": seq, "time": time.time(), "state": "run", "run": run,
              "experiment": experiment, "n_events": 40, "n_errors": 1, "n_announced": 100,
              "waiting_batches": 2, "refused": 0, "duplicates": 0, "dropped": 0, "rate": 12.5,
              "pending": 3, "in_flight": 4, "n_workers": 1,
              "workers": {"w0": {"backend": "cpu", "host": "node7", "pid": 99, "events": 40,
                                 "rate": 12.5}},
              "detectors": {DET: {"units": "keV", "type": DET, "pixel_um": 75.0,
                                  "extent": [0.0, 7.2, 4.8, 0.0], "n_summed": 40,
                                  "n_recent": 8, "azav": ["azav_0"]}},
              "strips": ["ipm2/sum", f"{DET}/ROI_0_sum"]}
    arrays = {f"{DET}/mean": img, f"{DET}/recent": img[::-1].copy(),
              f"{DET}/azav_0/q": q, f"{DET}/azav_0/last": np.sin(q), f"{DET}/azav_0/mean": np.cos(q),
              "strip/event_id": np.arange(30, dtype=np.int64),
              "strip/ipm2/sum": np.linspace(0, 1, 30), f"strip/{DET}/ROI_0_sum": np.ones(30)}
    return header, arrays


def test_monitor_refuses_malformed_messages():
    state = MonitorState(silent_s=60)
    state.take(encode(*preview_message(run=3)))
    assert state.state()["run"] == 3 and state.n_bad == 0
    good_header, good_arrays = preview_message(run=4)
    bad = [[b"not msgpack"], [], encode({"kind": "ack"}),
           encode({**good_header, "run": "4"}, good_arrays),
           encode({**good_header, "detectors": {DET: {"units": 3}}}, good_arrays),
           encode({**good_header, "detectors": [1]}, good_arrays),
           encode({**good_header, "strips": ["ipm2/sum"]}, {}),
           encode(good_header, {**good_arrays, f"{DET}/mean": np.zeros(5, np.float32)}),
           encode(good_header, {**good_arrays, f"{DET}/azav_0/last": np.zeros(3)}),
           encode({**good_header, "rate": float("nan")}, good_arrays),
           encode({**good_header, "pending": "3"}, good_arrays),
           encode({**good_header, "workers": {"w0": {"events": "many"}}}, good_arrays),
           encode({**good_header, "workers": {"w0": {"host": "x" * 65}}}, good_arrays),
           encode({**good_header, "workers": {"bad name!": {}}}, good_arrays)]
    for frames in bad:
        state.take(frames)
    assert state.n_bad == len(bad)
    assert state.state()["run"] == 3            # what was shown stays
    state.take(encode(good_header, good_arrays))
    assert state.state()["run"] == 4            # a new run replaces the old one


def test_monitor_shows_no_data_when_silent():
    state = MonitorState(silent_s=0.3)
    assert state.state()["status"] == "no data"
    state.take(encode(*preview_message()))
    s = state.state()
    assert s["status"] == "live" and s["run"] == 3
    assert s["plots"] == [f"{DET}/mean", f"{DET}/recent", f"{DET}/azav", "strips", "correlation"]
    assert s["workers"]["w0"] == {"backend": "cpu", "host": "node7", "pid": 99, "events": 40,
                                  "events_per_s": 12.5}
    assert s["health"]["pending"] == 3 and s["health"]["in_flight"] == 4
    time.sleep(0.4)
    s = state.state()
    assert s["status"] == "no data" and "silent" in s["reason"] and s["plots"] == []
    assert json.loads(state.data())["status"] == "no data"
    idle = {**preview_message()[0], "state": "idle", "run": -1, "detectors": {}, "strips": []}
    state.take(encode(idle))
    assert state.state()["status"] == "no data"


def image_of(im):
    return np.frombuffer(base64.b64decode(im["b64"]), "<f4").reshape(im["rows"], im["cols"])


def test_monitor_page_data():
    """What the page draws: the images as sent, their pixel centres in mm from the
    extent, colour limits; the profiles; the strips with units, intensity first; the
    detector feature against the beam intensity; NaN as null."""
    header, arrays = preview_message()
    arrays[f"{DET}/azav_0/last"][0] = np.nan
    state = MonitorState(silent_s=60)
    state.take(encode(header, arrays))
    data = json.loads(state.data())
    d = data["detectors"][DET]
    mean = d["images"]["mean"]
    np.testing.assert_array_equal(image_of(mean), arrays[f"{DET}/mean"])
    np.testing.assert_array_equal(image_of(d["images"]["recent"]), arrays[f"{DET}/recent"])
    # extent [0, 7.2, 4.8, 0] mm over 96 columns and 64 rows: 0.075 mm pixels
    assert mean["x0"] == pytest.approx(0.0375) and mean["dx"] == pytest.approx(0.075)
    assert mean["y0"] == pytest.approx(0.0375) and mean["dy"] == pytest.approx(0.075)
    lo, hi = np.percentile(arrays[f"{DET}/mean"], (0.5, 99.5))
    assert (mean["zmin"], mean["zmax"], mean["diverging"]) == (pytest.approx(lo),
                                                               pytest.approx(hi), False)
    az = d["azav"]["azav_0"]
    assert az["last"][0] is None and az["last"][1] == pytest.approx(np.sin(arrays[
        f"{DET}/azav_0/q"][1]))
    assert len(az["q"]) == len(az["mean"]) == 50
    strips = data["strips"]
    assert strips["shown"] == ["ipm2/sum", f"{DET}/ROI_0_sum"]
    assert strips["units"] == {"ipm2/sum": "arb. units", f"{DET}/ROI_0_sum": "keV"}
    assert strips["event_id"] == list(range(30)) and len(strips["values"]["ipm2/sum"]) == 30
    assert data["intensity"] == "ipm2/sum" and data["features"] == [f"{DET}/ROI_0_sum"]
    assert state.data() is state.data()             # made once per message


def test_monitor_serves_plotly():
    """plotly.js from the installed package, gzipped for a browser that takes it."""
    with Monitor(f"tcp://127.0.0.1:{free_port()}", port=0) as monitor:
        req = urllib.request.Request(monitor.url + "/plotly.min.js",
                                     headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            js = gzip.decompress(r.read())
        assert js == get(monitor.url + "/plotly.min.js")[2] and b"Plotly" in js[:2000]


# ---- through the services ---------------------------------------------------------------
CONFIG = f"""\
    batch_size: 4
    experiment: xpp00123
    detectors:
      {DET}:
        calib: constants.h5
        functions:
          - {{kind: roi, bounds: [[0, 1], [10, 300], [20, 600]]}}
          - {{kind: azav, center: [0.0, 0.0], dis_to_sam: 100.0, eBeam: 9.5, qbin: 0.02, phiBins: 2}}
        sums: [calib]
    services:
      heartbeat_s: 0.2
      worker_timeout_s: 1.0
      flush_s: 0.2
      log_every_s: 1.0
      preview: tcp://127.0.0.1:%(port)d
      preview_hz: 4
    """


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("monitor")
    dark_and_run(d, DET, N_EVENTS)
    port = free_port()
    (d / "run.yaml").write_text(textwrap.dedent(CONFIG) % {"port": port})
    return d, f"tcp://127.0.0.1:{port}"


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers["Content-Type"], r.read()


def png_array(data):
    import matplotlib.image
    from io import BytesIO
    return matplotlib.image.imread(BytesIO(data), format="png")


def data_of(monitor):
    return json.loads(get(f"{monitor.url}/data.json")[2])


def test_monitor_during_a_run_then_no_data(setup):
    """A run replayed through the services: the page's state has the run, the
    experiment, the health and the workers (host, pid, backend); its data has the
    detector's images and profile; once the services stop, "no data"."""
    d, address = setup
    seen = {}
    with Monitor(address, port=0, silent_s=3.0) as monitor:
        chain = LocalServices(d / "run.yaml", d / "out.h5", 2, "cpu", log_dir=d / "logs").start()
        try:
            # 6 s of events: the run outlasts the services' start on a loaded machine
            # (a sink up 2.5 s late took all 24 events of a 3 s run at once)
            publish_in_thread(chain, d / "run.h5", rate=4.0)

            def live():
                s = json.loads(get(f"{monitor.url}/state.json")[2])
                if (s["status"] == "live" and s["health"]["n_events"] >= 8
                        and s["health"]["pending"] >= 0):
                    seen["state"], seen["data"] = s, data_of(monitor)
                    return seen["data"]["status"] == "live"
                return False
            wait_for(live, "the monitor never showed the run", timeout=40)
            assert chain.wait_sink(60) == 0
        finally:
            chain.stop()
        s, data = seen["state"], seen["data"]
        assert s["run"] == 2 and s["experiment"] == "xpp00123"
        assert data["run"] == 2 and data["seq"] >= s["seq"]
        assert set(s["health"]) >= {"n_events", "n_errors", "waiting_batches", "events_per_s",
                                    "pending", "in_flight", "n_workers"}
        assert s["health"]["n_workers"] == 2
        assert 1 <= len(s["workers"]) <= 2
        for w in s["workers"].values():
            assert w["backend"] == "cpu" and w["host"] and w["pid"] > 0 and w["events"] > 0
        assert s["plots"][0] == f"{DET}/mean" and f"{DET}/azav" in s["plots"]
        assert "strips" in s["plots"]
        det = data["detectors"][DET]
        assert det["units"] == "keV" and det["n_summed"] >= 8
        for image in det["images"]:         # "recent" too where a message came before
            img = image_of(det["images"][image])
            assert img.shape == (det["images"][image]["rows"], det["images"][image]["cols"])
            assert max(img.shape) <= 512 and np.isfinite(img).mean() > 0.5
            assert np.nanstd(img) > 0
        az = det["azav"]["azav_0"]
        assert len(az["q"]) == len(az["mean"]) > 10 and any(v is not None for v in az["mean"])
        assert f"{DET}/ROI_0_sum" in data["strips"]["shown"]
        status, kind, page = get(monitor.url + "/")
        assert status == 200 and b"/state.json" in page and b"/plotly.min.js" in page
        wait_for(lambda: json.loads(get(f"{monitor.url}/state.json")[2])["status"] == "no data",
                 "the monitor still shows data after the services stopped", timeout=10)
        assert data_of(monitor)["status"] == "no data"
        with pytest.raises(urllib.error.HTTPError):
            get(f"{monitor.url}/nothing")
        assert monitor.state.n_bad == 0


def test_monitor_through_a_sink_killed_and_started_again(setup):
    """The page live during a run; the sink killed (SIGKILL): "no data" within a few
    seconds; a sink started again takes up the run: the page is live again, with the new
    sink's messages (the monitor's subscriber reconnects by itself) and their data."""
    d, address = setup
    out = d / "gap.h5"

    def state():
        return json.loads(get(f"{monitor.url}/state.json")[2])

    with Monitor(address, port=0, silent_s=1.0) as monitor:
        chain = LocalServices(d / "run.yaml", out, 2, "cpu", sink_args=["--delay-ms", "50"],
                              log_dir=d / "logs_gap").start()
        try:
            publish_in_thread(chain, d / "run.h5", rate=6.0)
            wait_for(lambda: (s := state())["status"] == "live" and s["run"] == 2
                     and s["health"]["n_events"] >= 4, "the monitor never showed the run",
                     timeout=40)
            before = monitor.state.n_messages
            chain.sink.send_signal(signal.SIGKILL)
            chain.sink.wait(5)
            killed = time.monotonic()
            wait_for(lambda: state()["status"] == "no data", "the page still shows data "
                     "after the sink was killed", timeout=5)
            gap = state()
            assert gap["run"] is None and gap["plots"] == [] and "silent" in gap["reason"]
            assert time.monotonic() - killed < 5
            chain.sink = chain._start("sink_again", "sink", "-o", str(out), "--no-progress",
                                      *chain.sink_args)
            seen = {}

            def live_again():
                s = state()
                if s["status"] == "live" and s["run"] == 2 and f"{DET}/mean" in s["plots"]:
                    seen["state"], seen["data"] = s, data_of(monitor)
                    return seen["data"]["status"] == "live"
                return False
            wait_for(live_again, "the page did not show the new sink's data", timeout=30)
            assert monitor.state.n_messages > before
            assert chain.wait_sink(60) == 0
        finally:
            chain.stop()
        s = seen["state"]
        assert s["experiment"] == "xpp00123" and s["health"]["n_events"] >= 1
        assert np.nanstd(image_of(seen["data"]["detectors"][DET]["images"]["mean"])) > 0
        assert monitor.state.n_bad == 0
    assert "taking up" in (d / "logs_gap" / "sink_again.log").read_text()


# ---- in a browser --------------------------------------------------------------------------
def chrome_or_skip():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_page_in_a_headless_browser(tmp_path):
    """The page shows the run number, its health and workers, and draws every panel
    with plotly.js (axes with units); a screenshot that is not blank; "no data" and no
    plots once the preview goes silent."""
    browser = chrome_or_skip()
    from selenium.webdriver.common.by import By
    with Monitor(f"tcp://127.0.0.1:{free_port()}", port=0, silent_s=8) as monitor:
        monitor.state.take(encode(*preview_message(run=42)))
        try:
            browser.get(monitor.url)
            wait_for(lambda: browser.find_element(By.ID, "run").text == "42",
                     "the page does not show run 42", timeout=15)
            # 2 images, 1 azav, 2 strips, 1 against the intensity
            drawn = lambda: browser.find_elements(By.CSS_SELECTOR, "#plots .js-plotly-plot .main-svg")
            wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute(
                "data-drawn") == "0" and len({e.find_element(By.XPATH, "ancestor::div[@data-panel]")
                                              .get_attribute("data-panel") for e in drawn()}) == 6,
                     "the page did not draw its panels", timeout=20)
            assert browser.find_element(By.ID, "experiment").text == "xpp00123"
            assert browser.find_element(By.ID, "status").text == "live"
            text = browser.find_element(By.ID, "plots").text + browser.page_source
            for label in ("q [1/Å]", "y [mm]", "x [mm]", "mean calibrated value [keV]",
                          "event id [#]", f"{DET}/ROI_0_sum [keV]", "ipm2/sum [arb. units]"):
                assert label in text, label
            workers = browser.find_element(By.ID, "workers").text
            assert "node7" in workers and "cpu" in workers
            shot = tmp_path / "monitor.png"
            browser.save_screenshot(str(shot))
            wait_for(lambda: browser.find_element(By.ID, "status").text.startswith("no data"),
                     "the page still shows data after the preview went silent", timeout=15)
            assert not browser.find_elements(By.CSS_SELECTOR, "#plots .js-plotly-plot")
        finally:
            browser.quit()
    img = png_array(shot.read_bytes())
    assert img.shape[0] > 500 and img[..., :3].std() > 0.05
