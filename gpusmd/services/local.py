"""Start the whole chain on this host: ingest, N workers and the sink as processes,
on free loopback ports (``gpusmd up`` and ``gpusmd replay --via-services``)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..config import ADDRESS_KEYS
from ..cpu_engine import take_share_of_cores
from ..errors import GpusmdError
from .shm import remove_stale

# A service runs the command line of the gpusmd package this process imported, whatever
# folder it starts in (with `python -m gpusmd.cli`, a gpusmd/ folder in the working
# directory would be imported instead).
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
RUN_CLI = (f"import sys; sys.path.insert(0, {PACKAGE_ROOT!r}); "
           "from gpusmd.cli import main; sys.exit(main())")
LOG_LINES = 20        # lines of a failed service's log shown in the error


def last_lines(f, n: int = LOG_LINES, max_bytes: int = 1 << 16) -> str:
    """The last lines of a file a service writes to, read without moving the offset
    the service shares."""
    size = os.fstat(f.fileno()).st_size
    data = os.pread(f.fileno(), min(size, max_bytes), max(0, size - max_bytes))
    return "\n".join(data.decode(errors="replace").splitlines()[-n:])


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
    """The processes of one chain; ``addresses`` default to free loopback ports. Each
    service writes to ``log_dir/<name>.log``; without ``log_dir``, to the terminal or,
    when ``quiet``, to a temporary file: what the error of a failed service shows."""

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
        self.logs: dict[subprocess.Popen, tuple[str, object]] = {}   # -> (name, file or None)

    def _start(self, name: str, *args) -> subprocess.Popen:
        cmd = [sys.executable, "-c", RUN_CLI, *args, "--config", self.config_path,
               *address_args(self.addresses)] + (["--once"] if self.once else [])
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "w+b")   # read back when it fails
        elif self.quiet:
            out = tempfile.TemporaryFile()
        cpus = self.affinity.get(args[0])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args[0] == "worker":             # the workers share the host's cores
            take_share_of_cores(self.n_workers, env)
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                             env=env,
                             preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.logs[p] = (name, out)
        return p

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

    def exit_report(self, p: subprocess.Popen) -> str:
        """How a service ended: its name, exit status and the last lines of its log."""
        name, out = self.logs[p]
        report = f"the {name} exited with status {p.returncode}"
        lines = last_lines(out) if out is not None else ""
        if lines:
            where = f" {out.name}" if isinstance(out.name, str) else ""
            report += f"; the last lines of its log{where}:\n{lines}"
        return report

    def check(self):
        """Raise GpusmdError, with the service's log, when the run cannot finish: the
        ingest or the sink failed, or every worker did (the others take over the
        batches of one)."""
        failed = [p for p in self.processes if p.poll() not in (None, 0)]
        needed = [p for p in failed if p in (self.ingest, self.sink)]
        if needed or (self.workers and len(failed) == len(self.workers)):
            raise GpusmdError(f"{self.exit_report((needed or failed)[0])}\n"
                              f"{self.output} may be incomplete")

    def wait_sink(self, timeout: float) -> int:
        """Wait for the sink to close its file and exit; its exit status, 0: a failure of
        the sink, or one that stops the run before the sink ends, raises (see check)."""
        deadline = time.monotonic() + timeout
        while self.sink.poll() is None:
            self.check()
            if time.monotonic() > deadline:
                raise GpusmdError(f"the sink did not finish within {timeout:.0f} s")
            time.sleep(0.1)
        self.check()
        return self.sink.returncode

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
                p.wait()
        remove_stale()          # the slot files of a killed ingest
        for _, out in self.logs.values():
            if out is not None:
                out.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
