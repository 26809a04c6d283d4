"""Placement: which vCPUs run on which node, and which memory range each node homes.

The policy is one replaceable function, `PlacementPolicy`:
``(nodes: Sequence[NodeResources], request: PlacementRequest) -> Placement``.
`default_policy` spreads the vCPUs evenly over the chosen nodes and homes on each node
a share of the memory proportional to its vCPUs (so every vCPU's memory is local: the
SRAT layout the guest sees). `check_placement` verifies any policy's answer against
the request and the nodes' free resources, so a custom policy cannot place nonsense.

The daemon (dvmmd.daemon.vm_owner) places a VM over its cluster's free resources with
`place`; ``dvmmctl run --nodes N`` (dvmmd.launcher) lays a VM out over N local nodes
with `layout_on`, which is `place` over N nodes that all have room: the same request
gets the same layout on both paths.

Conventions (docs/interfaces.md): vCPU indices are global, contiguous per node in
share order; share 0 is the boot node (it runs vCPU 0, the BSP, and the console);
``mem_start``/``mem_size`` are offsets into guest RAM and share i's range follows
share i-1's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dvmmd.vm.sizes import format_size

MIB = 1 << 20
PAGE = 4096


class PlacementError(ValueError):
    """The request cannot be placed; the message says why, with the numbers."""


@dataclass(frozen=True)
class NodeResources:
    name: str
    vcpus_free: int
    memory_free: int


@dataclass(frozen=True)
class PlacementRequest:
    vcpus: int
    memory: int
    nodes: tuple[str, ...] | None = None  # explicit node list (in order; first = boot node)
    max_nodes: int | None = None  # e.g. 1 when multi-node workers are not available
    prefer: str | None = None  # node to use as the boot node when possible (the local one)


@dataclass(frozen=True)
class NodeShare:
    node: str
    cpus: tuple[int, ...]
    mem_start: int
    mem_size: int

    def numa(self) -> dict[str, Any]:
        return {"cpus": list(self.cpus), "mem_start": self.mem_start, "mem_size": self.mem_size}


@dataclass(frozen=True)
class Placement:
    shares: tuple[NodeShare, ...]

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.shares]

    def numa(self) -> list[dict[str, Any]]:
        """The ``numa`` list of the VM spec."""
        return [s.numa() for s in self.shares]

    def to_json(self) -> dict[str, Any]:
        return {"shares": [{"node": s.node, **s.numa()} for s in self.shares]}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Placement:
        return Placement(
            tuple(
                NodeShare(
                    node=s["node"],
                    cpus=tuple(s["cpus"]),
                    mem_start=s["mem_start"],
                    mem_size=s["mem_size"],
                )
                for s in data["shares"]
            )
        )


PlacementPolicy = Callable[[Sequence[NodeResources], PlacementRequest], Placement]


def _describe(nodes: Sequence[NodeResources]) -> str:
    return (
        ", ".join(f"{n.name}: {n.vcpus_free} vCPUs/{format_size(n.memory_free)}" for n in nodes)
        or "no nodes"
    )


def _candidates(nodes: Sequence[NodeResources], req: PlacementRequest) -> list[NodeResources]:
    if req.vcpus < 1:
        raise PlacementError(f"a VM needs at least 1 vCPU (asked for {req.vcpus})")
    if req.memory < MIB or req.memory % PAGE:
        raise PlacementError(
            f"memory must be at least 1M and a multiple of 4K (asked for {req.memory} bytes)"
        )
    by_name = {n.name: n for n in nodes}
    if req.nodes is not None:
        if not req.nodes:
            raise PlacementError("the node list is empty")
        unknown = [n for n in req.nodes if n not in by_name]
        if unknown:
            raise PlacementError(
                f"unknown or unavailable node(s): {', '.join(unknown)} "
                f"(available: {', '.join(sorted(by_name)) or 'none'})"
            )
        if len(set(req.nodes)) != len(req.nodes):
            raise PlacementError("a node appears twice in the node list")
        if req.max_nodes is not None and len(req.nodes) > req.max_nodes:
            raise PlacementError(
                f"{len(req.nodes)} nodes requested but at most "
                f"{req.max_nodes} can be used (multi-node VMs unavailable)"
            )
        if len(req.nodes) > req.vcpus:
            raise PlacementError(
                f"{len(req.nodes)} nodes need at least {len(req.nodes)} "
                f"vCPUs (every node runs at least one)"
            )
        return [by_name[n] for n in req.nodes]
    usable = [n for n in nodes if n.vcpus_free > 0 and n.memory_free > 0]
    total_v = sum(n.vcpus_free for n in usable)
    total_m = sum(n.memory_free for n in usable)
    limit = req.max_nodes or len(usable)
    if req.vcpus > total_v or req.memory > total_m or not usable:
        scope = "the cluster offers" if limit > 1 else "any node offers"
        raise PlacementError(
            f"cannot place {req.vcpus} vCPUs and {format_size(req.memory)}: "
            f"{scope} only {total_v} free vCPUs and {format_size(total_m)} "
            f"({_describe(nodes)})"
        )
    # Boot node first (preferred node if usable), then the roomiest nodes.
    usable.sort(key=lambda n: (n.name != req.prefer, -n.vcpus_free, -n.memory_free, n.name))
    if limit == 1:
        fits = [n for n in usable if n.vcpus_free >= req.vcpus and n.memory_free >= req.memory]
        if not fits:
            raise PlacementError(
                f"no single node can hold {req.vcpus} vCPUs and "
                f"{format_size(req.memory)} ({_describe(nodes)})"
            )
        return fits[:1]
    return usable[: min(limit, req.vcpus)]


def _split_memory(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` proportionally to `weights`, in 2M units if possible (else 4K)."""
    unit = 2 * MIB if total % (2 * MIB) == 0 and total // (2 * MIB) >= len(weights) else PAGE
    units = total // unit
    wsum = sum(weights)
    parts = [units * w // wsum for w in weights]
    for i in range(units - sum(parts)):
        parts[i % len(parts)] += 1
    return [p * unit for p in parts]


def _build(names: Sequence[str], vcpus: Sequence[int], mems: Sequence[int]) -> Placement:
    shares = []
    cpu = 0
    mem = 0
    for name, v, m in zip(names, vcpus, mems):
        shares.append(NodeShare(name, tuple(range(cpu, cpu + v)), mem, m))
        cpu += v
        mem += m
    return Placement(tuple(shares))


def default_policy(nodes: Sequence[NodeResources], req: PlacementRequest) -> Placement:
    """Spread vCPUs evenly; home each node's memory with its vCPUs.

    With an explicit node list every listed node gets a share. Otherwise the VM spans as
    many usable nodes as it has vCPUs (at most `max_nodes`). If the even split does not
    fit some node, vCPUs and memory are shifted to the nodes with room (water-filling),
    still keeping memory proportional to vCPUs where capacity allows.
    """
    chosen = _candidates(nodes, req)
    k = len(chosen)
    vcpus = [req.vcpus // k + (1 if i < req.vcpus % k else 0) for i in range(k)]
    if any(v > n.vcpus_free for v, n in zip(vcpus, chosen)):
        vcpus = _water_fill(req.vcpus, [n.vcpus_free for n in chosen], minimum=1)
    mems = _split_memory(req.memory, vcpus)
    if any(m > n.memory_free for m, n in zip(mems, chosen)):
        mems = _water_fill(
            req.memory // PAGE, [n.memory_free // PAGE for n in chosen], minimum=1, weights=vcpus
        )
        mems = [m * PAGE for m in mems]
    placement = _build([n.name for n in chosen], vcpus, mems)
    check_placement(placement, nodes, req)
    return placement


def _water_fill(
    total: int, caps: Sequence[int], minimum: int = 0, weights: Sequence[int] | None = None
) -> list[int]:
    """Distribute `total` units over bins with capacities `caps`, as evenly as possible
    (proportionally to `weights`), every bin getting at least `minimum`."""
    if sum(caps) < total or any(c < minimum for c in caps):
        raise PlacementError(
            "the chosen nodes do not have enough free resources "
            f"(need {total} units, capacities {list(caps)})"
        )
    w = list(weights) if weights else [1] * len(caps)
    alloc = [minimum] * len(caps)
    left = total - minimum * len(caps)
    if left < 0:
        raise PlacementError(
            f"cannot give {len(caps)} nodes at least {minimum} each out of {total}"
        )
    open_bins = [i for i in range(len(caps)) if alloc[i] < caps[i]]
    while left > 0 and open_bins:
        wsum = sum(w[i] for i in open_bins)
        given = 0
        for i in open_bins:
            share = max(1, left * w[i] // wsum) if left >= len(open_bins) else 1
            share = min(share, caps[i] - alloc[i], left - given)
            alloc[i] += share
            given += share
            if given >= left:
                break
        left -= given
        open_bins = [i for i in open_bins if alloc[i] < caps[i]]
    if left:
        raise PlacementError("the chosen nodes do not have enough free resources")
    return alloc


def check_placement(p: Placement, nodes: Sequence[NodeResources], req: PlacementRequest) -> None:
    """Raise PlacementError unless `p` is a valid answer to `req` on `nodes`."""
    by_name = {n.name: n for n in nodes}
    if not p.shares:
        raise PlacementError("placement has no nodes")
    if req.max_nodes is not None and len(p.shares) > req.max_nodes:
        raise PlacementError(
            f"placement uses {len(p.shares)} nodes, at most {req.max_nodes} allowed"
        )
    cpus = [c for s in p.shares for c in s.cpus]
    if sorted(cpus) != list(range(req.vcpus)):
        raise PlacementError(f"placement must assign every vCPU 0..{req.vcpus - 1} once")
    if p.shares[0].cpus[:1] != (0,):
        raise PlacementError("the boot node (first share) must run vCPU 0")
    expect = 0
    seen: set[str] = set()
    for s in p.shares:
        n = by_name.get(s.node)
        if n is None:
            raise PlacementError(f"placement uses unknown node {s.node!r}")
        if s.node in seen:
            raise PlacementError(f"placement uses node {s.node!r} twice")
        seen.add(s.node)
        if not s.cpus:
            raise PlacementError(f"node {s.node} gets no vCPUs")
        if s.mem_start != expect or s.mem_size <= 0 or s.mem_size % PAGE:
            raise PlacementError(
                f"memory ranges must be contiguous, page-aligned and non-empty (node {s.node})"
            )
        expect += s.mem_size
        if len(s.cpus) > n.vcpus_free:
            raise PlacementError(
                f"node {s.node} has {n.vcpus_free} free vCPUs, placement gives it {len(s.cpus)}"
            )
        if s.mem_size > n.memory_free:
            raise PlacementError(
                f"node {s.node} has {format_size(n.memory_free)} free, "
                f"placement homes {format_size(s.mem_size)} there"
            )
    if expect != req.memory:
        raise PlacementError(f"memory ranges cover {expect} bytes, VM has {req.memory}")
    if req.nodes is not None and p.nodes != list(req.nodes):
        raise PlacementError("placement must use exactly the requested nodes, in order")


def place(
    nodes: Sequence[NodeResources], req: PlacementRequest, policy: PlacementPolicy = default_policy
) -> Placement:
    """Run a policy and check its answer."""
    p = policy(nodes, req)
    check_placement(p, nodes, req)
    return p


def layout_on(nodes: Sequence[str], vcpus: int, memory: int) -> Placement:
    """The layout of a VM over exactly `nodes` (in order; the first is the boot node),
    each with room for it: what the daemon places for the same request and node list.

    Raises PlacementError when the request cannot be laid out (fewer vCPUs than nodes,
    memory that does not split into page-aligned shares...).
    """
    roomy = [NodeResources(n, vcpus, memory) for n in nodes]
    return place(roomy, PlacementRequest(vcpus=vcpus, memory=memory, nodes=tuple(nodes)))
