"""Run one VM across N local nodes: ``dvmmctl run --nodes N [--netns] ...``.

Each node is a separate VMM worker process (``python -m dvmmd.worker SPEC
RESULT``, the same worker the daemon spawns) running node i's share of the VM:
the vCPUs of ``numa[i]`` and home of ``numa[i]``'s memory (docs/interfaces.md,
the ``cluster`` field). The launcher

- checks the request (1..16 nodes, at least one vCPU per node, memory that
  splits into page-aligned shares) and lays the VM out with the daemon's placement
  function (dvmmd.vm.placement.layout_on): vCPUs in contiguous blocks spread evenly
  (the BSP, vCPU 0, on node 0, the boot node), memory homed with them, in proportion;
- makes the data path's key material (dvmmd.security.keys): a random session id and one
  X25519 key pair per node, and one address per node: ``127.0.0.(i+1)`` (all of
  127/8 is loopback on Linux) with a free port, or with ``--netns``
  ``198.18.0.(i+1)`` in node i's own network namespace (``dvmmd.launcher.netns``);
- writes each node's spec (public: addresses, session id, every node's public key,
  ``security`` from ``--data-plane``, default ``encrypt``) into a private temporary
  directory and starts the workers with ``--key-stdin``, writing each one's private
  key to its stdin (never to a file), each in its own session (so a terminal's
  Ctrl-C reaches only the launcher, which forwards it) and with
  ``PR_SET_PDEATHSIG`` = SIGKILL (so no worker outlives a launcher that is
  killed);
- streams the console (only the boot node has ``console_stdout``; every node
  writes its own console log) and the workers' stderr prefixed ``node i:``;
- waits for every worker. Once one has ended, the others get ``PEER_GRACE_S``
  to end by themselves (a worker that dies is detected by its peers, whose DSM
  declares a silent peer dead after ~3 s) before they are sent SIGTERM and then
  SIGKILL. SIGINT/SIGTERM to the launcher stop every worker the same way.

The exit status is the guest's (the boot node's result), 124 for a timeout,
130/143 when interrupted, 1 with a message naming the node for any failure.
``--stats`` prints a per-node table of counters (``dvmmd.vm.stats_report``);
``--json`` prints one summary line ``{status, reason, error, exit_code, nodes:
[{node, addr, ...,  stats}], totals, ...}``.

With ``--nodes 1`` one worker runs the VM with no ``cluster`` field, exactly as
a single-node VM.

Entry point: ``Launcher(Options(...)).run() -> int`` (``dvmmctl run --nodes``,
dvmmd/cli/run.py, builds the options from its arguments). A request that cannot
be run raises `UsageError` (exit 2), a failure to launch `LaunchError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from dvmmd.launcher.netns import NetnsError, Topology
from dvmmd.security.keys import DATA_PLANE_HELP, DATA_PLANE_MODES, NodeKey, new_session_hex
from dvmmd.vm import stats_report
from dvmmd.vm.placement import PlacementError, layout_on
from dvmmd.vm.sizes import PAGE_SIZE, format_size
from dvmmd.vm.spec import (
    DEFAULT_CMDLINE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    MAX_VCPUS,
    SpecError,
    build_spec,
    check_cpu_model,
    exit_code,
    host_default_cpu_model,
    parse_result,
)

__all__ = [
    "MAX_NODES",
    "LaunchError",
    "Launcher",
    "Options",
    "UsageError",
    "layout",
    "validate",
]

PROG = "dvmmctl"
MAX_NODES = 16
#: Port every node listens on inside its own namespace (--netns).
NETNS_PORT = 7100
#: After one worker ends (or dies), how long the others get to end by themselves.
PEER_GRACE_S = 10.0
#: After SIGTERM, how long a worker gets before SIGKILL.
TERM_GRACE_S = 3.0
#: With a timeout, how long past it the launcher waits before killing everything.
TIMEOUT_BACKSTOP_S = 30.0
POLL_S = 0.05
EXIT_TERMINATED = 128 + signal.SIGTERM

PR_SET_PDEATHSIG = 1


class LaunchError(Exception):
    """A failure to report as ``dvmmctl: error: <message>`` (exit status 1)."""


class UsageError(Exception):
    """A request that cannot be run (exit status 2)."""


# --------------------------------------------------------------------------- options


@dataclass
class Options:
    """What ``run`` needs; ``from_args`` reads it from ``dvmmctl run``'s namespace."""

    nodes: int = 1
    vcpus: int = 1
    memory: int = 256 * 1024 * 1024
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = DEFAULT_CMDLINE
    console_log: str | None = None
    timeout: float = 0.0
    netns: bool = False
    base_port: int | None = None
    stats: bool = False
    json: bool = False
    #: Memory aggregation: bytes of other nodes' memory a node may keep resident.
    foreign_budget: int | None = None
    #: DSM hold window (us) against ping-pong pages; None = the engine's default, 0 = off.
    hold_window_us: int | None = None
    #: DSM sequential prefetch, pages per batch at most; None = the engine's default, 0 = off.
    prefetch_max_pages: int | None = None
    #: How the nodes' messages move: "tcp" or "shm" (shared memory, one host).
    transport: str = "tcp"
    #: CPU model for every node; None = this host's default (resolved once, so all
    #: nodes get the same one).
    cpu: str | None = None
    #: Protection of the data path between nodes (keys.DATA_PLANE_MODES).
    data_plane: str = "encrypt"
    #: The spec's ``snapshot`` plan (dvmmd.vm.snapshots), for every node.
    snapshot: dict[str, Any] | None = None
    #: Restore from this snapshot directory, with the snapshot's NUMA layout.
    restore: str | None = None
    restore_numa: list[dict[str, Any]] | None = None
    #: vCPU migrations during the run (dvmmd.vm.migrations), made by the boot node.
    migrate: list[dict[str, Any]] | None = None
    #: The boot node's control socket (rust/src/vm/control.rs).
    control: str | None = None


