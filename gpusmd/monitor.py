"""``gpusmd monitor``: a web page of the sink's live preview (gpusmd/services/preview.py).

A small HTTP server (the standard library's, in a thread), one thread subscribed to the
preview (ZeroMQ SUB, which reconnects by itself when the services restart), and the
pictures drawn in the browser by plotly.js, which the ``plotly`` package ships and this
server hands out (nothing is fetched from the internet). The server only relays the
latest preview as JSON: drawing the four pictures of a message with matplotlib on the
server took about 0.8 s of CPU (jungfrau05M), more than a core at two messages a second,
taken from the services on the same host; in the browser it costs the services nothing,
and the pictures can be zoomed and read value by value. Bokeh's server would do the
same with a second server process and its own session protocol.

    /                 the page
    /state.json       the run, experiment, health, workers and the panels to show, or
                      "status": "no data" (nothing for ``silent_s`` seconds, or no run
                      open) with its reason
    /data.json        what the panels draw, of the latest message: per detector its mean
                      and recent images (float32, base64, their placement in mm and colour
                      limits) and azimuthal profiles; the strip charts' last values with
                      their units; the beam-intensity strip the features are drawn against
    /plotly.min.js    plotly.js, gzipped where the browser takes it

Every message is checked (``check_preview``) before it is used: a malformed one is
counted and dropped."""
from __future__ import annotations

import base64
import gzip
import importlib.util
import json
import logging
import math
import re
import threading
import time
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import zmq

from .services.protocol import ProtocolError, decode, is_int, short

log = logging.getLogger("gpusmd.monitor")
SILENT_S = 5.0          # no message for this long: "no data"
MAX_STRIPS_SHOWN = 12
MAX_CORRELATIONS = 4    # detector features drawn against the beam intensity
NAME = re.compile(r"[A-Za-z0-9_.:/#-]{1,256}")
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
    for key in ("pending", "in_flight", "n_workers"):
        if not is_int(h.get(key, -1), -1):
            raise ProtocolError(f"preview: {key} {short(h.get(key))}")
        out[key] = h.get(key, -1)
    if not _number(h.get("rate", 0.0)):
        raise ProtocolError(f"preview: rate {short(h.get('rate'))}")
    out["rate"] = float(h.get("rate", 0.0))
    out["workers"] = check_workers(h.get("workers", {}))
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


def check_workers(workers) -> dict:
    """The preview's workers {name: {backend, host, pid, events, rate}}, checked."""
    if not isinstance(workers, dict) or len(workers) > 256:
        raise ProtocolError(f"preview: workers {short(workers)}")
    out = {}
    for name, w in workers.items():
        if not (isinstance(name, str) and NAME.fullmatch(name) and isinstance(w, dict)
                and all(isinstance(w.get(k, ""), str) and len(w.get(k, "")) <= 64
                        for k in ("backend", "host"))
                and is_int(w.get("pid", 0)) and is_int(w.get("events", 0))
                and _number(w.get("rate", 0.0))):
            raise ProtocolError(f"preview: worker {short(name)}: {short(w)}")
        out[name] = {"backend": w.get("backend", "?"), "host": w.get("host", "?"),
                     "pid": w.get("pid"), "events": w.get("events", 0),
                     "events_per_s": round(float(w.get("rate", 0.0)), 2)}
    return out


# ---- what the page draws -------------------------------------------------------------
def strip_units(name: str, p) -> str:
    """The units of a strip: a detector's feature in its units (sums, means, maxima),
    counts in [#], the rest in arbitrary units."""
    det, _, field = name.rpartition("/")
    if re.search(r"ndroplets|count|npix|nphot|common_mode|xray|laser", field, re.IGNORECASE):
        return "#"
    if det in p["detectors"] and re.search(r"_(sum|mean|max)$", field):
        return p["detectors"][det]["units"]
    return "arb. units"


