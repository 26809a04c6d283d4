"""``dvmmctl doctor``: can this host run dvmm, and what kind of host is it?

Pure Python: ioctls on /dev/kvm, a userfaultfd handshake, a memfd mapped
twice. Nothing here needs the Rust extension, so doctor works before the
build does.

Checks are *required* (dvmm cannot run without them: exit status 1 and the
failed names on stderr) or *optional* (a feature is missing or slower; shown
as a warning). The native module and the bundled guest are reported too, but
as build state, not as host requirements.

Kinds of host:

- ``vmx`` / ``svm``: hardware virtualization (Intel VT-x / AMD-V); all guest
  code runs natively.
- ``pvm``: the PVM flavour of KVM (``kvm_pvm`` module; the CPU shows no VMX or
  SVM). Guest code at CPL3 runs natively, but CPL0, real-mode and
  protected-mode code is run by KVM's instruction emulator (~500 ns per
  instruction) and some instructions are refused (e.g. cmpxchg16b, xrstor), so
  an unmodified Linux kernel is impractical; the bundled guest, which runs its
  work at CPL3, runs at speed.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import mmap
import os
import platform
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dvmmd.host import PVM_MEANING, host_kind, loaded_modules
from dvmmd.vm.spec import CPU_MODELS, default_cpu_model

__all__ = [
    "KVM_CAPS",
    "Check",
    "format_report",
    "host_kind",
    "main",
    "probe_kvm",
    "probe_memfd",
    "probe_userfaultfd",
    "run_doctor",
]

# ----------------------------------------------------------------- constants
# include/uapi/linux/kvm.h
KVMIO = 0xAE
KVM_API_VERSION = 12


def _io(typ: int, nr: int) -> int:
    return (typ << 8) | nr


def _iowr(typ: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (typ << 8) | nr


KVM_GET_API_VERSION = _io(KVMIO, 0x00)
KVM_CREATE_VM = _io(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _io(KVMIO, 0x03)

#: (name, KVM_CAP_* number, required, what dvmm uses it for)
KVM_CAPS: list[tuple[str, int, bool, str]] = [
    ("USER_MEMORY", 3, True, "guest RAM from a userspace mapping (memfd)"),
    ("SET_TSS_ADDR", 4, True, "x86 VM setup"),
    ("EXT_CPUID", 7, True, "CPUID set-up (KVM_SET_CPUID2)"),
    ("MAX_VCPUS", 66, True, "vCPUs per VM on this node"),
    ("SYNC_REGS", 74, True, "registers shared with the run loop"),
    ("READONLY_MEM", 81, True, "read-only memory slots"),
    ("IMMEDIATE_EXIT", 136, True, "kicking a vCPU out of KVM_RUN (pause, stop)"),
    ("X86_USER_SPACE_MSR", 188, True, "x2APIC MSRs handled in userspace"),
    ("X86_MSR_FILTER", 189, True, "choosing which MSRs exit to userspace"),
    ("EXIT_HYPERCALL", 201, True, "hypercall exits"),
    ("SPLIT_IRQCHIP", 121, False, "nice to have: split irqchip"),
    ("X2APIC_API", 129, False, "nice to have: 32-bit x2APIC IDs"),
    ("DIRTY_LOG_RING", 192, False, "nice to have: dirty page ring (migration)"),
]

# include/uapi/linux/userfaultfd.h
SYS_USERFAULTFD_X86_64 = 323
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
USERFAULTFD_IOC_NEW = _io(0xAA, 0x00)
UFFDIO_API = _iowr(0xAA, 0x3F, 24)
UFFDIO_REGISTER = _iowr(0xAA, 0x00, 32)
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

#: (feature name, bit, required, why)
UFFD_FEATURES: list[tuple[str, int, bool, str]] = [
    ("PAGEFAULT_FLAG_WP", 1 << 0, True, "write-protect faults (writes to shared pages)"),
    ("MISSING_SHMEM", 1 << 5, True, "missing-page faults on memfd guest RAM"),
    ("MINOR_SHMEM", 1 << 10, True, "minor faults on memfd RAM (pages filled via 2nd mapping)"),
    ("WP_HUGETLBFS_SHMEM", 1 << 12, True, "write-protect on memfd guest RAM"),
    ("WP_UNPOPULATED", 1 << 13, False, "nice to have: write-protect unpopulated pages"),
]

#: Why each host kind gets its default CPU model (dvmmd.vm.spec.default_cpu_model).
CPU_MODEL_WHY = {
    "vmx": "all guest code runs natively, so the guest gets every feature KVM offers",
    "svm": "all guest code runs natively, so the guest gets every feature KVM offers",
    "pvm": "leaves out what the CPL0 emulator refuses (CX16, XSAVE, PCID...); "
    "KVM PVM still shows some host features it cannot hide, and `run` names them",
    "other": "the safe model where the virtualization kind is not known",
}


@dataclass
class Check:
    name: str
    ok: bool
    required: bool
    detail: str
    value: Any = None

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        return "FAIL" if self.required else "warn"


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    host_kind: str = "none"
    host_kind_meaning: str = ""
    #: The CPU model ``dvmmctl run`` gives guests here when ``--cpu`` is not given.
    default_cpu_model: str = ""
    kvm: dict[str, Any] = field(default_factory=dict)
    userfaultfd: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    #: The VM data plane's protection in force here and where that comes from.
    data_plane: dict[str, str] = field(default_factory=dict)
    #: RDMA devices (/sys/class/infiniband); none is fine: TCP is used.
    rdma_devices: list[str] = field(default_factory=list)

    def add(self, name: str, ok: bool, required: bool, detail: str, value: Any = None) -> None:
        self.checks.append(Check(name, ok, required, detail, value))

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.required and not c.ok]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "host_kind": self.host_kind,
            "host_kind_meaning": self.host_kind_meaning,
            "default_cpu_model": self.default_cpu_model,
            "cpu_models": list(CPU_MODELS),
            "kvm": self.kvm,
            "userfaultfd": self.userfaultfd,
            "host": self.host,
            "build": self.build,
            "data_plane": self.data_plane,
            "rdma_devices": self.rdma_devices,
            "checks": [asdict(c) | {"status": c.status} for c in self.checks],
        }


# ----------------------------------------------------------------- KVM


def probe_kvm(path: str = "/dev/kvm") -> dict[str, Any]:
    info: dict[str, Any] = {"device": path, "present": os.path.exists(path)}
    if not info["present"]:
        info["error"] = f"{path} does not exist (KVM module not loaded?)"
        return info
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        info["error"] = f"cannot open {path}: {e.strerror}"
        return info
    vm_fd = -1
    try:
        info["api_version"] = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        try:
            vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
            info["create_vm"] = True
        except OSError as e:
            info["create_vm"] = False
            info["create_vm_error"] = e.strerror
        # Per-VM answers are the accurate ones (KVM_CHECK_EXTENSION on a VM fd);
        # fall back to the system fd if no VM could be made.
        check_fd = vm_fd if vm_fd >= 0 else fd
        caps: dict[str, int] = {}
        for name, num, _req, _why in KVM_CAPS:
            try:
                caps[name] = fcntl.ioctl(check_fd, KVM_CHECK_EXTENSION, num)
            except OSError:
                caps[name] = 0
        info["capabilities"] = caps
    except OSError as e:
        info["error"] = f"KVM ioctl failed: {e.strerror}"
    finally:
        if vm_fd >= 0:
            os.close(vm_fd)
        os.close(fd)
    return info


# ----------------------------------------------------------------- userfaultfd


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _uffd_syscall(flags: int) -> int:
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    fd = int(libc.syscall(ctypes.c_long(SYS_USERFAULTFD_X86_64), ctypes.c_int(flags)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _open_uffd() -> tuple[int, str]:
    """A userfaultfd that also takes faults from kernel mode (KVM's guest
    memory accesses come from the kernel, so a UFFD_USER_MODE_ONLY one would
    not see them). Tries the syscall, then /dev/userfaultfd."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    errors: list[str] = []
    try:
        return _uffd_syscall(flags), "userfaultfd(2)"
    except OSError as e:
        errors.append(f"userfaultfd(2): {e.strerror}")
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        errors.append(f"/dev/userfaultfd: {e.strerror}")
    else:
        try:
            return fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags), "/dev/userfaultfd"
        except OSError as e:
            errors.append(f"/dev/userfaultfd: {e.strerror}")
        finally:
            os.close(dev)
    try:
        os.close(_uffd_syscall(flags | UFFD_USER_MODE_ONLY))
        errors.append("only UFFD_USER_MODE_ONLY works, which does not see KVM's faults")
    except OSError:
        pass
    raise OSError(errno.ENOSYS, "; ".join(errors))