#: Largest DSM prefetch batch (the engine's MAX_PREFETCH).
MAX_PREFETCH_PAGES = 64


# --------------------------------------------------------------------------- layout


def validate(opts: Options) -> None:
    """Raise UsageError unless ``opts`` describes a VM that can be laid out."""
    if not 1 <= opts.nodes <= MAX_NODES:
        raise UsageError(f"--nodes {opts.nodes}: a VM runs on 1 to {MAX_NODES} local nodes")
    if not 1 <= opts.vcpus <= MAX_VCPUS:
        raise UsageError(f"--vcpus {opts.vcpus}: use 1 to {MAX_VCPUS}")
    if opts.vcpus < opts.nodes:
        raise UsageError(
            f"--nodes {opts.nodes} needs at least {opts.nodes} vCPUs (one per node), "
            f"not {opts.vcpus}"
        )
    if opts.memory % PAGE_SIZE:
        raise UsageError(f"--memory {opts.memory}: not a multiple of the 4 KiB page size")
    if opts.memory // PAGE_SIZE < opts.nodes:
        raise UsageError(
            f"--memory {format_size(opts.memory)} cannot be split into {opts.nodes} "
            "page-aligned shares"
        )
    if opts.transport == "shm" and opts.netns:
        # The doorbell is an abstract unix socket, which a network namespace hides.
        raise UsageError("--transport shm: not with --netns (nodes must share a host view)")
    if opts.foreign_budget is not None and opts.foreign_budget < PAGE_SIZE:
        raise UsageError(f"--foreign-budget {opts.foreign_budget}: at least one 4 KiB page")
    if not math.isfinite(opts.timeout) or opts.timeout < 0:
        raise UsageError(f"--timeout {opts.timeout}: use 0 (none) or seconds")
    if opts.cpu is not None:
        try:
            check_cpu_model(opts.cpu)
        except SpecError as e:
            raise UsageError(f"--cpu: {e}") from None
    if opts.data_plane not in DATA_PLANE_MODES:
        raise UsageError(
            f"--data-plane {opts.data_plane}: use one of {', '.join(DATA_PLANE_MODES)}"
        )


