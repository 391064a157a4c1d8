"""Optional CurveZMQ (authentication + encryption) for the links between hosts.

Each service has its own certificate pair (``<name>.key`` public, ``<name>.key_secret`` secret,
made by :func:`generate_keys` or ``zmq.auth.create_certificates``):

* a *server* side (the socket that binds) loads its secret cert; with ``authorized_dir`` set,
  only clients whose public cert (``*.key``) is in that directory are accepted (a ZAP
  authenticator thread per context checks them); without it, any client that knows the
  server's public key is accepted (encrypted, but not authenticated);
* a *client* side (the socket that connects) loads its secret cert and the server's public cert.

The authenticator of a context checks every CURVE server socket of that context: a server
socket without ``authorized_dir`` in a context where another one has it is checked against
that directory too (use a separate context if that is not wanted).

Call :func:`secure_server` before ``bind`` and :func:`secure_client` before ``connect``. A
refused peer is not an error on either side: libzmq drops the handshake and the client keeps
retrying, so nothing arrives. Stop the authenticators (:func:`stop_authenticators`, also run at
exit) before ``Context.term()``, which otherwise waits for their sockets forever.
"""
from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from gpusmd.errors import ConfigError

__all__ = ["CurveKeys", "generate_keys", "secure_server", "secure_client",
           "stop_authenticators", "curve_available", "watch_handshakes", "handshake_events"]


def curve_available() -> bool:
    """True when this libzmq was built with CURVE (libsodium / tweetnacl)."""
    return bool(zmq.has("curve"))


def _require_curve() -> None:
    if not curve_available():
        raise ConfigError(f"CurveZMQ keys are configured but this libzmq ({zmq.zmq_version()}) "
                          f"has no CURVE support")


def generate_keys(directory, names=("server", "client")) -> dict[str, tuple[Path, Path]]:
    """Create one certificate pair per name in ``directory`` (made if missing):
    ``{name: (public_file, secret_file)}``, the secret files readable by their owner only."""
    _require_curve()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
        os.chmod(secret_file, 0o600)
        out[name] = (Path(public_file), Path(secret_file))
    return out


@dataclass
class CurveKeys:
    """The CURVE keys of one service.

    ``secret_file``: its own secret cert (``*.key_secret``); ``server_public_file``: for a client
    side, the public cert of the server it connects to; ``authorized_dir``: for a server side, the
    directory of the public certs (``*.key``) of the clients it accepts (None: any client).
    """
    secret_file: Path
    server_public_file: Path | None = None
    authorized_dir: Path | None = None

    @classmethod
    def from_config(cls, d: Mapping, base_dir: Path | str = ".") -> "CurveKeys":
        """From a config mapping ``{secret, server_public?, authorized?}``; relative paths are
        resolved against ``base_dir`` (the config file's directory). Raises ConfigError naming
        the key and the file when something is missing."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"curve keys: expected a mapping with 'secret', 'server_public', "
                              f"'authorized', got {type(d).__name__}")
        unknown = sorted(set(d) - {"secret", "server_public", "authorized"})
        if unknown:
            raise ConfigError(f"curve keys: unknown key(s) {unknown} "
                              f"(expected 'secret', 'server_public', 'authorized')")
        if not d.get("secret"):
            raise ConfigError("curve keys: 'secret' (this service's *.key_secret file) is required")
        base_dir = Path(base_dir)

        def resolve(key: str, want_dir: bool = False) -> Path | None:
            value = d.get(key)
            if value is None:
                return None
            p = Path(os.path.expanduser(str(value)))
            if not p.is_absolute():
                p = base_dir / p
            if want_dir and not p.is_dir():
                raise ConfigError(f"curve keys: '{key}': directory not found: {p}")
            if not want_dir and not p.is_file():
                raise ConfigError(f"curve keys: '{key}': file not found: {p}")
            return p

        return cls(secret_file=resolve("secret"), server_public_file=resolve("server_public"),
                   authorized_dir=resolve("authorized", want_dir=True))


def _load(path: Path, what: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"curve keys: cannot read {what} {path}: {e}") from None
    if need_secret and not secret:
        raise ConfigError(f"curve keys: {what} {path} has no secret key "
                          f"(give the *.key_secret file, not the public *.key)")
    return public, secret


# one ZAP authenticator per context (only one handler can bind inproc://zeromq.zap.01), and per
# authorized directory its ZAP domain: the first directory serves domain "*" (sockets without a
# zap_domain), further ones get a domain of their own, set on their sockets
_authenticators: dict[zmq.Context, tuple[ThreadAuthenticator, dict[str, str]]] = {}
_auth_lock = threading.Lock()


def _ensure_authenticator(context: zmq.Context, authorized_dir: Path) -> str:
    """Start (once) the context's authenticator, configure ``authorized_dir``; its ZAP domain."""
    location = str(Path(authorized_dir).resolve())
    if not os.path.isdir(location):
        # configure_curve would only log this, and then refuse every client
        raise ConfigError(f"curve keys: 'authorized': directory not found: {authorized_dir}")
    with _auth_lock:
        entry = _authenticators.get(context)
        if entry is None:
            auth = ThreadAuthenticator(context)
            auth.start()
            entry = _authenticators[context] = (auth, {})
        auth, domains = entry
        domain = domains.get(location)
        if domain is None:
            domain = domains[location] = "*" if not domains else f"gpusmd-{len(domains)}"
        # (re)load the directory: certs added since the last call are picked up
        auth.configure_curve(domain=domain, location=location)
        return domain


