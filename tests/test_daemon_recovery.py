"""A VM with periodic snapshots survives the loss of a node (issue 15, item 4).

Three real dvmmd processes on loopback (the helpers of test_daemon_cluster.py) run the
bundled guest over three nodes with ``dvmmctl boot --snapshot-every``; one daemon is
killed (SIGKILL) mid-run, once a snapshot exists, and the owner restores the VM from
it on the other two. The guest must finish with exactly the result lines of an
uninterrupted run: the lines printed before the snapshot, then the restored run's.
The option's checks are tested without KVM.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import dvmmctl, require_guest, require_native, requires_kvm
from test_daemon_cluster import (
    ROOT,
    Cluster,
    Node,
    boot,
    logged_cluster,
    require_multinode,
    start_real_nodes,
    wait_for,
)

from dvmmd.cli.client import Client
from dvmmd.vm import periodic_snapshots as ps

#: Result fields that are timings, left out of the comparison (as test_snapshot.py).
TIMING = re.compile(r" (time_us|rtt\w*|total_ms)=\S+")
#: The node is killed once the first ``counter`` has printed its result and a snapshot
#: was taken after it, during the first ``ep`` (each CPU on its own data: seconds, and
#: steady on three nodes of a 2-core host, where write-shared ``stress`` can take
#: minutes); the rest runs after the restore, on two nodes, long enough for the
#: restored run's own snapshots.
WORK = "run=counter,ep,counter,ep counter.iters=100000 ep.size=3000M"
VCPUS, MEMORY = "3", "128M"
EVERY_S = "0.5"


def results(out: str) -> list[str]:
    """The workload result lines (PASS/FAIL), timings removed."""
    return [
        TIMING.sub("", ln.strip())
        for ln in out.splitlines()
        if ln.startswith("dvmm-guest: ") and ln.rstrip().endswith(("PASS", "FAIL"))
    ]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from logged_cluster(tmp_path)


def reference(work: str = WORK, n: int = 4) -> list[str]:
    """The uninterrupted run's result lines (they do not depend on the nodes)."""
    p = dvmmctl(
        "run", "--vcpus", VCPUS, "--memory", MEMORY, "--cmdline", work, "--timeout", "120",
        timeout=150,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    lines = results(p.stdout)
    assert len(lines) == n and all(ln.endswith("PASS") for ln in lines), p.stdout
    return lines


def console_text(node: Node, vm: str = "vm") -> str:
    """The VM's console so far (the API, not the CLI: fast enough to poll)."""
    chunks: list[str] = []
    with Client(node.socket, 30.0) as c:
        c.request("console", {"name": vm}, lambda ev: chunks.append(str(ev.get("data", ""))))
    return "".join(chunks)


def wait_mid_run(a: Node, snap: Path) -> None:
    """Until the first workload has printed its result and a snapshot was taken after
    that (so the lost run printed lines the restored one does not print again)."""
    wait_for(lambda: len(results(console_text(a))) >= 1, 90, "the first result line")
    seen = time.time()
    manifest = snap / "manifest.json"
    wait_for(
        lambda: manifest.is_file() and manifest.stat().st_mtime > seen,
        30,
        "a snapshot after the first result",
    )
    assert "passed," not in console_text(a), "the guest finished before the node was killed"


def check_console(out: str, ref: list[str]) -> None:
    """Lines before the snapshot (of the lost run), then the restored run's: the
    uninterrupted run's lines, in order, each once."""
    lost_run, marker, restored = out.partition("[dvmm: node n3 lost; VM vm restored on n1, n2")
    assert marker, out[-3000:]
    after = results(restored)
    k = len(ref) - len(after)
    assert after and after == ref[k:], restored
    assert k >= 1 and results(lost_run)[:k] == ref[:k], lost_run
    assert re.search(r"dvmm-guest: 4 passed, 0 failed", restored), restored


@requires_kvm
def test_node_loss_recovers_from_the_last_snapshot(cluster: Cluster) -> None:
    require_native()
    guest = require_guest()
    require_multinode()
    ref = reference()
    a, _b, c = start_real_nodes(cluster, 3)
    r = a.ctl(
        "boot", "vm", "--vcpus", VCPUS, "--memory", MEMORY, "--kernel", str(guest),
        "--nodes", "n1,n2,n3", "--cmdline", WORK, "--timeout", "240",
        "--snapshot-every", EVERY_S, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    snap = a.dir / "snapshots" / "vm"
    assert a.req("status", name="vm")["request"]["snapshot"]["dir"] == str(snap)
    follower = subprocess.Popen(
        [sys.executable, "-m", "dvmmd.cli", "console", "vm", "--socket", a.socket],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_mid_run(a, snap)
        c.stop(signal.SIGKILL)
        killed_at = time.time()
        wait_for(
            lambda: a.req("status", name="vm")["state"] in ("stopped", "failed"),
            120,
            "the recovered VM to finish",
        )
        out, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
    st = a.req("status", name="vm")
    assert st["state"] == "stopped", st
    assert st["result"]["reason"] == "debug_exit" and st["result"]["status"] == 0, st
    assert "recovered after the loss of n3" in st["reason"], st["reason"]
    (event,) = st["request"]["recovered"]
    assert event["lost"] == ["n3"] and event["nodes"] == ["n1", "n2"], event
    assert event["snapshot"] == str(snap)
    assert [s["node"] for s in st["placement"]["shares"]] == ["n1", "n2"]
    r = a.ctl("console", "vm", "--no-follow", timeout=60)
    assert r.returncode == 0, r.stderr
    check_console(r.stdout, ref)
    # The follower saw it all: the lost run, the recovery, the end; exit 0.
    assert follower.returncode == 0, err
    check_console(out, ref)
    text = a.ctl("status", "vm").stdout
    assert "recovered: at" in text and "node n3 lost; restored on n1, n2" in text, text
    assert "recovered from the snapshot taken" in a.log()
    # The restored run went on taking snapshots into the same directory.
    taken = ps.taken_unix_s(snap)
    assert taken is not None and taken >= math.floor(killed_at), (taken, killed_at)
    assert json.loads((snap / "manifest.json").read_text())["nodes"] == 2


# ------------------------------------------------------------- the daemon's side (no KVM)


def fake_snapshot(d: Path, vcpus: int, memory: int) -> None:
    """A manifest as the VMM writes it (the stand-in worker restores nothing)."""
    d.mkdir(parents=True)
    half = memory // 2
    manifest = {
        "format": "dvmm-snapshot",
        "version": 1,
        "vcpus": vcpus,
        "memory": memory,
        "numa": [
            {"cpus": [0], "mem_start": 0, "mem_size": half},
            {"cpus": [1], "mem_start": half, "mem_size": memory - half},
        ],
        "cpu": "baseline",
        "nodes": 2,
        "vcpu_node": [0, 1],
        "taken_unix_s": int(time.time()),
    }
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_recovery_on_the_survivor_or_failed_without_a_snapshot(cluster: Cluster) -> None:
    """Stand-in workers (they do not notice a peer's death: membership does). A VM with
    a snapshot of this run is restored on the surviving node, its console going on; one
    whose directory holds none fails as a VM without snapshots does, saying why."""
    a, b = cluster.add(2)
    for n in (a, b):
        n.write_config([m.addr for m in (a, b) if m is not n], vcpus=6)
    cluster.start_all()
    for vm, nodes in (("good", "n1,n2"), ("bare", "n1,n2"), ("moved", "n2,n1")):
        boot(a, vm, "--vcpus", "2", "--memory", "64M", "--nodes", nodes, "--snapshot-every", "60")
    fake_snapshot(a.dir / "snapshots" / "good", 2, 64 << 20)
    fake_snapshot(a.dir / "snapshots" / "moved", 2, 64 << 20)
    # A follower of the VM whose boot node (its console) is lost.
    follower = subprocess.Popen(
        [sys.executable, "-m", "dvmmd.cli", "console", "moved", "--socket", a.socket],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert follower.stdout is not None
    assert select.select([follower.stdout], [], [], 15)[0], "the follower printed nothing"
    first = follower.stdout.readline()
    assert "fake guest on node 0" in first, first
    b.stop(signal.SIGKILL)
    wait_for(
        lambda: (
            a.req("status", name="bare")["state"] == "failed"
            and "recovered from" in a.req("status", name="good")["reason"]
        ),
        15,
        "good recovered and bare failed",
    )
    bare = a.req("status", name="bare")["reason"]
    assert "node n2 lost" in bare and "not recovered" in bare and "no manifest.json" in bare, bare
    good = a.req("status", name="good")
    assert good["state"] == "running", good
    assert [s["node"] for s in good["placement"]["shares"]] == ["n1"]
    assert good["request"]["recovered"][0]["lost"] == ["n2"]
    wait_for(
        lambda: "fake guest on node 0" in console_text(a, "good").partition("restored on")[2],
        10,
        "the restored run's first console line",
    )
    text = console_text(a, "good")
    assert text.count("fake guest on node 0") == 2, text
    assert "[dvmm: node n2 lost; VM good restored on n1 from its snapshot taken" in text, text
    r = a.ctl("list")
    assert "recovered from the snapshot taken" in r.stdout, r.stdout
    r = a.ctl("stop", "good")
    assert r.returncode == 0, r.stderr
    st = a.req("status", name="good")
    assert st["state"] == "stopped" and "[recovered after the loss of n2]" in st["reason"], st
    r = a.ctl("rm", "good")
    assert r.returncode == 0 and not (a.dir / "snapshots" / "good").exists()
    # The boot node was lost: the console goes on from the new boot node's log.
    wait_for(lambda: a.req("status", name="moved")["state"] == "running", 10, "moved recovered")
    assert [s["node"] for s in a.req("status", name="moved")["placement"]["shares"]] == ["n1"]
    assert a.ctl("stop", "moved").returncode == 0
    try:
        out, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
    _, marker, restored = out.partition("[dvmm: node n2 lost; VM moved restored on n1")
    assert marker, out
    assert "fake guest on node 0" in restored, out
    assert "[moved: stopped: stopped by user [recovered after the loss of n2]]" in err, err


# --------------------------------------------------------------------------- the option


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "snapshot_every_s must be a number of seconds, not 'abc'"),
        (True, "snapshot_every_s must be a number of seconds, not True"),
        (0, "snapshot_every_s must be a number of seconds > 0, not 0"),
        (-2.5, "snapshot_every_s must be a number of seconds > 0, not -2.5"),
        (math.inf, "snapshot_every_s must be a number of seconds > 0, not inf"),
        (math.nan, "snapshot_every_s must be a number of seconds > 0, not nan"),
    ],
)
def test_snapshot_interval_is_checked(value: object, message: str) -> None:
    with pytest.raises(ps.SnapshotOptionError, match=re.escape(message)):
        ps.check_every(value)


def test_snapshot_option_values(tmp_path: Path) -> None:
    assert ps.check_every(None) is None
    assert ps.check_every(2) == 2.0 and ps.parse_every("0.5") == 0.5
    with pytest.raises(ps.SnapshotOptionError, match="'soon' is not a number of seconds"):
        ps.parse_every("soon")
    with pytest.raises(ps.SnapshotOptionError, match="must be an absolute path"):
        ps.check_dir("snaps/vm")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ps.SnapshotOptionError, match="neither empty nor a dvmm snapshot"):
        ps.check_dir(str(tmp_path / "other"))
    with pytest.raises(ps.SnapshotOptionError, match="its parent directory does not exist"):
        ps.check_dir(str(tmp_path / "no" / "snap"))
    assert ps.check_dir(str(tmp_path / "new")) == tmp_path / "new"
    settings = {"every_s": 3.0, "dir": str(tmp_path / "new")}
    assert ps.plan(settings) == {
        "dir": str(tmp_path / "new"),
        "after_s": 3.0,
        "every_s": 3.0,
        "leave_running": True,
    }


