"""Start the whole chain on this host: ingest, N workers and the sink as processes,
on free loopback ports (``gpusmd up`` and ``gpusmd replay --via-services``)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..config import ADDRESS_KEYS
from ..errors import GpusmdError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_addresses() -> dict[str, str]:
    return {key: f"tcp://127.0.0.1:{free_port()}" for key in ADDRESS_KEYS}


def ipc_addresses(directory) -> dict[str, str]:
    """Unix-domain sockets in a directory: the cheaper transport when the whole chain
    runs on one host."""
    return {key: f"ipc://{Path(directory) / key}" for key in ADDRESS_KEYS}


def address_args(addresses: dict[str, str]) -> list[str]:
    return [arg for key, value in addresses.items()
            for arg in (f"--{key.replace('_', '-')}", value)]


class LocalServices:
    """The processes of one chain; ``addresses`` default to free loopback ports."""

    def __init__(self, config_path, output, n_workers: int = 2, backend: str = "cpu",
                 once: bool = True, addresses: dict | None = None, sink_args=(), ingest_args=(),
                 worker_args=(), quiet=True, log_dir: Path | None = None,
                 affinity: dict[str, set[int]] | None = None,
                 per_worker_args: dict[int, list] | None = None):
        self.config_path = str(config_path)
        self.addresses = addresses or loopback_addresses()
        self.output = str(output)
        self.n_workers = n_workers
        self.backend = backend
        self.once = once
        self.sink_args = list(sink_args)
        self.ingest_args = list(ingest_args)
        self.worker_args = list(worker_args)
        self.per_worker_args = per_worker_args or {}   # worker index -> its own extra args
        self.affinity = affinity or {}          # "ingest" / "sink" / "worker" -> CPUs
        self.quiet = quiet
        self.log_dir = Path(log_dir) if log_dir else None
        self.ingest = self.sink = None
        self.workers: list[subprocess.Popen] = []

    def _start(self, name: str, *args) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "gpusmd.cli", *args, "--config", self.config_path,
               *address_args(self.addresses)] + (["--once"] if self.once else [])
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "w")
        elif self.quiet:
            out = subprocess.DEVNULL
        cpus = self.affinity.get(args[0])
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    def start(self) -> "LocalServices":
        self.sink = self._start("sink", "sink", "-o", self.output, "--no-progress",
                                *self.sink_args)
        self.ingest = self._start("ingest", "ingest", *self.ingest_args)
        self.workers = [self._start(f"worker{i}", "worker", "--backend", self.backend,
                                    "--name", f"worker{i}", *self.worker_args,
                                    *self.per_worker_args.get(i, ()))
                        for i in range(self.n_workers)]
        return self

    @property
    def processes(self):
        return [p for p in (self.ingest, self.sink, *self.workers) if p is not None]

    def wait_sink(self, timeout: float) -> int:
        """Wait for the sink to close its file and exit; its exit status."""
        try:
            return self.sink.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GpusmdError(f"the sink did not finish within {timeout:.0f} s") from None

    def stop(self, timeout: float = 5.0):
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.processes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
