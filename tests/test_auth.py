"""The peer handshake over mutual TLS and the framed peer protocol: good peers in, bad out.

Each handshake test runs a real TLS connection on loopback between two identities
(tls.py) and checks what each side concludes about the other.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest

from dvmmd.daemon.peer_protocol import (
    MAGIC,
    MAX_FRAME,
    PREAUTH_MAX_FRAME,
    PROTO_VERSION,
    Connection,
    ProtocolError,
    decode_body,
    encode,
)
from dvmmd.security import safejson, tls
from dvmmd.security.auth import AuthError, Peer, accept_handshake, dial_handshake
from dvmmd.security.secret import SecretError, load_secret

SECRET = b"k" * 32


def test_load_secret(tmp_path: Path) -> None:
    p = tmp_path / "secret"
    p.write_text("0123456789abcdef0123\n")
    p.chmod(0o600)
    assert load_secret(p) == b"0123456789abcdef0123"
    p.chmod(0o644)
    with pytest.raises(SecretError, match="group/others"):
        load_secret(p)
    p.write_text("short")
    p.chmod(0o600)
    with pytest.raises(SecretError, match="too short"):
        load_secret(p)
    with pytest.raises(SecretError, match="cannot read"):
        load_secret(tmp_path / "missing")


Outcome = Peer | Exception


async def _pair(
    acceptor: tls.Identity,
    dialer: tls.Identity,
    claim: str | None = None,
    welcome_as: str | None = None,
) -> tuple[Outcome, Outcome]:
    """One TLS connection from ``dialer`` to ``acceptor``, then the name handshake.

    ``claim``: the name the dialer claims in hello (default: its own);
    ``welcome_as``: the acceptor answers as this name (default: its own).
    """
    results: dict[str, Outcome] = {}

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await w.start_tls(acceptor.server, ssl_handshake_timeout=5)
        except OSError as e:
            results["server"] = e
            w.transport.abort()
            return
        conn = Connection(r, w)
        try:
            results["server"] = await accept_handshake(conn, welcome_as or acceptor.node)
        except (AuthError, ProtocolError, ConnectionError, OSError) as e:
            results["server"] = e
        finally:
            await conn.aclose()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client: Outcome
    try:
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=dialer.client, ssl_handshake_timeout=5
        )
    except OSError as e:
        client = e
    else:
        conn = Connection(r, w)
        try:
            client = await dial_handshake(conn, claim or dialer.node, "127.0.0.1:1")
        except (AuthError, ProtocolError, ConnectionError, OSError) as e:
            client = e
        await conn.aclose()
    for _ in range(200):
        if "server" in results:
            break
        await asyncio.sleep(0.01)
    server.close()
    return results["server"], client


def _ids(*names: str, secret: bytes = SECRET) -> list[tls.Identity]:
    return [tls.identity_from_secret(secret, n) for n in names]


def test_handshake_binds_both_names() -> None:
    acc, dia = _ids("acceptor", "dialer")
    s, c = asyncio.run(_pair(acc, dia))
    assert s == Peer(node="dialer", addr="127.0.0.1:1", role="node")
    assert isinstance(c, Peer) and c.node == "acceptor" and c.role == "node"


def test_valid_cert_for_a_claiming_b_is_refused() -> None:
    acc, a = _ids("acceptor", "A")
    s, c = asyncio.run(_pair(acc, a, claim="B"))
    assert isinstance(s, AuthError)
    assert "its certificate is for 'A' but it claims to be 'B'" in str(s)
    assert isinstance(c, AuthError)
    assert "the node name does not match the certificate" in str(c)


def test_acceptor_claiming_another_name_is_refused() -> None:
    acc, dia = _ids("X", "dialer")
    s, c = asyncio.run(_pair(acc, dia, welcome_as="Y"))
    assert isinstance(c, AuthError)
    assert "its certificate is for 'X' but it claims to be 'Y'" in str(c)
    assert isinstance(s, Peer)  # it said hello truthfully; the dialer hangs up


def test_other_cluster_secret_is_refused_in_tls() -> None:
    (acc,) = _ids("acceptor")
    (dia,) = _ids("dialer", secret=b"z" * 32)
    s, c = asyncio.run(_pair(acc, dia))
    # The dialer verifies the acceptor's certificate first and gives up.
    assert isinstance(c, OSError) and "certificate verify failed" in str(c)
    assert isinstance(s, OSError)


def test_client_certificate_from_another_ca_is_refused_by_the_acceptor() -> None:
    """A dialer that trusts our CA but shows a certificate of another CA."""
    (acc,) = _ids("acceptor")
    (other,) = _ids("intruder", secret=b"z" * 32)
    from dvmmd.security import pki

    _, ca_cert = pki.secret_ca(SECRET)
    ctx = other.client
    ctx.load_verify_locations(cadata=pki.cert_pem(ca_cert).decode())
    s, c = asyncio.run(_pair(acc, other))
    assert isinstance(s, OSError) and "certificate" in str(s).lower(), s
    # TLS 1.3: the dialer learns of the refusal on its first read.
    assert isinstance(c, (AuthError, ConnectionError, OSError)), c


def test_plain_connection_has_no_identity() -> None:
    async def run() -> Exception:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        conn = Connection(r, w)
        try:
            await dial_handshake(conn, "dialer", "127.0.0.1:1")
        except AuthError as e:
            return e
        finally:
            await conn.aclose()
            server.close()
        raise AssertionError("a plain connection passed the handshake")

    e = asyncio.run(run())
    assert "the connection has no verified TLS certificate" in str(e)


# --------------------------------------------------------------------------- frames


def test_frame_encode_decode() -> None:
    msg = {"type": "rpc", "id": 1, "method": "x", "params": {"a": [1, 2]}}
    frame = encode(msg)
    assert frame[:4] == MAGIC == b"DVP2" and PROTO_VERSION == 2
    assert struct.unpack("!I", frame[4:8])[0] == len(frame) - 8
    assert decode_body(frame[8:]) == msg


NESTED = b'{"type":"rpc","id":1,"method":"x","params":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"[1,2]", "not an object"),
        (b'{"type": "nope"}', "unknown message type"),
        (b'{"type": "rpc", "id": 1, "method": "x"}', "missing field 'params'"),
        (b'{"type": "rpc", "id": "1", "method": "x", "params": {}}', "wrong type"),
        (b'{"type": "rpc", "id": true, "method": "x", "params": {}}', "wrong type"),
        (b'{"type": "rpc", "id": 1, "method": "x", "params": {}, "x": 1}', "unexpected"),
        (b'{"type": "rpc", "id": NaN, "method": "x", "params": {}}', "non-standard JSON"),
        (b'{"type": "hello", "proto": 2, "node": "a/../b", "addr": "x:1", "role": "node"}',
         "invalid node name 'a/../b'"),
        (b'{"type": "hello", "proto": 2, "node": "a", "addr": "x:1", "role": "root"}',
         "role must be 'node' or 'client'"),
        (b'{"type": "leave", "node": "a", "boot_id": "00", "incarnation": 1}', "boot_id"),
        # Deep nesting: a protocol error, not a RecursionError.
        (NESTED, "nested deeper than 32 levels"),
        (b'{"type":"rpc","id":1,"method":"x","params":{"a":' + b"[" * 40 + b"]" * 40 + b"}}",
         "nested deeper than 32 levels"),
    ],
)  # fmt: skip
def test_garbage_bodies_rejected(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_body(body)


def test_safejson_loads() -> None:
    assert safejson.loads(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    assert safejson.loads("[" * 32 + "]" * 32) is not None
    for bad, match in (
        ("[" * 33 + "]" * 33, "nested deeper than 32"),
        ("[" * 100_000, "nested deeper than 32"),
        ("Infinity", "non-standard JSON constant Infinity"),
        ("{", "invalid JSON"),
    ):
        with pytest.raises(safejson.JsonError, match=match):
            safejson.loads(bad)


class _NoWriter:
    def get_extra_info(self, name: str) -> None:
        return None


async def _recv_from(raw: bytes, authenticated: bool = False) -> Exception | dict[str, object]:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    conn = Connection(reader, _NoWriter())  # type: ignore[arg-type]
    if authenticated:
        conn.authenticated()
    try:
        return await conn.recv()
    except (ProtocolError, ConnectionError) as e:
        return e


def _frame(body: bytes) -> bytes:
    return MAGIC + struct.pack("!I", len(body)) + body


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad frame magic"),
        (b"DVP1" + struct.pack("!I", 2) + b"{}", "bad frame magic"),  # protocol version 1
        (MAGIC + struct.pack("!I", PREAUTH_MAX_FRAME + 1), "before authentication"),
        (MAGIC + b"\x00", "truncated frame header"),
        (MAGIC + struct.pack("!I", 100) + b"{}", "truncated frame body"),
    ],
)
def test_garbage_frames_rejected(raw: bytes, match: str) -> None:
    e = asyncio.run(_recv_from(raw))
    assert isinstance(e, ProtocolError) and match in str(e)


def test_frame_limit_before_and_after_authentication() -> None:
    body = json.dumps({"type": "refused", "reason": "x" * 5000}).encode()
    e = asyncio.run(_recv_from(_frame(body)))
    assert isinstance(e, ProtocolError)
    assert f"frame of {len(body)} bytes exceeds the 4096 byte limit before authentication" in str(e)
    assert asyncio.run(_recv_from(_frame(body), authenticated=True)) == json.loads(body)
    e = asyncio.run(_recv_from(MAGIC + struct.pack("!I", MAX_FRAME + 1), authenticated=True))
    assert isinstance(e, ProtocolError) and f"exceeds the {MAX_FRAME} byte limit" in str(e)


def test_clean_eof_is_connection_error() -> None:
    e = asyncio.run(_recv_from(b""))
    assert isinstance(e, ConnectionError)


def test_random_garbage_never_crashes() -> None:
    for _ in range(200):
        raw = os.urandom(int.from_bytes(os.urandom(1), "little"))
        e = asyncio.run(_recv_from(_frame(raw)))
        assert isinstance(e, (ProtocolError, ConnectionError, dict))
    body = json.dumps({"type": "refused", "reason": "r"}).encode()
    assert asyncio.run(_recv_from(_frame(body))) == {"type": "refused", "reason": "r"}
