"""Recovery of a VM from its last periodic snapshot when one of its nodes is lost.

A VM defined with periodic snapshots (dvmmd.vm.periodic_snapshots) survives the loss
of a node other than its owner. When a share's worker fails (its peer vanished) or
membership declares a node of the VM dead, left or restarted, the owner (vm_owner.py)
hands the VM to `VmRecovery` instead of failing it:

1. the VM is ``recovering``; the old shares on every node not known lost are stopped
   (their workers are gone before anything is restored), while
2. membership decides which nodes are lost, within its failure timeout (the stop of a
   node found lost is not waited for): none (the failure was something else) ->
   ``failed`` with the original reason, as without snapshots;
3. the snapshot directory must hold a complete snapshot of this run (manifest.json,
   taken since the boot, the VM's shape) -> else ``failed``, saying why;
4. the VM is placed on the surviving nodes (their free resources, the placement
   policy; the old boot node stays the boot node, so its console log goes on) and
   restored there with a new boot id, still taking periodic snapshots; the record
   says ``recovered`` (``request.recovered``: the nodes lost, the snapshot, when).

A failure while the restored VM starts fails it (no second recovery of a recovery
that never ran). The owner's own loss is not survivable: the VM's record is there.

**Draining a node** (``dvmmctl drain NODE``) is the same restore, planned: the owner
takes a snapshot of the running VM through its control socket (the VM stops after
it), then restores it from that snapshot on the VM's other nodes, as if NODE had
been lost. The guest stands still for the snapshot and the restore (stop-and-copy:
moving the home role of a node's memory while the VM runs is not built yet).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvmmd.daemon.store import SHARE_ACTIVE_STATES, VmRecord
from dvmmd.daemon.vm_common import VmError, log
from dvmmd.vm import periodic_snapshots
from dvmmd.vm.placement import (
    NodeResources,
    Placement,
    PlacementError,
    PlacementRequest,
    place,
)
from dvmmd.vm.snapshots import SnapshotSpecError, read_info

if TYPE_CHECKING:
    from dvmmd.daemon.vm_owner import VmOwner

#: The request's list of the VM's recoveries (shown by ``dvmmctl status``).
RECOVERED_KEY = "recovered"
#: Membership states of a node that is lost to its VMs.
LOST_STATES = ("dead", "left", None)


class RecoveryFailed(Exception):
    """The VM cannot be recovered; the message is the VM's reason."""


class Abandoned(Exception):
    """The VM was stopped or removed while it was being recovered: nothing to do."""


@dataclass
class Pending:
    """One VM's recovery in progress."""

    cause: str
    old_boot_id: str
    lost: set[str] = field(default_factory=set)
    #: The restored shares have a new boot id: exits and losses are the VM's again.
    swapped: bool = False
    #: A drain (planned): the snapshot it took, restored instead of the periodic one.
    drain_dir: str | None = None


