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
   reserves a data-path port and answers its address;
2. ``share_start`` on n1..nk, then n0: each node writes its spec (the common spec +
   ``cluster = {node_index, nodes[{addr}], secret_hex, boot_node: 0}``) and spawns.

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
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .config import Config, is_valid_name, parse_memory
from .membership import MemberEvent, Membership
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
        secret: bytes,
        policy: PlacementPolicy = default_policy,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.node_name
        self.store = store
        self.membership = membership
        self._remote_call = call
        self.secret = secret
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
        }
        h = handlers.get(method)
        if h is None:
            raise VmError(f"unknown method {method!r}")
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

    async def boot(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        name = args.get("name")
        if not isinstance(name, str) or not is_valid_name(name):
            raise VmError(
                f"invalid VM name {name!r} (1-63 of A-Z a-z 0-9 _ . -, starting alphanumeric)"
            )
        try:
            vcpus = int(args.get("vcpus", 1))
            memory = check_guest_memory(parse_memory(args.get("memory", "256M")))
        except (TypeError, ValueError) as e:  # SizeError is a ValueError
            raise VmError(f"bad vCPU count or memory size: {e}") from None
        if not 1 <= vcpus <= MAX_VCPUS:
            raise VmError(f"a VM has 1 to {MAX_VCPUS} vCPUs, not {vcpus}")
        kernel = args.get("kernel") or self.cfg.default_kernel
        if not kernel:
            try:
                kernel = str(find_bundled_guest())
            except SpecError as e:
                raise VmError(
                    f"no kernel given (--kernel), no vm.kernel in {self.cfg.path}, and {e}"
                ) from None
        nodes = args.get("nodes")
        if nodes is not None and (
            not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes)
        ):
            raise VmError("nodes must be a list of node names")
        timeout_s = float(args.get("timeout_s") or 0)
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
            request = {
                "vcpus": vcpus,
                "memory": memory,
                "kernel": kernel,
                "initrd": args.get("initrd"),
                "cmdline": args.get("cmdline") or DEFAULT_CMDLINE,
                "nodes": nodes,
                "timeout_s": timeout_s,
                "boot_id": boot_id,
                "cpu": cpu,
            }
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
            cluster = {
                "nodes": [{"addr": a} for a in addrs],
                "secret_hex": self.secret.hex(),
                "boot_node": 0,
            }
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
        rec = self.store.get_vm(str(params["name"]))
        return None if rec is None else dict(rec.to_json(), owner=self.name)

    async def _rpc_vm_op(self, params: dict[str, Any]) -> Any:
        name = str(params["name"])
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
            for s in rec.placement["shares"]:
                try:
                    await self.call(s["node"], "share_forget", {"name": name})
                except Exception as e:  # noqa: BLE001 -- best effort: the record goes anyway
                    log.info("VM %s: could not clean up on %s: %s", name, s["node"], e)
            self.store.delete_vm(name)
            return {"name": name, "removed": True}

    async def on_share_exited(self, params: dict[str, Any]) -> dict[str, Any]:
        name, node, idx = str(params["name"]), str(params["node"]), int(params["node_index"])
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
        name = str(p["name"])
        if not is_valid_name(name):
            raise VmError(f"invalid VM name {name!r}")
        old = self.shares.get(name)
        if old is not None and old.active:
            if old.rec.boot_id == p["boot_id"]:
                host = self.cfg.advertise[0]
                return {"addr": f"{host}:{old.port}" if old.port else ""}
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
            if path and not os.access(str(path), os.R_OK):
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
        self.store.put_share(rec)
        self.shares[name] = sh
        self.spawn(self._expire_prepared(sh))
        return {"addr": f"{self.cfg.advertise[0]}:{sh.port}" if sh.port else ""}

    async def _expire_prepared(self, sh: LocalShare) -> None:
        await asyncio.sleep(PREPARE_EXPIRY)
        if sh.rec.state == "prepared" and self.shares.get(sh.rec.vm) is sh:
            log.warning("VM %s: prepared but never started; releasing", sh.rec.vm)
            self._finish(sh, "failed", "prepared but never started", None)

    async def share_start(self, p: dict[str, Any]) -> dict[str, Any]:
        name = str(p["name"])
        sh = self.shares.get(name)
        if sh is None or sh.rec.boot_id != p["boot_id"] or sh.rec.state != "prepared":
            raise VmError(f"VM {name} was not prepared on node {self.name}")
        spec = dict(p["spec"])
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
            spec = validate_spec(spec)
        except SpecError as e:
            self._finish(sh, "failed", f"invalid VM spec: {e}", None)
            raise VmError(f"node {self.name}: invalid VM spec: {e}") from None
        for f in (sh.result_path, sh.console_path, sh.result_path.with_suffix(".json.stats")):
            f.unlink(missing_ok=True)
        _write_json(sh.spec_path, spec)
        sh.console_path.touch(mode=0o640)
        cmd = [*self.cfg.worker_command, str(sh.spec_path), str(sh.result_path)]
        logf = _open_log(sh.dir / "worker.log")
        try:
            self._release(sh)  # the worker binds the port itself now
            sh.proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
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
        sh.rec.state = "running"
        sh.rec.pid = sh.proc.pid
        self.store.put_share(sh.rec)
        log.info(
            "VM %s: worker pid %d started (node index %d)", name, sh.proc.pid, sh.rec.node_index
        )
        self.spawn(self._watch(sh))
        return {"pid": sh.proc.pid}

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
        sh = self.shares.get(str(p["name"]))
        if sh is None:
            return {"state": "absent"}
        await self._stop_local(sh, str(p.get("reason") or "stopped"), bool(p.get("force")))
        return {"state": sh.rec.state}

    async def share_forget(self, p: dict[str, Any]) -> dict[str, Any]:
        name = str(p["name"])
        sh = self.shares.get(name)
        if sh is not None and sh.active:
            raise VmError(f"VM {name} is still active on node {self.name}")
        self.shares.pop(name, None)
        self.store.delete_share(name)
        d = self.vm_dir / name
        if d.is_dir():
            for f in d.iterdir():
                f.unlink(missing_ok=True)
            d.rmdir()
        return {}

    def live_stats(self, sh: LocalShare) -> dict[str, Any]:
        if sh.rec.result is not None and isinstance(sh.rec.result.get("stats"), dict):
            return dict(sh.rec.result["stats"])
        return _read_json(sh.result_path.with_suffix(".json.stats")) or {}

    async def share_stats(self, p: dict[str, Any]) -> dict[str, Any]:
        name = str(p["name"])
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
        name = str(p["name"])
        if not is_valid_name(name):
            raise VmError(f"invalid VM name {name!r}")
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
        name = str(p["name"])
        if not is_valid_name(name):
            raise VmError(f"invalid VM name {name!r}")
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
