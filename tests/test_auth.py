"""HMAC challenge-response and the framed peer protocol: good peers in, bad ones out."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest

from dvmmd import auth
from dvmmd.auth import AuthError, SecretError, accept_handshake, dial_handshake, load_secret
from dvmmd.peerproto import MAGIC, MAX_FRAME, Connection, ProtocolError, decode_body, encode

KEY = b"k" * 32


def test_proofs_are_directional_and_keyed() -> None:
    a = auth.acceptor_proof(KEY, "n1", "n2", "A", "D")
    assert a == auth.acceptor_proof(KEY, "n1", "n2", "A", "D")
    assert a != auth.acceptor_proof(b"x" * 32, "n1", "n2", "A", "D")
    assert a != auth.dialer_proof(KEY, "n2", "n1", "A", "D")  # no reflection
    assert a != auth.acceptor_proof(KEY, "n1", "n3", "A", "D")  # fresh nonce, new proof
    assert auth.new_nonce() != auth.new_nonce()


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


async def _pair(server_key: bytes, client_key: bytes) -> tuple[object, object]:
    results: dict[str, object] = {}

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = Connection(r, w)
        try:
            results["server"] = await accept_handshake(conn, server_key, "acceptor")
        except (AuthError, ProtocolError, ConnectionError) as e:
            results["server"] = e
        finally:
            await conn.aclose()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    conn = Connection(r, w)
    try:
        client: object = await dial_handshake(conn, client_key, "dialer", "127.0.0.1:1")
    except (AuthError, ProtocolError) as e:
        client = e
    await conn.aclose()
    for _ in range(100):
        if "server" in results:
            break
        await asyncio.sleep(0.01)
    server.close()
    return results["server"], client


def test_handshake_same_key() -> None:
    s, c = asyncio.run(_pair(KEY, KEY))
    assert isinstance(s, auth.Peer) and s.node == "dialer" and s.addr == "127.0.0.1:1"
    assert isinstance(c, auth.Peer) and c.node == "acceptor"


def test_handshake_wrong_key_refused_both_ways() -> None:
    s, c = asyncio.run(_pair(KEY, b"z" * 32))
    # The dialer catches the acceptor's bad proof first and never sends its own.
    assert isinstance(c, AuthError) and "wrong key" in str(c)
    assert isinstance(s, ConnectionError)


async def _forging_dialer() -> tuple[object, object]:
    """A dialer without the key that answers the challenge with a made-up proof."""
    results: dict[str, object] = {}

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = Connection(r, w)
        try:
            results["server"] = await accept_handshake(conn, KEY, "acceptor")
        except (AuthError, ProtocolError, ConnectionError) as e:
            results["server"] = e
        finally:
            await conn.aclose()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    conn = Connection(r, w)
    await conn.send(
        {
            "type": "hello",
            "proto": 1,
            "node": "evil",
            "addr": "x:1",
            "role": "node",
            "nonce": auth.new_nonce(),
        }
    )
    assert (await conn.recv(5))["type"] == "challenge"
    await conn.send({"type": "auth", "mac": "0" * 64})
    reply = await conn.recv(5)
    await conn.aclose()
    for _ in range(100):
        if "server" in results:
            break
        await asyncio.sleep(0.01)
    server.close()
    return results["server"], reply


def test_forged_proof_refused() -> None:
    s, reply = asyncio.run(_forging_dialer())
    assert isinstance(s, AuthError) and "failed to prove" in str(s) and "evil" in str(s)
    assert reply == {"type": "refused", "reason": "authentication failed"}


def test_frame_encode_decode() -> None:
    msg = {"type": "rpc", "id": 1, "method": "x", "params": {"a": [1, 2]}}
    frame = encode(msg)
    assert frame[:4] == MAGIC and struct.unpack("!I", frame[4:8])[0] == len(frame) - 8
    assert decode_body(frame[8:]) == msg


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xff\xfe", "invalid JSON"),
        (b"[1,2]", "not an object"),
        (b'{"type": "nope"}', "unknown message type"),
        (b'{"type": "rpc", "id": 1, "method": "x"}', "missing field 'params'"),
        (b'{"type": "rpc", "id": "1", "method": "x", "params": {}}', "wrong type"),
        (b'{"type": "rpc", "id": true, "method": "x", "params": {}}', "wrong type"),
        (b'{"type": "rpc", "id": 1, "method": "x", "params": {}, "x": 1}', "unexpected"),
        (b'{"type": "auth", "mac": "zz"}', "64 lowercase hex"),
        (b'{"type": "rpc", "id": NaN, "method": "x", "params": {}}', "invalid JSON"),
    ],
)
def test_garbage_bodies_rejected(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_body(body)


async def _recv_from(raw: bytes) -> Exception | dict[str, object]:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()

    class W:
        def get_extra_info(self, name: str) -> None:
            return None

    conn = Connection(reader, W())  # type: ignore[arg-type]
    try:
        return await conn.recv()
    except (ProtocolError, ConnectionError) as e:
        return e


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad frame magic"),
        (MAGIC + struct.pack("!I", MAX_FRAME + 1), "exceeds"),
        (MAGIC + b"\x00", "truncated frame header"),
        (MAGIC + struct.pack("!I", 100) + b"{}", "truncated frame body"),
    ],
)
def test_garbage_frames_rejected(raw: bytes, match: str) -> None:
    e = asyncio.run(_recv_from(raw))
    assert isinstance(e, ProtocolError) and match in str(e)


def test_clean_eof_is_connection_error() -> None:
    e = asyncio.run(_recv_from(b""))
    assert isinstance(e, ConnectionError)


def test_random_garbage_never_crashes() -> None:
    for _ in range(200):
        raw = os.urandom(int.from_bytes(os.urandom(1), "little"))
        e = asyncio.run(_recv_from(MAGIC + struct.pack("!I", len(raw)) + raw))
        assert isinstance(e, (ProtocolError, ConnectionError, dict))
    body = json.dumps({"type": "welcome"}).encode()
    assert asyncio.run(_recv_from(MAGIC + struct.pack("!I", len(body)) + body)) == {
        "type": "welcome"
    }
