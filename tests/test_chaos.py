"""Chaos on the data plane (issue 11, item 4): faults injected into a running distributed VM.

Each test starts ``dvmmctl run --nodes 2 --netns`` (every node a worker process
in its own network namespace, joined through veth links to a bridge) with a
short workload mix, and while the guest runs it

- drops every data-plane packet of a node with nftables for 0.8 s (TCP must
  retransmit), or a random 20 % of them for 1 s;
- queues every packet of both nodes behind a token bucket (tc tbf) for 1.5 s:
  the kernel here has no sch_netem, so a rate limit is how packets are delayed;
- freezes a worker with SIGSTOP for half the data plane's failure timeout, or
  for longer than it;
- kills a worker with SIGKILL while pages are moving.

Every case must end in one of two ways, and the test says which:

- the guest's exact results: every workload passes its own exact check and
  every result line (checksums, counts, errors=0) equals an undisturbed run's,
  made once per module with the same command line; or
- the VM stopped on every node with the cause named: exit status 1, the
  launcher's error and each surviving node's result name the lost node, the
  guest claimed no result (no summary line, no FAIL), no worker process and no
  namespace is left behind, within a bound.

Never a hang: every run has the VMM's own ``--timeout`` and a harder bound in
the test; reaching either fails the test. The lost-node cases never resume a
frozen node before its peers have given up on it.

Runs need /dev/kvm, the native module, the guest, root, ``ip``, ``nft`` and
``tc``: they skip with the printed reason where one is missing, and fail
instead under CI (``CI`` set), as tests/test_faultlat.py does.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos_util import ChaosRun, NftDrop, NodeInfo, Shaper, freeze, netns_unavailable, thaw
from conftest import assert_all_passed, parse_guest_output, skip_or_fail
from test_multinode import KILLED_WORKER_BOUND_S, _pid_gone, cluster_unavailable, result_lines

from dvmmd.launcher import netns

NODES = 2
VCPUS = 2
MEMORY = "256M"
#: The workloads whose results must come out exact. `sweep` first with
#: numa=ignore: all its memory is homed on node 0, so node 1's vCPU moves pages
#: over the link from the start, where the faults land; then `stress` (random
#: atomic adds, reads and owned writes on shared pages, replayed and
#: checksummed by the guest) and `matmul` (checksummed) run on whatever state
#: the disturbed sweep left behind.
EXACT_CMDLINE = "run=sweep,stress,matmul sweep.mem=16M sweep.numa=ignore stress.iters=6000"
#: A memory-heavy run for killing a node mid-transfer: node 1 writes and then
#: reads 32 MiB homed on node 0, several seconds of page traffic.
TRANSFER_CMDLINE = "run=sweep sweep.mem=64M sweep.numa=ignore"

#: The data plane declares a silent peer down after this long
#: (rust/src/dsm/engine.rs, the engine config's `dead_after`; keep-alives go
#: every dead_after/8, so a live but idle link is never silent that long).
DEAD_AFTER_S = 3.0
#: The VMM's own timeout for every run (a hang inside the VMM ends as exit 124).
VM_TIMEOUT_S = 60.0
#: The test's hard bound on a run: past the VMM's timeout and the launcher's
#: 30 s backstop after it, so reaching it means the launcher itself hung.
RUN_BOUND_S = VM_TIMEOUT_S + 40.0
#: From the moment a node is lost to the launcher's exit.
STOP_BOUND_S = KILLED_WORKER_BOUND_S
#: How long the guest may take to print its boot line.
BOOT_BOUND_S = 60.0
#: A delay after the boot line so that the fault hits running workloads.
SETTLE_S = 0.3
#: A lost node's name plus a word for its loss, in an error message.
LOSS_WORDS = r"(vanished|is down|died|lost|dead|unreachable)"


def _check_ready(tmp_dir: Path) -> None:
    for reason in (cluster_unavailable(tmp_dir), netns_unavailable()):
        if reason is not None:
            skip_or_fail(reason)


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[ChaosRun]]:
    """Runs a test started: killed, with their workers and namespaces, whatever happened."""
    _check_ready(tmp_path)
    started: list[ChaosRun] = []
    yield started
    for run in started:
        run.kill_all()
        netns.remove_owned(run.launch.proc.pid)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """EXACT_CMDLINE's result lines (without timings) from an undisturbed run."""
    _check_ready(tmp_path_factory.mktemp("chaos-ready"))
    run = ChaosRun.start(NODES, VCPUS, MEMORY, EXACT_CMDLINE, VM_TIMEOUT_S)
    try:
        rc = run.finish(RUN_BOUND_S)
        assert rc == 0, f"the undisturbed run failed: exit {rc}\n{run.explain()}"
        assert_all_passed(run.launch.stdout(), min_workloads=3)
        lines = result_lines(run.launch.stdout())
        print("undisturbed:\n  " + "\n  ".join(lines.values()))
        return lines
    finally:
        run.kill_all()
        netns.remove_owned(run.launch.proc.pid)


