"""What the two VM roles of a daemon share: the RPC between daemons, errors, tasks.

A daemon plays two roles for VMs (vm_owner.py: the VMs it was asked to boot;
node_share.py: its share of any VM). Both call other daemons (or this one) with a
`CallFn`, raise `VmError` for what a user should read, and run background tasks
that must not be lost or leak exceptions (`BackgroundTasks`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from dvmmd.daemon.peers import RpcError

log = logging.getLogger("dvmmd.vm")

#: ``call(node, method, params, timeout)``: an RPC to another daemon (peers.py).
RemoteCall = Callable[[str, str, dict[str, Any], float], Awaitable[Any]]


class CallFn(Protocol):
    """An RPC to any daemon of the cluster, this one included (a local call)."""

    def __call__(
        self, node: str, method: str, params: dict[str, Any], timeout: float = 10.0
    ) -> Awaitable[Any]: ...


Progress = Callable[[str], Awaitable[None]]
Emit = Callable[[dict[str, Any]], Awaitable[None]]


class VmError(RpcError):
    """A user-facing VM error (unknown name, impossible request, boot failure...)."""


class BackgroundTasks:
    """Fire-and-forget coroutines of the VM roles: kept referenced, failures logged."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception())

    def cancel_all(self) -> None:
        for t in list(self.tasks):
            t.cancel()
