"""The daemon's API: JSON lines over a unix socket (and, if enabled, remote clients).

Local access is controlled by the socket's file permissions (``api.socket_mode``,
default 0660, and ``api.socket_group``) inside a directory only root/the group can
enter (systemd's RuntimeDirectory). Remote clients are served only when
``api.remote = true``, on the peer port, after the HMAC handshake with the cluster
secret (peers.py, role "client"), and without streaming.

Protocol: the client sends one JSON object per line, ``{"op": "...", "args": {...}}``.
The daemon answers with zero or more event lines, ``{"event": "progress", "message":
...}`` / ``{"event": "console", "data": ...}``, then exactly one final line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. A connection can
carry several requests in turn.

Ops: ping, nodes, boot, list, status, console, console_input, stop, rm, stats.
"""

from __future__ import annotations

import asyncio
import base64
import grp
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .membership import Membership
from .peers import PeerError, PeerNetwork
from .placement import PlacementError
from .vmmanager import Emit, VmError, VmManager

log = logging.getLogger("dvmmd.api")

MAX_REQUEST = 1 << 20


class ApiError(Exception):
    """A bad request (unknown op, missing argument)."""


class ApiHandler:
    def __init__(
        self,
        node: str,
        incarnation: int,
        membership: Membership,
        network: PeerNetwork,
        vmm: VmManager,
        version: str,
    ) -> None:
        self.node = node
        self.incarnation = incarnation
        self.membership = membership
        self.network = network
        self.vmm = vmm
        self.version = version
        self.requests = 0

    async def handle(self, op: str, args: dict[str, Any], emit: Emit | None) -> Any:
        self.requests += 1

        def name() -> str:
            n = args.get("name")
            if not isinstance(n, str) or not n:
                raise ApiError(f"{op}: missing argument 'name'")
            return n

        async def progress(message: str) -> None:
            if emit is not None:
                await emit({"event": "progress", "message": message})

        if op == "ping":
            return {"node": self.node, "incarnation": self.incarnation, "version": self.version}
        if op == "nodes":
            return {
                "self": self.node,
                "nodes": self.membership.view(),
                "pending": self.network.pending_addrs(),
            }
        if op == "boot":
            return await self.vmm.boot(args, progress)
        if op == "list":
            return await self.vmm.list_all()
        if op in ("status", "stats", "rm"):
            return await self.vmm.op(op, name(), {})
        if op == "stop":
            return await self.vmm.op("stop", name(), {"force": bool(args.get("force"))})
        if op == "console":
            follow = bool(args.get("follow")) and emit is not None
            if emit is None:
                chunks: list[str] = []

                async def collect(ev: dict[str, Any]) -> None:
                    chunks.append(ev.get("data", ""))

                status = await self.vmm.console(name(), False, collect)
                return {"console": "".join(chunks), "status": status}
            return await self.vmm.console(name(), follow, emit)
        if op == "console_input":
            # {"name", "data": text} or {"name", "data_b64": base64}.
            if "data_b64" in args:
                try:
                    data = base64.b64decode(str(args["data_b64"]), validate=True)
                except ValueError:
                    raise ApiError("console_input: data_b64 is not valid base64") from None
            elif isinstance(args.get("data"), str):
                data = args["data"].encode("utf-8")
            else:
                raise ApiError("console_input: expected 'data' (text) or 'data_b64'")
            return await self.vmm.console_input(name(), data)
        raise ApiError(f"unknown op {op!r}")

    async def remote(self, method: str, params: dict[str, Any], _peer: object) -> Any:
        """Entry point for authenticated remote clients (peer port, role "client")."""
        if method != "api":
            raise ApiError(f"unknown method {method!r}")
        op, args = params.get("op"), params.get("args") or {}
        if not isinstance(op, str) or not isinstance(args, dict):
            raise ApiError("api: expected {op: str, args: object}")
        return await self.handle(op, args, None)


def _error_text(e: BaseException) -> str:
    return str(e) or type(e).__name__


class ApiServer:
    """The unix socket server."""

    def __init__(self, path: Path, mode: int, group: str | None, handler: ApiHandler) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        if self.path.exists() or self.path.is_symlink():
            if _socket_alive(self.path):
                raise OSError(f"another dvmmd is already serving {self.path}")
            self.path.unlink()
        gid = -1
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise OSError(f"api.socket_group: no group named {self.group!r}") from None
        old = os.umask(0o177)  # no window where the socket is more open than 0600
        try:
            self.server = await asyncio.start_unix_server(
                self._on_client, str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        if gid >= 0:
            os.chown(self.path, -1, gid)
        os.chmod(self.path, self.mode)

    async def close(self) -> None:
        if self.server is None:
            return  # never started: the path may be another daemon's socket
        self.server.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gone = False

        async def send(obj: dict[str, Any]) -> None:
            nonlocal gone
            if gone:
                return
            try:
                writer.write(json.dumps(obj).encode() + b"\n")
                await writer.drain()
            except (OSError, ConnectionError):
                gone = True  # the client left; the operation itself carries on

        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await send({"ok": False, "error": "request too large"})
                    return
                if not line:
                    return
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                        raise TypeError('expected {"op": ..., "args": {...}}')
                    args = req.get("args") or {}
                    if not isinstance(args, dict):
                        raise TypeError("args must be an object")
                except (TypeError, ValueError) as e:
                    await send({"ok": False, "error": f"bad request: {e}"})
                    return
                # Run the op in its own task: a client that disconnects mid-boot must
                # not cancel the boot half-way.
                task = asyncio.ensure_future(self._run(req["op"], args, send))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                await asyncio.shield(task)
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _run(
        self, op: str, args: dict[str, Any], send: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        try:
            result = await self.handler.handle(op, args, send)
            await send({"ok": True, "result": result})
        except (ApiError, VmError, PeerError, PlacementError, ValueError, KeyError, TypeError) as e:
            await send({"ok": False, "error": _error_text(e)})
        except Exception as e:  # never let a bug take the daemon down; say what happened
            log.exception("API op %s failed", op)
            await send({"ok": False, "error": f"internal error: {_error_text(e)}"})


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False