def start(runs: list[ChaosRun], cmdline: str) -> tuple[ChaosRun, dict[int, NodeInfo]]:
    """Start a run, wait for the guest's boot line, let the workloads get going."""
    run = ChaosRun.start(NODES, VCPUS, MEMORY, cmdline, VM_TIMEOUT_S)
    runs.append(run)
    infos = run.wait_started(BOOT_BOUND_S)
    time.sleep(SETTLE_S)
    assert run.running() and not run.finished_guest(), "the run ended before the fault\n" + (
        run.explain()
    )
    return run, infos


def assert_cleaned_up(run: ChaosRun, infos: dict[int, NodeInfo]) -> None:
    left = run.leftover_pids(infos)
    assert not left, f"worker processes {left} outlived the run"
    assert not netns.owned(run.launch.proc.pid), "the run left its namespaces behind"


def assert_exact(run: ChaosRun, rc: int, infos: dict[int, NodeInfo], base: dict[str, str]) -> None:
    """The disturbed run gave exactly the undisturbed run's results, on every node."""
    out = run.launch.stdout()
    assert rc == 0, f"exit {rc} (124 = the VMM's timeout was hit)\n{run.explain()}"
    summary = run.summary()
    assert (summary["reason"], summary["status"]) == ("debug_exit", 0), summary
    for node in summary["nodes"]:
        assert node["exit_status"] == 0 and node["reason"] == "debug_exit", node
    assert_all_passed(out, min_workloads=len(base))
    got = result_lines(out)
    assert got == base, "results differ from the undisturbed run:\n" + "\n".join(
        f"  {name}:\n    got      {got.get(name)}\n    expected {base.get(name)}"
        for name in sorted(set(got) | set(base))
        if got.get(name) != base.get(name)
    )
    assert_cleaned_up(run, infos)


def assert_stopped_naming(run: ChaosRun, rc: int, infos: dict[int, NodeInfo], lost: int) -> None:
    """The VM stopped on every node, the lost node named as the cause, no result claimed."""
    assert rc == 1, f"exit {rc}, expected 1 (124 = the VMM's timeout was hit)\n{run.explain()}"
    named = re.compile(rf"\bnode {lost}\b.*\b{LOSS_WORDS}")
    final = run.final_error()
    assert named.search(final), f"the CLI's error does not name node {lost}'s loss: {final!r}"
    summary = run.summary()
    assert summary["reason"] == "error" and named.search(summary["error"] or ""), summary
    for node in summary["nodes"]:
        if node["node"] == lost:
            continue
        # Each survivor stopped by itself with the cause ("stopped" would mean
        # the launcher had to terminate it) and exited with the error status.
        assert node["reason"] == "error", node
        assert named.search(node["error"] or ""), node
        assert node["exit_status"] == 1, node
    # A lost node must never turn into a result: no FAIL line, no closing line.
    rep = parse_guest_output(run.launch.stdout())
    assert not rep.failed_lines, rep.explain()
    assert rep.summary is None, "the guest claimed a result\n" + rep.explain()
    assert_cleaned_up(run, infos)


