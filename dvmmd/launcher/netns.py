"""Network namespaces for local multi-node runs (``dvmmctl run --nodes N --netns``).

Each node gets its own network namespace ``dvmm-<pid>-<i>`` with one interface
``eth0`` holding ``198.18.0.(i+1)/24`` (RFC 2544 benchmarking range: never a
range a real network here could be using). Every ``eth0`` is one end of a veth
pair whose other end, ``p<i>``, sits in a hub namespace ``dvmm-<pid>-hub``
on a bridge ``br0``: a switch joining the nodes. The links live only inside
these namespaces (they are created there with ``ip -n``), so the host's own
namespace is never touched and deleting the namespaces removes everything.

``<pid>`` is the launcher's process id: a test that started a launcher can
find its namespaces (``Topology.for_owner(pid, n)``) and cut a node off
(``cut_link``) while the VM runs. ``remove_stale()`` deletes namespaces left
behind by launchers that no longer exist (e.g. killed with SIGKILL).

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2's ``ip``; cutting a
link with nftables needs ``nft``.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

__all__ = [
    "ADDR_NET",
    "NetnsError",
    "Topology",
    "check_available",
    "list_namespaces",
    "node_addr",
    "owned",
    "remove_owned",
    "remove_stale",
]

#: RFC 2544 benchmarking network; node i is host i+1 in it.
ADDR_NET = ipaddress.IPv4Network("198.18.0.0/24")
PREFIX = "dvmm-"
#: Seconds any one `ip`/`nft` command may take.
CMD_TIMEOUT_S = 20.0
MAX_NODES = 253

_NAME_RE = re.compile(r"^dvmm-(\d+)-(hub|\d+)$")


class NetnsError(RuntimeError):
    """Namespaces cannot be created, changed or removed; the message says why."""


def node_addr(i: int) -> str:
    """The address of node ``i`` (``198.18.0.(i+1)``)."""
    if not 0 <= i < MAX_NODES:
        raise ValueError(f"node index {i} out of range 0..{MAX_NODES - 1}")
    return str(ADDR_NET.network_address + i + 1)


def _ip() -> str:
    path = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise NetnsError(
            "--netns needs iproute2's `ip` command, which is not installed "
            "(Debian package iproute2; `make setup`)"
        )
    return path


def check_available() -> None:
    """Raise NetnsError with a clear reason unless namespaces can be made here."""
    if os.geteuid() != 0:
        raise NetnsError(
            "--netns needs root (network namespaces and veth links need "
            "CAP_SYS_ADMIN and CAP_NET_ADMIN); run as root or drop --netns"
        )
    _ip()
    if not os.path.exists("/proc/self/ns/net"):
        raise NetnsError("--netns: this kernel has no network namespaces (/proc/self/ns/net)")


def _run(argv: Sequence[str], what: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NetnsError(
            f"{what}: `{' '.join(argv)}` did not finish in {CMD_TIMEOUT_S:.0f} s"
        ) from None
    except OSError as e:
        raise NetnsError(f"{what}: cannot run {argv[0]}: {e}") from None
    if check and cp.returncode != 0:
        msg = (cp.stderr or cp.stdout).strip() or f"exit status {cp.returncode}"
        raise NetnsError(f"{what}: `{' '.join(argv)}` failed: {msg}")
    return cp


def list_namespaces() -> list[str]:
    """Names of the network namespaces that exist (``ip netns list``)."""
    cp = _run([_ip(), "netns", "list"], "listing network namespaces")
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete ``dvmm-<pid>-*`` namespaces whose launcher is gone; return their names."""
    removed: list[str] = []
    for name in list_namespaces():
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            cp = _run([_ip(), "netns", "del", name], "removing a stale namespace", check=False)
            if cp.returncode == 0:
                removed.append(name)
    return removed


def remove_owned(owner_pid: int) -> list[str]:
    """Delete every ``dvmm-<owner_pid>-*`` namespace (a test's clean-up); return their names."""
    removed: list[str] = []
    for name in list_namespaces():
        m = _NAME_RE.match(name)
        if m and int(m.group(1)) == owner_pid:
            cp = _run([_ip(), "netns", "del", name], "removing a namespace", check=False)
            if cp.returncode == 0:
                removed.append(name)
    return removed


def owned(owner_pid: int) -> list[str]:
    """The ``dvmm-<owner_pid>-*`` namespaces that exist now."""
    out = []
    for name in list_namespaces():
        m = _NAME_RE.match(name)
        if m and int(m.group(1)) == owner_pid:
            out.append(name)
    return out


