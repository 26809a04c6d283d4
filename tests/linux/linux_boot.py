"""The Linux boot test (issue 13, item 4): Debian's cloud kernel on dvmm.

    python tests/linux/linux_boot.py prepare          # kernel + initramfs, cached
    python tests/linux/linux_boot.py boot --nodes 1   # boot, check the milestones

`prepare` downloads the distribution's kernel package with apt (`apt-get download`
of the package `linux-image-cloud-amd64` depends on), extracts its vmlinuz with
dpkg-deb and builds a tiny initramfs (cpio newc: a static /init from init.c, built
with gcc -nostdlib, and /dev/console), all under build/linux/ (git-ignored, never
committed). A second run reuses what is there.

`boot` runs `dvmmctl run --kernel ... --initrd ... --cmdline ...` on N local nodes
and checks the console for the milestones below, in order; it prints each one with
the time it was seen and the console's last lines, and fails when a required one is
missing. Run by `make test-linux` (not part of `make test`: a boot takes minutes
on a PVM host, where the kernel's CPL0 code is emulated).

It is not a pytest module on purpose (tests/ is pytest's test path): nothing here
runs in `make test`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "linux"
META_PACKAGE = "linux-image-cloud-amd64"
# Every option is there because of how this host runs the kernel's CPL0 code (in
# KVM PVM's instruction emulator, ~500 ns an instruction, with some instructions
# refused); on a VT-x/AMD-V host none is needed.
# noxsave: KVM PVM shows the guest XSAVE whatever CPUID the VMM sets, and its CPL0
# emulator refuses xrstor (FPU init). clearcpuid=ssse3: with SSSE3 the RNG's
# built-in blake2s runs SSE code (movd, pshufd, ...) at CPL0, which the emulator
# refuses too; dvmm finishes single instructions, not SIMD code. (clearcpuid=
# tsc_deadline_timer: with the TSC-deadline timer, CPU 0's timer interrupts come
# tens of seconds late here (RCU stall reports "timer wakeup didn't happen ...
# Possible timer handling issue on cpu=0", softirq counts frozen, X.509 loading
# 240 s instead of 4 s); the LAPIC one-shot timer does not show it. A dvmm bug
# under investigation, not a host limit: remove it once fixed.)
# cryptomgr.notests: the crypto self-tests (RSA/DH multi-precision arithmetic,
# hashes over test vectors) take many minutes emulated and test the emulator, not
# dvmm. mitigations=off: no retpolines, RSB stuffing, VERW or IBRS on every kernel
# entry and exit, each instruction of which costs an emulated instruction here.
# nowatchdog: code that runs 1000x slower than native trips the soft-lockup
# detector, whose reports (stack dumps over the serial port, one exit a byte) cost
# more time still.
DEFAULT_CMDLINE = (
    "console=ttyS0 earlyprintk=ttyS0 noxsave clearcpuid=ssse3,tsc_deadline_timer nokaslr panic=-1"
    " cryptomgr.notests mitigations=off nowatchdog"
)

# (name, regex, required): required milestones fail the test when missing.
MILESTONES: list[tuple[str, str, bool]] = [
    ("kernel started", r"Linux version \d", True),
    ("ACPI tables", r"ACPI: (XSDT|RSDT) 0x", True),
    ("MADT", r"ACPI: APIC 0x", True),
    ("SRAT", r"ACPI: SRAT 0x", False),
    ("smp brought up", r"smp: Brought up \d+ nodes?, \d+ CPUs?", True),
    ("run /init", r"Run /init as init process", True),
    ("/init prints", r"dvmm-linux-init: /init is running", False),
]


def log(msg: str) -> None:
    print(f"linux-boot: {msg}", flush=True)


def kernel_package() -> str:
    """The versioned kernel package the meta package depends on."""
    out = subprocess.run(
        ["apt-cache", "depends", META_PACKAGE], check=True, capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise SystemExit(f"linux-boot: apt-cache knows no kernel for {META_PACKAGE}")


def fetch_kernel() -> Path:
    """build/linux/vmlinuz from the Debian package (downloaded once)."""
    vmlinuz = CACHE / "vmlinuz"
    if vmlinuz.is_file():
        return vmlinuz
    CACHE.mkdir(parents=True, exist_ok=True)
    debs = CACHE / "deb"
    debs.mkdir(exist_ok=True)
    pkg = kernel_package()
    if not list(debs.glob(f"{pkg}_*.deb")):
        log(f"apt-get download {pkg}")
        subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
    deb = max(debs.glob(f"{pkg}_*.deb"))
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        found = sorted(Path(tmp, "boot").glob("vmlinuz-*"))
        if not found:
            raise SystemExit(f"linux-boot: no boot/vmlinuz-* in {deb}")
        shutil.copyfile(found[0], vmlinuz)
        (CACHE / "vmlinuz.version").write_text(found[0].name + "\n")
    log(f"kernel: {vmlinuz} ({deb.name})")
    return vmlinuz


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One cpio "newc" entry."""
    fields = [
        0,  # ino (unique enough: the kernel does not link by it unless nlink > 1)
        mode,
        0,  # uid
        0,  # gid
        1,  # nlink
        0,  # mtime
        len(data),
        0,  # devmajor
        0,  # devminor
        rdev[0],
        rdev[1],
        len(name) + 1,
        0,  # check
    ]
    hdr = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    out = hdr + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build_initramfs() -> Path:
    """build/linux/initramfs.cpio: /init (static, no libc) and /dev/console."""
    out = CACHE / "initramfs.cpio"
    src = REPO / "tests" / "linux" / "init.c"
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    init = CACHE / "init"
    subprocess.run(
        [
            "gcc",
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-pie",
            "-no-pie",
            "-O2",
            "-o",
            str(init),
            str(src),
        ],
        check=True,
    )
    archive = b"".join(
        [
            _cpio_entry("dev", 0o040755),
            _cpio_entry("dev/console", 0o020600, rdev=(5, 1)),
            _cpio_entry("init", 0o100755, init.read_bytes()),
            _cpio_entry("TRAILER!!!", 0),
        ]
    )
    archive += b"\0" * (-len(archive) % 512)
    out.write_bytes(archive)
    log(f"initramfs: {out} ({len(archive)} bytes)")
    return out