def _is_feature(name: str, p) -> bool:
    return "/" in name and name.rpartition("/")[0] in p["detectors"]


def chosen_strips(p) -> list[str]:
    """The strips shown, beam intensity first, then detector features, then the rest."""
    rank = lambda n: 0 if INTENSITY.search(n) else 1 if _is_feature(n, p) else 2
    return sorted(p["strips"], key=rank)[:MAX_STRIPS_SHOWN]


def intensity_strip(p) -> str | None:
    """The beam-intensity strip the detector features are drawn against, if any."""
    return next((n for n in p["strips"] if INTENSITY.search(n) and not _is_feature(n, p)),
                None)


def _floats(a) -> list:
    """JSON numbers; null where not finite."""
    return [v if math.isfinite(v) else None for v in np.asarray(a, np.float64).tolist()]


def image_json(img: np.ndarray, extent: list) -> dict:
    """An image as the page draws it: float32 little-endian in base64, its pixel centres
    in mm (first and step, rows down the page) and its colour limits."""
    from .beamtime.plot import image_limits
    rows, cols = img.shape
    left, right, bottom, top = extent
    lo, hi, diverging = image_limits(img)
    return {"rows": rows, "cols": cols,
            "x0": left + (right - left) / cols / 2, "dx": (right - left) / cols,
            "y0": top + (bottom - top) / rows / 2, "dy": (bottom - top) / rows,
            "zmin": lo, "zmax": hi, "diverging": diverging,
            "b64": base64.b64encode(np.ascontiguousarray(img, "<f4").tobytes()).decode()}


def panels(p) -> list[str]:
    """The panels of a message: per detector its images and azav, then the strips and
    the features against the beam intensity."""
    out = []
    for det, d in p["detectors"].items():
        out += [f"{det}/{image}" for image in ("mean", "recent") if d[image] is not None]
        if d["azav"]:
            out.append(f"{det}/azav")
    if p["strips"]:
        out.append("strips")
        if intensity_strip(p) and any(_is_feature(n, p) for n in p["strips"]):
            out.append("correlation")
    return out


def page_data(p) -> dict:
    """/data.json of a message."""
    dets = {}
    for det, d in p["detectors"].items():
        dets[det] = {"units": d["units"], "type": d["type"], "n_summed": d["n_summed"],
                     "n_recent": d["n_recent"],
                     "images": {image: image_json(d[image], d["extent"])
                                for image in ("mean", "recent") if d[image] is not None},
                     "azav": {name: {"q": _floats(q), "last": _floats(last),
                                     "mean": _floats(mean)}
                              for name, (q, last, mean) in d["azav"].items()}}
    shown = chosen_strips(p)
    intensity = intensity_strip(p)
    features = [n for n in p["strips"] if _is_feature(n, p)][:MAX_CORRELATIONS]
    strips = {n: p["strips"][n] for n in {*shown, *([intensity] if intensity else []),
                                         *features}}
    return {"status": "live", "seq": p["seq"], "run": p["run"], "experiment": p["experiment"],
            "rate": p["rate"], "detectors": dets,
            "strips": {"event_id": (p["event_ids"].tolist() if p["event_ids"] is not None
                                    else []),
                       "shown": shown, "values": {n: _floats(a) for n, a in strips.items()},
                       "units": {n: strip_units(n, p) for n in strips}},
            "intensity": intensity, "features": features if intensity else []}


