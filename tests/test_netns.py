"""Nodes in separate network namespaces: ``dvmmctl run --nodes N --netns``.

The topology tests (namespaces, veth links to a bridge, cutting a link) need
root and iproute2 only. The VM tests also need what test_multinode's
distributed runs need (and skip, with the reason, the same way). Every test
removes the namespaces it made, also when it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MakeKernel, assert_all_passed, code_exit
from test_multinode import (
    FAKE_WORKER,
    KILLED_WORKER_BOUND_S,
    LAUNCH_FAKE,
    Launch,
    _wait_gone,
    cluster_ready,  # noqa: F401 - a fixture, used by name
    start_launcher,
)

from dvmmd.launcher import netns
from dvmmd.launcher.netns import NetnsError, Topology

requires_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2's `ip`",
)

#: A port nothing listens on: a reachable node answers a connect with RST.
PROBE_PORT = 7999

_PROBE = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
    "    print('connected')\n"
    "except ConnectionRefusedError:\n"
    "    print('refused')\n"
    "except OSError as e:\n"
    "    print('unreachable', e)\n"
)


def probe(topo: Topology, src: int, dst: int, timeout: float = 2.0) -> str:
    """'refused' (reachable), 'connected' or 'unreachable ...' from node src to node dst."""
    cp = subprocess.run(
        [*topo.exec_prefix(src), sys.executable, "-c", _PROBE, topo.addr(dst), str(PROBE_PORT),
         str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 20,
        check=False,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    return cp.stdout.strip()


@pytest.fixture
def topology() -> Iterator[Topology]:
    topo = Topology(owner_pid=os.getpid(), nodes=3)
    try:
        topo.create()
        yield topo
    finally:
        topo.destroy()
        netns.remove_owned(os.getpid())


@requires_netns
def test_topology_links_nodes_and_cuts(topology: Topology) -> None:
    names = netns.list_namespaces()
    for i in range(3):
        assert f"dvmm-{os.getpid()}-{i}" in names
    assert f"dvmm-{os.getpid()}-hub" in names
    assert [topology.addr(i) for i in range(3)] == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
    # Every node reaches every other (RST from a closed port = reachable).
    for src, dst in ((0, 1), (1, 2), (2, 0)):
        assert probe(topology, src, dst) == "refused", (src, dst)
    # Nothing of ours in the host's namespace.
    host_links = subprocess.run(
        ["ip", "-o", "link"], capture_output=True, text=True, timeout=20, check=True
    ).stdout
    assert (
        "198.18."
        not in subprocess.run(
            ["ip", "-o", "addr"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    )
    assert not re.search(r"^\d+: p\d+@", host_links, re.MULTILINE)

    topology.cut_link(1)
    assert probe(topology, 0, 1, timeout=1.0).startswith("unreachable")
    assert probe(topology, 0, 2) == "refused"
    topology.restore_link(1)
    deadline = time.monotonic() + 10
    while probe(topology, 0, 1) != "refused":
        assert time.monotonic() < deadline, "node 1 not reachable again after restore_link"
        time.sleep(0.2)

    if shutil.which("nft"):
        topology.cut_link(2, method="nft")
        assert probe(topology, 0, 2, timeout=1.0).startswith("unreachable")
        topology.restore_link(2)
        assert probe(topology, 0, 2) == "refused"

    topology.destroy()
    left = [n for n in netns.list_namespaces() if n.startswith(f"dvmm-{os.getpid()}-")]
    assert not left, left


@requires_netns
def test_stale_namespaces_are_removed() -> None:
    # A pid that does not exist: spawn and reap a short process.
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    topo = Topology(owner_pid=dead.pid, nodes=1)
    try:
        topo.create()
        assert netns.owned(dead.pid)
        removed = netns.remove_stale()
        assert set(netns.owned(dead.pid)) == set()
        assert f"dvmm-{dead.pid}-0" in removed
    finally:
        topo.destroy()
        netns.remove_owned(dead.pid)


def test_needs_root_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsError, match="needs root"):
        netns.check_available()


def test_launcher_reports_netns_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from dvmmd.cli.dvmmctl import build_parser
    from dvmmd.cli.run import run_nodes

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    args = build_parser().parse_args(["run", "--nodes", "2", "--vcpus", "2", "--netns"])
    args.parser = None
    assert run_nodes(args) == 1


@requires_netns
def test_launcher_netns_with_fake_workers(tmp_path: Path, make_kernel: MakeKernel) -> None:
    # The launcher's --netns path on any root host: each fake worker binds its
    # own 198.18.0.x address (only possible inside its namespace); one dies.
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    kernel = make_kernel(code_exit(0))
    argv = [sys.executable, "-c", LAUNCH_FAKE, str(kernel), "3", "n0=ok n1=ok n2=ok",
            str(worker), "--netns", "--json"]  # fmt: skip
    launch = start_launcher(argv=argv)
    try:
        rc = launch.finish(120)
        out, err = launch.stdout(), launch.stderr()
        assert rc == 0, out + err
        for i in range(3):
            assert re.search(rf"node {i}\b.* at 198\.18\.0\.{i + 1}:7{100 + i} in netns", err), err
        assert not netns.owned(launch.proc.pid), "namespaces left behind"
        # A dead node: still named, still cleaned up.
        argv[5] = "n0=peerdead n1=die n2=wait"
        launch = start_launcher(argv=argv)
        rc = launch.finish(120)
        err = launch.stderr()
        assert rc == 1 and re.search(r"error: node 1 \(198\.18\.0\.2:7101, netns dvmm-", err), err
        assert not netns.owned(launch.proc.pid), "namespaces left behind after a failure"
    finally:
        launch.kill_all()
        _cleanup_owned(launch)


# --------------------------------------------------------------------------- VM runs


def _cleanup_owned(launch: Launch) -> list[str]:
    return netns.remove_owned(launch.proc.pid)


@requires_netns
@pytest.mark.usefixtures("cluster_ready")
def test_netns_two_nodes_pass_and_clean_up() -> None:
    t0 = time.monotonic()
    launch = start_launcher("--nodes", "2", "--vcpus", "2", "--memory", "256M", "--netns")
    try:
        try:
            rc = launch.finish(600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no result within 600 s\n{launch.stderr()[-3000:]}")
        out, err = launch.stdout(), launch.stderr()
        print(f"2 nodes in namespaces, run=all: {time.monotonic() - t0:.1f} s")
        print(out[-3000:])
        assert rc == 0, f"exit {rc}\n{out[-3000:]}\n{err[-3000:]}"
        assert_all_passed(out)
        assert re.search(r"node 1 at 198\.18\.0\.2:\d+ in netns dvmm-\d+-1", err), err
        assert not netns.owned(launch.proc.pid), "the launcher left its namespaces behind"
        assert not _wait_gone(list(launch.worker_pids().values()), 5)
    finally:
        launch.kill_all()
        _cleanup_owned(launch)


@requires_netns
@pytest.mark.usefixtures("cluster_ready")
def test_netns_cut_link_stops_the_vm() -> None:
    launch = start_launcher(
        "--nodes", "2", "--vcpus", "2", "--memory", "256M", "--netns",
        "--cmdline", "run=ep ep.size=64G",
    )  # fmt: skip
    try:
        assert launch.wait_for(r"dvmm-guest: boot ", 120), launch.stdout() + launch.stderr()
        time.sleep(1.0)
        assert launch.proc.poll() is None, "the run ended before the link could be cut"
        t0 = time.monotonic()
        Topology.for_owner(launch.proc.pid, 2).cut_link(1)
        try:
            rc = launch.finish(KILLED_WORKER_BOUND_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the VM did not stop after node 1 was cut off\n{launch.stderr()}")
        took = time.monotonic() - t0
        err = launch.stderr()
        print(f"cut node 1: launcher exited {rc} after {took:.1f} s\n{err[-2000:]}")
        assert rc != 0
        assert took < KILLED_WORKER_BOUND_S, took
        final = [line for line in err.splitlines() if line.startswith("dvmmctl: error:")]
        assert final and "node 1" in final[-1], err
        assert not netns.owned(launch.proc.pid), "namespaces left behind"
        assert not _wait_gone(list(launch.worker_pids().values()), 5)
    finally:
        if launch.proc.poll() is None:
            launch.proc.send_signal(signal.SIGTERM)
        launch.kill_all()
        _cleanup_owned(launch)
