"""``dvmmctl demo`` (what ``make demo`` runs) end to end: two real dvmmd daemons on
127.0.0.1/127.0.0.2, the bundled guest booted across both, its console, the per-node
counters, and everything torn down.

There is no other ``demo``: if the daemon-facing CLI failed to import, the verb would
be missing (exit 2), and every assertion below names something only the 2-daemon path
prints (the membership table, the placement over both nodes, the two-column counters).
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import BOOT_TIMEOUT_S, assert_all_passed, dvmmctl, requires_kvm

from dvmmd.cli import demo
from dvmmd.cli.dvmmctl import build_parser


def test_demo_verb_is_the_two_daemon_demo() -> None:
    args = build_parser().parse_args(["demo"])
    assert args.func is demo.cmd_demo
    assert args.vcpus == 2 and args.memory == 256 << 20


@requires_kvm
def test_demo_boots_the_guest_across_two_daemons(guest_kernel: Path) -> None:
    r = dvmmctl("demo", timeout=2 * BOOT_TIMEOUT_S)
    out, err = r.stdout, r.stderr
    explain = f"exit {r.returncode}\nstdout:\n{out[-4000:]}\nstderr:\n{err[-3000:]}"
    assert r.returncode == 0, explain
    assert "Traceback" not in err, explain
    m = re.search(r"starting 2 dvmmd daemons on 127\.0\.0\.1/127\.0\.0\.2 \(state in (\S+)\)", out)
    assert m, explain
    # membership: both daemons see both nodes alive
    rows = {
        ln.split()[0].rstrip("*"): ln.split() for ln in out.splitlines() if ln.startswith("node")
    }
    assert {"node1", "node2"} <= set(rows), explain
    assert all("alive" in rows[n] for n in ("node1", "node2")), explain
    assert "with 2 vCPUs, 256M across both nodes" in out, explain
    # the owner placed one vCPU and half the memory on each node, and started both
    assert "placement: 2 vCPU(s), 256M on node1 (vCPUs 0, 128M), node2 (vCPUs 1, 128M)" in err, (
        explain
    )
    assert "starting worker on node2" in err and "starting worker on node1 (boot node)" in err
    assert re.search(r"\[0\] node1: vCPUs 0-0, .* \[boot node\]", out), explain
    assert re.search(r"\[1\] node2: vCPUs 1-1", out), explain
    # the guest ran on both nodes and passed
    assert re.search(r"dvmm-guest: boot cpus=2 nodes=2\b", out), explain
    assert_all_passed(out)
    # the per-node counters: one column per node
    assert re.search(r"^COUNTER\s+node1\s+node2\s*$", out, re.MULTILINE), explain
    assert "dvmm demo: PASS" in out and "dvmm demo: stopping the daemons" in out, explain
    assert not Path(m.group(1)).exists(), "the demo left its state directory behind"