def test_boot_refuses_a_bad_interval() -> None:
    r = dvmmctl("boot", "vm", "--snapshot-every", "0")
    assert r.returncode == 2 and "snapshot_every_s must be a number of seconds > 0" in r.stderr
    r = dvmmctl("boot", "vm", "--snapshot-every", "often")
    assert r.returncode == 2 and "'often' is not a number of seconds" in r.stderr, r.stderr


@requires_kvm
def test_draining_node_2_of_3_moves_the_vm_and_it_finishes_exactly(cluster: Cluster) -> None:
    """``dvmmctl drain n2`` mid-run: the VM is snapshotted (it stops), restored on
    n1 and n3, and the guest finishes with the uninterrupted run's results, each
    once: the lines printed before the drain, then the restored run's."""
    require_native()
    guest = require_guest()
    require_multinode()
    # Not stress: write-shared data on three nodes of a 2-core host is slow (README);
    # the drain comes during ep (several seconds, every CPU on its own data).
    work = "run=counter,ep,counter counter.iters=100000 ep.size=6000M"
    ref = reference(work, 3)
    a, b, _c = start_real_nodes(cluster, 3)
    r = a.ctl(
        "boot", "vm", "--vcpus", VCPUS, "--memory", MEMORY, "--kernel", str(guest),
        "--nodes", "n1,n2,n3", "--cmdline", work, "--timeout", "240", timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(results(console_text(a))) >= 1, 90, "the first result line")
    r = b.ctl("drain", "n2", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "VM vm: running (recovered from the snapshot taken" in r.stdout, r.stdout
    assert "after node n2 was drained; running on n1, n3" in r.stdout, r.stdout
    st = a.req("status", name="vm")
    assert [s["node"] for s in st["placement"]["shares"]] == ["n1", "n3"], st["placement"]
    wait_for(
        lambda: a.req("status", name="vm")["state"] in ("stopped", "failed"),
        120,
        "the moved VM to finish",
    )
    st = a.req("status", name="vm")
    assert st["state"] == "stopped" and st["result"]["status"] == 0, st
    assert "[moved off n2 (drained)]" in st["reason"], st["reason"]
    out = a.ctl("console", "vm", "--no-follow", timeout=60).stdout
    before, marker, after = out.partition("[dvmm: node n2 drained; VM vm restored on n1, n3")
    assert marker, out[-3000:]
    assert results(before) + results(after) == ref, out[-3000:]
    assert results(before) and results(after), out[-3000:]
    # Nothing left on n2; a drain of a node no VM uses says so.
    r = a.ctl("drain", "n2", timeout=60)
    assert r.returncode == 0 and "no running VM uses n2" in r.stdout, r.stdout + r.stderr