def layout(vcpus: int, memory: int, nodes: int) -> list[dict[str, Any]]:
    """The ``numa`` list: the daemon's placement (dvmmd.vm.placement) of the VM over
    ``nodes`` local nodes with room for it, so ``run --nodes`` and ``boot`` lay the same
    request out the same way: node i gets a contiguous block of vCPUs (the first
    ``vcpus % nodes`` nodes one more) and homes memory in proportion to its vCPUs."""
    try:
        return layout_on([f"node{i}" for i in range(nodes)], vcpus, memory).numa()
    except PlacementError as e:
        raise UsageError(str(e)) from None


# --------------------------------------------------------------------------- workers

_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC


def _child_setup(parent_pid: int, libc: Any) -> None:
    """In the forked worker, before exec: die with the launcher."""
    if libc:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the launcher died before prctl
        os._exit(1)


@dataclass
class Node:
    index: int
    host: str
    port: int
    numa: dict[str, Any]
    spec_path: Path
    result_path: Path
    console_log: Path
    netns: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    reader: threading.Thread | None = None
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    #: This node's data-path key pair (multi-node); the private half goes to the
    #: worker's stdin only.
    key: NodeKey | None = None
    result: dict[str, Any] | None = None
    returncode: int | None = None
    ended_at: float | None = None
    term_sent_at: float | None = None
    killed_by_launcher: bool = False

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None

    def died(self) -> bool:
        """Ended without a result of its own (crashed, killed), not by our hand."""
        if self.returncode is None or self.killed_by_launcher:
            return False
        return self.result is None and self.returncode != 0

    def death(self) -> str:
        rc = self.returncode
        if rc is not None and rc < 0:
            try:
                how = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"killed by signal {-rc}"
        else:
            how = f"exited with status {rc} without a result"
        # Its last line that says something about the end: warnings (e.g. about the
        # CPU model, printed at start) are not why a worker died.
        last = next(
            (
                line
                for line in reversed(self.stderr_tail)
                if line.strip() and "warning:" not in line[:48].lower()
            ),
            None,
        )
        return how + (f" (last words: {last.strip()})" if last else "")


