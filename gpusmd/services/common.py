"""What every service shares: sockets (high-water marks, optional CurveZMQ), logging."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import zmq

from ..config import ServicesConfig
from .security import CurveKeys, generate_keys, secure_client, secure_server

LINGER_MS = 2000      # what is queued at exit still goes out (results, acks)


def curve_keys(cfg: ServicesConfig, server: bool) -> CurveKeys | None:
    """The keys of a binding (server) or connecting (client) socket, from the keys
    directory made by ``gpusmd keys``; None without CurveZMQ."""
    d = cfg.curve_keys
    if d is None:
        return None
    if server:
        return CurveKeys(d / "server.key_secret", authorized_dir=d / "authorized")
    return CurveKeys(d / "client.key_secret", server_public_file=d / "server.key")


def make_keys(directory) -> Path:
    """A keys directory for every link: server and client certs, and the client's public
    cert authorised by the servers. Copy it to every host of the chain."""
    directory = Path(directory)
    generate_keys(directory)
    (directory / "authorized").mkdir(exist_ok=True)
    shutil.copy(directory / "client.key", directory / "authorized" / "client.key")
    return directory


def open_socket(ctx: zmq.Context, kind: int, address: str, bind: bool,
                cfg: ServicesConfig, identity: bytes | None = None) -> zmq.Socket:
    s = ctx.socket(kind)
    if identity is not None:
        s.identity = identity
    s.linger = LINGER_MS
    s.sndhwm = cfg.hwm
    s.rcvhwm = cfg.hwm
    keys = curve_keys(cfg, server=bind)
    if keys is not None:
        (secure_server if bind else secure_client)(s, keys)
    if bind:
        s.bind(address)
    else:
        s.connect(address)
    return s


def setup_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