class MonitorState:
    """The latest preview and when it came (thread safe), and its page data (made once
    per message, when first asked for)."""

    def __init__(self, silent_s: float = SILENT_S):
        self.silent_s = silent_s
        self.lock = threading.Lock()
        self.latest: dict | None = None
        self.received = -math.inf
        self.n_messages = 0
        self.n_bad = 0
        self.data_json: bytes | None = None

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
            self.data_json = None

    def live(self) -> tuple[dict | None, str]:
        """(the message shown, "") or (None, why there is no data)."""
        with self.lock:
            p, age = self.latest, time.monotonic() - self.received
        if p is None:
            return None, "no preview received yet"
        if age > self.silent_s:
            return None, f"the preview has been silent for {age:.0f} s (services stopped?)"
        if p["state"] == "idle":
            return None, "the sink is up, no run is open"
        return p, ""

    def state(self) -> dict:
        with self.lock:
            p, age = self.latest, time.monotonic() - self.received
            n, bad = self.n_messages, self.n_bad
        out = {"messages": n, "refused_messages": bad,
               "age_s": None if p is None else round(age, 2)}
        shown, reason = self.live()
        health = {} if p is None or age > self.silent_s else {
            **{k: p[k] for k in ("n_events", "n_errors", "n_announced", "waiting_batches",
                                 "pending", "in_flight", "n_workers", "refused",
                                 "duplicates", "dropped")},
            "events_per_s": round(p["rate"], 2)}
        if shown is None:
            return {**out, "status": "no data", "reason": reason, "run": None,
                    "experiment": None, "plots": [], "health": health, "workers": {}}
        return {**out, "status": "live", "reason": "", "run": shown["run"],
                "experiment": shown["experiment"], "seq": shown["seq"], "health": health,
                "workers": shown["workers"], "plots": panels(shown)}

    def data(self) -> bytes:
        """/data.json: what the panels draw, or the "no data" state."""
        p, reason = self.live()
        if p is None:
            return json.dumps({"status": "no data", "reason": reason}).encode()
        with self.lock:
            cached = self.data_json if self.latest is p else None
        if cached is not None:
            return cached
        data = json.dumps(page_data(p)).encode()
        with self.lock:
            if self.latest is p:
                self.data_json = data
        return data


@lru_cache(maxsize=2)
def plotly_js(compressed: bool) -> bytes:
    """plotly.js as the ``plotly`` package ships it (read and gzipped once)."""
    spec = importlib.util.find_spec("plotly")
    path = (Path(next(iter(spec.submodule_search_locations))) / "package_data"
            / "plotly.min.js") if spec is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError("plotly.min.js is not installed (pip install plotly)")
    data = path.read_bytes()
    return gzip.compress(data, 6) if compressed else data


