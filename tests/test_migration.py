"""Live vCPU migration (issue 15): ``dvmmctl run --nodes N --migrate-vcpu
VCPU:NODE@SECONDS``.

The bundled guest's ``counter`` (every CPU ``lock xadd``s one shared word)
must count exactly while vCPU 1 moves back and forth between the two nodes 20
times in the middle of it; ``gap`` (each CPU's longest time off the CPU, as the
guest measures it) must see the moves; a snapshot taken after a move records
where the vCPUs are and restores exactly; bad ``--migrate-vcpu`` values are
refused before anything runs, and a move that cannot be made is reported while
the VM runs on. The control socket (``dvmmctl run --control``) does the same on
demand: ``dvmmctl placement``, ``migrate-vcpu`` and ``snapshot --control``.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import dvmmctl, require_guest, require_native, requires_kvm

RUN_S = 300


def run(*args: str) -> tuple[int, str, str]:
    require_native()
    require_guest()
    p = dvmmctl("run", "--timeout", "240", *args, timeout=RUN_S)
    return p.returncode, p.stdout, p.stderr


def back_and_forth(n: int, first_s: float, every_s: float) -> list[str]:
    """``--migrate-vcpu`` options moving vCPU 1 to node 0, 1, 0, ... n times."""
    out: list[str] = []
    for k in range(n):
        out += ["--migrate-vcpu", f"1:{k % 2}@{first_s + k * every_s:.2f}"]
    return out


def summary(out: str) -> dict[str, Any]:
    s: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return s


def moves_of(out: str) -> list[dict[str, Any]]:
    boot = next(n for n in summary(out)["nodes"] if n["node"] == 0)
    m: list[dict[str, Any]] = boot["stats"]["migrations"]
    return m


def line(out: str, workload: str) -> str:
    ls = [ln for ln in out.splitlines() if ln.startswith(f"dvmm-guest: {workload} ")]
    assert len(ls) == 1, out
    return ls[0]


def field(ln: str, key: str) -> int:
    m = re.search(rf" {key}=(\d+)", ln)
    assert m, ln
    return int(m.group(1))


@requires_kvm
def test_counter_is_exact_while_vcpu1_moves_back_and_forth_20_times() -> None:
    iters = 600_000_000
    code, out, err = run(
        "--nodes", "2", "--vcpus", "2", "--memory", "256M", "--json",
        "--cmdline", f"run=counter counter.iters={iters}", *back_and_forth(20, 0.2, 0.1),
    )  # fmt: skip
    assert code == 0, out + err
    ln = line(out, "counter")
    assert ln.endswith("PASS") and f"total={2 * iters} " in ln, ln
    moves = moves_of(out)
    assert [(m["from"], m["to"]) for m in moves] == [(1, 0), (0, 1)] * 10, err
    assert all(m["vcpu"] == 1 and m["state_bytes"] > 0 for m in moves), moves
    assert len(re.findall(r"dvmm: vCPU 1 moved from node \d to node \d: stopped", err)) == 20, err
    # The moves were in the middle of the count: the last one is due 2.1 s
    # after the start, and the counting took longer than that.
    assert field(ln, "time_us") > 2_300_000, ln
    # The vCPU ended on node 1, where it started: each node ran it again.
    nodes = summary(out)["nodes"]
    assert sorted((n["node"], n["stats"]["local_vcpus"]) for n in nodes) == [(0, [0]), (1, [1])]


@requires_kvm
def test_ipi_ping_pong_is_exact_while_the_peer_moves_30_times() -> None:
    # Every 50 ms vCPU 1 (the peer, which answers each ping IPI with a pong IPI)
    # moves: a move between KVM handing userspace the ICR write and KVM
    # completing it (the next KVM_RUN) would send the pong twice on the new
    # node; a lost IPI would stop the ping-pong. Each count must be exact.
    moves = []
    for k in range(30):
        moves += ["--migrate-vcpu", f"1:{k % 2}@{0.1 + 0.05 * k:.2f}"]
    code, out, err = run(
        "--nodes", "2", "--vcpus", "2", "--memory", "256M", "--json",
        "--cmdline", "run=ipi ipi.iters=8000", *moves,
    )  # fmt: skip
    assert code == 0, out + err
    ipi = line(out, "ipi")
    assert ipi.endswith("PASS") and " pings=8000 pongs=8000 " in ipi, ipi
    assert len(moves_of(out)) == 30, err


@requires_kvm
def test_interrupts_follow_vcpus_around_three_nodes() -> None:
    # vCPU 2 (the ipi peer) visits every node, and vCPU 0 (the boot CPU, whose
    # devices stay on node 0) runs on node 2 for a while: every ping gets its
    # pong and the count is exact, wherever the vCPUs are.
    code, out, err = run(
        "--nodes", "3", "--vcpus", "3", "--memory", "384M", "--json",
        "--cmdline", "run=ipi,counter ipi.iters=6000 ipi.peer=2 counter.iters=30000000",
        "--migrate-vcpu", "2:0@0.3", "--migrate-vcpu", "2:1@0.6", "--migrate-vcpu", "0:2@0.9",
        "--migrate-vcpu", "2:2@1.2", "--migrate-vcpu", "0:0@1.5",
    )  # fmt: skip
    assert code == 0, out + err
    ipi = line(out, "ipi")
    assert ipi.endswith("PASS") and " pings=6000 pongs=6000 " in ipi, ipi
    assert line(out, "counter").endswith("PASS") and " total=90000000 " in out, out
    moves = [(m["vcpu"], m["from"], m["to"]) for m in moves_of(out)]
    assert moves == [(2, 2, 0), (2, 0, 1), (0, 0, 2), (2, 1, 2), (0, 2, 0)], err


@requires_kvm
def test_the_guest_sees_a_move_as_a_short_gap() -> None:
    code, out, err = run(
        "--nodes", "2", "--vcpus", "2", "--memory", "256M", "--json",
        "--cmdline", "run=gap gap.iters=1500", *back_and_forth(4, 0.3, 0.2),
    )  # fmt: skip
    assert code == 0, out + err
    ln = line(out, "gap")
    assert ln.endswith("PASS"), ln
    moves = moves_of(out)
    assert len(moves) == 4, moves
    # vCPU 1 stood still at least as long as its longest move took to start
    # it again (guest TSC, whichever node it read it on).
    gaps = [int(g) for g in re.search(r"cpu_gap_us=([\d,]+)", ln).group(1).split(",")]  # type: ignore[union-attr]
    assert len(gaps) == 2 and gaps[1] > 0, ln
    assert all(m["stopped_ms"] > 0 for m in moves), moves


@requires_kvm
def test_a_snapshot_after_a_move_restores_exactly(tmp_path: Path) -> None:
    work = "run=stress,counter stress.iters=150000 counter.iters=20000"
    code, out, err = run("--nodes", "2", "--vcpus", "3", "--memory", "256M", "--cmdline", work)
    assert code == 0, out + err
    reference = [ln for ln in out.splitlines() if ln.endswith("PASS")]
    snap = tmp_path / "snap"
    code, out, err = run(
        "--nodes", "2", "--vcpus", "3", "--memory", "256M", "--cmdline", work,
        "--migrate-vcpu", "1:1@0.05", "--snapshot-dir", str(snap), "--snapshot-after", "0.2",
    )  # fmt: skip
    assert code == 0, out + err
    assert "dvmm: vCPU 1 moved from node 0 to node 1" in err, err
    assert not [ln for ln in out.splitlines() if ln.endswith("PASS")], "not mid-run"
    manifest = json.loads((snap / "manifest.json").read_text())
    # Where they ran when it was taken: vCPU 1 had moved from node 0 to node 1.
    assert manifest["vcpu_node"] == [0, 1, 1], manifest["vcpu_node"]
    code, out, err = run("--nodes", "2", "--restore", str(snap))
    assert code == 0, out + err
    timing = re.compile(r" (time_us|total_ms)=\S+")
    got = [timing.sub("", ln) for ln in out.splitlines() if ln.endswith("PASS")]
    assert got == [timing.sub("", ln) for ln in reference], out


@requires_kvm
def test_a_move_that_cannot_be_made_is_reported_and_the_vm_runs_on() -> None:
    code, out, err = run(
        "--nodes", "2", "--vcpus", "2", "--memory", "256M", "--json",
        "--cmdline", "run=counter counter.iters=50000000",
        "--migrate-vcpu", "1:1@0.05",
    )  # fmt: skip
    assert code == 0, out + err
    assert "dvmm: vCPU 1 not moved to node 1: vCPU 1 runs on node 1 already" in err, err
    assert line(out, "counter").endswith("PASS")
    assert moves_of(out) == []


def test_migrate_options_are_checked() -> None:
    p = dvmmctl("run", "--nodes", "2", "--migrate-vcpu", "1:0")
    assert p.returncode == 2 and "expected VCPU:NODE@SECONDS" in p.stderr, p.stderr
    p = dvmmctl("run", "--nodes", "2", "--migrate-vcpu", "1:0@-1")
    assert p.returncode == 2 and "after_s -1.0: must be a finite number >= 0" in p.stderr, p.stderr
    p = dvmmctl("run", "--migrate-vcpu", "1:0@1")
    assert p.returncode == 2 and "give --nodes 2 or more" in p.stderr, p.stderr
    p = dvmmctl("run", "--nodes", "2", "--vcpus", "2", "--migrate-vcpu", "5:0@1")
    assert p.returncode == 2 and "vcpu 5: the VM has vcpus 0-1" in p.stderr, p.stderr
    p = dvmmctl("run", "--nodes", "2", "--vcpus", "2", "--migrate-vcpu", "1:2@1")
    assert p.returncode == 2 and "node 2: the VM has nodes 0-1" in p.stderr, p.stderr


@requires_kvm
def test_the_control_socket_moves_a_vcpu_and_snapshots_a_running_vm(tmp_path: Path) -> None:
    require_native()
    require_guest()
    iters = 800_000_000
    sock = tmp_path / "vm.sock"
    vm = subprocess.Popen(
        [
            sys.executable, "-m", "dvmmd.cli", "run", "--nodes", "2", "--vcpus", "2",
            "--memory", "256M", "--timeout", "240", "--control", str(sock),
            "--cmdline", f"run=counter counter.iters={iters}",
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and vm.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), "no control socket"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        p = dvmmctl("placement", "--control", str(sock), "--json")
        assert p.returncode == 0 and json.loads(p.stdout) == {"vcpu_node": [0, 1]}, p.stderr
        p = dvmmctl("migrate-vcpu", "--control", str(sock), "1", "0")
        assert p.returncode == 0 and "vCPU 1 moved from node 1 to node 0" in p.stdout, p.stderr
        p = dvmmctl("migrate-vcpu", "--control", str(sock), "1", "0")
        assert p.returncode == 1 and "vCPU 1 runs on node 0 already" in p.stderr, p.stderr
        p = dvmmctl("migrate-vcpu", "--control", str(sock), "1", "5")
        assert p.returncode == 1 and "the VM has no node 5" in p.stderr, p.stderr
        snap = tmp_path / "snap"
        p = dvmmctl("snapshot", "--control", str(sock), str(snap), "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["dir"] == str(snap)
        out, err = vm.communicate(timeout=60)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.communicate()
    assert vm.returncode == 0, out + err
    assert "stopped after its snapshot" in err and not sock.exists()
    assert "dvmm-guest: counter" not in out, "the snapshot was not mid-run"
    assert json.loads((snap / "manifest.json").read_text())["vcpu_node"] == [0, 0]
    code, out, err = run("--nodes", "2", "--restore", str(snap))
    assert code == 0, out + err
    assert line(out, "counter").endswith("PASS") and f"total={2 * iters} " in out, out
    p = dvmmctl("placement", "--control", str(sock))
    assert p.returncode == 1 and "control socket" in p.stderr, p.stderr
    p = dvmmctl("snapshot", "--control", "/nonexistent.sock")
    assert p.returncode == 2 and "expected DIR with --control PATH" in p.stderr, p.stderr
    p = dvmmctl("migrate-vcpu", "vm", "1")
    assert p.returncode == 2 and "expected NAME VCPU NODE" in p.stderr, p.stderr
    p = dvmmctl("migrate-vcpu", "--control", "/nonexistent.sock", "x", "0")
    assert p.returncode == 2 and "VCPU 'x': a whole number >= 0" in p.stderr, p.stderr
    p = dvmmctl("placement", "--control", "/nonexistent.sock")
    assert p.returncode == 1 and "control socket /nonexistent.sock" in p.stderr, p.stderr