def _buffer_address(mm: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


def probe_userfaultfd() -> dict[str, Any]:
    """Open a userfaultfd, do the UFFDIO_API handshake, and register a memfd
    mapping for MISSING|WP|MINOR faults, as the coherence engine does."""
    info: dict[str, Any] = {"available": False}
    if platform.machine() != "x86_64":
        info["error"] = f"unsupported architecture {platform.machine()}"
        return info
    try:
        fd, via = _open_uffd()
    except OSError as e:
        info["error"] = e.strerror
        return info
    info["available"] = True
    info["via"] = via
    try:
        buf = bytearray(struct.pack("=QQQ", UFFD_API, 0, 0))
        try:
            fcntl.ioctl(fd, UFFDIO_API, buf, True)
        except OSError as e:
            info["error"] = f"UFFDIO_API handshake failed: {e.strerror}"
            return info
        _api, features, _ioctls = struct.unpack("=QQQ", buf)
        info["features_mask"] = features
        info["features"] = {name: bool(features & bit) for name, bit, _r, _w in UFFD_FEATURES}
        info["register_memfd"] = _register_memfd(fd)
    finally:
        os.close(fd)
    return info


def _register_memfd(uffd: int) -> str:
    """Register a memfd mapping in MISSING|WP|MINOR mode; "" on success.

    The mapping is never touched after registration (nobody serves faults
    here); closing the userfaultfd unregisters it.
    """
    size = 2 * 1024 * 1024
    mfd = os.memfd_create("dvmm-doctor-uffd", os.MFD_CLOEXEC)
    try:
        os.ftruncate(mfd, size)
        mm = mmap.mmap(mfd, size, flags=mmap.MAP_SHARED)
        try:
            addr = _buffer_address(mm)
            mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP
            mode |= UFFDIO_REGISTER_MODE_MINOR
            reg = bytearray(struct.pack("=QQQQ", addr, size, mode, 0))
            try:
                fcntl.ioctl(uffd, UFFDIO_REGISTER, reg, True)
            except OSError as e:
                return f"UFFDIO_REGISTER(MISSING|WP|MINOR) on a memfd mapping: {e.strerror}"
            return ""
        finally:
            # The ctypes view made in _buffer_address is gone by now (refcount),
            # so the mapping has no exports left and can be closed.
            mm.close()
    finally:
        os.close(mfd)


# ----------------------------------------------------------------- memfd


def probe_memfd() -> str:
    """Map one memfd twice and see a write through one in the other; "" if fine."""
    try:
        fd = os.memfd_create("dvmm-doctor", os.MFD_CLOEXEC)
    except (OSError, AttributeError) as e:
        return f"memfd_create: {getattr(e, 'strerror', e)}"
    try:
        os.ftruncate(fd, 65536)
        a = mmap.mmap(fd, 65536, flags=mmap.MAP_SHARED)
        b = mmap.mmap(fd, 65536, flags=mmap.MAP_SHARED)
        try:
            a[4096:4104] = b"dvmm-ok!"
            if b[4096:4104] != b"dvmm-ok!":
                return "a write through one mapping of a memfd is not seen in the other"
        finally:
            a.close()
            b.close()
    except OSError as e:
        return f"memfd mapping: {e.strerror}"
    finally:
        os.close(fd)
    return ""


# ----------------------------------------------------------------- network namespaces


def probe_netns() -> str:
    """ "" when a network namespace can be made (for local multi-node clusters)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare(1) not found (util-linux)"
    try:
        r = subprocess.run(
            [unshare, "--net", "true"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare --net: {e}"
    if r.returncode != 0:
        return f"unshare --net failed: {r.stderr.strip() or r.returncode}"
    if shutil.which("ip") is None:
        return "ip(8) not found (iproute2)"
    return ""


# ----------------------------------------------------------------- build state


def probe_build() -> dict[str, Any]:
    build: dict[str, Any] = {}
    try:
        from dvmmd import _native

        build["native"] = _native.version()
    except Exception as e:  # noqa: BLE001 - not built yet, or a broken build
        build["native"] = None
        build["native_error"] = f"{type(e).__name__}: {e}"
    from dvmmd.vm.spec import SpecError, find_bundled_guest

    try:
        build["guest"] = str(find_bundled_guest())
    except SpecError as e:
        build["guest"] = None
        build["guest_error"] = str(e)
    return build


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ----------------------------------------------------------------- the report


def probe_data_plane(path: str | None = None) -> dict[str, str]:
    """The data-plane protection in force on this node: the daemon config's
    ``cluster.data_plane`` (``$DVMMD_CONFIG`` or the default path), else the
    default that ``dvmmctl run --nodes`` and dvmmd use."""
    from dvmmd.config import DEFAULT_CONFIG_PATH, ConfigError, load_config

    cfg_path = path or os.environ.get("DVMMD_CONFIG") or DEFAULT_CONFIG_PATH
    if not os.path.exists(cfg_path):
        return {"mode": "encrypt", "source": f"default (no daemon config at {cfg_path})"}
    try:
        cfg = load_config(cfg_path)
    except (ConfigError, OSError) as e:
        return {"mode": "unknown", "source": f"{cfg_path}: {e}"}
    return {"mode": cfg.data_plane, "source": f"cluster.data_plane in {cfg_path}"}


def probe_rdma(sysfs: str = "/sys/class/infiniband") -> list[str]:
    """Names of the RDMA devices the kernel knows (empty: none)."""
    try:
        return sorted(os.listdir(sysfs))
    except OSError:
        return []


def run_doctor(kvm_path: str = "/dev/kvm") -> Report:
    r = Report()
    uname = os.uname()
    r.host = {
        "kernel": uname.release,
        "machine": uname.machine,
        "cpus": os.cpu_count(),
        "memory": _meminfo_total(),
        "modules": sorted(loaded_modules()),
    }
    r.add("x86-64 host", uname.machine == "x86_64", True, uname.machine)

    # KVM
    kvm = probe_kvm(kvm_path)
    r.kvm = kvm
    r.add(kvm_path, "api_version" in kvm, True, kvm.get("error") or "opened read-write")
    if "api_version" in kvm:
        api = kvm["api_version"]
        r.add(
            "KVM API version",
            api == KVM_API_VERSION,
            True,
            f"{api}" + ("" if api == KVM_API_VERSION else f" (dvmm needs {KVM_API_VERSION})"),
            api,
        )
        r.add(
            "KVM_CREATE_VM",
            bool(kvm.get("create_vm")),
            True,
            "a VM can be created"
            if kvm.get("create_vm")
            else f"failed: {kvm.get('create_vm_error')}",
        )
        caps: dict[str, int] = kvm.get("capabilities", {})
        for name, _num, required, why in KVM_CAPS:
            value = caps.get(name, 0)
            detail = why if name != "MAX_VCPUS" else f"{value} ({why})"
            if not value:
                detail = "missing: " + why
            r.add(f"KVM_CAP_{name}", value > 0, required, detail, value)

    # Host kind
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    kind, meaning = host_kind(cpuinfo, set(r.host["modules"]), kvm.get("present", False))
    r.host_kind, r.host_kind_meaning = kind, meaning
    short = {
        "vmx": "hardware virtualization (Intel VT-x): guest code runs natively",
        "svm": "hardware virtualization (AMD-V): guest code runs natively",
        "pvm": "PVM flavour of KVM: guest CPL3 native, CPL0 emulated (see below)",
    }.get(kind, meaning)
    r.add("virtualization", kind in ("vmx", "svm", "pvm"), True, short, kind)
    r.default_cpu_model = default_cpu_model(kind)
    r.add(
        "default CPU model",
        True,
        False,
        f"{r.default_cpu_model}: " + CPU_MODEL_WHY.get(kind, CPU_MODEL_WHY["other"]),
        r.default_cpu_model,
    )

    # userfaultfd
    uffd = probe_userfaultfd()
    r.userfaultfd = uffd
    r.add(
        "userfaultfd",
        uffd["available"] and "features" in uffd,
        True,
        f"via {uffd['via']}"
        if uffd["available"] and "features" in uffd
        else str(uffd.get("error")),
    )
    if "features" in uffd:
        for name, _bit, required, why in UFFD_FEATURES:
            have = uffd["features"][name]
            r.add(f"UFFD_FEATURE_{name}", have, required, why if have else "missing: " + why)
        reg = uffd.get("register_memfd", "")
        r.add(
            "userfaultfd on memfd RAM",
            not reg,
            True,
            reg or "a memfd mapping registers for MISSING|WP|MINOR faults",
        )

    # memfd
    memfd_err = probe_memfd()
    r.add(
        "memfd",
        not memfd_err,
        True,
        memfd_err or "memfd_create; two mappings of one memfd share pages",
    )

    # network namespaces
    netns_err = probe_netns()
    r.add(
        "network namespaces",
        not netns_err,
        False,
        netns_err or "available (local multi-node clusters with their own addresses)",
    )
    nft = shutil.which("nft")
    r.add(
        "nftables",
        nft is not None,
        False,
        f"{nft} (cutting links in tests)" if nft else "nft(8) not found: install nftables",
    )

    r.data_plane = probe_data_plane()
    r.add(
        "data plane",
        r.data_plane["mode"] != "unknown",
        False,
        f"{r.data_plane['mode']}: {r.data_plane['source']}",
        r.data_plane["mode"],
    )
    r.rdma_devices = probe_rdma()
    r.add(
        "RDMA devices",
        True,  # none is fine: the TCP transport needs nothing
        False,
        ", ".join(r.rdma_devices)
        if r.rdma_devices
        else "none (/sys/class/infiniband is empty): pages move over TCP",
        r.rdma_devices,
    )

    r.build = probe_build()
    return r


def format_report(r: Report) -> str:
    rows = [(c.name, c.status, c.detail) for c in r.checks]
    w0 = max(len(x[0]) for x in rows)
    w1 = max(len(x[1]) for x in rows)
    lines = ["dvmm doctor", ""]
    for name, status, detail in rows:
        lines.append(f"  {name:<{w0}}  {status:<{w1}}  {detail}")
    lines.append("")
    mem = r.host.get("memory")
    mem_s = f"{mem / 2**30:.1f} GiB" if isinstance(mem, int) else "?"
    lines.append(
        f"host: Linux {r.host.get('kernel')}, {r.host.get('cpus')} CPUs, {mem_s}; "
        f"kind: {r.host_kind}"
    )
    if r.host_kind == "pvm":
        lines.append("  " + PVM_MEANING + ".")
    lines.append(
        f"default CPU model: {r.default_cpu_model} "
        f"(`dvmmctl run --cpu {'|'.join(CPU_MODELS)}` chooses another)"
    )
    native = r.build.get("native")
    lines.append(
        "native module: "
        + (f"dvmmd._native {native}" if native else f"not built ({r.build.get('native_error')})")
    )
    guest = r.build.get("guest")
    lines.append(
        "bundled guest: " + (guest if guest else f"not built ({r.build.get('guest_error')})")
    )
    lines.append("")
    if r.ok:
        warns = [c.name for c in r.checks if not c.ok]
        lines.append(
            "result: this host can run dvmm"
            + (f" (missing optional: {', '.join(warns)})" if warns else "")
        )
    else:
        lines.append(f"result: this host cannot run dvmm: {', '.join(r.failed)}")
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    report = run_doctor()
    if as_json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(format_report(report))
    if not report.ok:
        print(
            f"dvmmctl doctor: this host cannot run dvmm: {', '.join(report.failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    return main(as_json=args.json)


def register(sub: Any) -> None:
    """Add ``doctor`` to dvmmctl's verbs."""
    p = sub.add_parser(
        "doctor",
        help="check whether this host can run dvmm and what kind of host it is",
        description="Check /dev/kvm, the KVM capabilities dvmm needs, hardware "
        "virtualization or PVM, userfaultfd and memfd. Exit 0 when dvmm can run.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
