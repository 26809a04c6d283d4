"""The placement policy: even spread, memory homed with vCPUs, clear errors."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from dvmmd.vm.placement import (
    NodeResources,
    NodeShare,
    Placement,
    PlacementError,
    PlacementRequest,
    check_placement,
    default_policy,
    place,
)

M = 1 << 20
G = 1 << 30


def nodes(*spec: tuple[str, int, int]) -> list[NodeResources]:
    return [NodeResources(n, v, m) for n, v, m in spec]


THREE = nodes(("a", 4, 4 * G), ("b", 4, 4 * G), ("c", 4, 4 * G))


def test_even_spread_memory_with_vcpus() -> None:
    p = place(THREE, PlacementRequest(vcpus=6, memory=3 * G, prefer="b"))
    assert p.nodes[0] == "b"  # the preferred (local) node boots
    assert [len(s.cpus) for s in p.shares] == [2, 2, 2]
    assert [s.cpus for s in p.shares] == [(0, 1), (2, 3), (4, 5)]
    assert [s.mem_size for s in p.shares] == [G, G, G]
    assert [s.mem_start for s in p.shares] == [0, G, 2 * G]
    assert p.numa()[1] == {"cpus": [2, 3], "mem_start": G, "mem_size": G}


def test_uneven_vcpus_memory_proportional() -> None:
    p = place(THREE, PlacementRequest(vcpus=4, memory=512 * M, nodes=("a", "b", "c")))
    assert [len(s.cpus) for s in p.shares] == [2, 1, 1]
    assert sum(s.mem_size for s in p.shares) == 512 * M
    assert p.shares[0].mem_size > p.shares[1].mem_size


def test_fewer_vcpus_than_nodes_uses_fewer_nodes() -> None:
    p = place(THREE, PlacementRequest(vcpus=2, memory=256 * M))
    assert len(p.shares) == 2


def test_max_nodes_one() -> None:
    p = place(THREE, PlacementRequest(vcpus=3, memory=256 * M, max_nodes=1, prefer="c"))
    assert p.nodes == ["c"] and p.shares[0].cpus == (0, 1, 2)


def test_capacity_aware_when_even_split_does_not_fit() -> None:
    ns = nodes(("a", 1, 4 * G), ("b", 3, 4 * G))
    p = place(ns, PlacementRequest(vcpus=4, memory=G))
    assert sorted(len(s.cpus) for s in p.shares) == [1, 3]
    ns = nodes(("a", 2, 256 * M), ("b", 2, 4 * G))
    p = place(ns, PlacementRequest(vcpus=4, memory=2 * G, nodes=("a", "b")))
    assert p.shares[0].mem_size <= 256 * M and sum(s.mem_size for s in p.shares) == 2 * G


@pytest.mark.parametrize(
    ("req", "match"),
    [
        (PlacementRequest(vcpus=13, memory=G), "only 12 free vCPUs"),
        (PlacementRequest(vcpus=2, memory=13 * G), "cannot place"),
        (PlacementRequest(vcpus=5, memory=G, max_nodes=1), "no single node"),
        (PlacementRequest(vcpus=2, memory=G, nodes=("a", "zz")), "unknown or unavailable.*zz"),
        (PlacementRequest(vcpus=2, memory=G, nodes=("a", "b", "c")), "at least 3 vCPUs"),
        (PlacementRequest(vcpus=0, memory=G), "at least 1 vCPU"),
        (PlacementRequest(vcpus=1, memory=1000), "multiple of 4K"),
        (PlacementRequest(vcpus=2, memory=G, nodes=("a", "a")), "twice"),
        (PlacementRequest(vcpus=8, memory=G, nodes=("a",)), "enough free"),
    ],
)
def test_impossible_requests(req: PlacementRequest, match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        place(THREE, req)


def test_policy_is_replaceable_and_checked() -> None:
    def all_on_last(ns: Sequence[NodeResources], req: PlacementRequest) -> Placement:
        return Placement((NodeShare(ns[-1].name, tuple(range(req.vcpus)), 0, req.memory),))

    p = place(THREE, PlacementRequest(vcpus=2, memory=G), all_on_last)
    assert p.nodes == ["c"]

    def broken(ns: Sequence[NodeResources], req: PlacementRequest) -> Placement:
        return Placement((NodeShare("a", (1,), 0, req.memory),))

    with pytest.raises(PlacementError, match="every vCPU"):
        place(THREE, PlacementRequest(vcpus=2, memory=G), broken)


def test_check_rejects_gaps_and_overcommit() -> None:
    req = PlacementRequest(vcpus=2, memory=2 * G)
    gap = Placement((NodeShare("a", (0,), 0, G), NodeShare("b", (1,), G + 4096, G - 4096)))
    with pytest.raises(PlacementError, match="contiguous"):
        check_placement(gap, THREE, req)
    big = Placement((NodeShare("a", (0, 1), 0, 2 * G),))
    with pytest.raises(PlacementError, match="free"):
        check_placement(big, nodes(("a", 2, G)), req)


def test_json_roundtrip() -> None:
    p = default_policy(THREE, PlacementRequest(vcpus=3, memory=384 * M))
    assert Placement.from_json(p.to_json()) == p


# ------------------------------------------------------------ one layout for both paths

#: Requests where an even memory split and a split that follows the vCPUs differ.
SAME_LAYOUT_CASES = [
    (2, 256 * M, 2),
    (3, 96 * M, 2),
    (5, 256 * M, 2),
    (3, 384 * M, 3),
    (4, 100 * M + 4096, 3),
    (7, 1 * G, 3),
    (16, 64 * M, 5),
]


@pytest.mark.parametrize(("vcpus", "memory", "n"), SAME_LAYOUT_CASES)
def test_launcher_and_daemon_lay_a_request_out_the_same(vcpus: int, memory: int, n: int) -> None:
    """``dvmmctl run --nodes N`` (launcher.layout) and a daemon placing the same request
    over N nodes with room (vm_owner: ``place`` with this node preferred, no node list,
    or ``boot --nodes`` with the list) give the same vCPUs and memory to every node."""
    from dvmmd.launcher.launch import layout

    names = [f"node{i}" for i in range(n)]
    cluster = [NodeResources(name, 64, 64 * G) for name in names]
    launcher = layout(vcpus, memory, n)
    chosen = place(cluster, PlacementRequest(vcpus=vcpus, memory=memory, prefer="node0"))
    listed = place(cluster, PlacementRequest(vcpus=vcpus, memory=memory, nodes=tuple(names)))
    assert chosen.nodes == names and listed.nodes == names
    assert launcher == chosen.numa() == listed.numa()
    sizes = [s["mem_size"] for s in launcher]
    cpus = [len(s["cpus"]) for s in launcher]
    # memory follows the vCPUs: a node with more vCPUs never homes less memory
    assert all(sizes[i] >= sizes[j] for i in range(n) for j in range(n) if cpus[i] > cpus[j]), (
        cpus,
        sizes,
    )