# ---- the page --------------------------------------------------------------------------
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>gpusmd monitor</title>
<script src="/plotly.min.js"></script>
<style>
body { font-family: sans-serif; margin: 1em; }
#status { font-size: 1.3em; font-weight: bold; }
.nodata { color: #b00; } .live { color: #070; }
table { border-collapse: collapse; margin: 0.5em 2em 0.5em 0; display: inline-table;
        vertical-align: top; }
td, th { padding: 0 1em 0 0; text-align: left; }
.panel { display: inline-block; margin: 4px; border: 1px solid #ccc; vertical-align: top; }
.small { display: inline-block; vertical-align: top; }
</style></head>
<body>
<h1>gpusmd monitor</h1>
<div id="status" class="nodata">no data</div>
<div>experiment <span id="experiment">-</span>, run <span id="run">-</span></div>
<table id="health"></table><table id="workers"></table>
<div id="plots"></div>
<script>
const CONFIG = {displaylogo: false, responsive: false};
const HEALTH = [["n_events", "events written"], ["n_announced", "events announced"],
  ["events_per_s", "events/s"], ["n_errors", "events in error"],
  ["waiting_batches", "batches waiting at the sink (out of order)"],
  ["pending", "batches pending at the ingest"], ["in_flight", "batches at the workers"],
  ["n_workers", "workers"], ["refused", "messages refused"],
  ["duplicates", "duplicates"], ["dropped", "preview messages dropped"]];
const COLOURS = ["black", "#2ca02c", "#9467bd", "#8c564b", "#bcbd22"];
const divs = {};
let shown = null;

function title(d, text) {
  return (d.experiment ? d.experiment + " " : "") + "run " + d.run + ": " + text;
}
function layout(text, xtitle, ytitle, more) {
  const l = {title: {text: text, font: {size: 12}, x: 0.01, xanchor: "left"},
             font: {size: 11}, margin: {l: 65, r: 20, t: 50, b: 45}, width: 560, height: 440,
             xaxis: {title: {text: xtitle}}, yaxis: {title: {text: ytitle}}};
  return Object.assign(l, more || {});
}
function panel(id, cls) {
  let div = divs[id];
  if (!div) {
    div = document.createElement("div");
    div.className = cls || "panel";
    div.dataset.panel = id;
    document.getElementById("plots").appendChild(div);
    divs[id] = div;
  }
  return div;
}
function clear(keep) {
  for (const id of Object.keys(divs)) {
    if (keep && keep.has(id)) continue;
    Plotly.purge(divs[id]);
    divs[id].remove();
    delete divs[id];
  }
}
function pixels(im) {
  const bin = atob(im.b64), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const f = new Float32Array(bytes.buffer), z = [];
  for (let r = 0; r < im.rows; r++) z.push(Array.from(f.subarray(r * im.cols, (r + 1) * im.cols)));
  return z;
}
function colours(im) {
  if (!im.diverging) return "Viridis";
  const mid = -im.zmin / (im.zmax - im.zmin);      // white at 0, as on the pictures of gpusmd plot
  return [[0, "#2166ac"], [mid / 2, "#92c5de"], [mid, "#f7f7f7"],
          [mid + (1 - mid) / 2, "#f4a582"], [1, "#b2182b"]];
}
function drawImage(data, det, d, which) {
  const im = d.images[which];
  const what = which === "mean" ? "mean of " + d.n_summed + " events"
                                : "mean of the last " + d.n_recent + " events";
  const trace = {type: "heatmap", z: pixels(im), x0: im.x0, dx: im.dx, y0: im.y0, dy: im.dy,
    zmin: im.zmin, zmax: im.zmax, colorscale: colours(im),
    colorbar: {title: {text: "mean calibrated value [" + d.units + "]", side: "right"}},
    hovertemplate: "y %{x:.2f} mm, x %{y:.2f} mm: %{z:.4g} " + d.units + "<extra></extra>"};
  Plotly.react(panel(det + "/" + which), [trace], layout(title(data, det + ", " + what),
    "y [mm]", "x [mm]", {plot_bgcolor: "#8c8c8c",
    xaxis: {title: {text: "y [mm]"}, constrain: "domain"},
    yaxis: {title: {text: "x [mm]"}, autorange: "reversed", scaleanchor: "x",
            constrain: "domain"}}), CONFIG);
}
function drawAzav(data, det, d) {
  const traces = [];
  Object.entries(d.azav).forEach(([name, a], i) => {
    const c = COLOURS[i % COLOURS.length];
    traces.push({x: a.q, y: a.mean, mode: "lines", name: name + ", run mean",
                 line: {color: c, width: 1.5}});
    traces.push({x: a.q, y: a.last, mode: "lines", name: name + ", latest event",
                 line: {color: c, width: 1, dash: "dot"}});
  });
  Plotly.react(panel(det + "/azav"), traces, layout(title(data, det + ", azimuthal average"),
    "q [1/\\u00c5]", "mean per pixel [" + d.units + "]",
    {legend: {font: {size: 9}, x: 1, xanchor: "right", y: 1}}), CONFIG);
}
function small(id, traces, text, xtitle, ytitle) {
  Plotly.react(panel(id, "panel small"), traces, layout(text, xtitle, ytitle,
    {width: 400, height: 230, margin: {l: 65, r: 15, t: 40, b: 40}, showlegend: false,
     title: {text: text, font: {size: 10}, x: 0.01, xanchor: "left"}}), CONFIG);
}
function drawStrips(data) {
  const s = data.strips;
  for (const name of s.shown) {
    small("strip:" + name, [{x: s.event_id, y: s.values[name], mode: "lines+markers",
      marker: {size: 3}, line: {width: 1}}],
      title(data, name + " (" + data.rate.toFixed(1) + " events/s)"), "event id [#]",
      name + " [" + s.units[name] + "]");
  }
}
function drawCorrelation(data) {
  const s = data.strips, x = s.values[data.intensity];
  for (const name of data.features) {
    small("against:" + name, [{x: x, y: s.values[name], mode: "markers", marker: {size: 3}}],
      title(data, name + " against " + data.intensity), data.intensity + " [" +
      s.units[data.intensity] + "]", name + " [" + s.units[name] + "]");
  }
}
function draw(data, plots) {
  const want = new Set();
  for (const id of plots) {
    if (id === "strips") data.strips.shown.forEach(n => want.add("strip:" + n));
    else if (id === "correlation") data.features.forEach(n => want.add("against:" + n));
    else want.add(id);
  }
  clear(want);
  for (const id of plots) {
    const [det, what] = [id.slice(0, id.lastIndexOf("/")), id.slice(id.lastIndexOf("/") + 1)];
    if (id === "strips") drawStrips(data);
    else if (id === "correlation") drawCorrelation(data);
    else if (what === "azav") drawAzav(data, det, data.detectors[det]);
    else drawImage(data, det, data.detectors[det], what);
  }
}
function table(id, head, rows) {
  document.getElementById(id).innerHTML = rows.length ?
    "<tr>" + head.map(h => "<th>" + h + "</th>").join("") + "</tr>" +
    rows.map(r => "<tr>" + r.map(v => "<td>" + v + "</td>").join("") + "</tr>").join("") : "";
}
function noData(reason) {
  const st = document.getElementById("status");
  st.textContent = "no data: " + reason;
  st.className = "nodata";
  clear(null);
  shown = null;
}
async function poll() {
  try {
    const s = await (await fetch("/state.json", {cache: "no-store"})).json();
    document.getElementById("run").textContent = s.run === null ? "-" : s.run;
    document.getElementById("experiment").textContent = s.experiment || "-";
    const h = s.health || {};
    table("health", ["health", ""], HEALTH.filter(([k]) => k in h && h[k] !== -1)
      .map(([k, label]) => [label, h[k]]));
    table("workers", ["worker", "host", "pid", "backend", "events", "events/s"],
      Object.entries(s.workers || {}).map(([n, w]) =>
        [n, w.host, w.pid, w.backend, w.events, w.events_per_s]));
    if (s.status !== "live") return noData(s.reason);
    const st = document.getElementById("status");
    st.textContent = "live";
    st.className = "live";
    if (s.seq === shown) return;
    const data = await (await fetch("/data.json?seq=" + s.seq, {cache: "no-store"})).json();
    if (data.status !== "live") return noData(data.reason);
    shown = s.seq;
    draw(data, s.plots);
    document.body.dataset.drawn = String(data.seq);
  } catch (e) {
    noData("the monitor does not answer");
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
            elif path == "/data.json":
                self.reply(200, "application/json", self.state.data())
            elif path == "/plotly.min.js":
                gz = "gzip" in self.headers.get("Accept-Encoding", "")
                self.reply(200, "text/javascript", plotly_js(gz), cache="max-age=86400",
                           encoding="gzip" if gz else None)
            else:
                self.reply(404, "text/plain", b"not found\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def reply(self, code: int, kind: str, body: bytes, cache: str = "no-store",
              encoding: str | None = None):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        if encoding:
            self.send_header("Content-Encoding", encoding)
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
        plotly_js(False)                # the page cannot draw without it: say so now
    except FileNotFoundError as e:
        raise GpusmdError(str(e)) from None
    try:
        serve(address, args.port, args.host, cfg)
    except OSError as e:
        raise GpusmdError(f"cannot serve on {args.host}:{args.port} ({e.strerror})") from None
