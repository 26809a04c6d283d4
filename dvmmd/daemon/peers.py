"""The daemon-to-daemon network: listener, dialers, heartbeats and RPC.

Each daemon listens on `node.listen` and dials every member it knows (static peers,
the seed, members gossiped in heartbeats, nodes that dialled it). Every connection is
mutual TLS 1.3 (dvmmd.security.tls) and the name a peer claims must be its certificate's
(dvmmd.security.auth) before any other message. On its *outgoing* connection a daemon sends
heartbeats and RPC requests; the acceptor answers RPCs on the same connection. A peer
that fails authentication is refused and logged; a peer that sends anything malformed
(peer_protocol.py) is disconnected with the reason logged. Neither affects any other
connection.

Strangers (connections not yet authenticated) are kept cheap: at most
`MAX_PENDING` of them at once and `MAX_PENDING_PER_HOST` per source address (more
are closed at once), `HANDSHAKE_TIMEOUT` each for TLS and again for ``hello``, frames
of at most PREAUTH_MAX_FRAME bytes, and what they make us log is escaped, truncated
and rate-limited (dvmmd.security.logsafe), at WARNING: a stranger cannot fill the log with ERRORs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dvmmd.config import Config, parse_hostport
from dvmmd.daemon.membership import Membership
from dvmmd.daemon.peer_protocol import Connection, Message, ProtocolError
from dvmmd.security.auth import HANDSHAKE_TIMEOUT, AuthError, Peer, accept_handshake, dial_handshake
from dvmmd.security.logsafe import RateLimitedLog, shown
from dvmmd.security.tls import Identity

log = logging.getLogger("dvmmd.peers")

#: Unauthenticated connections (TLS or ``hello`` not done yet) served at once ...
MAX_PENDING = 32
#: ... and from one source address.
MAX_PENDING_PER_HOST = 8

RpcHandler = Callable[[str, dict[str, Any], Peer], Awaitable[Any]]


def _tls_failure(e: BaseException) -> str:
    """Why a TLS handshake failed, in words (OpenSSL's reason code kept)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return (
            f"certificate verify failed: {e.verify_message} (the other end's certificate is "
            "not from this cluster's CA: another CA or cluster secret?)"
        )
    if isinstance(e, ssl.SSLError):
        reason = str(e.reason or e)
        if reason == "WRONG_VERSION_NUMBER" or reason == "HTTP_REQUEST":
            return f"the client does not speak TLS ({reason})"
        if "CERTIFICATE" in reason.upper():
            return (
                f"{reason}: its certificate is not from this cluster's CA "
                "(another CA or cluster secret?)"
            )
        return shown(reason, 120)
    if isinstance(e, ConnectionError):
        return (
            "the client hung up during the handshake (does it trust another cluster CA or secret?)"
        )
    if isinstance(e, TimeoutError) or "taking longer" in str(e):
        return f"no handshake within {HANDSHAKE_TIMEOUT:.0f} s"
    return shown(str(e) or type(e).__name__, 120)


class RpcError(Exception):
    """An error an RPC handler reports to its caller (a refusal, not a bug: not logged
    with a traceback)."""


class PeerError(RpcError):
    """An RPC could not be delivered or the remote side reported an error."""


@dataclass
class Counters:
    auth_failures: int = 0
    protocol_errors: int = 0
    connections_accepted: int = 0
    rpcs_served: int = 0
    #: connections closed unheard because too many strangers were pending
    connections_shed: int = 0


@dataclass
class _Dialer:
    addr: str
    task: asyncio.Task[None] | None = None
    node: str | None = None  # learned on handshake
    conn: Connection | None = None
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    last_error: str = ""
    stopped: bool = False


