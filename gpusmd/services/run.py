"""The chain on one host, for one command: ``gpusmd up`` and ``replay --via-services``."""
from __future__ import annotations

import logging
import threading
import time

import zmq

from ..config import load_config
from ..errors import GpusmdError
from ..io.output import check_new_output, run_output
from ..io.source import open_run
from ..replay import ReplaySummary
from .local import LocalServices
from .publish import publish

log = logging.getLogger("gpusmd.up")


def replay_via_services(source, config_path, output, n_workers: int = 2, backend: str = "auto",
                        max_events: int | None = None, timeout: float = 3600.0,
                        log_dir=None, force: bool = False) -> ReplaySummary:
    """publish -> ingest -> N workers -> sink, each a process on loopback; waits for the
    sink to close the file. ``output`` as replay takes it (a file, or a directory or None
    for <experiment>_Run<NNNN>.h5); an existing file is refused unless ``force``."""
    config = load_config(config_path)
    with open_run(source, list(config.detectors) or None) as run:   # a bad source first
        output = check_new_output(run_output(output, config.experiment or run.experiment,
                                             run.run), force)
    if output.exists():                     # --force: the sink never replaces a file
        output.unlink()
    t0 = time.perf_counter()
    with LocalServices(config_path, output, n_workers, backend, log_dir=log_dir) as chain:
        config.services.__dict__.update(chain.addresses)
        n = publish_watched(chain, source, config, max_events)
        chain.wait_sink(timeout)
    seconds = time.perf_counter() - t0
    return ReplaySummary(output, n, seconds, f"services x{n_workers} ({backend})")


def publish_watched(chain: LocalServices, source, config, max_events) -> int:
    """Publish the run into the chain from a thread while watching the services: when
    one the run needs fails (LocalServices.check), its error is raised, and terminating
    the context ends a publisher blocked by the chain that no longer reads."""
    ctx = zmq.Context()
    sent, errors = [], []

    def send():
        try:
            sent.append(publish(source, config, max_events=max_events, ctx=ctx))
        except zmq.ContextTerminated:
            pass
        except BaseException as e:
            errors.append(e)

    sender = threading.Thread(target=send, name="gpusmd-publish", daemon=True)
    sender.start()
    try:
        while sender.is_alive():
            chain.check()
            sender.join(0.1)
    finally:
        ctx.term()
    if errors:
        raise errors[0]
    return sent[0]


def serve_locally(config_path, output, n_workers: int, backend: str):
    """Run the chain until interrupted; sources send to the configured ingest address."""
    config = load_config(config_path)
    addresses = {k: getattr(config.services, k) for k in ("ingest_in", "ingest_work",
                                                          "ingest_ack", "sink_in")}
    chain = LocalServices(config_path, output, n_workers, backend, once=False,
                          addresses=addresses, quiet=False).start()
    print(f"gpusmd up: ingest at {addresses['ingest_in']}, {n_workers} workers, sink -> {output}"
          f" (Ctrl-C to stop)")
    try:
        while all(p.poll() is None for p in chain.processes):
            time.sleep(0.5)
        raise GpusmdError("\n".join(chain.exit_report(p) for p in chain.processes
                                     if p.poll() is not None))
    finally:
        chain.stop()
