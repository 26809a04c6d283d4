"""This daemon's VMs in both roles, behind one RPC entry point.

A daemon owns the VMs it was asked to boot (vm_owner.py: definition, placement, boot,
state) and runs its share of any VM (node_share.py: one worker process per VM per
node). `VmManager` builds both, routes the daemon-to-daemon RPCs to the role that
serves them (a call to this node itself is a local call), and starts and stops them
with the daemon. Single-node VMs take the same path with one share and
``cluster = null``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from dvmmd.config import Config
from dvmmd.daemon.membership import MemberEvent, Membership
from dvmmd.daemon.node_share import LocalShare, NodeShares
from dvmmd.daemon.store import Store
from dvmmd.daemon.vm_common import BackgroundTasks, Emit, Progress, RemoteCall, VmError
from dvmmd.daemon.vm_owner import VmOwner
from dvmmd.vm.boot_files import Caller
from dvmmd.vm.names import check_vm_name
from dvmmd.vm.placement import PlacementPolicy, default_policy

__all__ = ["Emit", "VmError", "VmManager"]


class VmManager:
    """The owner role and the share role of one daemon, wired together."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        membership: Membership,
        call: RemoteCall,
        policy: PlacementPolicy = default_policy,
    ) -> None:
        self.name = cfg.node_name
        self.vm_dir: Path = cfg.state_dir / "vms"
        self._remote_call = call
        self.membership = membership
        self.tasks = BackgroundTasks()
        self.node_shares = NodeShares(cfg, store, membership, self.call, self.tasks)
        self.owner = VmOwner(
            cfg, store, membership, self.call, self.tasks, self.node_shares, policy
        )
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            **self.owner.rpc_handlers(),
            **self.node_shares.rpc_handlers(),
        }
        membership.listeners.append(self.on_member_event)

    async def call(
        self, node: str, method: str, params: dict[str, Any], timeout: float = 10.0
    ) -> Any:
        if node == self.name:
            return await self.handle_rpc(method, params)
        return await self._remote_call(node, method, params, timeout)

    async def handle_rpc(self, method: str, params: dict[str, Any]) -> Any:
        h = self._handlers.get(method)
        if h is None:
            raise VmError(f"unknown method {method[:64]!r}")
        # Every method that names a VM gets a name that is one plain path component
        # (dvmmd.vm.names); the handlers check again, for callers that skip this entry point.
        if "name" in params:
            check_vm_name(params["name"])
        return await h(params)

    def on_member_event(self, ev: MemberEvent) -> None:
        self.owner.on_member_event(ev)
        self.node_shares.on_member_event(ev)

    # --- what the daemon, its API and its metrics use ---------------------------------

    @property
    def shares(self) -> dict[str, LocalShare]:
        return self.node_shares.shares

    def live_stats(self, sh: LocalShare) -> dict[str, Any]:
        return self.node_shares.live_stats(sh)

    def used(self) -> tuple[int, int]:
        return self.node_shares.used()

    def startup(self) -> None:
        self.owner.startup()

    async def boot(
        self, args: dict[str, Any], progress: Progress, *, caller: Caller, fds: Sequence[int] = ()
    ) -> dict[str, Any]:
        return await self.owner.boot(args, progress, caller=caller, fds=fds)

    async def start(self, name: str, progress: Progress) -> dict[str, Any]:
        return await self.owner.start(name, progress)

    async def list_all(self) -> dict[str, Any]:
        return await self.owner.list_all()

    async def op(self, op: str, name: str, args: dict[str, Any]) -> Any:
        return await self.owner.op(op, name, args)

    async def drain(self, node: str, progress: Progress) -> dict[str, Any]:
        return await self.owner.drain(node, progress)

    async def console(self, name: str, follow: bool, emit: Emit) -> dict[str, Any]:
        return await self.owner.console(name, follow, emit)

    async def console_input(self, name: str, data: bytes) -> dict[str, Any]:
        return await self.owner.console_input(name, data)

    async def shutdown(self) -> None:
        """Daemon stop: stop every local worker (gracefully, bounded by stop_grace)."""
        if self.on_member_event in self.membership.listeners:
            self.membership.listeners.remove(self.on_member_event)
        await self.owner.shutdown(f"dvmmd on {self.name} shut down", self.node_shares.stop_all)
        self.tasks.cancel_all()
