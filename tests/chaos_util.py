"""Fault injection for tests/test_chaos.py: nodes of a ``dvmmctl run --nodes N --netns``.

A run is started in the background (``ChaosRun.start``); once its workers are
up, the test reaches into node i's network namespace (``dvmm-<launcher
pid>-<i>``, see dvmmd/netns.py) to drop packets with nftables (``NftDrop``) or
queue them behind a token bucket with tc (``Shaper``), reads what the kernel
saw (drop counters, queue overlimits, TCP retransmits), or signals a worker
process (``freeze``/``thaw``/``kill``). Every injected fault is undone in a
``finally`` by the test, and the namespaces (with every rule and qdisc in them)
go away with the launcher, so nothing leaks into the host or the next test.

The run itself goes through ``dvmmctl run`` (``python -m dvmmd.cli run``), the
way a user starts it, so the tests do not depend on the cluster spec's fields.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from test_multinode import Launch, _wait_gone, start_launcher

from dvmmd.launcher.netns import Topology

#: Seconds any one `nft`/`tc`/`ip` command may take.
CMD_TIMEOUT_S = 20.0
#: The nftables table the drop rules live in (one per node namespace).
NFT_TABLE = "dvmm_chaos"

_NODE_LINE = re.compile(
    r"dvmmctl: node (\d+)\b.*? at ([\d.]+):(\d+) in netns (\S+): .*, pid (\d+)$", re.MULTILINE
)


def netns_unavailable() -> str | None:
    """Why nodes cannot be put in namespaces with faults injected, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {pkg}; `make setup`)"
    return None


@dataclass(frozen=True)
class NodeInfo:
    index: int
    addr: str
    port: int
    netns: str
    pid: int


def _run(argv: list[str], *, stdin: str | None = None, check: bool = True) -> str:
    cp = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT_S,
        check=False,
    )
    if check and cp.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp.stdout


@dataclass
class ChaosRun:
    """One ``dvmmctl run --nodes N --netns`` in the background."""

    launch: Launch
    nodes: int
    started_at: float

    @classmethod
    def start(cls, nodes: int, vcpus: int, memory: str, cmdline: str, timeout_s: float) -> ChaosRun:
        # --timeout is the VMM's own backstop; the test bounds the run itself too.
        argv = [
            sys.executable, "-m", "dvmmd.cli", "run", "--nodes", str(nodes),
            "--vcpus", str(vcpus), "--memory", memory, "--netns", "--json",
            "--timeout", f"{timeout_s:g}", "--cmdline", cmdline,
        ]  # fmt: skip
        return cls(start_launcher(argv=argv), nodes, time.monotonic())

    # ------------------------------------------------------------------ state

    def topology(self) -> Topology:
        return Topology.for_owner(self.launch.proc.pid, self.nodes)

    def node_infos(self) -> dict[int, NodeInfo]:
        """Every node the launcher reported starting (address, port, namespace, pid)."""
        return {
            int(m[1]): NodeInfo(int(m[1]), m[2], int(m[3]), m[4], int(m[5]))
            for m in _NODE_LINE.finditer(self.launch.stderr())
        }

    def wait_started(self, timeout: float) -> dict[int, NodeInfo]:
        """Wait for the guest's boot line; return the nodes (fails the test otherwise)."""
        if not self.launch.wait_for(r"dvmm-guest: boot ", timeout):
            raise AssertionError(f"the guest did not boot within {timeout:.0f} s\n{self.explain()}")
        infos = self.node_infos()
        assert sorted(infos) == list(range(self.nodes)), self.explain()
        return infos

    def running(self) -> bool:
        return self.launch.proc.poll() is None

    def finished_guest(self) -> bool:
        """The guest printed its closing summary line."""
        return re.search(r"dvmm-guest: \d+ passed, \d+ failed", self.launch.stdout()) is not None

    def finish(self, bound_s: float) -> int:
        """The launcher's exit status; fails the test (a hang) if it runs past ``bound_s``."""
        try:
            return self.launch.finish(bound_s)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(
                f"hang: the run did not end within {bound_s:.0f} s\n{self.explain()}"
            ) from None

    def summary(self) -> dict[str, Any]:
        """The ``--json`` summary line (the last JSON object on stdout)."""
        for line in reversed(self.launch.stdout().splitlines()):
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                parsed: dict[str, Any] = json.loads(line)
                return parsed
        raise AssertionError("no JSON summary line in the output\n" + self.explain())

    def final_error(self) -> str:
        """The launcher's last ``dvmmctl: error:`` line ('' if none)."""
        lines = [ln for ln in self.launch.stderr().splitlines() if ln.startswith("dvmmctl: error:")]
        return lines[-1] if lines else ""

    def leftover_pids(self, infos: dict[int, NodeInfo], timeout: float = 5.0) -> list[int]:
        return _wait_gone([n.pid for n in infos.values()], timeout)

    def explain(self) -> str:
        return (
            f"stdout tail:\n{self.launch.stdout()[-3000:]}\n"
            f"stderr tail:\n{self.launch.stderr()[-3000:]}"
        )

    def kill_all(self) -> None:
        """Whatever happened: continue frozen workers (SIGKILL needs none), kill everything."""
        for n in self.node_infos().values():
            _signal(n.pid, signal.SIGCONT)
        self.launch.kill_all()

    # ------------------------------------------------------------------ faults

    def ns_exec(
        self, i: int, argv: list[str], *, stdin: str | None = None, check: bool = True
    ) -> str:
        """Run ``argv`` in node i's namespace; its stdout (a failure fails the test if ``check``)."""
        return _run([*self.topology().exec_prefix(i), *argv], stdin=stdin, check=check)

    def link_bytes(self, i: int) -> int:
        """Bytes node i's eth0 has received and sent (all of its traffic to the others)."""
        text = self.ns_exec(i, ["ip", "-s", "-j", "link", "show", "dev", "eth0"])
        stats = json.loads(text)[0]["stats64"]
        return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])

    def tcp_retransmits(self, i: int) -> int:
        """TcpRetransSegs of node i's namespace (/proc/net/snmp is per namespace)."""
        text = self.ns_exec(i, ["cat", "/proc/net/snmp"])
        rows = [ln.split()[1:] for ln in text.splitlines() if ln.startswith("Tcp:")]
        assert len(rows) == 2, text
        return int(dict(zip(rows[0], rows[1], strict=True))["RetransSegs"])


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def freeze(node: NodeInfo) -> None:
    """SIGSTOP the node's worker: every thread stops, its sockets stay open."""
    os.kill(node.pid, signal.SIGSTOP)


