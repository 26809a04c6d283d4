"""A daemon's running VM driven by name (issue 15): ``dvmmctl placement NAME``,
``dvmmctl migrate-vcpu NAME VCPU NODE`` and ``dvmmctl snapshot NAME DIR`` go
through the daemons to the VM's control socket on its boot node.

Two real dvmmd processes on loopback (the helpers of test_daemon_cluster.py) run
the bundled guest's ``counter`` on two nodes; vCPU 1 moves to the other node and
back, a snapshot is taken while it runs, and the count is exact; ``dvmmctl
restore DIR NAME`` then starts a new VM from that snapshot, which finishes the
same count exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_guest, require_native, requires_kvm
from test_daemon_cluster import (
    Cluster,
    logged_cluster,
    require_multinode,
    start_real_nodes,
    wait_for,
)

ITERS = 800_000_000


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from logged_cluster(tmp_path)


@requires_kvm
def test_a_daemons_vm_moves_a_vcpu_and_is_snapshotted_by_name(
    cluster: Cluster, tmp_path: Path
) -> None:
    require_native()
    guest = require_guest()
    require_multinode()
    a, b = start_real_nodes(cluster, 2)
    r = a.ctl(
        "boot", "vm", "--vcpus", "2", "--memory", "128M", "--kernel", str(guest),
        "--nodes", "n1,n2", "--cmdline", f"run=counter counter.iters={ITERS}",
        "--timeout", "240", timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = a.ctl("placement", "vm", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"vcpu_node": [0, 1], "nodes": ["n1", "n2"]}
    r = a.ctl("migrate-vcpu", "vm", "1", "n1", timeout=60)
    assert r.returncode == 0 and "vCPU 1 moved from node 1 to node 0" in r.stdout, r.stderr
    r = b.ctl("migrate-vcpu", "vm", "1", "n3", timeout=60)
    assert r.returncode == 1 and "no node 'n3' there" in r.stderr, r.stderr
    snap = tmp_path / "snap"
    r = b.ctl("snapshot", "vm", str(snap), "--leave-running", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dir"] == str(snap)
    assert json.loads((snap / "manifest.json").read_text())["vcpu_node"] == [0, 0]
    r = a.ctl("migrate-vcpu", "vm", "1", "1", timeout=60)
    assert r.returncode == 0 and "vCPU 1 moved from node 0 to node 1" in r.stdout, r.stderr
    wait_for(
        lambda: a.req("status", name="vm")["state"] in ("stopped", "failed"),
        180,
        "the VM to finish",
    )
    st = a.req("status", name="vm")
    assert st["state"] == "stopped" and st["result"]["status"] == 0, st
    r = a.ctl("console", "vm", "--no-follow", timeout=60)
    assert f"counter cpus=2 iters={ITERS} total={2 * ITERS} " in r.stdout, r.stdout[-2000:]
    # Not running any more: a clear error.
    r = a.ctl("placement", "vm", timeout=60)
    assert r.returncode == 1 and "is not running" in r.stderr, r.stderr
    # The snapshot, restored by the daemons as a new VM (vCPU 1 had moved to n1;
    # the restore is placed afresh, here with n2 as its boot node), finishes the
    # count it was taken in the middle of.
    r = b.ctl("restore", str(snap), "vm2", "--nodes", "n2,n1", "--console", timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert f"counter cpus=2 iters={ITERS} total={2 * ITERS} " in r.stdout, r.stdout[-2000:]
    st = a.req("status", name="vm2")
    assert st["request"]["restored_from"] == str(snap) and st["request"]["vcpus"] == 2, st
    assert [s["node"] for s in st["placement"]["shares"]] == ["n2", "n1"], st["placement"]
    r = a.ctl("restore", str(tmp_path / "nothing"), "vm3", timeout=60)
    assert r.returncode == 1 and "not a dvmm snapshot" in r.stderr, r.stderr
