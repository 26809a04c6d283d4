"""The daemon's API: JSON lines over a unix socket (and, if enabled, remote clients).

Access. Local access is controlled by the socket's file permissions
(``api.socket_mode``, default 0660, and ``api.socket_group``); when a group is
configured the daemon also lets that group traverse the socket's directory (mode
0710, group = socket_group: see `open_dir_to_group`), since systemd creates
``/run/dvmmd`` as root:root 0750. Every local client is identified by the kernel
(SO_PEERCRED: uid, gid, pid), and what it may make the root daemon read depends on
it: a non-root client passes its kernel/initrd as open file descriptors (SCM_RIGHTS)
instead of paths (dvmmd.vm.boot_files). Remote clients are served only when ``api.remote =
true``, on the peer port, after authentication (peers.py, role "client"), without
streaming and without paths outside ``vm.images_dir``. Likewise only a local root
client names a ``boot``'s ``snapshot_dir`` (dvmmd.vm.periodic_snapshots) or a
``snapshot``'s ``dir`` (written by the VM's root workers).

Protocol: the client sends one JSON object per line, ``{"op": "...", "args": {...}}``,
at most `MAX_REQUEST` bytes, with at most `MAX_FDS` descriptors attached to its bytes.
The daemon answers with zero or more event lines, ``{"event": "progress", "message":
...}`` / ``{"event": "console", "data": ...}``, then exactly one final line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. A connection can
carry several requests in turn. Anything malformed -- not UTF-8, not JSON, nested
deeper than safejson.MAX_DEPTH, not an object, an unknown op, an unknown argument or
one of the wrong type -- is answered with ``ok: false`` and an error naming the
problem, and the connection stays usable; only a line longer than `MAX_REQUEST`
ends the connection (after the error), since the rest of it cannot be trusted.

Ops: ping, nodes, boot, list, status, console, console_input, stop, rm, stats.
"""

from __future__ import annotations

import array
import asyncio
import base64
import grp
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from dvmmd.daemon.membership import Membership
from dvmmd.daemon.peers import PeerError, PeerNetwork
from dvmmd.daemon.vms import Emit, VmError, VmManager
from dvmmd.security import safejson
from dvmmd.security.logsafe import RateLimitedLog
from dvmmd.vm.boot_files import MAX_FDS, Caller
from dvmmd.vm.names import check_vm_name
from dvmmd.vm.placement import PlacementError

log = logging.getLogger("dvmmd.api")

#: Longest request line, in bytes.
MAX_REQUEST = 1 << 20
#: Local connections served at once; more are answered with an error and closed.
MAX_CLIENTS = 128
_RECV = 64 << 10
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Send = Callable[[dict[str, Any]], Awaitable[None]]

_NONE = type(None)
_NUM = (int, float)
#: Arguments of every op: name -> accepted JSON types. Unknown names are errors.
ARGS: dict[str, dict[str, tuple[type, ...]]] = {
    "ping": {},
    "nodes": {},
    "list": {},
    "status": {"name": (str,)},
    "stats": {"name": (str,)},
    "rm": {"name": (str,)},
    "start": {"name": (str,)},
    "stop": {"name": (str,), "force": (bool, _NONE)},
    "console": {"name": (str,), "follow": (bool, _NONE)},
    "console_input": {"name": (str,), "data": (str,), "data_b64": (str,)},
    "snapshot": {"name": (str,), "dir": (str,), "leave_running": (bool, _NONE)},
    "migrate_vcpu": {"name": (str,), "vcpu": (int,), "node": (str, int)},
    "placement": {"name": (str,)},
    "drain": {"node": (str,)},
    "boot": {
        "name": (str,),
        "vcpus": (int, str, _NONE),
        "memory": (int, str, _NONE),
        "kernel": (str, _NONE),
        "initrd": (str, _NONE),
        "kernel_fd": (int, _NONE),
        "initrd_fd": (int, _NONE),
        "cmdline": (str, _NONE),
        "nodes": (list, _NONE),
        "timeout_s": (*_NUM, _NONE),
        "cpu": (str, _NONE),
        "foreign_budget": (int, str, _NONE),
        "snapshot_every_s": (*_NUM, _NONE),
        "snapshot_dir": (str, _NONE),
        "restore_dir": (str, _NONE),
    },
}
#: Ops that act on one VM: "name" is required and is a VM name.
NAMED_OPS = frozenset(op for op, spec in ARGS.items() if "name" in spec)