def thaw(node: NodeInfo) -> None:
    _signal(node.pid, signal.SIGCONT)


class NftDrop:
    """Drop the DSM traffic of node i (both directions) with nftables, counting drops.

    ``ports`` are the nodes' DSM listening ports: every data-plane connection
    has one of them at one end, so matching source or destination port catches
    all of it and nothing else. ``percent`` < 100 drops a random share
    (``numgen random mod 100 < percent``) instead of everything.
    """

    def __init__(self, run: ChaosRun, i: int, ports: list[int], percent: int = 100) -> None:
        self.run, self.i, self.ports, self.percent = run, i, ports, percent
        self.active = False

    def add(self) -> None:
        ports = ", ".join(str(p) for p in self.ports)
        cond = f"numgen random mod 100 < {self.percent} " if self.percent < 100 else ""
        rules = (
            f"table inet {NFT_TABLE} {{\n"
            " chain in { type filter hook input priority -300; policy accept;\n"
            f"  meta l4proto tcp th sport {{ {ports} }} {cond}counter drop\n"
            f"  meta l4proto tcp th dport {{ {ports} }} {cond}counter drop\n"
            " }\n"
            " chain out { type filter hook output priority -300; policy accept;\n"
            f"  meta l4proto tcp th sport {{ {ports} }} {cond}counter drop\n"
            f"  meta l4proto tcp th dport {{ {ports} }} {cond}counter drop\n"
            " }\n"
            "}\n"
        )
        self.run.ns_exec(self.i, ["nft", "-f", "-"], stdin=rules)
        self.active = True

    def dropped(self) -> int:
        """Packets the rules dropped so far."""
        text = self.run.ns_exec(self.i, ["nft", "-j", "list", "table", "inet", NFT_TABLE])
        total = 0
        for item in json.loads(text)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
        return total

    def remove(self) -> None:
        if self.active:
            self.active = False
            # Unchecked: if the run has ended meanwhile, its namespace (and the
            # rules in it) is gone already, and the test reports how it ended.
            self.run.ns_exec(self.i, ["nft", "delete", "table", "inet", NFT_TABLE], check=False)


class Shaper:
    """Queue node i's outgoing packets behind a token bucket (tc tbf) on its eth0.

    The kernel here has no sch_netem, so there is no fixed added latency;
    instead every packet waits its turn at ``rate`` (a 4 KiB page at 8 Mbit/s
    waits ~4 ms, more behind a queue). ``limit`` is large enough that the queue
    delays packets rather than dropping them.
    """

    def __init__(self, run: ChaosRun, i: int, rate: str, burst: str, limit: str) -> None:
        self.run, self.i = run, i
        self.rate, self.burst, self.limit = rate, burst, limit
        self.active = False

    def add(self) -> None:
        self.run.ns_exec(
            self.i,
            ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", self.rate,
             "burst", self.burst, "limit", self.limit],
        )  # fmt: skip
        self.active = True

    def stats(self) -> dict[str, int]:
        """The qdisc's counters: packets, bytes, drops, overlimits (packets made to wait)."""
        text = self.run.ns_exec(self.i, ["tc", "-s", "-j", "qdisc", "show", "dev", "eth0"])
        for q in json.loads(text):
            if q.get("kind") == "tbf":
                return {k: int(q.get(k, 0)) for k in ("packets", "bytes", "drops", "overlimits")}
        raise AssertionError(f"no tbf qdisc on node {self.i}'s eth0: {text}")

    def remove(self) -> None:
        if self.active:
            self.active = False
            # Unchecked, as NftDrop.remove.
            self.run.ns_exec(self.i, ["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
