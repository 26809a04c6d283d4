"""Who is on the other end of a peer connection: the TLS certificate, bound to a name.

Every daemon-to-daemon connection (and every remote API client) is mutual TLS 1.3
with certificates from the cluster CA (tls.py, pki.py). TLS proves that the peer holds
the key of a certificate the CA signed, encrypts and authenticates every byte after
the handshake (so a relay or a man in the middle can neither read nor inject), and
binds all of it to this one connection. What is left is to bind the name a peer
*claims* to the certificate it *showed*::

    dialer   -> acceptor : hello   {proto, node, addr, role}
    acceptor -> dialer   : welcome {node}          (or refused {reason})

The acceptor refuses a ``hello`` whose ``node`` is not a name in the dialer's
certificate; the dialer refuses a ``welcome`` whose ``node`` is not a name in the
acceptor's certificate. ``addr`` and ``role`` travel inside TLS, so they are as
authentic as the rest. (The HMAC challenge-response of protocol version 1 is gone:
over mutual TLS it proved nothing more.)

The cluster secret (secret mode) is read here; tls.py turns it into a CA.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from dvmmd.daemon.peer_protocol import PROTO_VERSION, Connection, ProtocolError
from dvmmd.security.logsafe import shown

HANDSHAKE_TIMEOUT = 5.0


class AuthError(Exception):
    """Authentication failed (no or wrong certificate, name mismatch, refused); the
    message says why."""


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of an authenticated connection."""

    node: str
    addr: str
    role: str  # "node" or "client"


def _names(conn: Connection) -> tuple[str, ...]:
    names = conn.peer_names()
    if not names:
        raise AuthError(f"{conn.peer}: the connection has no verified TLS certificate")
    return names


def _mismatch(names: tuple[str, ...], claimed: str) -> str:
    return (
        f"its certificate is for {', '.join(shown(n) for n in names)} "
        f"but it claims to be {shown(claimed)}"
    )


async def dial_handshake(
    conn: Connection,
    node: str,
    addr: str,
    role: str = "node",
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Peer:
    """Say who we are on an outgoing TLS connection; returns the acceptor's identity.

    Raises AuthError (refused, name mismatch, TLS alert from the acceptor: with TLS
    1.3 the acceptor checks our certificate after our side of the handshake is done,
    so its verdict arrives on the first read), ProtocolError, ConnectionError.
    """
    names = _names(conn)
    try:
        await conn.send(
            {"type": "hello", "proto": PROTO_VERSION, "node": node, "addr": addr, "role": role}
        )
        msg = await conn.recv(timeout)
    except ssl.SSLError as e:
        raise AuthError(f"{conn.peer} refused our certificate: {e.reason or e}") from None
    if msg["type"] == "refused":
        raise AuthError(f"refused by {conn.peer}: {shown(msg['reason'], 200)}")
    if msg["type"] != "welcome":
        raise ProtocolError(f"expected welcome, got {msg['type']}")
    if msg["node"] not in names:
        raise AuthError(f"{conn.peer}: {_mismatch(names, msg['node'])}")
    conn.authenticated()
    return Peer(node=msg["node"], addr=conn.peer, role="node")


async def accept_handshake(conn: Connection, node: str, timeout: float = HANDSHAKE_TIMEOUT) -> Peer:
    """Check who is on an incoming TLS connection; returns the dialer's identity.

    On failure sends ``refused`` (best effort) and raises AuthError / ProtocolError.
    """
    names = _names(conn)
    hello = await conn.recv(timeout)
    if hello["type"] != "hello":
        raise ProtocolError(f"expected hello, got {hello['type']}")
    if hello["proto"] != PROTO_VERSION:
        await _refuse(conn, f"unsupported protocol version {hello['proto']}")
        raise AuthError(f"{conn.peer} speaks protocol version {hello['proto']}")
    if hello["node"] not in names:
        await _refuse(conn, "the node name does not match the certificate")
        raise AuthError(f"{conn.peer}: {_mismatch(names, hello['node'])}")
    await conn.send({"type": "welcome", "node": node})
    conn.authenticated()
    return Peer(node=hello["node"], addr=hello["addr"], role=hello["role"])


async def _refuse(conn: Connection, reason: str) -> None:
    try:
        await conn.send({"type": "refused", "reason": reason})
    except (OSError, ConnectionError):
        pass
