"""``gpusmd monitor``: a web page of the sink's live preview (gpusmd/services/preview.py).

The simplest thing that serves: the standard library's HTTP server in a thread, one
thread subscribed to the preview (ZeroMQ SUB, which reconnects by itself when the
services restart), and the pictures drawn on the server by matplotlib as PNG, in the
style of ``gpusmd plot`` (gpusmd/beamtime/plot.py: axes labelled with units, a colour
bar with units). Nothing to install beyond what the package needs already, nothing to
build for the browser, and the page is plain HTML with a few lines of script that poll
the JSON state (Bokeh would add a dependency and a JavaScript runtime for the same).

    /                      the page
    /state.json            the run, experiment, health and the plots to show, or
                           "status": "no data" (nothing for ``silent_s`` seconds, or no
                           run open) with its reason
    /plot/<det>/mean.png   the run's mean calibrated image (pixels placed, mm)
    /plot/<det>/recent.png the mean of the events since the previous preview message
    /plot/<det>/azav.png   the latest azimuthal profile and the run's mean, against q
    /plot/strips.png       the last values of the per-event scalars and features

Every message is checked (``check_preview``) before it is used: a malformed one is
counted and dropped; a picture that cannot be drawn is a picture saying so."""
from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from urllib.parse import urlparse

import zmq

from .services.protocol import ProtocolError, decode, is_int, short

log = logging.getLogger("gpusmd.monitor")
SILENT_S = 5.0          # no message for this long: "no data"
DPI = 80
MAX_STRIPS_SHOWN = 12
NAME = re.compile(r"[A-Za-z0-9_.:/#-]{1,256}")
PANELS = ("mean", "recent", "azav")
INTENSITY = re.compile(r"ipm|gmd|intensity|i0|diode", re.IGNORECASE)


# ---- the messages ----------------------------------------------------------------------
def _number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def check_preview(msg) -> dict:
    """The fields of a preview message, each checked; ProtocolError naming the first
    problem. -> {header fields..., "arrays": {name: array}}."""
    h = msg.header
    if msg.kind != "preview":
        raise ProtocolError(f"a {short(msg.kind)} message, not a preview")
    if h.get("state") not in ("run", "idle"):
        raise ProtocolError(f"preview: state {short(h.get('state'))}")
    if not is_int(h.get("run"), -1) or not is_int(h.get("seq")):
        raise ProtocolError(f"preview: run {short(h.get('run'))}, seq {short(h.get('seq'))}")
    if not isinstance(h.get("experiment"), str) or len(h["experiment"]) > 64:
        raise ProtocolError(f"preview: experiment {short(h.get('experiment'))}")
    out = {"state": h["state"], "run": h["run"], "seq": h["seq"], "experiment": h["experiment"]}
    for key in ("n_events", "n_errors", "n_announced", "waiting_batches", "refused",
                "duplicates", "dropped"):
        if not is_int(h.get(key, 0)):
            raise ProtocolError(f"preview: {key} {short(h.get(key))}")
        out[key] = h.get(key, 0)
    if not _number(h.get("rate", 0.0)):
        raise ProtocolError(f"preview: rate {short(h.get('rate'))}")
    out["rate"] = float(h.get("rate", 0.0))
    arrays = msg.arrays
    dets = h.get("detectors", {})
    if not isinstance(dets, dict) or len(dets) > 64:
        raise ProtocolError(f"preview: detectors {short(dets)}")
    out["detectors"] = {}
    for det, d in dets.items():
        if not (isinstance(det, str) and NAME.fullmatch(det) and isinstance(d, dict)):
            raise ProtocolError(f"preview: detector {short(det)}")
        extent = d.get("extent")
        if not (isinstance(d.get("units"), str) and len(d["units"]) <= 32
                and isinstance(d.get("type", ""), str) and len(d.get("type", "")) <= 64
                and isinstance(extent, list) and len(extent) == 4
                and all(_number(v) for v in extent)
                and is_int(d.get("n_summed", 0)) and is_int(d.get("n_recent", 0))
                and isinstance(d.get("azav", []), list)
                and all(isinstance(a, str) and NAME.fullmatch(a) for a in d.get("azav", []))):
            raise ProtocolError(f"preview: detector {det}: {short(d)}")
        for image in ("mean", "recent"):
            a = arrays.get(f"{det}/{image}")
            if a is not None and (a.ndim != 2 or a.dtype.kind != "f" or 0 in a.shape):
                raise ProtocolError(f"preview: {det}/{image}: {a.dtype} {a.shape}")
        azavs = {}
        for name in d.get("azav", []):
            q = arrays.get(f"{det}/{name}/q")
            parts = [arrays.get(f"{det}/{name}/{p}") for p in ("last", "mean")]
            if q is None:
                continue
            if q.ndim != 1 or any(p is None or p.shape != q.shape or p.dtype.kind != "f"
                                  for p in parts):
                raise ProtocolError(f"preview: {det}/{name}: q and profiles differ")
            azavs[name] = (q, *parts)
        out["detectors"][det] = {"units": d["units"], "type": d.get("type", ""),
                                 "extent": [float(v) for v in extent],
                                 "n_summed": d.get("n_summed", 0),
                                 "n_recent": d.get("n_recent", 0), "azav": azavs,
                                 **{image: arrays.get(f"{det}/{image}")
                                    for image in ("mean", "recent")}}
    strips = h.get("strips", [])
    if not isinstance(strips, list) or not all(isinstance(s, str) and NAME.fullmatch(s)
                                               for s in strips):
        raise ProtocolError(f"preview: strips {short(strips)}")
    events = arrays.get("strip/event_id")
    out["strips"] = {}
    if strips and (events is None or events.ndim != 1):
        raise ProtocolError("preview: strips without their event ids")
    for name in strips:
        a = arrays.get(f"strip/{name}")
        if a is None or a.shape != events.shape or a.dtype.kind not in "iuf":
            raise ProtocolError(f"preview: strip {name}: not one value per event")
        out["strips"][name] = a
    out["event_ids"] = events
    return out


