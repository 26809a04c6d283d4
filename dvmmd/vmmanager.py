"""VM lifecycle: placement, one VMM worker process per VM per node, state, failures.

Roles. The daemon that is asked to boot a VM *owns* it: it stores the definition and
state (store.vms), runs the placement policy, and drives the boot. Every node that runs
part of the VM (a *share*: its vCPUs and its home memory range, numa[i]) spawns one
worker, ``WORKER_CMD SPEC.json RESULT.json`` (default ``python -m dvmmd.worker``),
tracks it and reports its exit to the owner. Single-node VMs take the same path with
one share and ``cluster = null``.

Boot of a VM over nodes n0..nk (n0 = boot node: BSP and console):
1. ``share_prepare`` on every node: the node checks its own free resources (the
   authority, so concurrent boots from different owners cannot overcommit it),
   reserves a data-path port, makes its X25519 key pair for this boot (keys.py) and
   answers its address and public key;
2. ``share_start`` on n1..nk, then n0: each node writes its spec (the common spec +
   ``cluster = {node_index, nodes[{addr}], boot_node: 0, security, session_hex,
   node_pubkeys_hex}``: nothing secret) and spawns the worker with ``--key-stdin``,
   writing its private key to the worker's stdin: it is never in a file or a message.

Exit. The boot node's worker result is the VM's result. A worker that fails on any
node fails the VM, naming the node; the owner then stops the other workers. A member
that dies, leaves or restarts (membership.py) fails every VM with a share there, and
a node whose VM's owner dies stops its workers: no worker is left behind. Workers also
die with their daemon (PR_SET_PDEATHSIG), and a restarted daemon marks whatever was
running as failed (store.fail_active).

Console: the boot node's worker writes the console to its ``console_log``; anyone can
read it through ``console_read`` (tail by byte offset).

Live counters: the worker's RESULT.json has ``stats`` at the end. While it runs, a
worker may publish live counters by atomically rewriting ``RESULT.json.stats`` (a JSON
object); `stats` and the metrics endpoint report them if present.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import json
import logging
import math
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import images
from .config import Config, parse_memory
from .images import BootFileError, BootSource, Caller
from .keys import KeyMaterialError, NodeKey, check_key_hex, new_session_hex
from .membership import MemberEvent, Membership
from .names import check_node_name, check_vm_name
from .peers import RpcError
from .placement import (
    NodeResources,
    Placement,
    PlacementError,
    PlacementPolicy,
    PlacementRequest,
    default_policy,
    place,
)
from .sizes import check_guest_memory, format_size
from .store import ACTIVE_STATES, SHARE_ACTIVE_STATES, ShareRecord, Store, VmRecord
from .vmspec import (
    DEFAULT_CMDLINE,
    MAX_VCPUS,
    SpecError,
    check_cpu_model,
    find_bundled_guest,
    host_default_cpu_model,
    validate_spec,
)

log = logging.getLogger("dvmmd.vm")

CallFn = Callable[[str, str, dict[str, Any], float], Awaitable[Any]]
Progress = Callable[[str], Awaitable[None]]
Emit = Callable[[dict[str, Any]], Awaitable[None]]

CONSOLE_CHUNK = 64 * 1024
PREPARE_EXPIRY = 60.0


class VmError(RpcError):
    """A user-facing VM error (unknown name, impossible request, boot failure...)."""


def multinode_supported(setting: str) -> tuple[bool, str]:
    """Can workers run one VM across several nodes? ("yes"/"no"/"auto" from config).

    "auto" asks the native module: a true ``MULTI_NODE`` (or ``SUPPORTS_CLUSTER``)
    attribute, or "cluster" in ``FEATURES``.
    """
    if setting == "yes":
        return True, "enabled by worker.multi_node"
    if setting == "no":
        return False, "disabled by worker.multi_node"
    try:
        import importlib

        native = importlib.import_module("dvmmd._native")
    except ImportError as e:
        return False, f"dvmmd._native is not available ({e})"
    for attr in ("MULTI_NODE", "SUPPORTS_CLUSTER"):
        v = getattr(native, attr, None)
        if isinstance(v, bool):
            return v, f"dvmmd._native.{attr} is {v}"
    feats = getattr(native, "FEATURES", None)
    if isinstance(feats, (list, tuple, set, frozenset, str)) and "cluster" in feats:
        return True, "dvmmd._native.FEATURES has 'cluster'"
    return False, "dvmmd._native does not advertise multi-node support (MULTI_NODE)"


def classify(result: dict[str, Any], stop_reason: str | None) -> tuple[str, str]:
    """Map a worker result to (state, human reason)."""
    reason = result.get("reason")
    err = result.get("error")
    if stop_reason is not None and reason in ("stopped", None, "crash", "error"):
        return "stopped", stop_reason
    if reason == "debug_exit":
        return "stopped", f"guest exited with status {result.get('status')}"
    if reason == "shutdown":
        return "stopped", "guest shut down"
    if reason == "stopped":
        return "stopped", "stopped"
    if reason == "timeout":
        return "failed", "timed out" + (f": {err}" if err else "")
    if reason == "crash":
        return "failed", "guest crashed" + (f": {err}" if err else "")
    return "failed", str(err or f"worker ended with reason {reason!r}")


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any], mode: int = 0o600) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class LocalShare:
    """This node's worker for one VM."""

    rec: ShareRecord
    dir: Path
    port: int | None = None
    proc: asyncio.subprocess.Process | None = None
    stop_reason: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    prepared_at: float = field(default_factory=time.monotonic)
    #: The console input FIFO, held open read-write by the daemon (boot node only) so
    #: input written before the VMM opened it waits in the pipe.
    console_in_fd: int | None = None
    #: This node's data-path key pair for this boot (multi-node), from share_prepare
    #: until the worker has the private half.
    key: NodeKey | None = None

    @property
    def console_in_path(self) -> Path:
        return self.dir / "console.in"

    @property
    def spec_path(self) -> Path:
        return self.dir / "spec.json"

    @property
    def result_path(self) -> Path:
        return self.dir / "result.json"

    @property
    def console_path(self) -> Path:
        return self.dir / "console.log"

    @property
    def active(self) -> bool:
        return self.rec.state in SHARE_ACTIVE_STATES


