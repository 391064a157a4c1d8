"""Counters and gauges of one service: a periodic log line and an optional Prometheus endpoint.

A service keeps one :class:`Metrics`, calls :meth:`Metrics.inc` / :meth:`Metrics.set` as work
happens and :meth:`Metrics.tick` from its poll loop. Every ``log_every`` seconds ``tick`` logs
one line on the logger ``gpusmd.<service>``::

    ingest: 1234.5 events/s, 12.3 MB/s, pending=3 in_flight=4 workers=2, errors=0

(rates over the last interval from the ``events`` and ``bytes_in`` counters, then the gauges,
then the other counters as totals). With ``port`` set, ``GET /metrics`` serves
:meth:`Metrics.render` in the Prometheus text format from a daemon thread, on
``127.0.0.1`` unless a host is given (``0.0.0.0``: every interface, so that other hosts
can scrape it). A port in use or a host that cannot be listened on is one GpusmdError
naming host:port.
"""
from __future__ import annotations

import errno
import logging
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import GpusmdError

__all__ = ["Metrics", "sanitize_name"]

_INVALID = re.compile(r"[^a-zA-Z0-9_]")

# counters shown as rates in the log line: name -> (divisor, unit)
_RATES = {"events": (1.0, "events/s"), "bytes_in": (1e6, "MB/s")}

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def sanitize_name(name: str) -> str:
    """A valid Prometheus metric-name part: [a-zA-Z0-9_], not starting with a digit."""
    s = _INVALID.sub("_", str(name)) or "_"
    if s[0].isdigit():
        s = "_" + s
    return s


def _prom_value(v: float) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


def _log_value(v: float) -> str:
    v = float(v)
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return f"{v:.4g}"