class MonitorState:
    """The latest preview and when it came (thread safe), and its pictures (cached)."""

    def __init__(self, silent_s: float = SILENT_S):
        self.silent_s = silent_s
        self.lock = threading.Lock()
        self.latest: dict | None = None
        self.received = -math.inf
        self.n_messages = 0
        self.n_bad = 0
        self.cache: dict = {}

    def take(self, frames):
        """One message from the preview: checked, then it replaces what was shown (a new
        run number replaces the old run's data)."""
        try:
            p = check_preview(decode(frames))
        except ProtocolError as e:
            with self.lock:
                self.n_bad += 1
            log.warning("preview message refused: %s", e)
            return
        with self.lock:
            self.latest, self.received = p, time.monotonic()
            self.n_messages += 1
            self.cache.clear()

    def state(self) -> dict:
        with self.lock:
            p, age = self.latest, time.monotonic() - self.received
            n, bad = self.n_messages, self.n_bad
        out = {"messages": n, "refused_messages": bad,
               "age_s": None if p is None else round(age, 2)}
        if p is None or age > self.silent_s:
            return {**out, "status": "no data", "reason": (
                "no preview received yet" if p is None else
                f"the preview has been silent for {age:.0f} s (services stopped?)"),
                "run": None, "experiment": None, "plots": []}
        health = {k: p[k] for k in ("n_events", "n_errors", "n_announced", "waiting_batches",
                                    "refused", "duplicates", "dropped")}
        health["events_per_s"] = round(p["rate"], 2)
        if p["state"] == "idle":
            return {**out, "status": "no data", "reason": "the sink is up, no run is open",
                    "run": None, "experiment": None, "plots": [], "health": health}
        plots = []
        for det, d in p["detectors"].items():
            plots += [f"/plot/{det}/{panel}.png" for panel in ("mean", "recent")
                      if d[panel] is not None]
            if d["azav"]:
                plots.append(f"/plot/{det}/azav.png")
        if p["strips"]:
            plots.append("/plot/strips.png")
        return {**out, "status": "live", "reason": "", "run": p["run"],
                "experiment": p["experiment"], "seq": p["seq"], "health": health,
                "plots": plots}

    def png(self, what: str) -> bytes | None:
        """The picture ``what`` ("<det>/<panel>" or "strips") of the latest message; a
        "no data" picture when there is none; None for a name it never has."""
        with self.lock:
            p, age = self.latest, time.monotonic() - self.received
            cached = self.cache.get(what)
        if cached is not None and p is not None and age <= self.silent_s:
            return cached
        if p is None or age > self.silent_s or p["state"] != "run":
            return render_text("no data")
        det, _, panel = what.rpartition("/")
        if what != "strips" and (det not in p["detectors"] or panel not in PANELS):
            return None
        try:
            data = (draw_strips(p) if what == "strips"
                    else DRAW[panel](p, det, p["detectors"][det]))
        except Exception as e:              # a picture that cannot be drawn says so
            log.warning("%s: cannot draw (%s: %s)", what, type(e).__name__, e)
            data = render_text(f"{what}: cannot draw ({type(e).__name__})")
        with self.lock:
            if self.latest is p:
                self.cache[what] = data
        return data