class ApiError(ValueError):
    """A bad request (malformed line, unknown op, missing or mistyped argument)."""


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )


def _type_ok(value: object, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in kinds  # a JSON boolean is not a number here
    return isinstance(value, kinds)


def check_args(op: str, args: dict[str, Any]) -> None:
    """Raise ApiError naming the argument unless `args` fits op's schema."""
    spec = ARGS.get(op)
    if spec is None:
        raise ApiError(f"unknown op {op[:64]!r} (known: {', '.join(sorted(ARGS))})")
    for key, value in args.items():
        kinds = spec.get(key)
        if kinds is None:
            known = ", ".join(sorted(spec)) or "none"
            raise ApiError(f"{op}: unknown argument {key[:64]!r} (known: {known})")
        if not _type_ok(value, kinds):
            want = " or ".join(sorted({_type_name(k()) for k in kinds}))
            raise ApiError(f"{op}: argument {key!r} must be {want}, got {_type_name(value)}")
    if op in NAMED_OPS:
        if "name" not in args:
            raise ApiError(f"{op}: missing argument 'name'")
        check_vm_name(args["name"])


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """One request line -> (op, args); ApiError("bad request: ...") naming the problem."""
    if len(line) > MAX_REQUEST:
        raise ApiError(f"request too large ({len(line)} bytes, over {MAX_REQUEST})")
    try:
        req = safejson.loads(line)
    except safejson.JsonError as e:
        raise ApiError(f"bad request: {e}") from None
    if not isinstance(req, dict):
        raise ApiError(
            f'bad request: expected a JSON object {{"op": ..., "args": {{...}}}}, '
            f"got {_type_name(req)}"
        )
    extra = sorted(k for k in req if k not in ("op", "args"))
    if extra:
        raise ApiError(f"bad request: unknown field {extra[0][:64]!r} (expected op, args)")
    op = req.get("op")
    if not isinstance(op, str):
        raise ApiError(f"bad request: 'op' must be a string, got {_type_name(op)}")
    args = req.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ApiError(f"bad request: 'args' must be an object, got {_type_name(args)}")
    return op, args


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

    async def handle(
        self,
        op: str,
        args: dict[str, Any],
        emit: Emit | None,
        *,
        caller: Caller,
        fds: Sequence[int] = (),
    ) -> Any:
        self.requests += 1
        check_args(op, args)
        name: str = args.get("name", "")

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
            if args.get("restore_dir") is not None and not caller.is_local_root:
                # The VM's workers (root) read the snapshot wherever it says.
                raise ApiError(
                    f"boot: only root may restore a snapshot ({caller.describe()} is not "
                    "local root)"
                )
            return await self.vmm.boot(args, progress, caller=caller, fds=fds)
        if op == "start":
            return await self.vmm.start(name, progress)
        if op == "list":
            return await self.vmm.list_all()
        if op in ("status", "stats", "rm"):
            return await self.vmm.op(op, name, {})
        if op == "stop":
            return await self.vmm.op("stop", name, {"force": bool(args.get("force"))})
        if op == "drain":
            return await self.vmm.drain(str(args.get("node", "")), progress)
        if op in ("snapshot", "migrate_vcpu", "placement"):
            if op == "snapshot" and not caller.is_local_root:
                # The VM's workers (root) write the snapshot where it says.
                raise ApiError(
                    f"snapshot: only root may choose where a snapshot is written "
                    f"({caller.describe()} is not local root)"
                )
            return await self.vmm.op(op, name, {k: v for k, v in args.items() if k != "name"})
        if op == "console":
            follow = bool(args.get("follow")) and emit is not None
            if emit is None:
                chunks: list[str] = []

                async def collect(ev: dict[str, Any]) -> None:
                    chunks.append(ev.get("data", ""))

                status = await self.vmm.console(name, False, collect)
                return {"console": "".join(chunks), "status": status}
            return await self.vmm.console(name, follow, emit)
        assert op == "console_input"  # check_args knows every op
        # {"name", "data": text} or {"name", "data_b64": base64}.
        if "data_b64" in args:
            try:
                data = base64.b64decode(args["data_b64"], validate=True)
            except ValueError:
                raise ApiError("console_input: data_b64 is not valid base64") from None
        elif "data" in args:
            try:
                data = args["data"].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate (\ud800) in the JSON text
                raise ApiError(f"console_input: data is not valid text: {e.reason}") from None
        else:
            raise ApiError("console_input: expected 'data' (text) or 'data_b64'")
        return await self.vmm.console_input(name, data)

    async def remote(self, method: str, params: dict[str, Any], peer: Any) -> Any:
        """Entry point for authenticated remote clients (peer port, role "client")."""
        if method != "api":
            raise ApiError(f"unknown method {method[:64]!r}")
        op, args = params.get("op"), params.get("args")
        if args is None:
            args = {}
        if not isinstance(op, str) or not isinstance(args, dict):
            raise ApiError("api: expected {op: str, args: object}")
        caller = Caller(remote_node=str(getattr(peer, "node", "?")))
        return await self.handle(op, args, None, caller=caller)


def _error_text(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _encode(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj).encode() + b"\n"
    except (TypeError, ValueError, RecursionError) as e:  # a result we cannot serialise
        log.error("API reply not serialisable: %s", e)
        return json.dumps({"ok": False, "error": f"internal error: reply: {e}"}).encode() + b"\n"


def open_dir_to_group(d: Path, gid: int, group: str) -> None:
    """Let members of `group` traverse `d`, the socket's directory, when they cannot.

    systemd's RuntimeDirectory (/run/dvmmd) is root:root 0750, so a configured
    api.socket_group could not reach the socket. A directory dvmmd owns that neither
    the group nor others can traverse is given to the group with search permission
    only (0710: no listing). Anything else (already reachable, or not ours) is left
    alone, so a socket in a shared directory never changes that directory.
    """
    st = os.stat(d)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o001 or (st.st_gid == gid and mode & 0o010):
        return
    if st.st_uid != os.geteuid():
        raise OSError(
            f"members of api.socket_group {group!r} cannot reach the socket: {d} is mode "
            f"{mode:04o}, owned by uid {st.st_uid}, group {st.st_gid}, and not dvmmd's to change"
        )
    new = (mode & ~0o070) | 0o010
    os.chown(d, -1, gid)
    os.chmod(d, new)
    log.info(
        "API: %s is now group %s, mode %04o (so the group can reach the socket)", d, group, new
    )


class ApiServer:
    """The unix socket server: SO_PEERCRED for who, SCM_RIGHTS for boot files."""

    def __init__(self, path: Path, mode: int, group: str | None, handler: ApiHandler) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.handler = handler
        self.sock: socket.socket | None = None
        self.accept_task: asyncio.Task[None] | None = None
        self.clients: set[asyncio.Task[None]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.rlog = RateLimitedLog(log)

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
            open_dir_to_group(self.path.parent, gid, self.group)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no window where the socket is more open than 0600
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(64)
        sock.setblocking(False)
        if gid >= 0:
            os.chown(self.path, -1, gid)
        os.chmod(self.path, self.mode)
        self.sock = sock
        self.accept_task = asyncio.ensure_future(self._accept_loop(sock))

    async def close(self) -> None:
        if self.sock is None:
            return  # never started: the path may be another daemon's socket
        assert self.accept_task is not None
        self.accept_task.cancel()
        for t in list(self.clients):
            t.cancel()
        self.sock.close()
        self.sock = None
        try:
            self.path.unlink()
        except OSError:
            pass

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and friends: wait, do not spin
                self.rlog.log(logging.WARNING, "API: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                self.rlog.log(logging.WARNING, "API: %d clients connected; refusing", MAX_CLIENTS)
                try:
                    conn.send(_encode({"ok": False, "error": "too many API connections"}))
                except OSError:
                    pass
                conn.close()
                continue
            task = asyncio.ensure_future(self._serve(conn))
            self.clients.add(task)
            task.add_done_callback(self.clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        gone = False

        async def send(obj: dict[str, Any]) -> None:
            nonlocal gone
            if gone:
                return
            try:
                await loop.sock_sendall(conn, _encode(obj))
            except (OSError, ConnectionError):
                gone = True  # the client left; the operation itself carries on

        buf = bytearray()
        pending: list[int] = []  # descriptors received with the current request's bytes
        truncated = False
        try:
            # Who is calling, as the kernel saw it at connect(): decides which files the
            # daemon may open for this client (dvmmd.vm.boot_files).
            pid, uid, gid = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            caller = Caller(uid=uid, gid=gid, pid=pid)
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > MAX_REQUEST:
                        await send(
                            {"ok": False, "error": f"request too large (over {MAX_REQUEST} bytes)"}
                        )
                        return
                    data, fds, cut = await _recvmsg(conn)
                    pending.extend(fds)
                    truncated |= cut
                    if not data:
                        if buf.strip():
                            await send(
                                {"ok": False, "error": "bad request: incomplete line (no newline)"}
                            )
                        return
                    buf += data
                    continue
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                fds, pending = pending, []
                cut, truncated = truncated, False
                try:
                    if cut or len(fds) > MAX_FDS:
                        raise ApiError(f"bad request: more than {MAX_FDS} file descriptors")
                    if not line.strip():
                        _close_all(fds)
                        continue
                    op, args = parse_request(line)
                except ApiError as e:
                    _close_all(fds)
                    await send({"ok": False, "error": str(e)})
                    continue
                # Run the op in its own task: a client that disconnects mid-boot must
                # not cancel the boot half-way.
                task = asyncio.ensure_future(self._run(op, args, send, caller, fds))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                await asyncio.shield(task)
        except (OSError, ConnectionError):
            pass
        except Exception:  # a bug here must cost one connection, not the daemon
            log.exception("API connection failed")
        finally:
            _close_all(pending)
            conn.close()

    async def _run(
        self, op: str, args: dict[str, Any], send: Send, caller: Caller, fds: list[int]
    ) -> None:
        try:
            result = await self.handler.handle(op, args, send, caller=caller, fds=fds)
            await send({"ok": True, "result": result})
        except (ApiError, VmError, PeerError, PlacementError, ValueError, KeyError, TypeError) as e:
            await send({"ok": False, "error": _error_text(e)})
        except Exception as e:  # never let a bug take the daemon down; say what happened
            log.exception("API op %s failed", op)
            await send({"ok": False, "error": f"internal error: {_error_text(e)}"})
        finally:
            _close_all(fds)


async def _recvmsg(conn: socket.socket) -> tuple[bytes, list[int], bool]:
    """(data, received descriptors, whether some were dropped); b"" at end of stream."""
    loop = asyncio.get_running_loop()
    anc = socket.CMSG_SPACE(MAX_FDS * 4)
    while True:
        try:
            data, cmsgs, flags, _ = conn.recvmsg(_RECV, anc, socket.MSG_CMSG_CLOEXEC)
            break
        except (BlockingIOError, InterruptedError):
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(conn.fileno(), _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())
        except ConnectionResetError:
            return b"", [], False
    fds: list[int] = []
    for level, kind, cdata in cmsgs:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
            fds.extend(a)
    return data, fds, bool(flags & socket.MSG_CTRUNC)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False