def prepare() -> tuple[Path, Path]:
    return fetch_kernel(), build_initramfs()


def check(console: str, nodes: int, vcpus: int) -> list[tuple[str, bool, bool]]:
    """(milestone, seen, required) for each milestone. SMP must have brought up all
    `vcpus` CPUs on `nodes` NUMA nodes (Linux counts the nodes its CPUs are on)."""
    res = []
    for name, rx, required in MILESTONES:
        if name == "SRAT" and nodes > 1:
            required = True
        if name == "smp brought up":
            rx = rf"smp: Brought up {nodes} nodes?, {vcpus} CPUs?\b"
        res.append((name, re.search(rx, console) is not None, required))
    return res


# Seconds the VM runs on after the last required milestone (for "/init prints").
STOP_GRACE_S = 60


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stops dvmmctl as Ctrl-C does (it prints its stats), killing it if it lingers."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def boot(nodes: int, vcpus: int, memory: str, cmdline: str, timeout: int, extra: list[str]) -> int:
    kernel, initrd = prepare()
    dvmmctl = REPO / ".venv" / "bin" / "dvmmctl"
    console_log = CACHE / f"console-{nodes}n.log"
    output_log = CACHE / f"dvmmctl-{nodes}n.log"
    console_log.unlink(missing_ok=True)  # dvmmctl appends
    cmd = [
        str(dvmmctl), "run", "--nodes", str(nodes), "--vcpus", str(vcpus), "--memory", memory,
        "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", cmdline,
        "--console-log", str(console_log), "--no-console-stdin", "--timeout", str(timeout), "--stats",
        *extra,
    ]  # fmt: skip
    log(" ".join(cmd))
    t0 = time.monotonic()
    seen: dict[str, float] = {}
    text = ""
    required = {name for name, _, req in check("", nodes, vcpus) if req}
    stopper: threading.Timer | None = None
    with (
        output_log.open("w") as out,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            text += line
            out.write(line)
            out.flush()
            for name, rx, _ in MILESTONES:
                if name not in seen and re.search(rx, line):
                    seen[name] = time.monotonic() - t0
                    log(f"milestone {name!r} after {seen[name]:.0f} s")
            if stopper is None and required <= seen.keys():
                # Everything required is there: give /init a little time to print
                # (VT-x hosts), then stop the VM rather than wait for the timeout.
                log(f"all required milestones seen; stopping the VM in {STOP_GRACE_S} s")
                stopper = threading.Timer(STOP_GRACE_S, _stop, (proc,))
                stopper.daemon = True
                stopper.start()
        rc = proc.wait()
        if stopper is not None:
            stopper.cancel()
    log(f"dvmmctl exited with {rc} after {time.monotonic() - t0:.0f} s")
    log(f"console: {console_log}; dvmmctl's output: {output_log}")
    body, _, stats = text.partition("\nstats:\n")
    tail = [ln for ln in body.splitlines() if ln.strip()][-25:]
    print("\n".join("    " + ln for ln in tail))
    for ln in stats.splitlines():
        if "insns_completed" in ln or "exits_total" in ln:
            log(ln.strip())
    failed = False
    for name, ok, needed in check(text, nodes, vcpus):
        state = "ok" if ok else ("MISSING" if needed else "not reached")
        when = f" ({seen[name]:.0f} s)" if name in seen else ""
        log(f"{name:16} {state}{when}")
        failed |= needed and not ok
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="fetch the kernel, build the initramfs (cached)")
    b = sub.add_parser("boot", help="boot it and check the milestones")
    b.add_argument("--nodes", type=int, default=1)
    b.add_argument("--vcpus", type=int, default=0, help="default: one per node, at least 2")
    b.add_argument("--memory", default="512M")
    b.add_argument("--cmdline", default=os.environ.get("DVMM_LINUX_CMDLINE", DEFAULT_CMDLINE))
    b.add_argument("--timeout", type=int, default=1500)
    b.add_argument("extra", nargs="*", help="more dvmmctl run options (after --)")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        k, i = prepare()
        print(k)
        print(i)
        return 0
    vcpus = a.vcpus or max(2, a.nodes)
    return boot(a.nodes, vcpus, a.memory, a.cmdline, a.timeout, a.extra)


if __name__ == "__main__":
    sys.exit(main())