class Metrics:
    """Counters (monotonic totals) and gauges (current values) of the service ``service``.

    ``log_every``: seconds between log lines (0: every :meth:`tick`; None: never log, the rates
    are still updated every 5 s for :meth:`render`). ``port``: serve ``GET /metrics`` on
    ``host:port`` (0 = a free port, see :attr:`port`); None = no HTTP server. ``host``
    defaults to :attr:`default_host`, which a service's ``--metrics-host`` sets.
    ``label``: who the log line is about (default: ``service``), e.g. ``worker
    host-1234 (cpu)``; ``extra(dt)``: more words for the log line, given the seconds
    since the last one (e.g. the ingest's workers and their rates), or "" for none.
    Thread-safe: the HTTP thread reads while the service loop writes.
    """

    default_host = "127.0.0.1"      # this host only; "0.0.0.0" exposes it to the network

    def __init__(self, service: str, log_every: float | None = 5.0, port: int | None = None,
                 host: str | None = None, logger: logging.Logger | None = None,
                 label: str | None = None, extra=None):
        self.service = str(service)
        self.label = self.service if label is None else str(label)
        self.extra = extra
        self._prefix = "gpusmd_" + sanitize_name(self.service)
        self.log = logger if logger is not None else logging.getLogger(f"gpusmd.{self.service}")
        self._log_enabled = log_every is not None
        self._interval = 5.0 if log_every is None else max(0.0, float(log_every))
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {"events": 0, "errors": 0}
        self._gauges: dict[str, float] = {}
        self._rates: dict[str, float] = {name: 0.0 for name in _RATES}
        self._last_t = time.monotonic()
        self._last_counts = dict(self._counters)
        self._next_t = self._last_t + self._interval
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if port is not None:
            self._start_server(host or self.default_host, int(port))

    # -- recording ------------------------------------------------------------------------
    def inc(self, name: str, n: float = 1) -> None:
        """Add ``n`` to the counter ``name`` (created at 0)."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def set(self, name: str, value: float) -> None:
        """Set the gauge ``name`` to ``value``."""
        with self._lock:
            self._gauges[name] = value

    def get(self, name: str, default: float = 0) -> float:
        """The current value of counter or gauge ``name`` (counters first)."""
        with self._lock:
            if name in self._counters:
                return self._counters[name]
            return self._gauges.get(name, default)

    def snapshot(self) -> dict:
        """{"counters": {...}, "gauges": {...}, "rates": {"events": per s, "bytes_in": per s}}."""
        with self._lock:
            return {"counters": dict(self._counters), "gauges": dict(self._gauges),
                    "rates": dict(self._rates)}

    # -- periodic log -----------------------------------------------------------------------
    def tick(self) -> None:
        """Cheap unless an interval has elapsed: then update the rates and log one line."""
        now = time.monotonic()
        if now < self._next_t:
            return
        with self._lock:
            dt = now - self._last_t
            for name in _RATES:
                delta = self._counters.get(name, 0) - self._last_counts.get(name, 0)
                self._rates[name] = delta / dt if dt > 0 else 0.0
            self._last_counts = dict(self._counters)
            self._last_t = now
            self._next_t = now + self._interval
            line = self._format_line() if self._log_enabled else None
        if line is not None and self.extra is not None:
            more = self.extra(dt)
            if more:
                line += f", {more}"
        if line is not None:
            self.log.info("%s", line)

    def _format_line(self) -> str:
        parts = [f"{self._rates['events'] / _RATES['events'][0]:.1f} {_RATES['events'][1]}"]
        if "bytes_in" in self._counters:
            parts.append(f"{self._rates['bytes_in'] / _RATES['bytes_in'][0]:.1f} "
                         f"{_RATES['bytes_in'][1]}")
        if self._gauges:
            parts.append(" ".join(f"{k}={_log_value(v)}" for k, v in self._gauges.items()))
        others = [f"{k}={_log_value(v)}" for k, v in self._counters.items()
                  if k not in _RATES]
        if others:
            parts.append(" ".join(others))
        return f"{self.label}: " + ", ".join(parts)

    # -- Prometheus -------------------------------------------------------------------------
    def render(self) -> str:
        """The metrics in the Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            counters = dict(self._counters)
            gauges = dict(self._gauges)
            rate = self._rates["events"]
        p = self._prefix
        out: list[str] = []
        seen: set[str] = set()

        def emit(metric: str, kind: str, value: float) -> None:
            if metric in seen:   # two names that sanitize to the same metric: keep the first
                return
            seen.add(metric)
            out.append(f"# TYPE {metric} {kind}")
            out.append(f"{metric} {_prom_value(value)}")

        for name, value in counters.items():
            base = sanitize_name(name)
            if base.endswith("_total"):
                base = base[: -len("_total")]
            emit(f"{p}_{base}_total", "counter", value)
        for name, value in gauges.items():
            emit(f"{p}_{sanitize_name(name)}", "gauge", value)
        emit(f"{p}_events_per_second", "gauge", rate)
        return "\n".join(out) + "\n"

    # -- HTTP endpoint ----------------------------------------------------------------------
    def _start_server(self, host: str, port: int) -> None:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server naming)
                if self.path.split("?", 1)[0] != "/metrics":
                    body = b"not found: try /metrics\n"
                    self.send_response(404)
                else:
                    body = metrics.render().encode()
                    self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # quiet: no request log on stderr
                pass

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:        # in use, a host that is not one of this one's, no such name
            hint = ("; is another service running there?" if e.errno == errno.EADDRINUSE
                    else "")
            raise GpusmdError(f"metrics endpoint {host}:{port}: cannot listen "
                              f"({e.strerror or e}){hint}") from None
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"gpusmd-{self.service}-metrics", daemon=True)
        self._thread.start()
        self.log.debug("%s: metrics on http://%s:%d/metrics", self.service, host, self.port)

    @property
    def port(self) -> int | None:
        """The port the HTTP endpoint listens on (the one picked when started with port=0)."""
        return None if self._server is None else self._server.server_address[1]

    def close(self) -> None:
        """Stop the HTTP endpoint (if any); idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Metrics({self.service!r}, port={self.port})"


class RunProgress:
    """A run's progress as the sink's gauges, beside its own progress bar (``bar``, a
    tqdm, disabled or not): ``run`` (the run's number), ``run_done`` (events written,
    with those of error records), ``run_total`` (the events the source announced; -1
    where it did not say) and ``run_open`` (1 until the file is closed). What ``gpusmd
    up`` draws its bar from (services.run.RunBar, over the sink's /metrics)."""

    def __init__(self, bar, metrics: Metrics | None, run: int, total: int | None,
                 done: int = 0):
        self.bar = bar
        self.metrics = metrics
        self.done = int(done)
        if metrics is not None:
            metrics.set("run", run)
            metrics.set("run_total", -1 if total is None else int(total))
            metrics.set("run_done", self.done)
            metrics.set("run_open", 1)

    def update(self, n: int):
        self.bar.update(n)
        self.done += int(n)
        if self.metrics is not None:
            self.metrics.set("run_done", self.done)

    def close(self):
        self.bar.close()
        if self.metrics is not None:
            self.metrics.set("run_open", 0)


def parse_metrics(text: str) -> dict[str, float]:
    """The samples of a Prometheus text page (as Metrics.render writes it): {name: value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values