# --------------------------------------------------------------------------- exact results


def test_dropped_packets_are_retransmitted_exact(
    runs: list[ChaosRun], baseline: dict[str, str]
) -> None:
    # Every data-plane packet in and out of node 1 dropped for 0.8 s: TCP
    # retransmits (RTO 200 ms, doubling: the first segment to get through
    # leaves <= ~1.4 s after the burst began, inside the 3 s failure timeout;
    # a 2 s outage already outlasts it and stops the VM, naming node 1), and
    # the DSM must neither lose nor duplicate a message.
    run, infos = start(runs, EXACT_CMDLINE)
    ports = [n.port for n in infos.values()]
    retrans0 = sum(run.tcp_retransmits(i) for i in infos)
    drop = NftDrop(run, 1, ports)
    try:
        drop.add()
        time.sleep(0.8)
        # Read while the namespaces exist: they go away when the run ends.
        dropped = drop.dropped() if run.running() else None
    finally:
        drop.remove()
    retransmits = sum(run.tcp_retransmits(i) for i in infos) - retrans0 if run.running() else None
    lifted_mid_run = not run.finished_guest()
    rc = run.finish(RUN_BOUND_S)
    print(f"dropped {dropped} packets, {retransmits} TCP retransmits; exit {rc}")
    assert_exact(run, rc, infos, baseline)
    assert lifted_mid_run, "the guest finished while the packets were being dropped"
    assert dropped, "the drop rules caught no data-plane packet"
    assert retransmits, "nothing was retransmitted: the drop did not hit live traffic"


def test_random_packet_loss_exact(runs: list[ChaosRun], baseline: dict[str, str]) -> None:
    # A lossy link: a random 20 % of node 1's data-plane packets dropped for 1 s
    # (nftables `numgen random`); fast retransmits and RTOs interleave with
    # traffic that gets through.
    run, infos = start(runs, EXACT_CMDLINE)
    drop = NftDrop(run, 1, [n.port for n in infos.values()], percent=20)
    try:
        drop.add()
        time.sleep(1.0)
        dropped = drop.dropped() if run.running() else None
    finally:
        drop.remove()
    lifted_mid_run = not run.finished_guest()
    rc = run.finish(RUN_BOUND_S)
    print(f"dropped {dropped} packets at random; exit {rc}")
    assert_exact(run, rc, infos, baseline)
    assert lifted_mid_run, "the guest finished while packets were being dropped"
    assert dropped, "the random drop rules caught no data-plane packet"


def test_delayed_packets_exact(runs: list[ChaosRun], baseline: dict[str, str]) -> None:
    # Both nodes' packets queued behind a 20 Mbit/s token bucket for 1.5 s: a
    # 4 KiB page then waits ~1.6 ms plus whatever is queued ahead of it, so
    # replies arrive late and out of step with requests. No sch_netem in this
    # kernel (no fixed latency); the queue is long enough not to drop.
    run, infos = start(runs, EXACT_CMDLINE)
    shapers = [Shaper(run, i, rate="20mbit", burst="16kb", limit="4mb") for i in infos]
    stats: list[dict[str, int]] = []
    try:
        for s in shapers:
            s.add()
        time.sleep(1.5)
        stats = [s.stats() for s in shapers] if run.running() else []
    finally:
        for s in shapers:
            s.remove()
    lifted_mid_run = not run.finished_guest()
    rc = run.finish(RUN_BOUND_S)
    print(f"token-bucket counters per node: {stats}; exit {rc}")
    assert_exact(run, rc, infos, baseline)
    assert lifted_mid_run, "the guest finished while packets were being delayed"
    assert sum(s["overlimits"] for s in stats) > 0, f"no packet had to wait: {stats}"
    assert all(s["drops"] == 0 for s in stats), f"the queue dropped packets: {stats}"


