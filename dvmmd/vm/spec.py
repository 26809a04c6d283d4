"""The VM spec and result JSON shared with the Rust core (docs/interfaces.md).

``build_spec`` makes a spec dict from what a user asked for and checks it, so
that a bad request fails here with a message naming the problem, before any
KVM work starts; ``validate_spec`` checks a spec that came from elsewhere (a
file, the daemon); ``exit_code`` maps a result to a process exit status.

The Rust side checks everything again: these checks exist for clear messages,
not for safety.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dvmmd.host import current_host_kind
from dvmmd.security.keys import DATA_PLANE_MODES, KeyMaterialError, check_key_hex, is_session_hex
from dvmmd.vm import migrations, snapshots
from dvmmd.vm.sizes import PAGE_SIZE, SizeError, check_guest_memory

__all__ = [
    "CPU_MODELS",
    "CPU_MODEL_HELP",
    "DEFAULT_CMDLINE",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_TIMEOUT",
    "GUEST_ENV",
    "LAPIC_KINDS",
    "MAX_CMDLINE",
    "MAX_VCPUS",
    "RESULT_REASONS",
    "SpecError",
    "build_spec",
    "check_cpu_model",
    "check_lapic",
    "default_cpu_model",
    "exit_code",
    "find_bundled_guest",
    "host_default_cpu_model",
    "parse_result",
    "sniff_kernel",
    "spec_to_json",
    "validate_spec",
]

#: APIC IDs equal vCPU indexes and the IOAPIC takes the ID after the last vCPU;
#: xAPIC physical IDs are 8 bits and 0xFF is the broadcast ID, so 0..253 are
#: vCPUs and 254 at most is the IOAPIC.
MAX_VCPUS = 254
#: Longest kernel command line accepted (Linux's x86 COMMAND_LINE_SIZE is 2048;
#: the bundled guest and Multiboot have no fixed limit).
MAX_CMDLINE = 4096
DEFAULT_CMDLINE = "run=all"
#: Environment variable naming the guest kernel to boot by default.
GUEST_ENV = "DVMM_GUEST"

RESULT_REASONS = ("debug_exit", "shutdown", "crash", "error", "timeout", "stopped", "snapshot")

#: Exit statuses for results that carry no guest status. A guest's own
#: debug-exit status (0-255) is passed through unchanged, so these can
#: coincide with a guest's; the message printed with them tells them apart.
EXIT_ERROR = 1
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT


class SpecError(ValueError):
    """A VM request that cannot be run, with a message saying why."""


# --------------------------------------------------------------------------- CPU model

#: The CPU models the VMM knows (rust/src/cpuid.rs ``CpuModel``), in listing order:
#: ``host`` offers the guest everything KVM_GET_SUPPORTED_CPUID offers; ``baseline``
#: leaves out what KVM's instruction emulator refuses or a guest kernel would run at
#: CPL0 (XSAVE and AVX*, CX16, PCID/INVPCID, FSGSBASE, SMAP, CLFLUSHOPT/CLWB,
#: RDRAND/RDSEED, RDTSCP, ...).
CPU_MODELS: tuple[str, ...] = ("host", "baseline")
#: One line per model for help texts.
CPU_MODEL_HELP = {
    "host": "everything KVM offers (hardware-virtualization hosts)",
    "baseline": "host minus what KVM PVM's CPL0 emulator refuses (XSAVE/AVX, "
    "CX16, PCID, FSGSBASE, ...)",
}


def default_cpu_model(host_kind: str) -> str:
    """The CPU model for a host of ``host_kind`` (``dvmmctl doctor``'s classification).

    ``host`` where all guest code runs natively (``vmx``, ``svm``); ``baseline``
    everywhere else: on ``pvm`` guest CPL0 code is emulated and the emulator refuses
    instructions ``host`` would promise, and on an unrecognized host the safe model is
    the right guess.
    """
    return "host" if host_kind in ("vmx", "svm") else "baseline"


def host_default_cpu_model() -> str:
    """The default CPU model for this host (its kind detected as ``dvmmctl doctor`` does)."""
    return default_cpu_model(current_host_kind())


#: The local APICs a VM can get (rust/src/kirq.rs ``LapicKind``): dvmm's userspace
#: LAPIC (the default; every node of a distributed VM), KVM's in-kernel LAPIC
#: (one-node VMs: IPIs, timer and HLT never leave the kernel, but KVM's deviations
#: from the SDM come with it), or ``auto`` (kernel on one node, user otherwise).
LAPIC_KINDS = ("user", "kernel", "auto")


def check_lapic(lapic: Any, *, distributed: bool) -> str:
    """``lapic`` if it names a LAPIC kind this VM can have, else a SpecError."""
    if not isinstance(lapic, str) or lapic not in LAPIC_KINDS:
        raise SpecError(f"unknown LAPIC {lapic!r} (use one of {', '.join(LAPIC_KINDS)})")
    if lapic == "kernel" and distributed:
        raise SpecError(
            "lapic = kernel needs a one-node VM: a distributed VM routes IPIs across "
            "nodes in userspace (use user or auto)"
        )
    return lapic


def check_cpu_model(cpu: Any) -> str:
    """``cpu`` if it names a known CPU model, else a SpecError naming it and the known ones."""
    if not isinstance(cpu, str) or cpu not in CPU_MODELS:
        raise SpecError(f"unknown CPU model {cpu!r} (known models: {', '.join(CPU_MODELS)})")
    return cpu


# --------------------------------------------------------------------------- kernel


def _package_root() -> Path:
    """The ``dvmmd`` package directory."""
    return Path(__file__).resolve().parents[1]


def bundled_guest_candidates() -> list[Path]:
    """Where the bundled guest is looked for, in order (without the env var)."""
    pkg = _package_root()
    return [
        # a source checkout / editable install: <repo>/guest/build/dvmm-guest
        pkg.parent / "guest" / "build" / "dvmm-guest",
        # a wheel that ships the guest as package data
        pkg / "guest" / "dvmm-guest",
    ]


def find_bundled_guest() -> Path:
    """The default guest kernel: ``$DVMM_GUEST``, else the bundled guest."""
    env = os.environ.get(GUEST_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise SpecError(f"{GUEST_ENV}={env}: no such kernel file")
        return p.resolve()
    candidates = bundled_guest_candidates()
    for p in candidates:
        if p.is_file():
            return p
    looked = ", ".join(str(p) for p in candidates)
    raise SpecError(
        f"the bundled guest kernel was not found (looked in {looked}); "
        "build it with `make -C guest`, set DVMM_GUEST, or pass --kernel PATH"
    )


_ELF_MAGIC = b"\x7fELF"
_MULTIBOOT1_MAGIC = 0x1BADB002
_MULTIBOOT1_SEARCH = 8192


def sniff_kernel(path: Path) -> str:
    """Say which boot protocol ``path`` is for: ``elf``, ``bzimage`` or ``multiboot``.

    Raises SpecError naming the file when it is missing, unreadable, empty or
    none of the formats dvmm boots.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(max(_MULTIBOOT1_SEARCH, 0x210))
    except FileNotFoundError:
        raise SpecError(f"kernel file {path} does not exist") from None
    except IsADirectoryError:
        raise SpecError(f"kernel {path} is a directory, not a kernel image") from None
    except OSError as e:
        raise SpecError(f"cannot read kernel file {path}: {e.strerror or e}") from None
    if not head:
        raise SpecError(f"kernel file {path} is empty")
    if head.startswith(_ELF_MAGIC):
        if len(head) < 5 or head[4] not in (1, 2):
            raise SpecError(f"kernel file {path} has a malformed ELF header")
        return "elf"
    # Linux boot protocol: "HdrS" at 0x202 of the real-mode setup header.
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        return "bzimage"
    for off in range(0, min(len(head), _MULTIBOOT1_SEARCH) - 11, 4):
        magic, flags, checksum = (
            int.from_bytes(head[off + i : off + i + 4], "little") for i in (0, 4, 8)
        )
        if magic == _MULTIBOOT1_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return "multiboot"
    raise SpecError(
        f"kernel file {path} is not a kernel image dvmm can boot "
        "(no ELF header, Linux bzImage header or Multiboot header found)"
    )


# --------------------------------------------------------------------------- NUMA


def _check_numa(numa: Any, vcpus: int, memory: int) -> list[dict[str, Any]]:
    if not isinstance(numa, Sequence) or isinstance(numa, (str, bytes)) or not numa:
        raise SpecError("numa must be a non-empty list of nodes")
    seen: set[int] = set()
    expect_start = 0
    out: list[dict[str, Any]] = []
    for i, node in enumerate(numa):
        if not isinstance(node, Mapping):
            raise SpecError(f"numa[{i}] must be an object with cpus, mem_start, mem_size")
        cpus = node.get("cpus")
        if not isinstance(cpus, Sequence) or isinstance(cpus, (str, bytes)) or not cpus:
            raise SpecError(f"numa[{i}].cpus must be a non-empty list of vCPU indexes")
        for c in cpus:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < vcpus:
                raise SpecError(f"numa[{i}].cpus: {c!r} is not a vCPU index below {vcpus}")
            if c in seen:
                raise SpecError(f"numa[{i}].cpus: vCPU {c} is in more than one node")
            seen.add(c)
        start, size = node.get("mem_start"), node.get("mem_size")
        for key, v in (("mem_start", start), ("mem_size", size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v % PAGE_SIZE:
                raise SpecError(f"numa[{i}].{key} must be a multiple of 4 KiB, not {v!r}")
        assert isinstance(start, int) and isinstance(size, int)
        if size == 0:
            raise SpecError(f"numa[{i}] has no memory")
        if start != expect_start:
            raise SpecError(
                f"numa[{i}].mem_start is {start}, expected {expect_start} "
                "(node i's memory follows node i-1's)"
            )
        expect_start = start + size
        out.append({"cpus": list(cpus), "mem_start": start, "mem_size": size})
    if len(seen) != vcpus:
        missing = sorted(set(range(vcpus)) - seen)
        raise SpecError(f"numa: vCPUs {missing} are in no node")
    if expect_start != memory:
        raise SpecError(
            f"numa: the nodes' memory adds up to {expect_start} bytes, not the VM's {memory}"
        )
    return out


def _check_cluster(
    cluster: Any, numa: list[dict[str, Any]] | None, allow_private_key: bool
) -> dict[str, Any]:
    """Check the ``cluster`` object (keys.py says what the key material is).

    ``private_key_hex`` is accepted only when ``allow_private_key`` (the in-memory spec
    a worker hands to the VMM): a spec from a file or another node must not carry it.
    """
    if not isinstance(cluster, Mapping):
        raise SpecError("cluster must be an object or null")
    nodes = cluster.get("nodes")
    if not isinstance(nodes, Sequence) or isinstance(nodes, (str, bytes)) or not nodes:
        raise SpecError('cluster.nodes must be a non-empty list of {"addr": "host:port"}')
    for i, n in enumerate(nodes):
        addr = n.get("addr") if isinstance(n, Mapping) else None
        if not isinstance(addr, str) or ":" not in addr:
            raise SpecError(f'cluster.nodes[{i}].addr must be "host:port", not {addr!r}')
    for key in ("node_index", "boot_node"):
        v = cluster.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(nodes):
            raise SpecError(f"cluster.{key} must be a node index below {len(nodes)}, not {v!r}")
    if "secret_hex" in cluster:
        raise SpecError(
            "cluster.secret_hex is no longer accepted: the data path's keys come from "
            "session_hex, node_pubkeys_hex and each node's private key (on the worker's stdin)"
        )
    security = cluster.get("security", "encrypt")
    if security not in DATA_PLANE_MODES:
        raise SpecError(
            f"cluster.security must be one of {', '.join(DATA_PLANE_MODES)}, not {security!r}"
        )
    if not is_session_hex(cluster.get("session_hex")):
        raise SpecError("cluster.session_hex must be 32 lowercase hex digits (16 random bytes)")
    pubkeys = cluster.get("node_pubkeys_hex")
    if not isinstance(pubkeys, Sequence) or isinstance(pubkeys, (str, bytes)):
        raise SpecError("cluster.node_pubkeys_hex must be a list of X25519 public keys (hex)")
    if len(pubkeys) != len(nodes):
        raise SpecError(
            f"cluster.node_pubkeys_hex has {len(pubkeys)} keys for {len(nodes)} nodes "
            "(one per node, in node order)"
        )
    try:
        for i, k in enumerate(pubkeys):
            check_key_hex(k, f"cluster.node_pubkeys_hex[{i}]")
        if "private_key_hex" in cluster:
            if not allow_private_key:
                raise SpecError(
                    "cluster.private_key_hex must not be in a spec file or request: the worker "
                    "takes the node's private key on its stdin (--key-stdin)"
                )
            check_key_hex(cluster["private_key_hex"], "cluster.private_key_hex")
    except KeyMaterialError as e:
        raise SpecError(str(e)) from None
    if numa is not None and len(numa) != len(nodes) and cluster.get("placement") is None:
        raise SpecError(
            f"cluster has {len(nodes)} nodes but numa has {len(numa)}: node i runs numa[i]"
        )
    return {**cluster, "security": security, "node_pubkeys_hex": list(pubkeys)}


# --------------------------------------------------------------------------- spec


def _check_vcpus(vcpus: Any) -> int:
    if isinstance(vcpus, bool) or not isinstance(vcpus, int):
        raise SpecError(f"vcpus must be an integer, not {vcpus!r}")
    if vcpus < 1:
        raise SpecError(f"a VM needs at least 1 vCPU, not {vcpus}")
    if vcpus > MAX_VCPUS:
        raise SpecError(f"{vcpus} vCPUs is more than dvmm supports (at most {MAX_VCPUS})")
    return vcpus


def _check_cmdline(cmdline: Any) -> str:
    if not isinstance(cmdline, str):
        raise SpecError(f"cmdline must be a string, not {cmdline!r}")
    if "\0" in cmdline:
        raise SpecError("the kernel command line must not contain a NUL character")
    if len(cmdline.encode()) >= MAX_CMDLINE:
        raise SpecError(f"the kernel command line is longer than {MAX_CMDLINE - 1} bytes")
    return cmdline


def _check_file(path: Any, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise SpecError(f"{what} must be a path, not {path!r}")
    p = Path(path)
    if not p.exists():
        raise SpecError(f"{what} file {p} does not exist")
    if not p.is_file():
        raise SpecError(f"{what} {p} is not a regular file")
    if not os.access(p, os.R_OK):
        raise SpecError(f"{what} file {p} is not readable")
    return str(p.resolve())


def _check_console_log(path: Any) -> str | None:
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise SpecError(f"console_log must be a path, not {path!r}")
    p = Path(path).absolute()
    if p.is_dir():
        raise SpecError(f"console log {p} is a directory")
    if not p.parent.is_dir():
        raise SpecError(f"console log {p}: directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SpecError(f"console log {p} is not writable")
    return str(p)


def _check_console_input(path: Any) -> str | None:
    """A FIFO for console input: it may not exist yet (the worker creates it)."""
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise SpecError(f"console_input must be a path, not {path!r}")
    p = Path(path).absolute()
    if p.exists() and not stat.S_ISFIFO(p.stat().st_mode):
        raise SpecError(f"console input {p} exists and is not a FIFO")
    if not p.parent.is_dir():
        raise SpecError(f"console input {p}: directory {p.parent} does not exist")
    return str(p)


def _check_timeout(timeout_s: Any) -> int:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise SpecError(f"timeout must be a number of seconds, not {timeout_s!r}")
    if not math.isfinite(timeout_s) or timeout_s < 0:
        raise SpecError(
            f"timeout must be 0 (none) or a positive number of seconds, not {timeout_s}"
        )
    # The Rust side takes whole seconds; round a fraction up so that a short
    # timeout never becomes "no timeout".
    return math.ceil(timeout_s)


def build_spec(
    *,
    vcpus: int,
    memory: int,
    kernel: str | os.PathLike[str] | None = None,
    initrd: str | os.PathLike[str] | None = None,
    cmdline: str = DEFAULT_CMDLINE,
    console_log: str | os.PathLike[str] | None = None,
    console_stdout: bool = True,
    timeout_s: float = 0,
    numa: list[dict[str, Any]] | None = None,
    cluster: Mapping[str, Any] | None = None,
    console_input: str | os.PathLike[str] | None = None,
    console_stdin: bool = False,
    cpu: str | None = None,
    lapic: str | None = None,
    snapshot: Mapping[str, Any] | None = None,
    restore: str | os.PathLike[str] | None = None,
    migrate: list[dict[str, Any]] | None = None,
    control: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Build and check a VM spec. ``kernel=None`` means the bundled guest;
    ``cpu=None`` this host's default CPU model (:func:`host_default_cpu_model`);
    ``lapic=None`` dvmm's userspace LAPIC (see :data:`LAPIC_KINDS`)."""
    kernel_path = find_bundled_guest() if kernel is None else Path(kernel)
    extra: dict[str, Any] = {}
    if lapic is not None:
        extra["lapic"] = lapic
    if console_input is not None:
        extra["console_input"] = str(console_input)
    if console_stdin:
        extra["console_stdin"] = True
    if snapshot is not None:
        extra["snapshot"] = dict(snapshot)
    if restore is not None:
        extra["restore"] = str(restore)
    if migrate:
        extra["migrate"] = list(migrate)
    if control is not None:
        extra["control"] = str(control)
    return validate_spec(
        {
            **extra,
            "vcpus": vcpus,
            "memory": memory,
            "kernel": str(kernel_path),
            "initrd": None if initrd is None else str(initrd),
            "cmdline": cmdline,
            "numa": numa,
            "console_log": None if console_log is None else str(console_log),
            "console_stdout": console_stdout,
            "timeout_s": timeout_s,
            "cluster": None if cluster is None else dict(cluster),
            "cpu": cpu,
        }
    )


def _check_control(path: Any) -> str:
    """The control socket's path: absolute, in an existing directory."""
    if not isinstance(path, str) or not path:
        raise SpecError(f"control must be a socket path, not {path!r}")
    p = Path(path).absolute()
    if not p.parent.is_dir():
        raise SpecError(f"control socket {p}: its directory does not exist")
    if p.exists() and not p.is_socket():
        raise SpecError(f"control socket {p}: a file that is not a socket is there")
    return str(p)


def validate_spec(spec: Mapping[str, Any], *, allow_private_key: bool = False) -> dict[str, Any]:
    """Check a spec dict and return a normalized copy (absolute paths, numa filled in,
    the CPU model explicit: a missing or null ``cpu`` becomes this host's default).

    ``allow_private_key``: only for the in-memory spec a worker passes to the VMM; a
    spec that will be written to a file, or came from one, must not hold
    ``cluster.private_key_hex``."""
    if not isinstance(spec, Mapping):
        raise SpecError("a VM spec must be a JSON object")
    known = {
        "vcpus", "memory", "kernel", "initrd", "cmdline", "numa",
        "console_log", "console_stdout", "timeout_s", "cluster",
        "console_input", "console_stdin", "cpu", "lapic", "snapshot", "restore", "migrate",
        "control",
    }  # fmt: skip
    unknown = sorted(set(spec) - known)
    if unknown:
        raise SpecError(f"unknown VM spec field(s): {', '.join(unknown)}")
    for key in ("vcpus", "memory", "kernel"):
        if key not in spec:
            raise SpecError(f"the VM spec has no {key!r}")
    vcpus = _check_vcpus(spec["vcpus"])
    try:
        memory = check_guest_memory(spec["memory"])
    except SizeError as e:
        raise SpecError(str(e)) from None
    kernel = _check_file(spec["kernel"], "kernel")
    sniff_kernel(Path(kernel))
    initrd = spec.get("initrd")
    initrd = None if initrd is None else _check_file(initrd, "initrd")
    cmdline = _check_cmdline(spec.get("cmdline", DEFAULT_CMDLINE))
    numa_in = spec.get("numa")
    # No layout: one node with every vCPU and all the memory (multi-node layouts come
    # from dvmmd.vm.placement, the daemon's and the launcher's).
    one_node = [{"cpus": list(range(vcpus)), "mem_start": 0, "mem_size": memory}]
    numa = one_node if numa_in is None else _check_numa(numa_in, vcpus, memory)
    console_stdout = spec.get("console_stdout", True)
    if not isinstance(console_stdout, bool):
        raise SpecError(f"console_stdout must be true or false, not {console_stdout!r}")
    cluster_in = spec.get("cluster")
    cluster = None if cluster_in is None else _check_cluster(cluster_in, numa, allow_private_key)
    # Console input: only present in the normalized spec when asked for.
    extra: dict[str, Any] = {}
    console_input = _check_console_input(spec.get("console_input"))
    if console_input is not None:
        extra["console_input"] = console_input
    console_stdin = spec.get("console_stdin", False)
    if not isinstance(console_stdin, bool):
        raise SpecError(f"console_stdin must be true or false, not {console_stdin!r}")
    if console_stdin:
        extra["console_stdin"] = True
    cpu_in = spec.get("cpu")
    cpu = host_default_cpu_model() if cpu_in is None else check_cpu_model(cpu_in)
    lapic = spec.get("lapic")
    if lapic is not None:
        extra["lapic"] = check_lapic(lapic, distributed=cluster is not None)
    try:
        if spec.get("snapshot") is not None:
            extra["snapshot"] = snapshots.check_plan(spec["snapshot"])
        if spec.get("restore") is not None:
            extra["restore"] = snapshots.check_restore(spec["restore"])
    except snapshots.SnapshotSpecError as e:
        raise SpecError(str(e)) from None
    if spec.get("control") is not None:
        extra["control"] = _check_control(spec["control"])
    if spec.get("migrate"):
        if cluster is None:
            raise SpecError("migrate: vCPUs move between nodes; this VM runs on one")
        try:
            extra["migrate"] = migrations.check_moves(
                spec["migrate"], vcpus=vcpus, nodes=len(cluster["nodes"])
            )
        except migrations.MigrationSpecError as e:
            raise SpecError(str(e)) from None
    return {
        **extra,
        "vcpus": vcpus,
        "memory": memory,
        "kernel": kernel,
        "initrd": initrd,
        "cmdline": cmdline,
        "numa": numa,
        "console_log": _check_console_log(spec.get("console_log")),
        "console_stdout": console_stdout,
        "timeout_s": _check_timeout(spec.get("timeout_s", 0)),
        "cluster": cluster,
        "cpu": cpu,
    }


def spec_to_json(spec: Mapping[str, Any]) -> str:
    return json.dumps(dict(spec), separators=(",", ":"))


# --------------------------------------------------------------------------- result


def parse_result(result_json: str) -> dict[str, Any]:
    """Parse the native result JSON; a malformed one becomes an ``error`` result."""
    try:
        result = json.loads(result_json)
    except (TypeError, ValueError) as e:
        return {"reason": "error", "status": None, "error": f"malformed result from the VMM: {e}"}
    if not isinstance(result, dict) or result.get("reason") not in RESULT_REASONS:
        return {
            "reason": "error",
            "status": None,
            "error": f"malformed result from the VMM: {result_json[:200]!r}",
        }
    return result


def exit_code(result: Mapping[str, Any]) -> int:
    """The process exit status for a result.

    ``debug_exit``: the guest's status byte; ``shutdown``/``stopped``: 0;
    ``timeout``: 124; ``crash``/``error``/anything else: 1.
    """
    reason = result.get("reason")
    if reason == "debug_exit":
        status = result.get("status")
        if isinstance(status, int) and not isinstance(status, bool) and 0 <= status <= 255:
            return status
        return EXIT_ERROR
    if reason in ("shutdown", "stopped", "snapshot"):
        return 0
    if reason == "timeout":
        return EXIT_TIMEOUT
    return EXIT_ERROR
