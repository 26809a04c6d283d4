"""Mutual HMAC-SHA256 challenge-response with the cluster secret.

Every daemon-to-daemon connection (and every remote API client) starts with::

    dialer   -> acceptor : hello     {proto, node, addr, role, nonce=Nc}
    acceptor -> dialer   : challenge {node, nonce=Ns, mac=HMAC(K, "dvmm-acceptor" Nc Ns A D)}
    dialer   -> acceptor : auth      {mac=HMAC(K, "dvmm-dialer" Ns Nc D A)}
    acceptor -> dialer   : welcome   (or refused {reason})

where K is the cluster secret, Nc/Ns fresh 128-bit random nonces and A/D the two node
names. Each side proves knowledge of K over the other side's fresh nonce, so a
recorded exchange cannot be replayed, and the two directions use different labels so a
peer cannot reflect one side's proof back. The acceptor proves itself first, but only
over the acceptor label: that gives a keyless dialer nothing it could use as its own
proof. Comparisons are constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from .peerproto import PROTO_VERSION, Connection, ProtocolError

MIN_SECRET_BYTES = 16
HANDSHAKE_TIMEOUT = 5.0


class AuthError(Exception):
    """Authentication failed (wrong key, bad proof, refused); the message says why."""


class SecretError(Exception):
    """The secret file is missing, unreadable, too short or too widely readable."""


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read the cluster secret: the file's contents with surrounding whitespace removed.

    Generate one with ``head -c 32 /dev/urandom | xxd -p -c 64 > /etc/dvmmd/secret``.
    Refuses secrets shorter than 16 bytes and files readable by group or others.
    """
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes().strip()
    except OSError as e:
        raise SecretError(f"cannot read cluster secret {p}: {e.strerror or e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"cluster secret {p} is accessible by group/others "
            f"(mode {oct(st.st_mode & 0o777)}); chmod 600 it"
        )
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(
            f"cluster secret {p} is too short ({len(data)} bytes; need at least {MIN_SECRET_BYTES})"
        )
    return data


def new_nonce() -> str:
    return secrets.token_hex(16)


def _mac(key: bytes, label: str, *parts: str) -> str:
    msg = "\x00".join((label, *parts)).encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def acceptor_proof(
    key: bytes, dialer_nonce: str, acceptor_nonce: str, acceptor: str, dialer: str
) -> str:
    return _mac(key, "dvmm-acceptor", dialer_nonce, acceptor_nonce, acceptor, dialer)


def dialer_proof(
    key: bytes, acceptor_nonce: str, dialer_nonce: str, dialer: str, acceptor: str
) -> str:
    return _mac(key, "dvmm-dialer", acceptor_nonce, dialer_nonce, dialer, acceptor)


def proofs_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of an authenticated connection."""

    node: str
    addr: str
    role: str  # "node" or "client"


async def dial_handshake(
    conn: Connection,
    key: bytes,
    node: str,
    addr: str,
    role: str = "node",
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Peer:
    """Authenticate an outgoing connection; returns the acceptor's identity."""
    nonce = new_nonce()
    await conn.send(
        {
            "type": "hello",
            "proto": PROTO_VERSION,
            "node": node,
            "addr": addr,
            "role": role,
            "nonce": nonce,
        }
    )
    msg = await conn.recv(timeout)
    if msg["type"] == "refused":
        raise AuthError(f"refused by {conn.peer}: {msg['reason']}")
    if msg["type"] != "challenge":
        raise ProtocolError(f"expected challenge, got {msg['type']}")
    expected = acceptor_proof(key, nonce, msg["nonce"], msg["node"], node)
    if not proofs_equal(expected, msg["mac"]):
        raise AuthError(
            f"{conn.peer} (claims to be {msg['node']!r}) failed to prove the "
            "cluster secret (wrong key?)"
        )
    await conn.send(
        {"type": "auth", "mac": dialer_proof(key, msg["nonce"], nonce, node, msg["node"])}
    )
    reply = await conn.recv(timeout)
    if reply["type"] == "refused":
        raise AuthError(f"refused by {conn.peer}: {reply['reason']}")
    if reply["type"] != "welcome":
        raise ProtocolError(f"expected welcome, got {reply['type']}")
    return Peer(node=msg["node"], addr=conn.peer, role="node")


async def accept_handshake(
    conn: Connection, key: bytes, node: str, timeout: float = HANDSHAKE_TIMEOUT
) -> Peer:
    """Authenticate an incoming connection; returns the dialer's identity.

    On failure sends ``refused`` (best effort) and raises AuthError / ProtocolError.
    """
    hello = await conn.recv(timeout)
    if hello["type"] != "hello":
        raise ProtocolError(f"expected hello, got {hello['type']}")
    if hello["proto"] != PROTO_VERSION:
        await _refuse(conn, f"unsupported protocol version {hello['proto']}")
        raise AuthError(f"{conn.peer} speaks protocol version {hello['proto']}")
    nonce = new_nonce()
    await conn.send(
        {
            "type": "challenge",
            "node": node,
            "nonce": nonce,
            "mac": acceptor_proof(key, hello["nonce"], nonce, node, hello["node"]),
        }
    )
    msg = await conn.recv(timeout)
    if msg["type"] != "auth":
        raise ProtocolError(f"expected auth, got {msg['type']}")
    expected = dialer_proof(key, nonce, hello["nonce"], hello["node"], node)
    if not proofs_equal(expected, msg["mac"]):
        await _refuse(conn, "authentication failed")
        raise AuthError(
            f"{conn.peer} (claims to be {hello['node']!r}) failed to prove the "
            "cluster secret (wrong key?)"
        )
    await conn.send({"type": "welcome"})
    return Peer(node=hello["node"], addr=hello["addr"], role=hello["role"])


async def _refuse(conn: Connection, reason: str) -> None:
    try:
        await conn.send({"type": "refused", "reason": reason})
    except (OSError, ConnectionError):
        pass