class VmManager:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        membership: Membership,
        call: CallFn,
        policy: PlacementPolicy = default_policy,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.node_name
        self.store = store
        self.membership = membership
        self._remote_call = call
        self.policy = policy
        self.vm_dir = cfg.state_dir / "vms"
        self.shares: dict[str, LocalShare] = {}
        self.stop_reasons: dict[str, str] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.ports_in_use: set[int] = set()
        self.membership.listeners.append(self.on_member_event)

    # --- plumbing -------------------------------------------------------------------

    async def call(
        self, node: str, method: str, params: dict[str, Any], timeout: float = 10.0
    ) -> Any:
        if node == self.name:
            return await self.handle_rpc(method, params)
        return await self._remote_call(node, method, params, timeout)

    def spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception())

    def _lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    def startup(self) -> None:
        """Called once at daemon start: whatever was running lost its workers."""
        vms, shares = self.store.fail_active("dvmmd restarted; the VM's worker(s) were lost")
        for v in vms:
            log.warning("VM %s was active when dvmmd stopped; marked failed", v)
        for s in shares:
            log.warning("worker of VM %s on this node was lost with the previous dvmmd", s)

    def used(self) -> tuple[int, int]:
        active = [s for s in self.shares.values() if s.active]
        return sum(s.rec.vcpus for s in active), sum(s.rec.memory for s in active)

    async def handle_rpc(self, method: str, params: dict[str, Any]) -> Any:
        handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "vm_list": self._rpc_vm_list,
            "vm_find": self._rpc_vm_find,
            "vm_op": self._rpc_vm_op,
            "share_prepare": self.share_prepare,
            "share_start": self.share_start,
            "share_stop": self.share_stop,
            "share_forget": self.share_forget,
            "share_stats": self.share_stats,
            "share_exited": self.on_share_exited,
            "console_read": self.console_read,
            "console_write": self.console_write,
            "boot_file_put": self.boot_file_put,
        }
        h = handlers.get(method)
        if h is None:
            raise VmError(f"unknown method {method[:64]!r}")
        # Every method that names a VM gets a name that is one plain path component
        # (names.py); the handlers check again, for callers that skip this entry point.
        if "name" in params:
            check_vm_name(params["name"])
        return await h(params)

    # --- cluster-wide user operations (any node) -----------------------------------

    def _peers(self) -> list[str]:
        return [m.name for m in self.membership.alive() if m.name != self.name]

    async def list_all(self) -> dict[str, Any]:
        vms = [dict(r.to_json(), owner=self.name) for r in self.store.list_vms()]
        unreachable = []
        results = await asyncio.gather(
            *(self.call(p, "vm_list", {}) for p in self._peers()), return_exceptions=True
        )
        for peer, res in zip(self._peers(), results):
            if isinstance(res, BaseException):
                unreachable.append(f"{peer}: {res}")
            else:
                vms.extend(res)
        vms.sort(key=lambda v: v["name"])
        return {"vms": vms, "unreachable": unreachable}

    async def locate(self, name: str) -> str:
        """The node that owns VM `name`; VmError naming the known VMs if none does."""
        if self.store.get_vm(name) is not None:
            return self.name
        peers = self._peers()
        results = await asyncio.gather(
            *(self.call(p, "vm_find", {"name": name}) for p in peers), return_exceptions=True
        )
        for peer, res in zip(peers, results):
            if isinstance(res, dict):
                return peer
        known = sorted(v["name"] for v in (await self.list_all())["vms"])
        raise VmError(
            f"no VM named {name!r}"
            + (f" (known: {', '.join(known)})" if known else " (no VMs are defined)")
        )

    async def op(self, op: str, name: str, args: dict[str, Any]) -> Any:
        owner = await self.locate(name)
        return await self.call(
            owner, "vm_op", {"op": op, "name": name, "args": args}, self.cfg.stop_grace + 15.0
        )

    async def console(self, name: str, follow: bool, emit: Emit) -> dict[str, Any]:
        """Stream the console of VM `name` from its boot node; returns the final status."""
        rec = await self.op("status", name, {})
        boot = rec["placement"]["shares"][0]["node"]
        offset = 0
        idle = 0
        while True:
            r = await self.call(boot, "console_read", {"name": name, "offset": offset})
            if r["data"]:
                await emit({"event": "console", "data": r["data"]})
                offset = r["offset"]
                idle = 0
                continue
            if not follow:
                break
            idle += 1
            if idle % 5 == 0 or not r["active"]:
                rec = await self.op("status", name, {})
                if rec["state"] not in ACTIVE_STATES and not r["active"]:
                    r = await self.call(boot, "console_read", {"name": name, "offset": offset})
                    if r["data"]:
                        await emit({"event": "console", "data": r["data"]})
                    break
            await asyncio.sleep(0.2)
        return await self.op("status", name, {})  # type: ignore[no-any-return]

    async def console_input(self, name: str, data: bytes) -> dict[str, Any]:
        """Send `data` to the serial console of VM `name` (on its boot node)."""
        rec = await self.op("status", name, {})
        boot = rec["placement"]["shares"][0]["node"]
        params = {"name": name, "data": base64.b64encode(data).decode("ascii")}
        return await self.call(boot, "console_write", params)  # type: ignore[no-any-return]

    # --- boot (this node becomes the owner) ----------------------------------------

    def resources(self) -> list[NodeResources]:
        out = []
        for m in self.membership.alive():
            i = m.info
            out.append(
                NodeResources(
                    m.name,
                    max(0, i.get("vcpus", 0) - i.get("used_vcpus", 0)),
                    max(0, i.get("memory", 0) - i.get("used_memory", 0)),
                )
            )
        return out

    async def boot(
        self,
        args: dict[str, Any],
        progress: Progress,
        *,
        caller: Caller,
        fds: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Boot VM ``args["name"]`` with this node as its owner (the API's ``boot``).

        `caller` decides which kernel/initrd paths the daemon may open, and `fds` are
        the descriptors passed with the request (``kernel_fd``/``initrd_fd`` index
        them): see images.py. The caller closes `fds`; descriptors opened here are
        closed here.
        """
        sources: dict[str, BootSource | None] = {}
        try:
            for kind in images.KINDS:
                sources[kind] = images.resolve(kind, args, fds, caller, self.cfg.images_dir)
            return await self._boot(args, progress, caller, sources)
        except BootFileError as e:
            raise VmError(str(e)) from None
        finally:
            for src in sources.values():
                if src is not None and src.owned_fd and src.fd is not None:
                    os.close(src.fd)

    async def _boot(
        self,
        args: dict[str, Any],
        progress: Progress,
        caller: Caller,
        sources: dict[str, BootSource | None],
    ) -> dict[str, Any]:
        name = check_vm_name(args.get("name"))
        try:
            v, m = args.get("vcpus"), args.get("memory")
            vcpus = 1 if v is None else int(v)
            memory = check_guest_memory(parse_memory("256M" if m is None else m))
        except (TypeError, ValueError) as e:  # SizeError is a ValueError
            raise VmError(f"bad vCPU count or memory size: {e}") from None
        if not 1 <= vcpus <= MAX_VCPUS:
            raise VmError(f"a VM has 1 to {MAX_VCPUS} vCPUs, not {vcpus}")
        # Memory aggregation bound per node (bytes of other nodes' memory it may
        # hold); None: the VMM's default, half of the node's own share.
        fb = args.get("foreign_budget")
        try:
            foreign_budget = None if fb is None else parse_memory(fb)
        except (TypeError, ValueError) as e:
            raise VmError(f"bad foreign budget {fb!r}: {e}") from None
        if foreign_budget is not None and foreign_budget < 4096:
            raise VmError(f"foreign budget {fb!r}: at least one 4 KiB page")
        nodes = args.get("nodes")
        if nodes is not None:
            if not isinstance(nodes, list):
                raise VmError("nodes must be a list of node names")
            for n in nodes:
                check_node_name(n)
        t = args.get("timeout_s")
        try:
            timeout_s = float(t or 0)
        except (TypeError, ValueError):
            raise VmError(f"timeout_s must be a number of seconds, got {t!r}") from None
        if not math.isfinite(timeout_s) or timeout_s < 0:
            raise VmError(f"timeout_s must be a finite number of seconds >= 0, got {t!r}")
        cmdline = args.get("cmdline") or DEFAULT_CMDLINE
        if not isinstance(cmdline, str):
            raise VmError(f"cmdline must be a string, got {type(cmdline).__name__}")
        if sources["kernel"] is None:  # the admin's choice: anyone may boot it
            kernel = self.cfg.default_kernel
            if not kernel:
                try:
                    kernel = str(find_bundled_guest())
                except SpecError as e:
                    raise VmError(
                        f"no kernel given (--kernel), no vm.kernel in {self.cfg.path}, and {e}"
                    ) from None
            sources["kernel"] = BootSource("kernel", kernel, path=kernel)
        # The CPU model is fixed here, on the owner, so every node's share gets the same.
        cpu_in = args.get("cpu")
        try:
            cpu = host_default_cpu_model() if cpu_in is None else check_cpu_model(cpu_in)
        except SpecError as e:
            raise VmError(str(e)) from None
        async with self._lock(name):
            old = self.store.get_vm(name)
            if old is not None and old.state in ACTIVE_STATES:
                raise VmError(f"VM {name} already exists and is {old.state}")
            peers = self._peers()
            found = await asyncio.gather(
                *(self.call(p, "vm_find", {"name": name}) for p in peers), return_exceptions=True
            )
            for peer, res in zip(peers, found):
                if isinstance(res, dict):
                    raise VmError(
                        f"a VM named {name} is defined on node {peer} "
                        f"({res['state']}); use another name or `dvmmctl rm {name}`"
                    )
            multi, why = multinode_supported(self.cfg.multi_node)
            req = PlacementRequest(
                vcpus=vcpus,
                memory=memory,
                nodes=tuple(nodes) if nodes else None,
                max_nodes=None if multi else 1,
                prefer=self.name,
            )
            try:
                placement = place(self.resources(), req, self.policy)
            except PlacementError as e:
                hint = f" [multi-node VMs unavailable: {why}]" if not multi else ""
                raise VmError(f"impossible request: {e}{hint}") from None
            boot_id = uuid.uuid4().hex
            paths, copied = await self._take_boot_files(name, boot_id, sources, caller, progress)
            request: dict[str, Any] = {
                "vcpus": vcpus,
                "memory": memory,
                "kernel": paths["kernel"],
                "initrd": paths["initrd"],
                "cmdline": cmdline,
                "nodes": nodes,
                "timeout_s": timeout_s,
                "boot_id": boot_id,
                "cpu": cpu,
            }
            if foreign_budget is not None:
                request["foreign_budget"] = foreign_budget
            if copied:
                request["boot_files"] = copied
            pj = placement.to_json()
            for s in pj["shares"]:
                s.update(state="prepared", reason="", stats=None)
            rec = VmRecord(
                name=name,
                request=request,
                placement=pj,
                state="booting",
                reason="booting",
                created_at=old.created_at if old else time.time(),
            )
            self.store.put_vm(rec)
            self.stop_reasons.pop(name, None)
            desc = ", ".join(
                f"{s.node} (vCPUs {_ranges(s.cpus)}, {format_size(s.mem_size)})"
                for s in placement.shares
            )
            note = "" if multi else f" [single node: {why}]"
            await progress(f"placement: {vcpus} vCPU(s), {format_size(memory)} on {desc}{note}")
            try:
                if copied:
                    await self._push_boot_files(name, boot_id, copied, placement, progress)
                await self._boot_shares(name, boot_id, request, placement, progress)
            except Exception as e:
                reason = f"boot failed: {e}"
                log.warning("VM %s: %s", name, reason)
                await self._stop_shares(name, placement.nodes, "boot failed", force=True)
                cur = self.store.get_vm(name)
                if cur is not None and cur.request.get("boot_id") == boot_id:
                    for s in cur.placement["shares"]:
                        if s.get("state") in SHARE_ACTIVE_STATES:
                            s["state"] = "stopped"
                    self.store.update_vm(
                        name, state="failed", reason=reason, placement=cur.placement
                    )
                if isinstance(e, VmError):
                    raise VmError(reason) from None
                raise
            cur = self.store.get_vm(name)
            assert cur is not None
            if cur.state == "booting":  # the guest may already have finished
                cur = self.store.update_vm(
                    name, state="running", reason="running on " + ", ".join(placement.nodes)
                )
            await progress(f"{cur.state}: {cur.reason}")
            return dict(cur.to_json(), owner=self.name)

    async def _take_boot_files(
        self,
        name: str,
        boot_id: str,
        sources: dict[str, BootSource | None],
        caller: Caller,
        progress: Progress,
    ) -> tuple[dict[str, str | None], dict[str, Any]]:
        """Boot file paths for the request, copying what came as a descriptor.

        Returns ({kind: path or vmdir: reference or None}, {kind: copy details}).
        """
        paths: dict[str, str | None] = {}
        copied: dict[str, Any] = {}
        vm_dir = self.vm_dir / name
        local = self.shares.get(name)
        for kind, src in sources.items():
            if src is None or src.fd is None:
                paths[kind] = None if src is None else src.path
                continue
            if not copied:
                vm_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
                if local is None or not local.active:
                    images.remove_stale(vm_dir, None)  # copies of earlier boots
            file = images.vmdir_name(kind, boot_id)
            try:
                size, digest = await asyncio.to_thread(
                    images.copy_fd, kind, src.label, src.fd, vm_dir / file
                )
            except BaseException:
                for done in copied:  # no record will name them: do not leave them behind
                    (vm_dir / images.vmdir_name(done, boot_id)).unlink(missing_ok=True)
                raise
            paths[kind] = images.VMDIR_PREFIX + file
            copied[kind] = {
                "source": src.label,
                "by": caller.describe(),
                "size": size,
                "sha256": digest,
            }
            await progress(f"{kind}: {src.label} ({format_size(size)}) copied")
        return paths, copied

    async def _push_boot_files(
        self,
        name: str,
        boot_id: str,
        copied: dict[str, Any],
        placement: Placement,
        progress: Progress,
    ) -> None:
        """Send the VM's copied kernel/initrd to its other nodes (``boot_file_put``)."""
        vm_dir = self.vm_dir / name
        for node in dict.fromkeys(s.node for s in placement.shares):
            if node == self.name:
                continue
            for kind, meta in copied.items():
                await progress(f"sending the {kind} ({format_size(meta['size'])}) to {node}")
                path = vm_dir / images.vmdir_name(kind, boot_id)
                offset = 0
                while offset < meta["size"]:
                    _, chunk, _ = await asyncio.to_thread(
                        _read_chunk, path, offset, images.PUSH_CHUNK
                    )
                    if not chunk:
                        raise VmError(f"{path} shrank while it was sent to {node}")
                    params = {
                        "name": name,
                        "boot_id": boot_id,
                        "kind": kind,
                        "offset": offset,
                        "size": meta["size"],
                        "sha256": meta["sha256"],
                        "data": base64.b64encode(chunk).decode("ascii"),
                    }
                    await self.call(node, "boot_file_put", params, 30.0)
                    offset += len(chunk)

    async def _boot_shares(
        self,
        name: str,
        boot_id: str,
        request: dict[str, Any],
        placement: Placement,
        progress: Progress,
    ) -> None:
        multi = len(placement.shares) > 1
        addrs = []
        pubkeys = []
        for i, s in enumerate(placement.shares):
            await progress(f"preparing node {s.node}")
            r = await self.call(
                s.node,
                "share_prepare",
                {
                    "name": name,
                    "boot_id": boot_id,
                    "owner": self.name,
                    "node_index": i,
                    "vcpus": len(s.cpus),
                    "memory": s.mem_size,
                    "kernel": request["kernel"],
                    "initrd": request["initrd"],
                    "multi": multi,
                },
                15.0,
            )
            addrs.append(r["addr"])
            if multi:
                try:
                    pubkeys.append(check_key_hex(r.get("pubkey_hex"), "pubkey_hex"))
                except KeyMaterialError as e:
                    raise VmError(
                        f"node {s.node} answered share_prepare with a bad key: {e}"
                    ) from None
        spec = {
            "vcpus": request["vcpus"],
            "memory": request["memory"],
            "kernel": request["kernel"],
            "initrd": request["initrd"],
            "cmdline": request["cmdline"],
            "numa": placement.numa(),
            "console_stdout": False,
            "timeout_s": request["timeout_s"],
            # Explicit even for records from before CPU models: one model on every node.
            "cpu": request.get("cpu") or host_default_cpu_model(),
        }
        cluster = None
        if multi:
            # Public: each node derives its link keys from its own private key, the
            # others' public keys and this boot's session id (keys.py).
            cluster = {
                "nodes": [{"addr": a} for a in addrs],
                "boot_node": 0,
                "security": self.cfg.data_plane,
                "session_hex": new_session_hex(),
                "node_pubkeys_hex": pubkeys,
            }
            if self.cfg.transport != "tcp":
                cluster["transport"] = self.cfg.transport
            if request.get("foreign_budget") is not None:
                cluster["foreign_budget_pages"] = max(1, int(request["foreign_budget"]) // 4096)
            await progress(f"data plane: {self.cfg.data_plane} over {self.cfg.transport}")
            cur = self.store.get_vm(name)
            if cur is not None:  # shown by `dvmmctl status`
                placed = {**cur.placement, "data_plane": self.cfg.data_plane}
                self.store.update_vm(name, placement=placed)
        order = list(range(1, len(placement.shares))) + [0]
        for i in order:
            node = placement.shares[i].node
            await progress(
                f"starting worker on {node}" + (" (boot node)" if multi and i == 0 else "")
            )
            await self.call(
                node,
                "share_start",
                {
                    "name": name,
                    "boot_id": boot_id,
                    "node_index": i,
                    "spec": spec,
                    "cluster": cluster,
                },
                30.0,
            )

    async def _stop_shares(
        self, name: str, nodes: list[str], reason: str, force: bool
    ) -> list[str]:
        """Stop VM `name` on `nodes`; returns the nodes that could not be reached."""
        results = await asyncio.gather(
            *(
                self.call(
                    n,
                    "share_stop",
                    {"name": name, "force": force, "reason": reason},
                    self.cfg.stop_grace + 10.0,
                )
                for n in nodes
            ),
            return_exceptions=True,
        )
        failed = []
        for n, r in zip(nodes, results):
            if isinstance(r, BaseException):
                log.warning("VM %s: cannot stop worker on %s: %s", name, n, r)
                failed.append(n)
        return failed

    # --- owner-side operations -----------------------------------------------------

    async def _rpc_vm_list(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return [dict(r.to_json(), owner=self.name) for r in self.store.list_vms()]

    async def _rpc_vm_find(self, params: dict[str, Any]) -> dict[str, Any] | None:
        rec = self.store.get_vm(check_vm_name(params["name"]))
        return None if rec is None else dict(rec.to_json(), owner=self.name)

    async def _rpc_vm_op(self, params: dict[str, Any]) -> Any:
        name = check_vm_name(params["name"])
        rec = self.store.get_vm(name)
        if rec is None:
            raise VmError(f"no VM named {name!r} on node {self.name}")
        op = params["op"]
        args = params.get("args") or {}
        if op == "status":
            return dict(rec.to_json(), owner=self.name)
        if op == "stop":
            return await self.stop_owned(name, bool(args.get("force")))
        if op == "stats":
            return await self.stats_owned(name)
        if op == "rm":
            return await self.remove_owned(name)
        raise VmError(f"unknown VM operation {op!r}")

    async def stop_owned(self, name: str, force: bool) -> dict[str, Any]:
        async with self._lock(name):
            rec = self.store.get_vm(name)
            assert rec is not None
            if rec.state not in ACTIVE_STATES:
                raise VmError(f"VM {name} is not running ({rec.state}: {rec.reason})")
            reason = "stopped by user" + (" (forced)" if force else "")
            self.stop_reasons[name] = reason
            self.store.update_vm(name, state="stopping", reason="stopping")
            nodes = [s["node"] for s in rec.placement["shares"]]
            unreachable = await self._stop_shares(name, nodes, reason, force)
            for _ in range(50):
                rec = self.store.get_vm(name)
                assert rec is not None
                if rec.state not in ACTIVE_STATES:
                    break
                await asyncio.sleep(0.1)
            if rec.state in ACTIVE_STATES:
                extra = (
                    (
                        f"; node(s) {', '.join(unreachable)} unreachable (their daemons stop "
                        "orphaned workers)"
                    )
                    if unreachable
                    else ""
                )
                rec = self.store.update_vm(name, state="stopped", reason=reason + extra)
            self.stop_reasons.pop(name, None)
            return dict(rec.to_json(), owner=self.name)

    async def stats_owned(self, name: str) -> dict[str, Any]:
        rec = self.store.get_vm(name)
        assert rec is not None
        shares = rec.placement["shares"]
        res = await asyncio.gather(
            *(self.call(s["node"], "share_stats", {"name": name}) for s in shares),
            return_exceptions=True,
        )
        nodes = []
        for s, r in zip(shares, res):
            if isinstance(r, dict):
                nodes.append(r)
            else:
                nodes.append(
                    {
                        "node": s["node"],
                        "state": s.get("state"),
                        "stats": s.get("stats") or {},
                        "error": str(r),
                    }
                )
        return {"name": name, "state": rec.state, "reason": rec.reason, "nodes": nodes}

    async def remove_owned(self, name: str) -> dict[str, Any]:
        async with self._lock(name):
            rec = self.store.get_vm(name)
            assert rec is not None
            if rec.state in ACTIVE_STATES:
                raise VmError(f"VM {name} is {rec.state}; stop it first")
            nodes = [s["node"] for s in rec.placement["shares"]]
            if self.name not in nodes and (self.vm_dir / name).exists():
                nodes.append(self.name)  # the owner's copies of the kernel/initrd
            for node in nodes:
                try:
                    await self.call(node, "share_forget", {"name": name})
                except Exception as e:  # noqa: BLE001 -- best effort: the record goes anyway
                    log.info("VM %s: could not clean up on %s: %s", name, node, e)
            self.store.delete_vm(name)
            return {"name": name, "removed": True}

    async def on_share_exited(self, params: dict[str, Any]) -> dict[str, Any]:
        name, node = check_vm_name(params["name"]), check_node_name(params["node"])
        idx = int(params["node_index"])
        rec = self.store.get_vm(name)
        if rec is None or rec.request.get("boot_id") != params["boot_id"]:
            return {}
        shares = rec.placement["shares"]
        if not 0 <= idx < len(shares) or shares[idx]["node"] != node:
            raise VmError(f"share {idx} of VM {name} is not on {node}")
        result = params.get("result") or {}
        shares[idx].update(
            state=params["state"], reason=params["reason"], stats=result.get("stats")
        )
        if rec.state not in ACTIVE_STATES:
            self.store.update_vm(name, placement=rec.placement)
            return {}
        if idx != 0 and params["state"] != "failed" and name not in self.stop_reasons:
            self.store.update_vm(name, placement=rec.placement)
            return {}  # a non-boot node finished cleanly: the boot node decides
        stop_reason = self.stop_reasons.get(name)
        if stop_reason is not None:
            state, reason = "stopped", stop_reason
        elif idx == 0:
            state, reason = params["state"], params["reason"]
            if len(shares) > 1:
                reason += f" (boot node {node})"
        else:
            state, reason = "failed", f"worker on node {node}: {params['reason']}"
        log.info("VM %s: %s", name, reason)
        self.store.update_vm(
            name, state=state, reason=reason, result=result, placement=rec.placement
        )
        others = [
            s["node"]
            for i, s in enumerate(shares)
            if i != idx and s.get("state") in SHARE_ACTIVE_STATES
        ]
        if others and stop_reason is None:
            self.spawn(
                self._stop_shares(
                    name, others, f"VM {name} ended: {reason}", force=state == "failed"
                )
            )
        return {}

    # --- membership events ----------------------------------------------------------

    def on_member_event(self, ev: MemberEvent) -> None:
        if ev.name == self.name or not (ev.new in ("dead", "left") or ev.restarted):
            return
        why = ev.reason or f"node {ev.name} is {ev.new}"
        for rec in self.store.list_vms():
            nodes = [s["node"] for s in rec.placement["shares"]]
            if rec.state in ACTIVE_STATES and ev.name in nodes:
                reason = f"node {ev.name} failed: {why}"
                log.warning("VM %s: %s; stopping it", rec.name, reason)
                for s in rec.placement["shares"]:
                    if s["node"] == ev.name and s.get("state") in SHARE_ACTIVE_STATES:
                        s.update(state="lost", reason=why)
                self.store.update_vm(
                    rec.name, state="failed", reason=reason, placement=rec.placement
                )
                others = [n for n in nodes if n != ev.name]
                self.spawn(self._stop_shares(rec.name, others, reason, force=True))
        for sh in list(self.shares.values()):
            if sh.rec.owner == ev.name and sh.active:
                log.warning(
                    "VM %s: its owner %s is gone (%s); stopping the local worker",
                    sh.rec.vm,
                    ev.name,
                    why,
                )
                self.spawn(self._stop_local(sh, f"owner node {ev.name} failed: {why}", force=True))

    # --- share side (every node) ----------------------------------------------------

    def _reserve_port(self) -> int:
        lo, hi = self.cfg.data_ports
        host = self.cfg.advertise[0]
        for port in range(lo, hi + 1):
            if port in self.ports_in_use:
                continue
            try:
                with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                    s.bind((host, port))
            except OSError:
                continue
            self.ports_in_use.add(port)
            return port
        raise VmError(f"node {self.name}: no free data port in {lo}-{hi} (worker.data_ports)")

    def _release(self, sh: LocalShare) -> None:
        if sh.port is not None:
            self.ports_in_use.discard(sh.port)
            sh.port = None

    async def share_prepare(self, p: dict[str, Any]) -> dict[str, Any]:
        name = check_vm_name(p["name"])
        check_node_name(p["owner"])
        old = self.shares.get(name)
        if old is not None and old.active:
            if old.rec.boot_id == p["boot_id"]:
                host = self.cfg.advertise[0]
                return {
                    "addr": f"{host}:{old.port}" if old.port else "",
                    "pubkey_hex": old.key.public_hex if old.key else "",
                }
            raise VmError(f"node {self.name} already runs VM {name}")
        vcpus, memory = int(p["vcpus"]), int(p["memory"])
        used_v, used_m = self.used()
        if used_v + vcpus > self.cfg.vcpus:
            raise VmError(
                f"node {self.name} has {self.cfg.vcpus - used_v} free vCPUs, {vcpus} needed"
            )
        if used_m + memory > self.cfg.memory:
            raise VmError(
                f"node {self.name} has {format_size(self.cfg.memory - used_m)} free "
                f"memory, {format_size(memory)} needed"
            )
        for what in ("kernel", "initrd"):  # every node's worker loads the spec's files
            path = p.get(what)
            if not path:
                continue
            try:  # a copy the owner pushed into this node's VM directory (images.py)?
                copy = images.vmdir_file(path)
            except BootFileError as e:
                raise VmError(f"node {self.name}: {e}") from None
            if copy is not None:
                if not (self.vm_dir / name / copy).is_file():
                    raise VmError(f"{what} {copy} was not transferred to node {self.name}")
            elif not os.access(str(path), os.R_OK):
                raise VmError(f"{what} {path} is not readable on node {self.name}")
        d = self.vm_dir / name
        d.mkdir(parents=True, exist_ok=True, mode=0o750)
        rec = ShareRecord(
            vm=name,
            owner=str(p["owner"]),
            boot_id=str(p["boot_id"]),
            node_index=int(p["node_index"]),
            vcpus=vcpus,
            memory=memory,
            state="prepared",
        )
        sh = LocalShare(rec, d)
        if p.get("multi"):
            sh.port = self._reserve_port()
            sh.key = NodeKey.generate()  # the private half stays in this process
        self.store.put_share(rec)
        self.shares[name] = sh
        self.spawn(self._expire_prepared(sh))
        return {
            "addr": f"{self.cfg.advertise[0]}:{sh.port}" if sh.port else "",
            "pubkey_hex": sh.key.public_hex if sh.key else "",
        }

    async def _expire_prepared(self, sh: LocalShare) -> None:
        await asyncio.sleep(PREPARE_EXPIRY)
        if sh.rec.state == "prepared" and self.shares.get(sh.rec.vm) is sh:
            log.warning("VM %s: prepared but never started; releasing", sh.rec.vm)
            self._finish(sh, "failed", "prepared but never started", None)

    async def share_start(self, p: dict[str, Any]) -> dict[str, Any]:
        name = check_vm_name(p["name"])
        sh = self.shares.get(name)
        if sh is None or sh.rec.boot_id != p["boot_id"] or sh.rec.state != "prepared":
            raise VmError(f"VM {name} was not prepared on node {self.name}")
        # vmdir: kernel/initrd copies live in this node's own VM directory (images.py).
        spec = images.resolve_vmdir(dict(p["spec"]), sh.dir)
        spec["console_log"] = str(sh.console_path)
        cluster = p.get("cluster")
        boot_index = 0 if cluster is None else int(cluster.get("boot_node", 0))
        if int(p.get("node_index", 0)) == boot_index:
            try:
                self._open_console_input(sh)
            except OSError as e:
                self._finish(sh, "failed", f"cannot create the console input FIFO: {e}", None)
                raise VmError(
                    f"node {self.name}: cannot create {sh.console_in_path}: {e}"
                ) from None
            spec["console_input"] = str(sh.console_in_path)
        spec["cluster"] = (
            None if cluster is None else {"node_index": int(p["node_index"]), **cluster}
        )
        try:
            # Refuses a private key in the request: no key travels between nodes.
            spec = validate_spec(spec)
            if spec["cluster"] is not None:
                self._check_share_keys(sh, spec["cluster"])
        except SpecError as e:
            self._finish(sh, "failed", f"invalid VM spec: {e}", None)
            raise VmError(f"node {self.name}: invalid VM spec: {e}") from None
        for f in (sh.result_path, sh.console_path, sh.result_path.with_suffix(".json.stats")):
            f.unlink(missing_ok=True)
        _write_json(sh.spec_path, spec)
        sh.console_path.touch(mode=0o640)
        key, sh.key = sh.key, None  # from here on only the worker has it
        cmd = [*self.cfg.worker_command, str(sh.spec_path), str(sh.result_path)]
        if spec["cluster"] is not None:
            cmd.append("--key-stdin")
        logf = _open_log(sh.dir / "worker.log")
        try:
            self._release(sh)  # the worker binds the port itself now
            sh.proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE if key else asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                preexec_fn=_set_pdeathsig,
                cwd=str(sh.dir),
            )
        except OSError as e:
            self._finish(sh, "failed", f"cannot start worker {cmd[0]}: {e}", None)
            raise VmError(
                f"node {self.name}: cannot start worker ({' '.join(cmd[:3])}): {e}"
            ) from None
        finally:
            logf.close()
        if key is not None:
            await _send_key(sh.proc, key)
        sh.rec.state = "running"
        sh.rec.pid = sh.proc.pid
        self.store.put_share(sh.rec)
        log.info(
            "VM %s: worker pid %d started (node index %d)", name, sh.proc.pid, sh.rec.node_index
        )
        self.spawn(self._watch(sh))
        return {"pid": sh.proc.pid}

    def _check_share_keys(self, sh: LocalShare, cluster: dict[str, Any]) -> None:
        """The owner's cluster object must match this node: its setting and its key."""
        if cluster["security"] != self.cfg.data_plane:
            raise SpecError(
                f"the VM's data plane is {cluster['security']!r} but node {self.name} is "
                f"configured for {self.cfg.data_plane!r} (cluster.data_plane must be the "
                "same on every node)"
            )
        transport = cluster.get("transport", "tcp")
        if transport != self.cfg.transport:
            raise SpecError(
                f"the VM's data-plane transport is {transport!r} but node {self.name} is "
                f"configured for {self.cfg.transport!r} (cluster.transport must be the same "
                "on every node)"
            )
        mine = cluster["node_pubkeys_hex"][cluster["node_index"]]
        if sh.key is None or mine != sh.key.public_hex:
            raise SpecError(
                f"cluster.node_pubkeys_hex[{cluster['node_index']}] is not the key node "
                f"{self.name} made for this boot"
            )

    async def _watch(self, sh: LocalShare) -> None:
        assert sh.proc is not None
        rc = await sh.proc.wait()
        result = _read_json(sh.result_path)
        if result is None:
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            result = {
                "reason": "crash" if sh.stop_reason is None else "stopped",
                "status": None,
                "error": f"worker {how} without writing a result (see {sh.dir / 'worker.log'})",
                "vcpu_dump": None,
                "stats": {},
            }
        state, reason = classify(result, sh.stop_reason)
        self._finish(sh, state, reason, result)
        log.info("VM %s: worker on this node ended: %s", sh.rec.vm, reason)
        await self._report_exit(sh, result)

    def _open_console_input(self, sh: LocalShare) -> None:
        self._close_console_input(sh)
        sh.console_in_path.unlink(missing_ok=True)
        os.mkfifo(sh.console_in_path, 0o600)
        sh.console_in_fd = os.open(sh.console_in_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def _close_console_input(self, sh: LocalShare) -> None:
        if sh.console_in_fd is not None:
            os.close(sh.console_in_fd)
            sh.console_in_fd = None

    def _finish(
        self, sh: LocalShare, state: str, reason: str, result: dict[str, Any] | None
    ) -> None:
        self._release(sh)
        self._close_console_input(sh)
        sh.rec.state, sh.rec.reason, sh.rec.result, sh.rec.pid = state, reason, result, None
        self.store.put_share(sh.rec)
        sh.done.set()

    async def _report_exit(self, sh: LocalShare, result: dict[str, Any]) -> None:
        params = {
            "name": sh.rec.vm,
            "boot_id": sh.rec.boot_id,
            "node": self.name,
            "node_index": sh.rec.node_index,
            "state": sh.rec.state,
            "reason": sh.rec.reason,
            "result": result,
        }
        for attempt in range(5):
            try:
                await self.call(sh.rec.owner, "share_exited", params)
                return
            except Exception as e:  # noqa: BLE001 -- retried, then logged
                if attempt == 4 or self.membership.state_of(sh.rec.owner) in ("dead", "left"):
                    log.warning(
                        "VM %s: cannot report the worker's exit to owner %s: %s",
                        sh.rec.vm,
                        sh.rec.owner,
                        e,
                    )
                    return
                await asyncio.sleep(1.0)

    async def _stop_local(self, sh: LocalShare, reason: str, force: bool) -> None:
        if sh.proc is None:
            if sh.rec.state == "prepared":
                self._finish(sh, "stopped", reason, None)
            return
        if sh.proc.returncode is not None or sh.done.is_set():
            return
        if sh.stop_reason is None:
            sh.stop_reason = reason
        sh.rec.state = "stopping"
        self.store.put_share(sh.rec)
        pid = sh.proc.pid
        if not force:
            _kill(pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(sh.done.wait(), self.cfg.stop_grace)
                return
            except TimeoutError:
                log.warning(
                    "VM %s: worker %d ignored SIGTERM for %.0fs; killing it",
                    sh.rec.vm,
                    pid,
                    self.cfg.stop_grace,
                )
        _kill(pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(sh.done.wait(), 10.0)
        except TimeoutError:
            log.error("VM %s: worker %d did not die after SIGKILL", sh.rec.vm, pid)

    async def share_stop(self, p: dict[str, Any]) -> dict[str, Any]:
        sh = self.shares.get(check_vm_name(p["name"]))
        if sh is None:
            return {"state": "absent"}
        await self._stop_local(sh, str(p.get("reason") or "stopped"), bool(p.get("force")))
        return {"state": sh.rec.state}

    async def share_forget(self, p: dict[str, Any]) -> dict[str, Any]:
        # The name becomes a path to delete: "../../x" must never reach the file system.
        name = check_vm_name(p["name"])
        sh = self.shares.get(name)
        if sh is not None and sh.active:
            raise VmError(f"VM {name} is still active on node {self.name}")
        self.shares.pop(name, None)
        self.store.delete_share(name)
        d = self.vm_dir / name
        if d.is_symlink():
            d.unlink()  # never follow a link out of the state directory
        elif d.is_dir():
            shutil.rmtree(d)
        return {}

    async def boot_file_put(self, p: dict[str, Any]) -> dict[str, Any]:
        """Receive one chunk of a VM's copied kernel/initrd from its owner (images.py)."""
        name = check_vm_name(p["name"])
        boot_id, kind = str(p["boot_id"]), str(p["kind"])
        sh = self.shares.get(name)
        if sh is not None and sh.active and sh.rec.boot_id != boot_id:
            raise VmError(f"node {self.name} already runs VM {name}")
        try:
            data = base64.b64decode(str(p["data"]), validate=True)
        except ValueError:
            raise VmError(f"boot_file_put: {kind} data is not valid base64") from None
        offset, size, sha256 = int(p["offset"]), int(p["size"]), str(p["sha256"])
        d = self.vm_dir / name
        if offset == 0 and (sh is None or not sh.active):
            images.remove_stale(d, boot_id)
        try:
            done = await asyncio.to_thread(
                images.PartialFile.put, d, kind, boot_id, offset, data, size, sha256
            )
        except BootFileError as e:
            raise VmError(f"node {self.name}: {e}") from None
        return {"done": done}

    def live_stats(self, sh: LocalShare) -> dict[str, Any]:
        if sh.rec.result is not None and isinstance(sh.rec.result.get("stats"), dict):
            return dict(sh.rec.result["stats"])
        return _read_json(sh.result_path.with_suffix(".json.stats")) or {}

    async def share_stats(self, p: dict[str, Any]) -> dict[str, Any]:
        name = check_vm_name(p["name"])
        sh = self.shares.get(name)
        if sh is None:
            rec = self.store.get_share(name)
            if rec is None:
                raise VmError(f"VM {name} has no worker on node {self.name}")
            sh = LocalShare(rec, self.vm_dir / name)
        return {
            "node": self.name,
            "node_index": sh.rec.node_index,
            "state": sh.rec.state,
            "reason": sh.rec.reason,
            "pid": sh.rec.pid,
            "stats": self.live_stats(sh),
        }

    async def console_read(self, p: dict[str, Any]) -> dict[str, Any]:
        name = check_vm_name(p["name"])
        offset = max(0, int(p.get("offset", 0)))
        sh = self.shares.get(name)
        path = self.vm_dir / name / "console.log"
        offset, data, size = _read_chunk(path, offset, CONSOLE_CHUNK)
        return {
            "data": data.decode("utf-8", "replace"),
            "offset": offset + len(data),
            "size": size,
            "active": bool(sh is not None and sh.active),
        }

    async def console_write(self, p: dict[str, Any]) -> dict[str, Any]:
        """Write base64 `data` into the console input FIFO of the local boot share."""
        name = check_vm_name(p["name"])
        try:
            data = base64.b64decode(str(p.get("data", "")), validate=True)
        except ValueError:
            raise VmError("console input: data is not valid base64") from None
        sh = self.shares.get(name)
        if sh is None or not sh.active or sh.console_in_fd is None:
            raise VmError(f"VM {name} is not running with its console on node {self.name}")
        fd = sh.console_in_fd
        deadline = time.monotonic() + CONSOLE_WRITE_TIMEOUT_S
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
                view = view[n:]
            except BlockingIOError:
                # The pipe is full: the guest is not reading its console.
                if time.monotonic() > deadline:
                    raise VmError(
                        f"VM {name}: console input not consumed "
                        f"({len(data) - len(view)} of {len(data)} bytes sent)"
                    ) from None
                await asyncio.sleep(0.02)
                if sh.console_in_fd != fd:
                    raise VmError(f"VM {name} stopped") from None
        return {"written": len(data)}

    # --- shutdown --------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Daemon stop: stop every local worker (gracefully, bounded by stop_grace)."""
        if self.on_member_event in self.membership.listeners:
            self.membership.listeners.remove(self.on_member_event)
        for rec in self.store.list_vms():
            if rec.state in ACTIVE_STATES:
                self.stop_reasons[rec.name] = f"dvmmd on {self.name} shut down"
        active = [s for s in self.shares.values() if s.active]
        await asyncio.gather(
            *(self._stop_local(s, f"dvmmd on {self.name} shut down", force=False) for s in active),
            return_exceptions=True,
        )
        await asyncio.sleep(0)
        for rec in self.store.list_vms():
            if rec.state in ACTIVE_STATES:
                self.store.update_vm(
                    rec.name, state="stopped", reason=f"dvmmd on {self.name} shut down"
                )
        for t in list(self.tasks):
            t.cancel()


#: How long console_write waits for a full console input pipe to drain.
CONSOLE_WRITE_TIMEOUT_S = 5.0


def _open_log(path: Path) -> BinaryIO:
    return open(path, "ab")  # handed to the child, closed after the spawn


def _read_chunk(path: Path, offset: int, limit: int) -> tuple[int, bytes, int]:
    """(offset actually used, up to `limit` bytes from it, file size); a missing file is
    empty, an offset past the end (the log was recreated by a new boot) restarts at 0."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset > size:
                offset = 0
            f.seek(offset)
            return offset, f.read(limit), size
    except FileNotFoundError:
        return 0, b"", 0


async def _send_key(proc: asyncio.subprocess.Process, key: NodeKey) -> None:
    """Hand the worker its private key on stdin (one line), then close the pipe."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(key.private_hex.encode("ascii") + b"\n")
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the worker died at once: _watch reports its exit
    finally:
        proc.stdin.close()


def _kill(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the worker leads its own session/process group
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _ranges(cpus: tuple[int, ...]) -> str:
    if not cpus:
        return "-"
    return f"{cpus[0]}" if len(cpus) == 1 else f"{cpus[0]}-{cpus[-1]}"