def secure_server(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``socket`` a CURVE server (call before bind). With ``keys.authorized_dir``, only the
    clients whose public certs are in that directory are accepted."""
    _require_curve()
    public, secret = _load(keys.secret_file, "secret cert", need_secret=True)
    if keys.authorized_dir is not None:
        domain = _ensure_authenticator(socket.context, keys.authorized_dir)
        if domain != "*":
            socket.zap_domain = domain.encode()
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def secure_client(socket: zmq.Socket, keys: CurveKeys, server_public_file: Path | None = None
                  ) -> None:
    """Make ``socket`` a CURVE client of the server whose public cert is ``server_public_file``
    (default ``keys.server_public_file``). Call before connect."""
    _require_curve()
    server_file = server_public_file if server_public_file is not None else keys.server_public_file
    if server_file is None:
        raise ConfigError("curve keys: 'server_public' (the server's public *.key file) is "
                          "required on a client side")
    public, secret = _load(keys.secret_file, "secret cert", need_secret=True)
    server_public, _ = _load(Path(server_file), "server public cert", need_secret=False)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public


# -- seeing refusals ------------------------------------------------------------------------
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

_PROTOCOL_ERRORS = {getattr(zmq, n): n[len("PROTOCOL_ERROR_"):] for n in dir(zmq)
                    if n.startswith("PROTOCOL_ERROR_")}
_HINTS = {
    "ZMTP_MECHANISM_MISMATCH": "one side does not use CURVE",
    "ZMTP_CRYPTOGRAPHIC": "the client has the wrong server public key",
}


def watch_handshakes(socket: zmq.Socket) -> zmq.Socket:
    """A monitor socket (PAIR) that receives ``socket``'s handshake results: add it to the
    service's poller and read it with :func:`handshake_events`. A refused peer is otherwise
    silent on both sides. Close it (linger 0) and ``socket.disable_monitor()`` on shutdown."""
    return socket.get_monitor_socket(HANDSHAKE_EVENTS)


def handshake_events(monitor: zmq.Socket) -> list[tuple[bool, str]]:
    """Drain ``monitor`` without blocking: ``[(ok, "endpoint: description"), ...]``."""
    from zmq.utils.monitor import recv_monitor_message
    out = []
    while monitor.poll(0, zmq.POLLIN):
        msg = recv_monitor_message(monitor, zmq.NOBLOCK)
        event, value = int(msg["event"]), int(msg["value"])
        endpoint = msg.get("endpoint", b"")
        endpoint = endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else endpoint
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            out.append((True, f"{endpoint}: handshake succeeded"))
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            out.append((False, f"{endpoint}: refused by the server's authenticator (ZAP status "
                               f"{value}): the client's public key is not authorized"))
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            name = _PROTOCOL_ERRORS.get(value, hex(value))
            hint = _HINTS.get(name)
            out.append((False, f"{endpoint}: handshake failed ({name}"
                               + (f": {hint})" if hint else ")")))
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            out.append((False, f"{endpoint}: handshake failed (no detail; on a CURVE client "
                               f"usually the wrong server public key)"))
    return out


def stop_authenticators(context: zmq.Context | None = None) -> None:
    """Stop the ZAP authenticator of ``context`` (None: of every context). Call it before
    ``context.term()``; registered with atexit."""
    with _auth_lock:
        if context is None:
            entries = list(_authenticators.items())
            _authenticators.clear()
        else:
            entry = _authenticators.pop(context, None)
            entries = [] if entry is None else [(context, entry)]
    for ctx, (auth, _) in entries:
        if ctx.closed:
            continue
        try:
            auth.stop()
        except zmq.ZMQError:
            pass


atexit.register(stop_authenticators)