# ---- the pictures ----------------------------------------------------------------------
def _figure(size=(6.4, 4.8)):
    from matplotlib.figure import Figure
    return Figure(figsize=size, dpi=DPI, layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_text(text: str) -> bytes:
    fig = _figure((4, 1.5))
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, transform=ax.transAxes)
    ax.set_axis_off()
    return _png(fig)


def _title(p, text: str) -> str:
    exp = f"{p['experiment']} " if p["experiment"] else ""
    return f"{exp}run {p['run']}: {text}"


def draw_image(p, det: str, d: dict, which: str) -> bytes:
    from .beamtime.plot import image_scale
    img = d[which]
    fig = _figure()
    ax = fig.add_subplot()
    cmap, norm = image_scale(img)
    shown = ax.imshow(img, origin="upper", extent=d["extent"], interpolation="antialiased",
                      cmap=cmap, norm=norm)
    bar = fig.colorbar(shown, ax=ax, shrink=0.85)
    bar.set_label(f"mean calibrated value [{d['units']}]")
    ax.set_xlabel("y [mm]")
    ax.set_ylabel("x [mm]")
    what = (f"mean of {d['n_summed']} events" if which == "mean"
            else f"mean of the last {d['n_recent']} events")
    ax.set_title(_title(p, f"{det}, {what}"), fontsize=9)
    return _png(fig)