class VmRecovery:
    """The recoveries of the VMs one owner owns."""

    def __init__(self, owner: VmOwner) -> None:
        self.owner = owner
        self.pending: dict[str, Pending] = {}

    # --- what the owner asks ---------------------------------------------------------

    def may_recover(self, rec: VmRecord, result: dict[str, Any] | None = None) -> bool:
        """A running VM with periodic snapshots whose end is not the guest's own."""
        if rec.state != "running" or not rec.request.get(periodic_snapshots.REQUEST_KEY):
            return False
        return result is None or result.get("reason") != "timeout"

    def absorbs_exit(self, name: str, boot_id: str) -> bool:
        """An exit of the old shares while their VM is being recovered: only recorded."""
        p = self.pending.get(name)
        return p is not None and p.old_boot_id == boot_id

    def absorbs_loss(self, name: str, node: str) -> bool:
        """A node lost while its VM is being recovered (before the restore): noted."""
        p = self.pending.get(name)
        if p is None or p.swapped:
            return False
        p.lost.add(node)
        return True

    def begin(self, rec: VmRecord, cause: str, lost: str | None = None) -> None:
        """Start recovering VM `rec` (the owner found it running and losing a node)."""
        p = Pending(cause, str(rec.request.get("boot_id")), {lost} if lost else set())
        self.pending[rec.name] = p
        log.warning("VM %s: %s; recovering it from its last snapshot", rec.name, cause)
        self.owner.store.update_vm(
            rec.name, state="recovering", reason=f"recovering: {cause}", placement=rec.placement
        )
        self.owner.spawn(self._run(rec.name, p))

    async def drain(self, rec: VmRecord, node: str, snapshot_dir: str) -> None:
        """Move VM `rec` off `node`: snapshot it into `snapshot_dir` (it stops), then
        restore it on its other nodes. Returns once it runs there (VmError if not)."""
        name = rec.name
        if node not in [s["node"] for s in rec.placement["shares"]]:
            raise VmError(f"VM {name} does not run on {node}")
        if node == self.owner.name:
            raise VmError(
                f"VM {name} is owned by {node} (its record lives there): a node cannot "
                "drain the VMs it owns"
            )
        if len(rec.placement["shares"]) < 2:
            raise VmError(f"VM {name} runs on {node} alone: nowhere to move it")
        cause = f"node {node} drained"
        p = Pending(cause, str(rec.request.get("boot_id")), {node}, drain_dir=snapshot_dir)
        # Registered first: the shares' exits after the snapshot belong to the drain.
        self.pending[name] = p
        try:
            await self.owner.control_owned(
                rec, "snapshot", {"dir": snapshot_dir, "leave_running": False}
            )
        except BaseException:
            self.pending.pop(name, None)
            raise
        log.warning("VM %s: %s; restoring it on its other nodes", name, cause)
        self.owner.store.update_vm(
            name, state="recovering", reason=f"recovering: {cause}", placement=rec.placement
        )
        await self._run(name, p)
        cur = self.owner.store.get_vm(name)
        if cur is None or cur.state not in ("running", "stopped"):
            raise VmError(f"VM {name}: {cur.reason if cur else 'gone'}")

    # --- the recovery ----------------------------------------------------------------

    async def _run(self, name: str, p: Pending) -> None:
        try:
            await self._recover(name, p)
        except RecoveryFailed as e:
            self._fail(name, str(e))
        except Abandoned:
            log.info("VM %s: stopped while it was being recovered", name)
        except Exception as e:  # noqa: BLE001 -- the VM must not stay "recovering"
            log.exception("VM %s: recovery failed", name)
            self._fail(name, f"{p.cause}; recovery failed: {e}")
        finally:
            self.pending.pop(name, None)

    def _fail(self, name: str, reason: str) -> None:
        rec = self.owner.store.get_vm(name)
        if rec is None or rec.state not in ("recovering", "running"):
            return  # stopped by the user, or already ended
        log.warning("VM %s: %s", name, reason)
        for s in rec.placement["shares"]:
            if s.get("state") in SHARE_ACTIVE_STATES:
                s["state"] = "stopped"
        self.owner.store.update_vm(name, state="failed", reason=reason, placement=rec.placement)

    async def _recover(self, name: str, p: Pending) -> None:
        rec = self._current(name, p)
        old = Placement.from_json(rec.placement)
        before = self.owner.resources()  # still counting the old shares
        stops = {
            n: asyncio.ensure_future(
                self.owner._stop_shares(name, [n], f"VM {name}: node lost", True)
            )
            for n in old.nodes
            if n not in p.lost
        }
        lost = await self._wait_lost(old.nodes, p)
        for n, stop in stops.items():
            if n in lost:
                stop.cancel()  # a lost node may never answer
        await asyncio.gather(*stops.values(), return_exceptions=True)
        if not lost:
            raise RecoveryFailed(p.cause)
        what = f"node {', '.join(sorted(lost))} lost ({p.cause})"
        try:
            if p.drain_dir is not None:
                what = p.cause
                d = Path(p.drain_dir)
                snap = periodic_snapshots.UsableSnapshot(
                    read_info(d), periodic_snapshots.taken_unix_s(d) or 0
                )
            else:
                snap = periodic_snapshots.usable_snapshot(
                    rec.request[periodic_snapshots.REQUEST_KEY],
                    int(rec.request["vcpus"]),
                    int(rec.request["memory"]),
                )
        except SnapshotSpecError as e:
            raise RecoveryFailed(f"{what}; not recovered: {e}") from None
        survivors = [n for n in old.nodes if n not in lost]
        placement = self._place(rec, old, before, survivors, what)
        async with self.owner._lock(name):
            rec = self._current(name, p)
            await self._restore(rec, old, placement, snap, sorted(lost), p)

    def _current(self, name: str, p: Pending) -> VmRecord:
        """The VM's record, still recovering from this loss (else the recovery ends)."""
        rec = self.owner.store.get_vm(name)
        if (
            rec is None
            or rec.state != "recovering"
            or name in self.owner.stop_reasons
            or rec.request.get("boot_id") != p.old_boot_id
        ):
            raise Abandoned
        return rec

    async def _wait_lost(self, nodes: list[str], p: Pending) -> set[str]:
        """The VM's nodes membership declares lost, waiting up to its failure timeout."""
        cfg = self.owner.cfg
        deadline = time.monotonic() + cfg.failure_timeout + 2 * cfg.heartbeat_interval + 1.0
        while True:
            states = {n: self.owner.membership.state_of(n) for n in nodes}
            lost = {n for n in nodes if n in p.lost or states[n] in LOST_STATES}
            if lost or time.monotonic() > deadline:
                return lost - {self.owner.name}
            await asyncio.sleep(0.1)

    def _place(
        self,
        rec: VmRecord,
        old: Placement,
        before: list[NodeResources],
        survivors: list[str],
        what: str,
    ) -> Placement:
        """The VM over the surviving nodes, counting the old shares' resources as free
        (they were stopped; membership may not have heard yet)."""
        credit = {s.node: (len(s.cpus), s.mem_size) for s in old.shares}
        caps = {m.name: m.info for m in self.owner.membership.alive()}
        free = []
        for r in before:
            if r.name not in survivors:
                continue
            v, m = credit.get(r.name, (0, 0))
            cap = caps.get(r.name, {})
            free.append(
                NodeResources(
                    r.name,
                    min(int(cap.get("vcpus", 0)), r.vcpus_free + v),
                    min(int(cap.get("memory", 0)), r.memory_free + m),
                )
            )
        req = PlacementRequest(
            vcpus=int(rec.request["vcpus"]),
            memory=int(rec.request["memory"]),
            nodes=tuple(survivors),
        )
        try:
            return place(free, req, self.owner.policy)
        except PlacementError as e:
            raise RecoveryFailed(f"{what}; not recovered on {', '.join(survivors)}: {e}") from None

    async def _restore(
        self,
        rec: VmRecord,
        old: Placement,
        placement: Placement,
        snap: periodic_snapshots.UsableSnapshot,
        lost: list[str],
        p: Pending,
    ) -> None:
        """Start the VM from `snap` on `placement` under a new boot id."""
        name = rec.name
        taken = time.strftime("%H:%M:%S", time.localtime(snap.taken_unix_s))
        event = {
            "lost": lost,
            "drained": p.drain_dir is not None,
            "cause": p.cause,
            "snapshot": str(snap.info.dir),
            "taken_unix_s": snap.taken_unix_s,
            "at": time.time(),
            "nodes": placement.nodes,
        }
        boot_id = uuid.uuid4().hex
        rec.request = dict(rec.request, boot_id=boot_id)
        rec.request[RECOVERED_KEY] = [*rec.request.get(RECOVERED_KEY, []), event]
        pj = placement.to_json()
        for s in pj["shares"]:
            s.update(state="prepared", reason="", stats=None)
        rec.placement, rec.result = pj, None
        rec.reason = (
            f"recovering: restoring the snapshot taken {taken} on {', '.join(placement.nodes)}"
        )
        self.owner.store.put_vm(rec)
        p.swapped = True
        how = "drained" if p.drain_dir is not None else "lost"
        note = (
            f"\n[dvmm: node {', '.join(lost)} {how}; VM {name} restored on "
            f"{', '.join(placement.nodes)} from its snapshot taken {taken} "
            f"({snap.info.dir}); the guest goes on from there]\n"
        )
        console = {
            "console_keep": placement.shares[0].node == old.shares[0].node,
            "console_note": note,
        }
        try:
            await self.owner._boot_shares(
                name, boot_id, rec.request, placement, _logged, restore=snap, console=console
            )
        except Exception as e:  # noqa: BLE001 -- stop what started, then fail the VM
            await self.owner._stop_shares(name, placement.nodes, "recovery failed", True)
            raise RecoveryFailed(f"node {', '.join(lost)} lost; recovery failed: {e}") from None
        self._recovered(name, boot_id, event, taken)

    def _recovered(self, name: str, boot_id: str, event: dict[str, Any], taken: str) -> None:
        cur = self.owner.store.get_vm(name)
        if cur is None or cur.state != "recovering" or cur.request.get("boot_id") != boot_id:
            return  # the restored VM ended (or was stopped) already
        how = "drained" if event.get("drained") else "lost"
        reason = (
            f"recovered from the snapshot taken {taken} ({event['snapshot']}) after node "
            f"{', '.join(event['lost'])} was {how}; running on {', '.join(event['nodes'])}"
        )
        log.warning("VM %s: %s", name, reason)
        self.owner.store.update_vm(name, state="running", reason=reason)


def recovered_note(request: dict[str, Any]) -> str:
    """`` [recovered after the loss of n3]`` (or ``[moved off n3 (drained)]``) for a
    VM's final reason, or ``""``."""
    events = request.get(RECOVERED_KEY) or []
    lost = [n for e in events if not e.get("drained") for n in e.get("lost", [])]
    drained = [n for e in events if e.get("drained") for n in e.get("lost", [])]
    notes = []
    if lost:
        notes.append(f"recovered after the loss of {', '.join(lost)}")
    if drained:
        notes.append(f"moved off {', '.join(drained)} (drained)")
    return f" [{'; '.join(notes)}]" if notes else ""


async def _logged(message: str) -> None:
    """Progress of a recovery's restore: to the daemon log."""
    log.info("%s", message)