def _pump_stderr(node: Node, stream: IO[bytes], prefix: str) -> None:
    out = sys.stderr
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        node.stderr_tail.append(line)
        try:
            out.write(f"{prefix}{line}\n")
            out.flush()
        except (OSError, ValueError):
            pass
    stream.close()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _send_key(proc: subprocess.Popen[bytes], key: NodeKey) -> None:
    """Write the worker's private key to its stdin (one line) and close the pipe."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(key.private_hex.encode("ascii") + b"\n")
        proc.stdin.flush()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the worker died at once: reported like any other death
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()


def _package_parent() -> str:
    """The directory that holds the ``dvmmd`` package (for the workers' PYTHONPATH)."""
    return str(Path(__file__).resolve().parents[2])


class Launcher:
    """One run: lay out, start, watch and clean up N workers."""

    def __init__(
        self,
        opts: Options,
        *,
        worker_argv: Sequence[str] | None = None,
        peer_grace_s: float = PEER_GRACE_S,
        term_grace_s: float = TERM_GRACE_S,
    ) -> None:
        self.opts = opts
        #: The worker command; SPEC and RESULT paths are appended (tests use a fake).
        self.worker_argv = (
            list(worker_argv) if worker_argv else [sys.executable, "-m", "dvmmd.worker"]
        )
        self.peer_grace_s = peer_grace_s
        self.term_grace_s = term_grace_s
        self.keep_logs = False
        self.multi = opts.nodes > 1
        self.boot = 0
        self.nodes: list[Node] = []
        self.tmpdir: Path | None = None
        self.topology: Topology | None = None
        self.signum: int | None = None
        self.timed_out = False
        self.started_at = 0.0
        self.cleanup_problems: list[str] = []

    # ------------------------------------------------------------------ set-up

    def _addresses(self) -> list[tuple[str, int]]:
        n = self.opts.nodes
        if self.opts.netns:
            assert self.topology is not None
            base = self.opts.base_port or NETNS_PORT
            return [(self.topology.addr(i), base + i) for i in range(n)]
        hosts = [f"127.0.0.{i + 1}" for i in range(n)]
        if self.opts.base_port:
            return [(h, self.opts.base_port + i) for i, h in enumerate(hosts)]
        try:
            return [(h, _free_port(h)) for h in hosts]
        except OSError as e:
            raise LaunchError(f"cannot find free ports on 127.0.0.1..{n}: {e}") from None

    def _make_specs(self) -> None:
        opts = self.opts
        assert self.tmpdir is not None
        # Where the nodes' shares are; a restore keeps the snapshot's NUMA
        # topology for the guest and, on another number of nodes, places it
        # as a fresh boot on these nodes would be placed.
        phys = layout(opts.vcpus, opts.memory, opts.nodes)
        numa = opts.restore_numa or phys
        placement = None
        if numa != phys:
            placement = {
                "homes": [[n["mem_start"], n["mem_size"]] for n in phys],
                "vcpu_node": [
                    next(k for k, n in enumerate(phys) if v in n["cpus"]) for v in range(opts.vcpus)
                ],
            }
        addrs = self._addresses()
        # Public key material in the specs; each private key only to its own worker.
        session = new_session_hex()
        keys = [NodeKey.generate() for _ in addrs] if self.multi else []
        # One explicit CPU model for every node: a guest must see the same CPU everywhere.
        cpu = opts.cpu if opts.cpu is not None else host_default_cpu_model()
        for i, (host, port) in enumerate(addrs):
            console = self.tmpdir / f"node{i}.console.log"
            if i == self.boot and opts.console_log:
                console = Path(opts.console_log)
            cluster = None
            if self.multi:
                cluster = {
                    "node_index": i,
                    "nodes": [{"addr": f"{h}:{p}"} for h, p in addrs],
                    "boot_node": self.boot,
                    "security": opts.data_plane,
                    "session_hex": session,
                    "node_pubkeys_hex": [k.public_hex for k in keys],
                }
                if opts.foreign_budget is not None:
                    cluster["foreign_budget_pages"] = max(1, opts.foreign_budget // PAGE_SIZE)
                if opts.hold_window_us is not None:
                    cluster["hold_window_us"] = opts.hold_window_us
                if opts.prefetch_max_pages is not None:
                    cluster["prefetch_max_pages"] = opts.prefetch_max_pages
                if opts.transport != "tcp":
                    cluster["transport"] = opts.transport
                if placement is not None:
                    cluster["placement"] = placement
            try:
                spec = build_spec(
                    vcpus=opts.vcpus,
                    memory=opts.memory,
                    kernel=opts.kernel,
                    initrd=opts.initrd,
                    cmdline=opts.cmdline,
                    console_log=console,
                    console_stdout=i == self.boot,
                    timeout_s=opts.timeout,
                    numa=numa if self.multi else None,
                    cluster=cluster,
                    cpu=cpu,
                    snapshot=opts.snapshot,
                    restore=opts.restore,
                    migrate=opts.migrate,
                    control=opts.control if i == self.boot else None,
                )
            except SpecError as e:
                raise UsageError(str(e)) from None
            node = Node(
                index=i,
                host=host,
                port=port,
                numa=phys[i],
                spec_path=self.tmpdir / f"node{i}.spec.json",
                result_path=self.tmpdir / f"node{i}.result.json",
                console_log=console,
                netns=self.topology.name(i) if self.topology else None,
                key=keys[i] if self.multi else None,
            )
            _write_private(node.spec_path, json.dumps(spec, indent=1) + "\n")
            self.nodes.append(node)

    def _describe(self, node: Node) -> str:
        cpus = node.numa["cpus"]
        cpu_text = f"vCPU {cpus[0]}" if len(cpus) == 1 else f"vCPUs {cpus[0]}-{cpus[-1]}"
        start, size = node.numa["mem_start"], node.numa["mem_size"]
        where = f" in netns {node.netns}" if node.netns else ""
        boot = " (boot node)" if node.index == self.boot else ""
        return (
            f"node {node.index}{boot} at {node.addr}{where}: {cpu_text}, memory "
            f"{format_size(start)}+{format_size(size)}"
        )

    def _spawn(self) -> None:
        env = dict(os.environ)
        pkg = _package_parent()
        env["PYTHONPATH"] = pkg + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        libc = _libc()
        me = os.getpid()
        if self.multi:
            print(
                f"{PROG}: data plane: {self.opts.data_plane} "
                f"({DATA_PLANE_HELP[self.opts.data_plane]})",
                file=sys.stderr,
            )
        for node in self.nodes:
            argv = [*self.worker_argv, str(node.spec_path), str(node.result_path)]
            if node.key is not None:
                argv.append("--key-stdin")
            if self.topology is not None:
                argv = self.topology.exec_prefix(node.index) + argv
            try:
                node.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if node.key is not None else subprocess.DEVNULL,
                    stdout=None,
                    stderr=subprocess.PIPE,
                    env=env,
                    cwd=pkg,
                    start_new_session=True,
                    preexec_fn=lambda: _child_setup(me, libc),  # noqa: PLW1509
                )
            except OSError as e:
                raise LaunchError(f"cannot start the worker of node {node.index}: {e}") from None
            if node.key is not None:
                _send_key(node.proc, node.key)
            if self.multi:
                print(f"{PROG}: {self._describe(node)}, pid {node.proc.pid}", file=sys.stderr)
        sys.stderr.flush()
        # Readers start after every fork (preexec_fn and threads do not mix well).
        for node in self.nodes:
            assert node.proc is not None and node.proc.stderr is not None
            prefix = f"node {node.index}: " if self.multi else ""
            node.reader = threading.Thread(
                target=_pump_stderr,
                args=(node, node.proc.stderr, prefix),
                name=f"dvmm-node{node.index}-stderr",
                daemon=True,
            )
            node.reader.start()

    # ------------------------------------------------------------------ watching

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def _signal_node(self, node: Node, sig: int) -> None:
        if node.proc is None or node.returncode is not None:
            return
        # Each worker leads its own process group (start_new_session) and is
        # not reaped yet (returncode is None), so its pgid cannot be reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.proc.pid, sig)

    def _terminate(self, node: Node, now: float) -> None:
        if node.running and node.term_sent_at is None:
            node.killed_by_launcher = True
            node.term_sent_at = now
            self._signal_node(node, signal.SIGTERM)

    def _reap(self, node: Node, now: float) -> None:
        assert node.proc is not None
        rc = node.proc.poll()
        if rc is None:
            return
        node.returncode = rc
        node.ended_at = now
        try:
            text = node.result_path.read_text()
        except OSError:
            node.result = None
        else:
            node.result = parse_result(text)

    def _watch(self) -> None:
        opts = self.opts
        deadline = self.started_at + opts.timeout + TIMEOUT_BACKSTOP_S if opts.timeout > 0 else None
        first_end: float | None = None
        stop_at: float | None = None
        while any(n.running for n in self.nodes):
            now = time.monotonic()
            for node in self.nodes:
                if node.running:
                    self._reap(node, now)
                    if node.returncode is not None and first_end is None:
                        first_end = now
                        stop_at = now + self.peer_grace_s
            if self.signum is not None:
                stop_at = now if stop_at is None else min(stop_at, now)
            if deadline is not None and now > deadline and stop_at is None:
                self.timed_out = True
                stop_at = now
            if stop_at is not None and now >= stop_at:
                for node in self.nodes:
                    self._terminate(node, now)
                    if (
                        node.running
                        and node.term_sent_at is not None
                        and now - node.term_sent_at > self.term_grace_s
                    ):
                        self._signal_node(node, signal.SIGKILL)
            time.sleep(POLL_S)
        for node in self.nodes:
            if node.reader is not None:
                node.reader.join(timeout=2.0)

    # ------------------------------------------------------------------ outcome

    def _outcome(self) -> tuple[dict[str, Any], int, list[str]]:
        """(summary result, exit status, warnings)."""
        boot = self.nodes[self.boot]
        warnings: list[str] = []
        dead = [n for n in self.nodes if n.died()]
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            code = EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_TERMINATED
            return (
                {"reason": "stopped", "status": None, "error": f"interrupted by {name}"},
                code,
                warnings,
            )
        if dead:
            parts = [
                f"node {n.index} ({n.addr}{', netns ' + n.netns if n.netns else ''}) died: "
                + n.death()
                for n in dead
            ]
            others = [
                f"node {n.index}: {n.result.get('error')}"
                for n in self.nodes
                if n not in dead and n.result is not None and n.result.get("error")
            ]
            msg = "; ".join(parts)
            if others:
                msg += " [" + "; ".join(others) + "]"
            return {"reason": "error", "status": None, "error": msg}, EXIT_ERROR, warnings
        if self.timed_out:
            return (
                {
                    "reason": "timeout",
                    "status": None,
                    "error": f"the workers did not stop {TIMEOUT_BACKSTOP_S:.0f} s after "
                    f"the {self.opts.timeout:g} s timeout; killed",
                },
                EXIT_TIMEOUT,
                warnings,
            )
        if boot.result is None:
            err = f"the boot node (node {boot.index}) ended without a result"
            if boot.killed_by_launcher:
                ended = [n for n in self.nodes if n.ended_at is not None and n is not boot]
                first = min(ended, key=lambda n: n.ended_at or 0.0) if ended else None
                err = (
                    f"the boot node (node {boot.index}) did not stop within "
                    f"{self.peer_grace_s:.0f} s"
                    + (f" after node {first.index} ended" if first is not None else "")
                    + "; killed"
                )
            return {"reason": "error", "status": None, "error": err}, EXIT_ERROR, warnings
        result = {
            "reason": boot.result.get("reason"),
            "status": boot.result.get("status"),
            "error": boot.result.get("error"),
        }
        code = exit_code(boot.result)
        for n in self.nodes:
            if n is boot:
                continue
            if n.killed_by_launcher and (n.result is None or n.result.get("reason") == "stopped"):
                warnings.append(
                    f"node {n.index} did not stop within {self.peer_grace_s:.0f} s after the "
                    "boot node; it was stopped by the launcher"
                )
            elif n.result is not None and (
                n.result.get("reason") != result["reason"]
                or n.result.get("status") != result["status"]
            ):
                warnings.append(
                    f"node {n.index} ended with {n.result.get('reason')}"
                    f"/{n.result.get('status')}"
                    + (f": {n.result.get('error')}" if n.result.get("error") else "")
                )
        if result["reason"] in ("error", "crash") and not result["error"]:
            result["error"] = f"node {boot.index} reported {result['reason']}"
        return result, code, warnings

    def _node_entries(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for n in self.nodes:
            r = n.result or {}
            out.append(
                {
                    "node": n.index,
                    "addr": n.addr if self.multi else None,
                    "netns": n.netns,
                    "cpus": n.numa["cpus"],
                    "mem_start": n.numa["mem_start"],
                    "mem_size": n.numa["mem_size"],
                    "pid": n.proc.pid if n.proc else None,
                    "exit_status": n.returncode,
                    "reason": r.get("reason"),
                    "status": r.get("status"),
                    "error": r.get("error"),
                    "stats": r.get("stats") or {},
                    "console_log": str(n.console_log)
                    if self.keep_logs or n.console_log.parent != self.tmpdir
                    else None,
                }
            )
        return out

    def _report(self, result: dict[str, Any], code: int, warnings: list[str]) -> None:
        sys.stdout.flush()
        entries = self._node_entries()
        if self.opts.stats:
            print(stats_report.format_table(entries), flush=True)
        if self.opts.json:
            summary = {
                "status": result["status"],
                "reason": result["reason"],
                "error": result["error"],
                "exit_code": code,
                "boot_node": self.boot,
                "data_plane": self.opts.data_plane if self.multi else None,
                "elapsed_s": round(time.monotonic() - self.started_at, 3),
                "nodes": entries,
                "totals": stats_report.totals([e["stats"] for e in entries]),
            }
            print(json.dumps(summary, sort_keys=True), flush=True)
        for w in warnings:
            print(f"{PROG}: warning: {w}", file=sys.stderr)
        reason, status, error = result["reason"], result["status"], result["error"]
        if reason == "debug_exit" and status != 0:
            print(
                f"{PROG}: the guest exited with status {status}" + (f" ({error})" if error else ""),
                file=sys.stderr,
            )
        elif reason == "timeout":
            print(f"{PROG}: error: the VM timed out: {error or self.opts.timeout}", file=sys.stderr)
        elif self.signum is not None:
            print(f"{PROG}: {error}: the VM was stopped", file=sys.stderr)
        elif reason == "snapshot":
            print(f"{PROG}: the VM stopped after its snapshot in {error}", file=sys.stderr)
        elif reason not in ("debug_exit", "shutdown") and (error or reason != "stopped"):
            print(f"{PROG}: error: {error or reason}", file=sys.stderr)
        sys.stderr.flush()

    # ------------------------------------------------------------------ run

    def _cleanup(self, keep_logs: bool) -> None:
        now = time.monotonic()
        for node in self.nodes:
            if node.running:
                self._signal_node(node, signal.SIGKILL)
                assert node.proc is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=5.0)
                self._reap(node, now)
        if self.topology is not None:
            self.cleanup_problems.extend(self.topology.destroy())
        if self.tmpdir is not None:
            for node in self.nodes:
                with contextlib.suppress(OSError):
                    node.spec_path.unlink()  # the run's, not the user's (no key in it)
            if keep_logs:
                print(f"{PROG}: node logs and results kept in {self.tmpdir}", file=sys.stderr)
            else:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
        for p in self.cleanup_problems:
            print(f"{PROG}: warning: {p}", file=sys.stderr)

    def run(self) -> int:
        validate(self.opts)
        old: dict[int, Any] = {}
        in_main = threading.current_thread() is threading.main_thread()
        code = EXIT_ERROR
        try:
            if in_main:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    old[sig] = signal.signal(sig, self._on_signal)
            self.tmpdir = Path(tempfile.mkdtemp(prefix="dvmm-run-"))
            if self.opts.netns:
                self.topology = Topology(owner_pid=os.getpid(), nodes=self.opts.nodes)
                try:
                    self.topology.create()
                except NetnsError as e:
                    raise LaunchError(str(e)) from None
            self._make_specs()
            self.started_at = time.monotonic()
            if self.signum is None:
                self._spawn()
                self._watch()
            result, code, warnings = self._outcome()
            self.keep_logs = code != 0 and self.signum is None and bool(self.nodes)
            self._report(result, code, warnings)
        finally:
            self._cleanup(keep_logs=self.keep_logs)
            for signo, handler in old.items():
                signal.signal(signo, handler)
        return code
