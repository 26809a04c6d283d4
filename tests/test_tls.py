"""Certificates (pki.py), TLS identities (tls.py) and the peer network's defences
against strangers (peers.py), in one process: no daemons, no KVM.

The network tests run a real `PeerNetwork` on loopback and attack it: a relay that
injects a frame into a live connection, floods of unauthenticated connections, oversized
and deeply nested frames, and attacker-chosen names in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import dvmmctl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dvmmd.config import Config, parse_config
from dvmmd.daemon.membership import Membership
from dvmmd.daemon.peer_protocol import MAGIC, PROTO_VERSION, Connection, encode
from dvmmd.daemon.peers import MAX_PENDING, MAX_PENDING_PER_HOST, PeerNetwork
from dvmmd.security import pki, tls
from dvmmd.security.auth import AuthError, Peer, dial_handshake

SECRET = b"s" * 32


# --------------------------------------------------------------------------- pki


def test_secret_ca_is_the_same_from_the_same_secret() -> None:
    k1, c1 = pki.secret_ca(SECRET)
    k2, c2 = pki.secret_ca(SECRET)
    der = serialization.Encoding.DER
    assert c1.public_bytes(der) == c2.public_bytes(der)
    assert k1.public_key() == k2.public_key()
    k3, c3 = pki.secret_ca(b"t" * 32)
    assert k3.public_key() != k1.public_key() and c3.public_bytes(der) != c1.public_bytes(der)
    ca = c1.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca.ca is True


def test_node_certificate_names_and_signature() -> None:
    ca_key, ca_cert = pki.secret_ca(SECRET)
    _, cert = pki.issue_node_cert(ca_key, ca_cert, "node-1.a")
    assert pki.cert_names(cert) == ["node-1.a"]
    assert cert.subject.rfc4514_string() == "CN=node-1.a"
    cert.verify_directly_issued_by(ca_cert)
    with pytest.raises(pki.PkiError, match="invalid node name '../x'"):
        pki.issue_node_cert(ca_key, ca_cert, "../x")


def test_cluster_init_and_add_node_files(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    written = pki.init_cluster(d, "node1")
    assert [p.name for p in written] == ["ca.key", "ca.crt", "node1.key", "node1.crt"]
    pki.add_node(d, "node2")
    for name, mode in (("ca.key", 0o600), ("node1.key", 0o600), ("node2.key", 0o600)):
        assert (d / name).stat().st_mode & 0o777 == mode, name
    assert (d / "ca.crt").stat().st_mode & 0o777 == 0o644
    ident = tls.identity_from_files(d / "ca.crt", d / "node2.crt", d / "node2.key", "node2")
    assert ident.mode == "ca" and ident.node == "node2"
    assert "mutual TLS 1.3, CA certificate files" in ident.describe()
    # OpenSSL agrees the chain is valid, with strict X.509 checks.
    r = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(d / "ca.crt"), str(d / "node2.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    with pytest.raises(pki.PkiError, match="node2.key already exists"):
        pki.add_node(d, "node2")
    with pytest.raises(pki.PkiError, match="this directory has a cluster CA"):
        pki.init_cluster(d, "node9")


def test_identity_files_are_checked(tmp_path: Path) -> None:
    d, other = tmp_path / "a", tmp_path / "b"
    pki.init_cluster(d, "node1")
    pki.init_cluster(other, "node1")
    ca, crt, key = d / "ca.crt", d / "node1.crt", d / "node1.key"
    with pytest.raises(tls.IdentityError, match=r"is for node1, not for this node \(node7\)"):
        tls.identity_from_files(ca, crt, key, "node7")
    with pytest.raises(tls.IdentityError, match="is not signed by the CA in"):
        tls.identity_from_files(ca, other / "node1.crt", other / "node1.key", "node1")
    with pytest.raises(tls.IdentityError, match="is not the key of certificate"):
        tls.identity_from_files(ca, crt, other / "node1.key", "node1")
    key.chmod(0o640)
    with pytest.raises(tls.IdentityError, match=r"accessible by group/others \(mode 0o640\)"):
        tls.identity_from_files(ca, crt, key, "node1")
    with pytest.raises(tls.IdentityError, match="cannot read CA certificate"):
        tls.identity_from_files(d / "missing.crt", crt, key, "node1")


def test_cli_cluster_init_and_add_node(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    r = dvmmctl("cluster", "init", "--dir", str(d), "--node", "n1")
    assert r.returncode == 0, r.stderr
    assert f"wrote ca.key, ca.crt, n1.key, n1.crt in {d}" in r.stdout
    assert 'cert_file = "/etc/dvmmd/tls/n1.crt"' in r.stdout
    r = dvmmctl("cluster", "add-node", "n2", "--dir", str(d))
    assert r.returncode == 0 and "wrote n2.key, n2.crt" in r.stdout, r.stderr
    r = dvmmctl("cluster", "add-node", "n2", "--dir", str(d))
    assert r.returncode == 1 and "n2.key already exists" in r.stderr
    r = dvmmctl("cluster", "add-node", "bad/name", "--dir", str(d))
    assert r.returncode == 1 and "invalid node name 'bad/name'" in r.stderr


# --------------------------------------------------------------------------- a live network


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _cfg(tmp_path: Path, name: str) -> Config:
    port = _free_port()
    return parse_config(
        f'[node]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\nstate_dir = "{tmp_path}"\n'
        f'vcpus = 1\nmemory = "1G"\n[cluster]\nsecret_file = "{tmp_path}/secret"\n'
        'heartbeat_interval = 0.2\nfailure_timeout = 2.0\n[worker]\ndata_ports = "1-2"\n'
    )


class Net:
    """An acceptor `PeerNetwork` named ``acc`` and what its RPC handler was asked."""

    def __init__(self, tmp_path: Path) -> None:
        self.cfg = _cfg(tmp_path, "acc")
        self.calls: list[tuple[str, str]] = []
        membership = Membership(
            "acc",
            self.cfg.advertise_str,
            1,
            suspect_timeout=1.0,
            failure_timeout=2.0,
            local_info=lambda: {
                "vcpus": 1,
                "memory": 1,
                "used_vcpus": 0,
                "used_memory": 0,
                "vms": 0,
            },
        )

        async def rpc(method: str, params: dict[str, Any], peer: Peer) -> Any:
            self.calls.append((peer.node, method))
            return {"ok": method}

        self.net = PeerNetwork(
            self.cfg, tls.identity_from_secret(SECRET, "acc"), membership, rpc, None
        )
        self.port = self.cfg.listen[1]


def run_net(tmp_path: Path, body: Callable[[Net], Awaitable[None]]) -> Net:
    n = Net(tmp_path)

    async def main() -> None:
        await n.net.start()
        try:
            await body(n)
        finally:
            await n.net.close(leave=False)

    asyncio.run(main())
    return n


async def _dial(port: int, name: str, secret: bytes = SECRET) -> Connection:
    ident = tls.identity_from_secret(secret, name)
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ident.client)
    return Connection(r, w)


async def _closed_soon(r: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(r.read(1), within) == b""
    except (TimeoutError, ConnectionError):
        return False


def test_authenticated_peer_rpc_works(tmp_path: Path) -> None:
    async def body(n: Net) -> None:
        conn = await _dial(n.port, "friend")
        peer = await dial_handshake(conn, "friend", "127.0.0.1:9")
        assert peer.node == "acc"
        await conn.send({"type": "rpc", "id": 7, "method": "ping", "params": {}})
        reply = await conn.recv(5)
        assert reply == {"type": "rpc_reply", "id": 7, "ok": True, "result": {"ok": "ping"},
                         "error": None}  # fmt: skip
        await conn.aclose()

    n = run_net(tmp_path, body)
    assert n.calls == [("friend", "ping")]


def test_reflected_connection_is_never_served(tmp_path: Path) -> None:
    """No reflection: a connection whose other end is this node itself (a relay that
    turns a node's own dial back at it, or a stranger holding a certificate for this
    node's name) is never served as a peer: its RPCs are not run and it is closed,
    while the same RPC from another node is."""

    async def body(n: Net) -> None:
        conn = await _dial(n.port, "acc")  # a valid certificate for the acceptor's name
        peer = await dial_handshake(conn, "acc", "127.0.0.1:9")
        assert peer.node == "acc"
        try:
            await conn.send({"type": "rpc", "id": 1, "method": "share_forget", "params": {}})
        except ConnectionError:
            pass  # already closed by the acceptor
        else:
            assert await _closed_soon(conn.reader, 5), "the node served a connection from itself"
        await conn.aclose()
        other = await _dial(n.port, "friend")
        await dial_handshake(other, "friend", "127.0.0.1:9")
        await other.send({"type": "rpc", "id": 2, "method": "ping", "params": {}})
        assert (await other.recv(5))["ok"] is True
        await other.aclose()

    n = run_net(tmp_path, body)
    assert n.calls == [("friend", "ping")]


async def _relay(
    listen: socket.socket, target_port: int, inject_after: int, payload: bytes
) -> None:
    """A man in the middle: forwards bytes both ways and, once ``inject_after`` bytes
    went upstream, injects ``payload`` into the upstream (dialer -> acceptor) stream."""
    loop = asyncio.get_running_loop()
    client, _ = await loop.sock_accept(listen)
    cr, cw = await asyncio.open_connection(sock=client)
    ur, uw = await asyncio.open_connection("127.0.0.1", target_port)

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, inject: bool) -> None:
        sent = 0
        injected = False
        while data := await r.read(65536):
            w.write(data)
            sent += len(data)
            if inject and not injected and sent >= inject_after:
                w.write(payload)
                injected = True
            await w.drain()
        w.close()

    try:
        await asyncio.gather(pipe(cr, uw, True), pipe(ur, cw, False), return_exceptions=True)
    finally:
        cw.close()
        uw.close()


def test_relay_cannot_inject_into_an_authenticated_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before TLS, a relay of the dialer's connection could push frames after welcome
    (issue 11). Now every byte after the handshake is TLS-authenticated: an injected
    plaintext RPC ends the connection and is never run."""
    evil = encode({"type": "rpc", "id": 99, "method": "share_forget", "params": {}})

    async def body(n: Net) -> None:
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        relay = asyncio.ensure_future(_relay(lsock, n.port, 1, b""))
        conn = await _dial(lsock.getsockname()[1], "friend")
        await dial_handshake(conn, "friend", "127.0.0.1:9")  # through the relay: fine
        relay.cancel()
        lsock.close()
        await conn.aclose()

        # Now a relay that injects its frame once the handshake is over.
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        relay = asyncio.ensure_future(_relay(lsock, n.port, 2000, evil))
        conn = await _dial(lsock.getsockname()[1], "friend")
        await dial_handshake(conn, "friend", "127.0.0.1:9")
        await conn.send({"type": "rpc", "id": 1, "method": "pad", "params": {"x": "y" * 2500}})
        assert await _closed_soon(conn.reader, 5), "the acceptor kept a tampered connection"
        await conn.aclose()
        relay.cancel()
        lsock.close()

    with caplog.at_level(logging.WARNING, logger="dvmmd.peers"):
        n = run_net(tmp_path, body)
    assert ("friend", "share_forget") not in n.calls
    assert all(m != "share_forget" for _, m in n.calls)
    assert any("TLS error" in r.getMessage() for r in caplog.records), caplog.text
    assert n.net.counters.protocol_errors >= 1


def test_name_not_matching_certificate_is_refused_by_the_network(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(n: Net) -> None:
        conn = await _dial(n.port, "mallory")
        with pytest.raises(AuthError, match="does not match the certificate"):
            await dial_handshake(conn, "alice", "127.0.0.1:9")
        await conn.aclose()

    with caplog.at_level(logging.WARNING, logger="dvmmd.peers"):
        n = run_net(tmp_path, body)
    assert n.net.counters.auth_failures == 1
    assert "its certificate is for 'mallory' but it claims to be 'alice'" in caplog.text


def test_oversized_frame_before_authentication_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: 4 MiB frames from anyone. Now: 4 KiB until hello is accepted."""

    async def body(n: Net) -> None:
        conn = await _dial(n.port, "friend")
        big = json.dumps({"type": "hello", "proto": PROTO_VERSION, "node": "friend",
                          "addr": "x" * 60_000, "role": "node"}).encode()  # fmt: skip
        conn.writer.write(MAGIC + struct.pack("!I", len(big)) + big)
        assert await _closed_soon(conn.reader, 5)
        await conn.aclose()

    with caplog.at_level(logging.WARNING, logger="dvmmd.peers"):
        run_net(tmp_path, body)
    assert "exceeds the 4096 byte limit before authentication" in caplog.text


def test_nested_json_is_a_protocol_error_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(n: Net) -> None:
        conn = await _dial(n.port, "friend")
        await dial_handshake(conn, "friend", "127.0.0.1:9")
        nested = b'{"type":"rpc","id":1,"method":"x","params":' + b"[" * 200_000
        conn.writer.write(MAGIC + struct.pack("!I", len(nested)) + nested)
        assert await _closed_soon(conn.reader, 5)
        await conn.aclose()
        conn = await _dial(n.port, "friend")  # and the daemon still serves
        await dial_handshake(conn, "friend", "127.0.0.1:9")
        await conn.aclose()

    with caplog.at_level(logging.DEBUG):
        run_net(tmp_path, body)
    assert "nested deeper than 32 levels" in caplog.text
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "RecursionError" not in caplog.text


def _connect_from(src: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    s.settimeout(2.0)
    return s


def _shed(s: socket.socket) -> bool:
    """Was this connection closed by the server at once (nothing sent)?"""
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_pending_unauthenticated_connections_are_limited(tmp_path: Path) -> None:
    """Silent connections (no TLS ClientHello) hold a slot until the handshake times
    out; past MAX_PENDING_PER_HOST from one address, or MAX_PENDING in all, new ones
    are closed unheard. A node from another address still gets in."""

    async def body(n: Net) -> None:
        loop = asyncio.get_running_loop()
        held: list[socket.socket] = []
        try:
            for _ in range(MAX_PENDING_PER_HOST):
                held.append(await loop.run_in_executor(None, _connect_from, "127.0.0.9", n.port))
            await asyncio.sleep(0.2)
            extra = await loop.run_in_executor(None, _connect_from, "127.0.0.9", n.port)
            assert await loop.run_in_executor(None, _shed, extra), "9th stranger not shed"
            extra.close()
            # Fill the global budget from other addresses, then one more is shed.
            hosts = [f"127.0.1.{i}" for i in range(1, MAX_PENDING // MAX_PENDING_PER_HOST)]
            for h in hosts:
                for _ in range(MAX_PENDING_PER_HOST):
                    held.append(await loop.run_in_executor(None, _connect_from, h, n.port))
            await asyncio.sleep(0.2)
            assert sum(n.net.pending.values()) == MAX_PENDING
            extra = await loop.run_in_executor(None, _connect_from, "127.0.2.1", n.port)
            assert await loop.run_in_executor(None, _shed, extra), "stranger over the cap"
            extra.close()
            assert n.net.counters.connections_shed == 2
            # The held ones were not shed: they are still open, waiting for TLS.
            held[0].setblocking(False)
            with pytest.raises(BlockingIOError):
                held[0].recv(1)
        finally:
            for s in held:
                s.close()
        await asyncio.sleep(0.3)
        assert n.net.pending == {}
        conn = await _dial(n.port, "friend")  # slots are free again
        await dial_handshake(conn, "friend", "127.0.0.1:9")
        await conn.aclose()

    run_net(tmp_path, body)


def test_strangers_are_logged_escaped_truncated_and_rate_limited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: every refused stranger was logged at ERROR with its chosen name."""
    long_name = "\x1b[2J" + "A" * 3000

    async def body(n: Net) -> None:
        conn = await _dial(n.port, "friend")
        hello = json.dumps({"type": "hello", "proto": PROTO_VERSION, "node": long_name,
                            "addr": "1.2.3.4:5", "role": "node"}).encode()  # fmt: skip
        conn.writer.write(MAGIC + struct.pack("!I", len(hello)) + hello)
        assert await _closed_soon(conn.reader, 5)
        await conn.aclose()
        for _ in range(40):  # a flood of non-TLS garbage
            r, w = await asyncio.open_connection("127.0.0.1", n.port)
            w.write(b"GET / HTTP/1.1\r\n\r\n")
            await _closed_soon(r, 5)
            w.close()

    with caplog.at_level(logging.DEBUG, logger="dvmmd.peers"):
        run_net(tmp_path, body)
    records = [r for r in caplog.records if r.name == "dvmmd.peers"]
    assert not [r for r in records if r.levelno >= logging.ERROR]
    refused = [r.getMessage() for r in records if "refused connection" in r.getMessage()]
    assert len(refused) == 10, refused  # the burst; the other 31 are counted, not logged
    first = refused[0]
    assert "invalid node name '\\x1b[2JAAA" in first and "\x1b" not in first
    assert len(first) < 300, first
    assert sum("TLS handshake failed: the client does not speak TLS" in m for m in refused) == 9