class PeerNetwork:
    def __init__(
        self,
        cfg: Config,
        identity: Identity,
        membership: Membership,
        rpc_handler: RpcHandler,
        client_handler: RpcHandler | None,
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.membership = membership
        self.rpc_handler = rpc_handler
        self.client_handler = client_handler
        self.counters = Counters()
        self.dialers: dict[str, _Dialer] = {}
        self.server: asyncio.Server | None = None
        self.inbound: set[Connection] = set()
        self.handlers: set[asyncio.Task[Any]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self.self_addrs = {cfg.advertise_str}
        self.pending: dict[str, int] = {}  # source host -> unauthenticated connections
        self.strangers = RateLimitedLog(log)

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        host, port = self.cfg.listen
        self.server = await asyncio.start_server(self._on_accept, host, port, reuse_address=True)
        for hp in self.cfg.peers + ((self.cfg.seed,) if self.cfg.seed else ()):
            self.ensure_dialer(f"{hp[0]}:{hp[1]}")

    async def close(self, leave: bool = True) -> None:
        if leave:
            msg = self.membership.leave_message()
            for d in self.dialers.values():
                if d.conn is not None:
                    try:
                        await asyncio.wait_for(d.conn.send(msg), 1.0)
                    except (TimeoutError, OSError, ConnectionError):
                        pass
        if self.server is not None:
            self.server.close()
        for d in self.dialers.values():
            d.stopped = True
            if d.task is not None:
                d.task.cancel()
            if d.conn is not None:
                d.conn.close()
        for c in list(self.inbound):
            c.close()
        for t in list(self.tasks):
            t.cancel()
        # Let the connection handlers see EOF and finish, rather than being cancelled.
        handlers = [
            t
            for t in (*self.handlers, *(d.task for d in self.dialers.values()))
            if t is not None and not t.done()
        ]
        if handlers:
            await asyncio.wait(handlers, timeout=2.0)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- dialling ----------------------------------------------------------------

    def ensure_dialer(self, addr: str) -> None:
        if addr in self.self_addrs or addr in self.dialers:
            return
        try:
            parse_hostport(addr)
        except ValueError:
            log.warning("ignoring malformed peer address %r", addr)
            return
        d = _Dialer(addr)
        self.dialers[addr] = d
        d.task = asyncio.ensure_future(self._dial_loop(d))

    def _by_node(self, node: str) -> _Dialer | None:
        for d in self.dialers.values():
            if d.node == node and d.conn is not None:
                return d
        return None

    async def _dial_loop(self, d: _Dialer) -> None:
        backoff = self.cfg.heartbeat_interval
        host, port = parse_hostport(d.addr)
        while not d.stopped:
            conn: Connection | None = None
            try:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(
                            host,
                            port,
                            ssl=self.identity.client,
                            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                        ),
                        max(2.0, self.cfg.heartbeat_interval) + HANDSHAKE_TIMEOUT,
                    )
                except ssl.SSLError as e:  # the acceptor's certificate is not from our CA
                    raise AuthError(f"TLS handshake failed: {_tls_failure(e)}") from None
                conn = Connection(reader, writer)
                peer = await dial_handshake(conn, self.cfg.node_name, self.cfg.advertise_str)
                if peer.node == self.cfg.node_name:
                    log.info("peer address %s is this node; not dialling it", d.addr)
                    self.self_addrs.add(d.addr)
                    d.stopped = True
                    await conn.aclose()
                    break
                other = self._by_node(peer.node)
                if other is not None and other is not d:
                    log.debug("%s is %s, already connected via %s", d.addr, peer.node, other.addr)
                    await conn.aclose()
                    await asyncio.sleep(10 * self.cfg.heartbeat_interval)
                    continue
                if d.node is None:
                    log.info("connected to %s at %s", peer.node, d.addr)
                d.node, d.conn, d.last_error = peer.node, conn, ""
                backoff = self.cfg.heartbeat_interval
                await self._run_outgoing(d, conn)
            except AuthError as e:
                self.counters.auth_failures += 1
                self._note_error(d, f"authentication with {d.addr} failed: {e}", logging.ERROR)
            except ProtocolError as e:
                self.counters.protocol_errors += 1
                self._note_error(d, f"protocol error from {d.addr}: {e}", logging.WARNING)
            except ssl.SSLError as e:  # a TLS failure after the handshake (a forged record)
                self.counters.protocol_errors += 1
                self._note_error(d, f"TLS error with {d.addr}: {e.reason or e}", logging.WARNING)
            except (TimeoutError, OSError, ConnectionError) as e:
                self._note_error(
                    d, f"cannot reach {d.addr}: {e or type(e).__name__}", logging.DEBUG
                )
            finally:
                d.conn = None
                for fut in d.pending.values():
                    if not fut.done():
                        fut.set_exception(PeerError(f"connection to {d.node or d.addr} lost"))
                d.pending.clear()
                if conn is not None:
                    conn.close()
            if not d.stopped:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max(5.0, self.cfg.heartbeat_interval))

    def _note_error(self, d: _Dialer, msg: str, level: int) -> None:
        if msg != d.last_error:  # log each distinct failure once, not every retry
            log.log(max(level, logging.INFO) if d.node else level, "%s", msg)
        d.last_error = msg

    async def _run_outgoing(self, d: _Dialer, conn: Connection) -> None:
        async def heartbeats() -> None:
            while True:
                await conn.send(self.membership.heartbeat())
                await asyncio.sleep(self.cfg.heartbeat_interval)

        hb = asyncio.ensure_future(heartbeats())
        recv: asyncio.Future[Message] | None = None
        try:
            while True:
                recv = asyncio.ensure_future(conn.recv())
                await asyncio.wait({recv, hb}, return_when=asyncio.FIRST_COMPLETED)
                if hb.done():
                    hb.result()  # raises the send error
                    return
                msg = recv.result()
                if msg["type"] != "rpc_reply":
                    raise ProtocolError(f"unexpected {msg['type']} on an outgoing connection")
                fut = d.pending.pop(msg["id"], None)
                if fut is None or fut.done():
                    continue
                if msg["ok"]:
                    fut.set_result(msg["result"])
                else:
                    fut.set_exception(PeerError(msg["error"] or "remote error"))
        finally:
            for t in (hb, recv):
                if t is None:
                    continue
                t.cancel()
                if t.done() and not t.cancelled():
                    t.exception()  # retrieved: the error that matters was raised above

    async def call(
        self, node: str, method: str, params: dict[str, Any], timeout: float = 10.0
    ) -> Any:
        """Call `method` on `node`; raises PeerError (unreachable, timeout, remote error)."""
        d = self._by_node(node)
        if d is None or d.conn is None:
            raise PeerError(f"node {node} is not reachable")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        d.pending[rid] = fut
        try:
            await d.conn.send({"type": "rpc", "id": rid, "method": method, "params": params})
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise PeerError(f"node {node} did not answer {method} within {timeout:.0f}s") from None
        except (OSError, ConnectionError) as e:
            raise PeerError(f"node {node}: {e}") from None
        finally:
            d.pending.pop(rid, None)

    def pending_addrs(self) -> list[dict[str, Any]]:
        """Dialled addresses whose node we have never reached (for `dvmmctl nodes`)."""
        known = set(self.membership.members)
        return [
            {"addr": d.addr, "error": d.last_error}
            for d in self.dialers.values()
            if not d.stopped and (d.node is None or d.node not in known)
        ]

    # --- accepting -----------------------------------------------------------------

    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        host = str(peername[0]) if isinstance(peername, tuple) else str(peername)
        where = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else host
        self.counters.connections_accepted += 1
        total = sum(self.pending.values())
        if total >= MAX_PENDING or self.pending.get(host, 0) >= MAX_PENDING_PER_HOST:
            self.counters.connections_shed += 1
            self.strangers.log(
                logging.WARNING,
                "refused connection from %s: too many unauthenticated connections "
                "(%d from this address, %d in all)",
                where,
                self.pending.get(host, 0),
                total,
            )
            writer.transport.abort()
            return
        me = asyncio.current_task()
        if me is not None:
            self.handlers.add(me)
        conn: Connection | None = None
        try:
            self.pending[host] = self.pending.get(host, 0) + 1
            try:
                conn, peer = await self._authenticate(reader, writer, where)
            finally:
                self._unpend(host)
            if conn is None or peer is None:
                return
            if peer.role == "client":
                if self.client_handler is None:
                    log.warning(
                        "refused remote API client %s (%s): remote API is disabled "
                        "(api.remote = false)",
                        peer.node,
                        where,
                    )
                    return
                log.info("remote API client %s (%s) authenticated", peer.node, where)
            elif peer.node == self.cfg.node_name:
                return  # we dialled ourselves
            else:
                self.ensure_dialer(peer.addr)
            await self._serve(conn, peer)
        except ssl.SSLError as e:  # a record that fails TLS's MAC: tampering on the path
            self.counters.protocol_errors += 1
            log.warning("disconnecting %s: TLS error: %s", where, e.reason or e)
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if me is not None:
                self.handlers.discard(me)
            if conn is not None:
                self.inbound.discard(conn)
                await conn.aclose()
            else:
                writer.transport.abort()

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str
    ) -> tuple[Connection | None, Peer | None]:
        """TLS, then ``hello``; (None, None) after logging why the stranger was refused."""
        # No await may come before start_tls: it stops the plain transport's reading
        # before the client's first bytes could be read as plain data (asyncio runs
        # this task's first step before any read callback of the new connection).
        try:
            await writer.start_tls(self.identity.server, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, ConnectionError, TimeoutError) as e:  # ssl.SSLError is an OSError
            self.counters.auth_failures += 1
            self.strangers.log(
                logging.WARNING,
                "refused connection from %s: TLS handshake failed: %s",
                where,
                _tls_failure(e),
            )
            return None, None
        conn = Connection(reader, writer)
        self.inbound.add(conn)
        try:
            return conn, await accept_handshake(conn, self.cfg.node_name)
        except AuthError as e:
            self.counters.auth_failures += 1
            self.strangers.log(logging.WARNING, "refused connection from %s: %s", where, e)
        except ProtocolError as e:
            self.counters.protocol_errors += 1
            self.strangers.log(
                logging.WARNING,
                "refused connection from %s: protocol error before authentication: %s",
                where,
                e,
            )
        except TimeoutError:
            self.strangers.log(
                logging.WARNING, "refused connection from %s: handshake timed out", where
            )
        except ssl.SSLError as e:
            self.counters.auth_failures += 1
            self.strangers.log(
                logging.WARNING,
                "refused connection from %s: TLS error before authentication: %s",
                where,
                shown(e.reason or str(e), 120),
            )
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            pass
        self.inbound.discard(conn)
        await conn.aclose()
        return None, None

    def _unpend(self, host: str) -> None:
        n = self.pending.get(host, 0) - 1
        if n > 0:
            self.pending[host] = n
        else:
            self.pending.pop(host, None)

    async def _serve(self, conn: Connection, peer: Peer) -> None:
        try:
            while True:
                msg = await conn.recv()
                t = msg["type"]
                if t == "rpc":
                    self._spawn(self._answer(conn, peer, msg))
                elif peer.role != "node":
                    raise ProtocolError(f"a client may only send rpc, not {t}")
                elif t == "heartbeat":
                    if msg["node"] != peer.node:
                        raise ProtocolError(
                            f"heartbeat for {msg['node']!r} on {peer.node}'s connection"
                        )
                    for addr in self.membership.on_heartbeat(msg, peer.addr):
                        self.ensure_dialer(addr)
                elif t == "leave":
                    if msg["node"] != peer.node:
                        raise ProtocolError("leave for another node")
                    self.membership.on_leave(msg)
                else:
                    raise ProtocolError(f"unexpected {t} message")
        except ProtocolError as e:
            self.counters.protocol_errors += 1
            log.warning("disconnecting %s (%s): protocol error: %s", peer.node, conn.peer, e)

    async def _answer(self, conn: Connection, peer: Peer, msg: Message) -> None:
        handler = self.rpc_handler if peer.role == "node" else self.client_handler
        assert handler is not None
        self.counters.rpcs_served += 1
        reply: Message
        try:
            result = await handler(msg["method"], msg["params"], peer)
            reply = {
                "type": "rpc_reply",
                "id": msg["id"],
                "ok": True,
                "result": result,
                "error": None,
            }
        except Exception as e:  # every failure becomes an error reply, never a crash
            if not isinstance(e, (RpcError, ValueError, LookupError)):
                log.exception("rpc %s from %s failed", msg["method"], peer.node)
            reply = {
                "type": "rpc_reply",
                "id": msg["id"],
                "ok": False,
                "result": None,
                "error": str(e) or type(e).__name__,
            }
        try:
            await conn.send(reply)
        except (OSError, ConnectionError, ProtocolError) as e:
            log.debug("cannot send reply to %s: %s", peer.node, e)