@pytest.mark.parametrize("victim", [0, 1], ids=["boot-node", "node1"])
def test_short_freeze_exact(runs: list[ChaosRun], baseline: dict[str, str], victim: int) -> None:
    # SIGSTOP stops every thread of the worker (vCPUs, engine, fault handler)
    # with its sockets open, like a node paused by its hypervisor or swapping;
    # for half the failure timeout, which the peer must ride out.
    run, infos = start(runs, EXACT_CMDLINE)
    try:
        freeze(infos[victim])
        time.sleep(DEAD_AFTER_S / 2)
    finally:
        thaw(infos[victim])
    resumed_mid_run = not run.finished_guest()
    rc = run.finish(RUN_BOUND_S)
    print(f"froze node {victim} for {DEAD_AFTER_S / 2:.1f} s; exit {rc}")
    assert_exact(run, rc, infos, baseline)
    assert resumed_mid_run, "the guest finished while a node was frozen"


# --------------------------------------------------------------------------- a node lost


def test_long_freeze_stops_the_vm_naming_the_node(runs: list[ChaosRun]) -> None:
    # Node 1 frozen past the failure timeout: node 0 must declare it down and
    # stop the VM by itself while node 1 is still frozen (a frozen peer that
    # never comes back must not hold the VM forever). Node 1 is resumed only
    # then, and must notice it was left and stop too.
    run, infos = start(runs, EXACT_CMDLINE)
    t0 = time.monotonic()
    try:
        freeze(infos[1])
        deadline = t0 + DEAD_AFTER_S + STOP_BOUND_S
        while not _pid_gone(infos[0].pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        boot_node_stopped_after = time.monotonic() - t0
        boot_node_stopped = _pid_gone(infos[0].pid)
    finally:
        thaw(infos[1])
    rc = run.finish(RUN_BOUND_S)
    took = time.monotonic() - t0
    print(
        f"froze node 1: node 0 stopped after {boot_node_stopped_after:.1f} s, the launcher "
        f"exited {rc} after {took:.1f} s\n{run.final_error()}"
    )
    assert boot_node_stopped, (
        f"node 0 still ran {DEAD_AFTER_S + STOP_BOUND_S:.0f} s after node 1 froze\n" + run.explain()
    )
    assert took < boot_node_stopped_after + STOP_BOUND_S, took
    assert_stopped_naming(run, rc, infos, lost=1)


@pytest.mark.parametrize("victim", [0, 1], ids=["boot-node", "node1"])
def test_killed_mid_transfer_stops_every_node(runs: list[ChaosRun], victim: int) -> None:
    # SIGKILL while node 1 is pulling pages from node 0 (shown by the bytes on
    # the victim's link), so the peer loses it with page requests in flight.
    run, infos = start(runs, TRANSFER_CMDLINE)
    base_bytes = run.link_bytes(victim)
    deadline = time.monotonic() + 20.0
    moved = 0
    while moved < 4 << 20 and time.monotonic() < deadline and run.running():
        time.sleep(0.05)
        moved = run.link_bytes(victim) - base_bytes
    assert moved >= 4 << 20, f"only {moved} bytes moved on node {victim}'s link\n{run.explain()}"
    assert not run.finished_guest(), "the guest finished before the kill\n" + run.explain()
    t0 = time.monotonic()
    os.kill(infos[victim].pid, signal.SIGKILL)
    rc = run.finish(RUN_BOUND_S)
    took = time.monotonic() - t0
    print(f"killed node {victim} after {moved >> 20} MiB: exit {rc} after {took:.1f} s")
    print(run.final_error()[:400])
    assert took < STOP_BOUND_S, f"the VM took {took:.1f} s to stop\n{run.explain()}"
    assert re.search(rf"\bnode {victim}\b.*killed by SIGKILL", run.final_error()), run.final_error()
    assert_stopped_naming(run, rc, infos, lost=victim)