@dataclass
class Topology:
    """N node namespaces joined by veth pairs to a bridge in a hub namespace."""

    owner_pid: int
    nodes: int
    created: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _atexit_registered: bool = field(default=False, repr=False)

    @classmethod
    def for_owner(cls, owner_pid: int, nodes: int) -> Topology:
        """The topology a launcher with pid ``owner_pid`` made (to cut links, say)."""
        return cls(owner_pid=owner_pid, nodes=nodes)

    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.owner_pid}-hub"

    def name(self, i: int) -> str:
        """The namespace of node ``i``."""
        self._check_index(i)
        return f"{PREFIX}{self.owner_pid}-{i}"

    def names(self) -> list[str]:
        return [self.name(i) for i in range(self.nodes)]

    def addr(self, i: int) -> str:
        self._check_index(i)
        return node_addr(i)

    def exec_prefix(self, i: int) -> list[str]:
        """The argv prefix that runs a command inside node ``i``'s namespace."""
        return [_ip(), "netns", "exec", self.name(i)]

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.nodes:
            raise ValueError(f"node index {i} out of range 0..{self.nodes - 1}")

    # ------------------------------------------------------------------ lifecycle

    def create(self) -> None:
        """Make the namespaces and links; on failure remove what was made and raise."""
        if not 1 <= self.nodes <= MAX_NODES:
            raise NetnsError(f"--netns: {self.nodes} nodes, at most {MAX_NODES}")
        check_available()
        if not self._atexit_registered:
            atexit.register(self.destroy)
            self._atexit_registered = True
        ip = _ip()
        try:
            self._add_ns(self.hub)
            _run([ip, "-n", self.hub, "link", "set", "lo", "up"], "hub namespace")
            _run([ip, "-n", self.hub, "link", "add", "br0", "type", "bridge"], "hub bridge")
            _run([ip, "-n", self.hub, "link", "set", "br0", "up"], "hub bridge")
            for i in range(self.nodes):
                ns = self.name(i)
                what = f"node {i} namespace {ns}"
                self._add_ns(ns)
                _run([ip, "-n", ns, "link", "set", "lo", "up"], what)
                _run(
                    [ip, "-n", self.hub, "link", "add", f"p{i}", "type", "veth",
                     "peer", "name", "eth0", "netns", ns],
                    what,
                )  # fmt: skip
                _run([ip, "-n", self.hub, "link", "set", f"p{i}", "master", "br0"], what)
                _run([ip, "-n", self.hub, "link", "set", f"p{i}", "up"], what)
                prefix = ADDR_NET.prefixlen
                _run([ip, "-n", ns, "addr", "add", f"{node_addr(i)}/{prefix}", "dev", "eth0"], what)
                _run([ip, "-n", ns, "link", "set", "eth0", "up"], what)
        except BaseException:
            self.destroy()
            raise

    def _add_ns(self, name: str) -> None:
        _run([_ip(), "netns", "add", name], f"creating network namespace {name}")
        with self._lock:
            self.created.append(name)

    def destroy(self) -> list[str]:
        """Remove every namespace this topology made (idempotent); return problems."""
        with self._lock:
            names = list(reversed(self.created))
            self.created.clear()
        problems: list[str] = []
        for name in names:
            try:
                cp = _run([_ip(), "netns", "del", name], "removing a namespace", check=False)
            except NetnsError as e:
                problems.append(str(e))
                continue
            if cp.returncode != 0 and "No such file" not in cp.stderr:
                problems.append(f"cannot remove namespace {name}: {cp.stderr.strip()}")
        return problems

    def __enter__(self) -> Self:
        self.create()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()

    # ------------------------------------------------------------------ faults

    def cut_link(self, i: int, method: str = "down") -> None:
        """Cut node ``i`` off the others.

        ``down``: set its hub-side veth end down (both directions stop, no RST,
        as a pulled cable). ``nft``: an nftables table in the node's namespace
        that drops every packet on ``eth0`` (the link stays up).
        """
        self._check_index(i)
        if method == "down":
            _run([_ip(), "-n", self.hub, "link", "set", f"p{i}", "down"], f"cutting node {i}")
        elif method == "nft":
            nft = shutil.which("nft")
            if nft is None:
                raise NetnsError("cutting a link with nftables needs `nft` (Debian: nftables)")
            rules = (
                "table inet dvmm_cut {\n"
                " chain in { type filter hook input priority -300; policy accept;"
                ' iifname "eth0" drop; }\n'
                " chain out { type filter hook output priority -300; policy accept;"
                ' oifname "eth0" drop; }\n'
                "}\n"
            )
            try:
                cp = subprocess.run(
                    [_ip(), "netns", "exec", self.name(i), nft, "-f", "-"],
                    input=rules,
                    capture_output=True,
                    text=True,
                    timeout=CMD_TIMEOUT_S,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise NetnsError(f"cutting node {i} with nftables: {e}") from None
            if cp.returncode != 0:
                raise NetnsError(f"cutting node {i} with nftables: {cp.stderr.strip()}")
        else:
            raise ValueError(f"unknown cut method {method!r} (down or nft)")

    def restore_link(self, i: int) -> None:
        """Undo ``cut_link`` (either method)."""
        self._check_index(i)
        _run([_ip(), "-n", self.hub, "link", "set", f"p{i}", "up"], f"restoring node {i}")
        nft = shutil.which("nft")
        if nft is not None:
            _run(
                [_ip(), "netns", "exec", self.name(i), nft, "delete", "table", "inet", "dvmm_cut"],
                f"restoring node {i}",
                check=False,
            )
