"""A service whose address is taken, or not an address, stops with one line."""
import subprocess
import sys

import pytest
import zmq

from gpusmd.config import ServicesConfig
from gpusmd.errors import GpusmdError
from gpusmd.services.common import open_socket


def test_taken_and_malformed_addresses_are_one_line(tmp_path):
    ctx = zmq.Context()
    first = open_socket(ctx, zmq.PULL, "tcp://127.0.0.1:*", True, ServicesConfig())
    try:
        address = first.getsockopt_string(zmq.LAST_ENDPOINT)
        with pytest.raises(GpusmdError, match=r"cannot bind .*another service running there"):
            open_socket(ctx, zmq.PULL, address, True, ServicesConfig())
        with pytest.raises(GpusmdError, match="nowhere:5: cannot connect"):
            open_socket(ctx, zmq.PUSH, "nowhere:5", False, ServicesConfig())
        (tmp_path / "run.yaml").write_text("detectors:\n  cam: {type: camera}\n")
        r = subprocess.run([sys.executable, "-m", "gpusmd.cli", "ingest", "--config", "run.yaml",
                            "--ingest-in", address, "--once"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and address in lines[-1] and "cannot bind" in lines[-1], r.stderr
        assert not any("Traceback" in line for line in lines)
    finally:
        first.close(linger=0)
        ctx.term()