def draw_azav(p, det: str, d: dict) -> bytes:
    from .beamtime.plot import AZAV_COLOURS
    fig = _figure()
    ax = fig.add_subplot()
    for (name, (q, last, mean)), colour in zip(d["azav"].items(), AZAV_COLOURS):
        ax.plot(q, mean, "-", color=colour, lw=1.3, label=f"{name}, run mean")
        ax.plot(q, last, ":", color=colour, lw=1.0, label=f"{name}, latest event")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xlabel("q [1/Å]")
    ax.set_ylabel(f"mean per pixel [{d['units']}]")
    ax.set_title(_title(p, f"{det}, azimuthal average"), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def strip_units(name: str, p) -> str:
    """The units of a strip: a detector's feature in its units (sums, means, maxima),
    counts in [#], the rest in arbitrary units."""
    det, _, field = name.rpartition("/")
    if re.search(r"ndroplets|count|npix|nphot|common_mode|xray|laser", field, re.IGNORECASE):
        return "#"
    if det in p["detectors"] and re.search(r"_(sum|mean|max)$", field):
        return p["detectors"][det]["units"]
    return "arb. units"


def chosen_strips(p) -> list[str]:
    """The strips shown, beam intensity first, then detector features, then the rest."""
    names = list(p["strips"])
    rank = lambda n: (0 if INTENSITY.search(n) else 1 if "/" in n and n.rpartition("/")[0]
                      in p["detectors"] else 2)
    return sorted(names, key=rank)[:MAX_STRIPS_SHOWN]


def draw_strips(p) -> bytes:
    names = chosen_strips(p)
    cols = 2 if len(names) > 3 else 1
    rows = math.ceil(len(names) / cols)
    fig = _figure((6.4 * cols / 1.3, 1.7 * rows + 0.6))
    events = p["event_ids"]
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(events, p["strips"][name], ".-", ms=2, lw=0.6)
        ax.set_ylabel(f"[{strip_units(name, p)}]", fontsize=8)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i >= len(names) - cols:
            ax.set_xlabel("event id [#]", fontsize=8)
    fig.suptitle(_title(p, f"last {len(events)} events, {p['rate']:.1f} events/s"), fontsize=9)
    return _png(fig)


DRAW = {"mean": lambda p, det, d: draw_image(p, det, d, "mean"),
        "recent": lambda p, det, d: draw_image(p, det, d, "recent"),
        "azav": draw_azav}


# ---- the page --------------------------------------------------------------------------
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>gpusmd monitor</title>
<style>
body { font-family: sans-serif; margin: 1em; }
#status { font-size: 1.3em; font-weight: bold; }
.nodata { color: #b00; } .live { color: #070; }
#health td { padding: 0 1em 0 0; }
#plots img { margin: 4px; border: 1px solid #ccc; vertical-align: top; }
</style></head>
<body>
<h1>gpusmd monitor</h1>
<div id="status" class="nodata">no data</div>
<div>experiment <span id="experiment">-</span>, run <span id="run">-</span></div>
<table id="health"></table>
<div id="plots"></div>
<script>
let shown = null;
async function poll() {
  try {
    const s = await (await fetch("/state.json", {cache: "no-store"})).json();
    const st = document.getElementById("status");
    st.textContent = s.status === "live" ? "live" : "no data: " + s.reason;
    st.className = s.status === "live" ? "live" : "nodata";
    document.getElementById("run").textContent = s.run === null ? "-" : s.run;
    document.getElementById("experiment").textContent = s.experiment || "-";
    const h = s.health || {};
    document.getElementById("health").innerHTML = s.status === "live" ?
      Object.entries(h).map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("") : "";
    const plots = document.getElementById("plots");
    const key = s.status === "live" ? s.seq : null;
    if (key !== shown) {
      shown = key;
      plots.innerHTML = "";
      for (const url of s.plots) {
        const img = document.createElement("img");
        img.src = url + "?seq=" + s.seq;
        img.alt = url;
        plots.appendChild(img);
      }
    }
  } catch (e) {
    document.getElementById("status").textContent = "no data: the monitor does not answer";
    document.getElementById("status").className = "nodata";
    document.getElementById("plots").innerHTML = "";
    shown = null;
  }
}
poll();
setInterval(poll, 1000);
</script>
</body></html>
"""


class Handler(BaseHTTPRequestHandler):
    state: MonitorState = None

    def do_GET(self):
        path = urlparse(self.path).path
        try:
            if path in ("/", "/index.html"):
                self.reply(200, "text/html; charset=utf-8", PAGE.encode())
            elif path == "/state.json":
                self.reply(200, "application/json", json.dumps(self.state.state()).encode())
            elif path.startswith("/plot/") and path.endswith(".png"):
                data = self.state.png(path[len("/plot/"):-len(".png")])
                if data is None:
                    self.reply(404, "text/plain", b"no such plot\n")
                else:
                    self.reply(200, "image/png", data)
            else:
                self.reply(404, "text/plain", b"not found\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def reply(self, code: int, kind: str, body: bytes):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)


class Monitor:
    """The preview's subscriber and the web server, each in a thread; ``url`` once
    started (``port`` 0: any free port)."""

    def __init__(self, address: str, port: int = 8080, host: str = "127.0.0.1",
                 silent_s: float = SILENT_S, cfg=None, ctx: zmq.Context | None = None):
        self.address = address
        self.state = MonitorState(silent_s)
        self.ctx = ctx or zmq.Context.instance()
        self.cfg = cfg
        handler = type("MonitorHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def subscribe(self):
        from .services.common import curve_keys
        from .services.security import secure_client
        sub = self.ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.rcvhwm = 4
        keys = curve_keys(self.cfg, server=False) if self.cfg is not None else None
        if keys is not None:
            secure_client(sub, keys)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.address)
        try:
            while not self.stopping.is_set():
                if sub.poll(100):
                    self.state.take(sub.recv_multipart(copy=False))
        finally:
            sub.close(linger=0)

    def start(self) -> "Monitor":
        for target, name in ((self.subscribe, "gpusmd-monitor-sub"),
                             (self.server.serve_forever, "gpusmd-monitor-http")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        for t in self.threads:
            t.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve(address: str, port: int, host: str = "127.0.0.1", cfg=None):
    """``gpusmd monitor``: serve until interrupted."""
    with Monitor(address, port, host, cfg=cfg) as m:
        print(f"gpusmd monitor: {m.url} (the preview of {address}; Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(1)


def main(args):
    """``gpusmd monitor [--config run.yaml] [--port 8080] [--preview ADDRESS]``: the
    preview address from --preview, else the config's services.preview, else the
    default; CurveZMQ with the config's keys."""
    from .config import ServicesConfig, load_config
    from .errors import GpusmdError
    from .services.common import setup_logging
    setup_logging()
    cfg = load_config(args.config).services if args.config else None
    address = args.preview or (cfg.preview if cfg is not None else ServicesConfig().preview)
    if not address:
        raise GpusmdError(f"{args.config}: services.preview is off: no preview to show "
                          f"(give --preview ADDRESS)")
    try:
        serve(address, args.port, args.host, cfg)
    except OSError as e:
        raise GpusmdError(f"cannot serve on {args.host}:{args.port} ({e.strerror})") from None
