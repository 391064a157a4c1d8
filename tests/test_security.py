"""CurveZMQ links: accepted with the right keys, refused (nothing arrives) otherwise."""
import os
import stat
import time

import pytest
import zmq

from gpusmd.errors import ConfigError
from gpusmd.services.security import (CurveKeys, generate_keys, handshake_events, secure_client,
                                      secure_server, stop_authenticators, watch_handshakes)

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

REFUSED_WAIT_MS = 1000


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    stop_authenticators(context)          # before term(): its sockets would block it
    context.destroy(linger=0)


@pytest.fixture
def keys(tmp_path):
    """server + client pairs, an impostor pair, and an authorized dir holding client.key only."""
    made = generate_keys(tmp_path / "keys", names=("server", "client", "other"))
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_bytes(made["client"][0].read_bytes())
    return made, authorized


def _link(ctx, server_keys, client_keys=None, message=b"hello", wait_ms=REFUSED_WAIT_MS):
    """PULL server (CURVE) <- PUSH client: (message received or None after wait_ms,
    the server's handshake events, the client's)."""
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    secure_server(pull, server_keys)
    server_mon = watch_handshakes(pull)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    if client_keys is not None:
        secure_client(push, client_keys)
    client_mon = watch_handshakes(push)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(message, zmq.NOBLOCK)       # queued on the connecting side until the handshake
    try:
        got = pull.recv(zmq.NOBLOCK) if pull.poll(wait_ms, zmq.POLLIN) else None
        time.sleep(0.05)                  # let the last monitor events arrive
        return got, handshake_events(server_mon), handshake_events(client_mon)
    finally:
        for sock, mon in ((push, client_mon), (pull, server_mon)):
            sock.disable_monitor()
            mon.close(linger=0)
            sock.close(linger=0)


def _refused(events, text):
    return any(not ok and text in msg for ok, msg in events) and not any(ok for ok, _ in events)


def test_generate_keys_files(keys):
    made, _ = keys
    for name, (public, secret) in made.items():
        assert public.name == f"{name}.key" and secret.name == f"{name}.key_secret"
        assert public.is_file() and secret.is_file()
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        assert b"secret-key" not in public.read_bytes()


def test_right_keys_pass(ctx, keys):
    made, authorized = keys
    server = CurveKeys(made["server"][1], authorized_dir=authorized)
    client = CurveKeys(made["client"][1], server_public_file=made["server"][0])
    got, server_ev, client_ev = _link(ctx, server, client, b"event 1", wait_ms=5000)
    assert got == b"event 1"
    assert [ok for ok, _ in server_ev] == [True] and [ok for ok, _ in client_ev] == [True]


def test_right_keys_pass_without_authenticator(ctx, keys):
    """No authorized dir: any client that knows the server's public key gets through."""
    made, _ = keys
    server = CurveKeys(made["server"][1])
    client = CurveKeys(made["other"][1], server_public_file=made["server"][0])
    assert _link(ctx, server, client, wait_ms=5000)[0] == b"hello"


def test_wrong_server_key_refused(ctx, keys):
    made, authorized = keys
    server = CurveKeys(made["server"][1], authorized_dir=authorized)
    client = CurveKeys(made["client"][1], server_public_file=made["other"][0])
    got, server_ev, client_ev = _link(ctx, server, client)
    assert got is None
    assert _refused(server_ev, "ZMTP_CRYPTOGRAPHIC")
    assert _refused(client_ev, "no detail")


def test_unauthorized_client_refused(ctx, keys):
    made, authorized = keys
    server = CurveKeys(made["server"][1], authorized_dir=authorized)
    client = CurveKeys(made["other"][1], server_public_file=made["server"][0])
    got, server_ev, client_ev = _link(ctx, server, client)
    assert got is None
    assert _refused(server_ev, "not authorized") and _refused(client_ev, "ZAP status 400")


def test_plain_client_refused(ctx, keys):
    made, authorized = keys
    server = CurveKeys(made["server"][1], authorized_dir=authorized)
    got, server_ev, client_ev = _link(ctx, server, None)
    assert got is None
    assert _refused(server_ev, "MECHANISM_MISMATCH") and _refused(client_ev, "MECHANISM_MISMATCH")


def test_authenticator_once_per_context(ctx, keys, tmp_path):
    """Two server sockets of one context with different authorized dirs: each accepts its own."""
    made, authorized = keys
    other_dir = tmp_path / "authorized_other"
    other_dir.mkdir()
    (other_dir / "other.key").write_bytes(made["other"][0].read_bytes())
    s1 = CurveKeys(made["server"][1], authorized_dir=authorized)
    s2 = CurveKeys(made["server"][1], authorized_dir=other_dir)
    client = CurveKeys(made["client"][1], server_public_file=made["server"][0])
    other = CurveKeys(made["other"][1], server_public_file=made["server"][0])
    assert _link(ctx, s1, client, wait_ms=5000)[0] == b"hello"
    assert _link(ctx, s2, other, wait_ms=5000)[0] == b"hello"
    got, server_ev, _ = _link(ctx, s2, client, wait_ms=500)
    assert got is None and _refused(server_ev, "not authorized")
    from gpusmd.services import security
    assert len([c for c in security._authenticators if c is ctx]) == 1


def test_from_config(tmp_path, keys):
    made, authorized = keys
    base = made["server"][0].parent
    k = CurveKeys.from_config({"secret": "client.key_secret", "server_public": "server.key"},
                              base)
    assert k.secret_file == made["client"][1] and k.server_public_file == made["server"][0]
    assert k.authorized_dir is None
    k = CurveKeys.from_config({"secret": str(made["server"][1]), "authorized": str(authorized)},
                              tmp_path / "elsewhere")
    assert k.authorized_dir == authorized


def test_from_config_missing_file(tmp_path, keys):
    made, _ = keys
    base = made["server"][0].parent
    with pytest.raises(ConfigError, match=r"'server_public'.*nope\.key"):
        CurveKeys.from_config({"secret": "client.key_secret", "server_public": "nope.key"}, base)
    with pytest.raises(ConfigError, match=r"'secret'.*missing\.key_secret"):
        CurveKeys.from_config({"secret": "missing.key_secret"}, base)
    with pytest.raises(ConfigError, match=r"'authorized'.*no_such_dir"):
        CurveKeys.from_config({"secret": "server.key_secret", "authorized": "no_such_dir"}, base)
    with pytest.raises(ConfigError, match="secret"):
        CurveKeys.from_config({"server_public": "server.key"}, base)
    with pytest.raises(ConfigError, match="unknown"):
        CurveKeys.from_config({"secret": "client.key_secret", "public": "x"}, base)


def test_public_file_as_secret_rejected(ctx, keys):
    made, _ = keys
    sock = ctx.socket(zmq.PULL)
    try:
        with pytest.raises(ConfigError, match="no secret key"):
            secure_server(sock, CurveKeys(made["server"][0]))
        with pytest.raises(ConfigError, match="server_public"):
            secure_client(sock, CurveKeys(made["client"][1]))
    finally:
        sock.close(linger=0)
