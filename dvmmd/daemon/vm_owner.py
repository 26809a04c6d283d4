"""The VMs this daemon owns: definition, placement, boot, stop, state, failures.

The daemon that is asked to boot a VM *owns* it: it stores the definition and state
(store.vms), runs the placement policy (dvmmd.vm.placement), and drives the boot over
the nodes' shares (node_share.py), itself included. Any daemon answers the
cluster-wide user operations (list, status, console, stop, rm, stats) by finding the
VM's owner.

Boot of a VM over nodes n0..nk (n0 = boot node: BSP and console): ``share_prepare``
on every node, then ``share_start`` on n1..nk, then n0.

Exit. The boot node's worker result is the VM's result. A worker that fails on any
node fails the VM, naming the node; the owner then stops the other workers. A member
that dies, leaves or restarts (membership.py) fails every VM with a share there. A
restarted daemon marks whatever was running as failed (store.fail_active).

Periodic snapshots (``snapshot_every_s``, dvmmd.vm.periodic_snapshots): the boot node
snapshots the VM every interval; such a VM, when it fails or loses a node while
running, goes to vm_recovery.py instead, which restores it from its last snapshot on
the surviving nodes if a node was lost (and fails it as above otherwise).
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dvmmd.config import Config, parse_memory
from dvmmd.daemon.membership import MemberEvent, Membership
from dvmmd.daemon.node_share import NodeShares, read_chunk
from dvmmd.daemon.store import ACTIVE_STATES, SHARE_ACTIVE_STATES, Store, VmRecord
from dvmmd.daemon.vm_common import BackgroundTasks, CallFn, Emit, Progress, VmError, log
from dvmmd.daemon.vm_recovery import VmRecovery, recovered_note
from dvmmd.security.keys import KeyMaterialError, check_key_hex, new_session_hex
from dvmmd.vm import boot_files, periodic_snapshots
from dvmmd.vm.boot_files import BootFileError, BootSource, Caller
from dvmmd.vm.names import check_node_name, check_vm_name
from dvmmd.vm.periodic_snapshots import UsableSnapshot
from dvmmd.vm.placement import (
    NodeResources,
    Placement,
    PlacementError,
    PlacementPolicy,
    PlacementRequest,
    default_policy,
    place,
)
from dvmmd.vm.sizes import check_guest_memory, format_size
from dvmmd.vm.snapshots import SnapshotSpecError, read_info
from dvmmd.vm.spec import (
    DEFAULT_CMDLINE,
    MAX_VCPUS,
    SpecError,
    check_cpu_model,
    find_bundled_guest,
    host_default_cpu_model,
)
from dvmmd.worker import multinode_supported


class VmOwner:
    """The VMs this node owns, and the cluster-wide user operations on any VM."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        membership: Membership,
        call: CallFn,
        tasks: BackgroundTasks,
        local_shares: NodeShares,
        policy: PlacementPolicy = default_policy,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.node_name
        self.store = store
        self.membership = membership
        self.call = call
        self.spawn = tasks.spawn
        self.local_shares = local_shares
        self.policy = policy
        self.vm_dir = cfg.state_dir / "vms"
        self.stop_reasons: dict[str, str] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.recovery = VmRecovery(self)

    def _lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    def startup(self) -> None:
        """Called once at daemon start: whatever was running lost its workers."""
        vms, shares = self.store.fail_active("dvmmd restarted; the VM's worker(s) were lost")
        for v in vms:
            log.warning("VM %s was active when dvmmd stopped; marked failed", v)
        for s in shares:
            log.warning("worker of VM %s on this node was lost with the previous dvmmd", s)

    async def shutdown(self, reason: str, stop_local: Any) -> None:
        """Daemon stop: every VM owned here that is active ends as stopped."""
        for rec in self.store.list_vms():
            if rec.state in ACTIVE_STATES:
                self.stop_reasons[rec.name] = reason
        await stop_local(reason)
        await asyncio.sleep(0)
        for rec in self.store.list_vms():
            if rec.state in ACTIVE_STATES:
                self.store.update_vm(rec.name, state="stopped", reason=reason)

    def rpc_handlers(self) -> dict[str, Any]:
        return {
            "vm_list": self._rpc_vm_list,
            "vm_find": self._rpc_vm_find,
            "vm_op": self._rpc_vm_op,
            "share_exited": self.on_share_exited,
        }

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
        """Stream the console of VM `name` from its boot node; returns the final status.

        A recovery (vm_recovery.py) restarts the VM under a new boot id: the stream
        then goes on from the new boot node (the same log, continued, when the boot
        node survived; else its new log from the start)."""
        rec = await self.op("status", name, {})
        boot, boot_id = _boot_of(rec)
        offset = 0
        idle = 0
        while True:
            r = await self._console_read(boot, name, offset, follow)
            if r is not None and r["data"]:
                await emit({"event": "console", "data": r["data"]})
                offset = r["offset"]
                idle = 0
                continue
            if not follow:
                break
            idle += 1
            if r is None or idle % 5 == 0 or not r["active"]:
                rec = await self.op("status", name, {})
                if _boot_of(rec)[1] != boot_id:  # recovered: follow the new run
                    new_boot, boot_id = _boot_of(rec)
                    offset = offset if new_boot == boot else 0
                    boot = new_boot
                    continue
                if rec["state"] not in ACTIVE_STATES and (r is None or not r["active"]):
                    r = await self._console_read(boot, name, offset, follow)
                    if r is not None and r["data"]:
                        await emit({"event": "console", "data": r["data"]})
                    break
            await asyncio.sleep(0.2)
        return await self.op("status", name, {})  # type: ignore[no-any-return]

    async def _console_read(
        self, node: str, name: str, offset: int, follow: bool
    ) -> dict[str, Any] | None:
        """One console_read; when following, None for a boot node that cannot be asked
        (lost: the VM may be recovering elsewhere)."""
        try:
            r = await self.call(node, "console_read", {"name": name, "offset": offset})
        except Exception:
            if not follow:
                raise
            return None
        return r  # type: ignore[no-any-return]

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

    async def start(self, name: str, progress: Progress) -> dict[str, Any]:
        """Boot VM `name` again from its stored definition (``dvmmctl start NAME``), on
        the node that owns it: the same request (vCPUs, memory, kernel, initrd, command
        line, nodes, timeout, CPU model), placed afresh."""
        owner = await self.locate(name)
        if owner != self.name:
            await progress(f"VM {name} is owned by {owner}: starting it there")
            return await self.call(  # type: ignore[no-any-return]
                owner, "vm_op", {"op": "start", "name": name, "args": {}}, 300.0
            )
        return await self.start_owned(name, progress)

    async def start_owned(self, name: str, progress: Progress) -> dict[str, Any]:
        rec = self.store.get_vm(name)
        if rec is None:
            raise VmError(f"no VM named {name!r} on node {self.name}")
        if rec.state in ACTIVE_STATES:
            raise VmError(f"VM {name} is already {rec.state}")
        req = rec.request
        args: dict[str, Any] = {
            "name": name,
            **{k: req.get(k) for k in ("vcpus", "memory", "cmdline", "timeout_s", "cpu")},
            "nodes": req.get("nodes"),
            "foreign_budget": req.get("foreign_budget"),
        }
        snap = req.get(periodic_snapshots.REQUEST_KEY)
        if snap:
            args["snapshot_every_s"] = snap["every_s"]
            args["snapshot_dir"] = snap["dir"] if snap.get("explicit") else None
        # The boot files were vetted when the VM was defined: a path is used in place,
        # a copy (vmdir:) in the owner's VM directory is copied again for this boot.
        sources: dict[str, BootSource | None] = {}
        copies = req.get("boot_files") or {}
        try:
            for kind in boot_files.KINDS:
                value = req.get(kind)
                copy = boot_files.vmdir_file(value)
                if not value:
                    sources[kind] = None
                elif copy is None:
                    sources[kind] = BootSource(kind, str(value), path=str(value))
                else:
                    label = str((copies.get(kind) or {}).get("source") or value)
                    try:
                        fd = os.open(self.vm_dir / name / copy, os.O_RDONLY | os.O_CLOEXEC)
                    except OSError as e:
                        raise VmError(
                            f"VM {name}: its {kind} copy {copy} is gone ({e.strerror}); "
                            f"boot it again with --{kind}"
                        ) from None
                    sources[kind] = BootSource(kind, label, fd=fd, owned_fd=True)
            by = Caller(uid=0, pid=os.getpid())  # the copy is the daemon's own file
            return await self._boot(args, progress, by, sources)
        except BootFileError as e:
            raise VmError(str(e)) from None
        finally:
            for src in sources.values():
                if src is not None and src.owned_fd and src.fd is not None:
                    os.close(src.fd)

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
        them): see boot_files.py. The caller closes `fds`; descriptors opened here are
        closed here.
        """
        sources: dict[str, BootSource | None] = {}
        try:
            for kind in boot_files.KINDS:
                sources[kind] = boot_files.resolve(kind, args, fds, caller, self.cfg.images_dir)
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
        restore = _restore_of(args)
        if restore is not None:
            # The VM's shape is the snapshot's (the guest cannot change under it).
            info = restore.info
            args = dict(args, vcpus=info.vcpus, memory=info.memory, cpu=info.cpu)
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
        snapshot = self._snapshot_settings(name, args, caller)
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
            if snapshot is not None:
                request[periodic_snapshots.REQUEST_KEY] = dict(snapshot, since=time.time())
            if copied:
                request["boot_files"] = copied
            if restore is not None:
                request["restored_from"] = str(restore.info.dir)
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
                await self._boot_shares(
                    name, boot_id, request, placement, progress, restore=restore
                )
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

    def _snapshot_settings(
        self, name: str, args: dict[str, Any], caller: Caller
    ) -> dict[str, Any] | None:
        """The VM's periodic snapshots ({every_s, dir, explicit}) from ``snapshot_every_s``
        and ``snapshot_dir``; None without an interval. Only a local root caller names
        the directory (the daemon replaces it at every snapshot); the default is
        ``<vm.snapshot_dir>/<name>``, its parent made here (every node must see it)."""
        try:
            every = periodic_snapshots.check_every(args.get("snapshot_every_s"))
            chosen = periodic_snapshots.check_dir(args.get("snapshot_dir"))
        except periodic_snapshots.SnapshotOptionError as e:
            raise VmError(str(e)) from None
        if every is None:
            if chosen is not None:
                raise VmError("snapshot_dir needs snapshot_every_s (the snapshot interval)")
            return None
        if chosen is not None and not caller.is_local_root:
            raise VmError(
                f"snapshot_dir: only root may choose where {caller.describe()}'s VM's "
                f"snapshots go (the default is {self.cfg.snapshot_base}/{name})"
            )
        if chosen is not None:
            return {"every_s": every, "dir": str(chosen), "explicit": True}
        base = self.cfg.snapshot_base
        try:
            base.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as e:
            raise VmError(f"snapshot directory {base}/{name}: cannot make {base}: {e}") from None
        return {"every_s": every, "dir": str(base / name), "explicit": False}

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
        for kind, src in sources.items():
            if src is None or src.fd is None:
                paths[kind] = None if src is None else src.path
                continue
            if not copied:
                vm_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
                if not self.local_shares.is_active(name):
                    boot_files.remove_stale(vm_dir, None)  # copies of earlier boots
            file = boot_files.vmdir_name(kind, boot_id)
            try:
                size, digest = await asyncio.to_thread(
                    boot_files.copy_fd, kind, src.label, src.fd, vm_dir / file
                )
            except BaseException:
                for done in copied:  # no record will name them: do not leave them behind
                    (vm_dir / boot_files.vmdir_name(done, boot_id)).unlink(missing_ok=True)
                raise
            paths[kind] = boot_files.VMDIR_PREFIX + file
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
                path = vm_dir / boot_files.vmdir_name(kind, boot_id)
                offset = 0
                while offset < meta["size"]:
                    _, chunk, _ = await asyncio.to_thread(
                        read_chunk, path, offset, boot_files.PUSH_CHUNK
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
        *,
        restore: UsableSnapshot | None = None,
        console: dict[str, Any] | None = None,
    ) -> None:
        """Prepare and start the VM's shares. `restore`: start from that snapshot
        instead of booting; `console`: the boot node's ``console_keep``/``console_note``
        (a recovery's console goes on from the lost run's)."""
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
        spec, layout = _common_spec(request, placement, restore)
        cluster = None
        if multi:
            # Public: each node derives its link keys from its own private key, the
            # others' public keys and this boot's session id (dvmmd.security.keys).
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
            if layout is not None:
                cluster["placement"] = layout
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
            params: dict[str, Any] = {
                "name": name,
                "boot_id": boot_id,
                "node_index": i,
                "spec": spec,
                "cluster": cluster,
            }
            if i == 0 and console:
                params.update(console)
            await self.call(node, "share_start", params, 30.0)

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
        if op == "start":
            return await self.start_owned(name, _no_progress)
        if op in ("snapshot", "migrate_vcpu", "placement"):
            return await self.control_owned(rec, op, args)
        if op == "drain":
            return await self.drain_owned(rec, check_node_name(args.get("node")))
        raise VmError(f"unknown VM operation {op!r}")

    async def drain(self, node: str, progress: Progress) -> dict[str, Any]:
        """``dvmmctl drain NODE``: move every running VM off `node` (each by its
        owner: vm_recovery.py's drain), one at a time; what happened to each."""
        check_node_name(node)
        vms = [
            v
            for v in (await self.list_all())["vms"]
            if v["state"] == "running" and node in [s["node"] for s in v["placement"]["shares"]]
        ]
        done: list[dict[str, Any]] = []
        for v in vms:
            await progress(f"VM {v['name']}: moving it off {node} (owner {v['owner']})")
            try:
                r = await self.call(
                    v["owner"],
                    "vm_op",
                    {"op": "drain", "name": v["name"], "args": {"node": node}},
                    900.0,
                )
                done.append({"name": v["name"], "state": r["state"], "reason": r["reason"]})
            except Exception as e:  # noqa: BLE001 -- reported per VM; the others go on
                done.append({"name": v["name"], "error": str(e)})
            await progress(f"VM {v['name']}: {done[-1].get('reason') or done[-1].get('error')}")
        return {"node": node, "vms": done}

    async def drain_owned(self, rec: Any, node: str) -> dict[str, Any]:
        """Move VM `rec` off `node` (snapshot, then restore on its other nodes)."""
        if rec.state != "running":
            raise VmError(f"VM {rec.name} is not running ({rec.state}: {rec.reason})")
        settings = rec.request.get(periodic_snapshots.REQUEST_KEY)
        if settings:
            target = str(settings["dir"])
        else:
            base = self.cfg.snapshot_base
            try:
                base.mkdir(parents=True, exist_ok=True, mode=0o750)
            except OSError as e:
                raise VmError(f"drain: cannot make {base}: {e}") from None
            target = str(base / f"{rec.name}.drain")
        await self.recovery.drain(rec, node, target)
        cur = self.store.get_vm(rec.name)
        assert cur is not None
        return dict(cur.to_json(), owner=self.name)

    async def control_owned(self, rec: Any, op: str, args: dict[str, Any]) -> Any:
        """Ask the running VM, through its boot node's control socket, for a
        snapshot, a vCPU migration (``node``: a node name or index) or where
        its vCPUs run (rust/src/vm/control.rs)."""
        if rec.state != "running":
            raise VmError(f"VM {rec.name} is not running ({rec.state}: {rec.reason})")
        shares = rec.placement["shares"]
        names = [s["node"] for s in shares]
        if op == "snapshot":
            try:
                target = periodic_snapshots.check_dir(args["dir"])
            except periodic_snapshots.SnapshotOptionError as e:
                raise VmError(str(e).replace("snapshot_dir", "snapshot directory")) from None
            req: dict[str, Any] = {
                "op": "snapshot",
                "dir": str(target),
                "leave_running": bool(args.get("leave_running")),
            }
        elif op == "migrate_vcpu":
            node = args["node"]
            if isinstance(node, str) and node in names:
                node = names.index(node)
            if not isinstance(node, int) or not 0 <= node < len(names):
                raise VmError(
                    f"VM {rec.name} runs on {', '.join(names)}: no node {args['node']!r} there"
                )
            req = {"op": "migrate", "vcpu": int(args["vcpu"]), "node": node}
        else:
            req = {"op": "placement"}
        report = await self.call(
            names[0], "share_control", {"name": rec.name, "request": req}, 660.0
        )
        if op == "placement" and isinstance(report, dict):
            report = dict(report, nodes=names)
        return report

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
            await asyncio.to_thread(periodic_snapshots.remove_default, rec.request, name)
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
        if rec.state not in ACTIVE_STATES or self.recovery.absorbs_exit(name, params["boot_id"]):
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
        if state == "failed" and stop_reason is None and self.recovery.may_recover(rec, result):
            self.recovery.begin(rec, reason)  # a node lost? the recovery finds out
            return {}
        reason += recovered_note(rec.request)
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
                if self.recovery.absorbs_loss(rec.name, ev.name):
                    continue
                reason = f"node {ev.name} failed: {why}"
                for s in rec.placement["shares"]:
                    if s["node"] == ev.name and s.get("state") in SHARE_ACTIVE_STATES:
                        s.update(state="lost", reason=why)
                if self.recovery.may_recover(rec):
                    self.recovery.begin(rec, reason, lost=ev.name)
                    continue
                log.warning("VM %s: %s; stopping it", rec.name, reason)
                self.store.update_vm(
                    rec.name, state="failed", reason=reason, placement=rec.placement
                )
                others = [n for n in nodes if n != ev.name]
                self.spawn(self._stop_shares(rec.name, others, reason, force=True))


def _common_spec(
    request: dict[str, Any], placement: Placement, restore: UsableSnapshot | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The spec every node's share gets (before its ``cluster``), and, for a restore
    whose shares differ from the guest's NUMA nodes, ``cluster.placement``."""
    spec: dict[str, Any] = {
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
    settings = request.get(periodic_snapshots.REQUEST_KEY)
    if settings:
        spec["snapshot"] = periodic_snapshots.plan(settings)
    if restore is None:
        return spec, None
    # The guest keeps the snapshot's shape: its NUMA nodes, its CPU model.
    numa, layout = periodic_snapshots.restore_layout(restore.info, placement)
    spec.update(restore=str(restore.info.dir), numa=numa, cpu=restore.info.cpu)
    return spec, layout


def _restore_of(args: dict[str, Any]) -> periodic_snapshots.UsableSnapshot | None:
    """A ``boot`` with ``restore_dir`` (``dvmmctl restore DIR NAME``): the snapshot
    there, checked as a restore needs it (its manifest; the VMM checks every file)."""
    d = args.get("restore_dir")
    if d is None:
        return None
    if not isinstance(d, str) or not os.path.isabs(d):
        raise VmError(f"restore_dir must be an absolute path, not {d!r}")
    try:
        info = read_info(d)
    except SnapshotSpecError as e:
        raise VmError(f"restore: {e}") from None
    taken = periodic_snapshots.taken_unix_s(Path(d))
    return periodic_snapshots.UsableSnapshot(info, taken or 0)


def _boot_of(status: dict[str, Any]) -> tuple[str, str]:
    """(boot node, boot id) of a VM's status: where its console is, and for which run."""
    return status["placement"]["shares"][0]["node"], str(status["request"].get("boot_id"))


def _ranges(cpus: tuple[int, ...]) -> str:
    if not cpus:
        return "-"
    return f"{cpus[0]}" if len(cpus) == 1 else f"{cpus[0]}-{cpus[-1]}"


async def _no_progress(message: str) -> None:
    """Progress of a start asked for by another node: not streamed (only logged)."""
    log.info("%s", message)
