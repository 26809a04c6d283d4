"""The Linux boot test (issue 13, item 4): Debian's cloud kernel on dvmm.

    python tests/linux/linux_boot.py prepare          # kernel + initramfs, cached
    python tests/linux/linux_boot.py boot --nodes 1   # boot, check the milestones
    python tests/linux/linux_boot.py boot --qemu      # the same kernel under QEMU/KVM

`prepare` downloads the distribution's kernel package with apt (`apt-get download`
of the package `linux-image-cloud-amd64` depends on), extracts its vmlinuz with
dpkg-deb and builds a tiny initramfs (cpio newc: a static /init from init.c, built
with gcc -nostdlib, and /dev/console), all under build/linux/ (git-ignored, never
committed). A second run reuses what is there.

`boot` runs `dvmmctl run --kernel ... --initrd ... --cmdline ...` on N local nodes
and checks the console for the milestones below, in order; it prints each one with
the time it was seen and the console's last lines, and fails when a required one is
missing. Run by `make test-linux` (not part of `make test`: a boot takes minutes
on a PVM host, where the kernel's CPL0 code is emulated). `boot --qemu` runs the
same kernel, initramfs and command line under `qemu-system-x86_64 -enable-kvm -cpu
host` for comparison (on a PVM host QEMU stops early: KVM's emulator refuses an
instruction that dvmm finishes, `lock cmpxchg16b` in SLUB with `-cpu host`).

The timing is reusable: `run_console` starts a VMM, reads its console and returns a
`BootTimes` (the wall and guest seconds of each milestone, and what ended the boot:
every required milestone, the kernel's death, the VMM's exit or a timeout);
`Timeline` is its pure parser. The perf suite's `linux` stage (perf/linux.py)
uses both.

It is not a pytest module on purpose (tests/ is pytest's test path): nothing here
runs in `make test` (in a clean-clone CI run on a PVM host a 1-node boot had not
reached `/init` after 13.5 minutes; with the rest of CI that is past its 30-minute
budget).
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "linux"
META_PACKAGE = "linux-image-cloud-amd64"
# The options speed the boot up on this host, whose CPL0 code runs in KVM PVM's
# instruction emulator (~500 ns an instruction); the kernel also boots with plain
# `console=ttyS0` (issue 13's check), only slower. On a VT-x/AMD-V host none is
# needed.
# noxsave clearcpuid=ssse3: what dvmm's `baseline` CPU model adds to a Linux
# command line by itself (cpuid.rs, `linux_switches`: KVM PVM shows the guest XSAVE
# and SSSE3 whatever CPUID says, and its emulator refuses xrstor and the RNG's
# SSSE3 blake2s); written here too so that QEMU (perf's `linux` stage) boots the
# same line.
# cryptomgr.notests: the crypto self-tests (RSA/DH multi-precision arithmetic,
# hashes over test vectors) take many minutes emulated and test the emulator, not
# dvmm. mitigations=off: no retpolines, RSB stuffing, VERW or IBRS on every kernel
# entry and exit, each instruction of which costs an emulated instruction here.
# nowatchdog: code that runs 1000x slower than native trips the soft-lockup
# detector, whose reports (stack dumps over the serial port, one exit a byte) cost
# more time still.
DEFAULT_CMDLINE = (
    "console=ttyS0 earlyprintk=ttyS0 noxsave clearcpuid=ssse3 nokaslr panic=-1"
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


def milestones(nodes: int, vcpus: int) -> list[tuple[str, str, bool]]:
    """MILESTONES for a boot of `vcpus` vCPUs on `nodes` nodes: SRAT is required on
    several nodes, and SMP must have brought up all `vcpus` CPUs on `nodes` NUMA nodes
    (Linux counts the nodes its CPUs are on)."""
    res = []
    for name, rx, required in MILESTONES:
        if name == "SRAT" and nodes > 1:
            required = True
        if name == "smp brought up":
            rx = rf"smp: Brought up {nodes} nodes?, {vcpus} CPUs?\b"
        res.append((name, rx, required))
    return res


def check(console: str, nodes: int, vcpus: int) -> list[tuple[str, bool, bool]]:
    """(milestone, seen, required) for each milestone (see `milestones`)."""
    return [
        (name, re.search(rx, console) is not None, required)
        for name, rx, required in milestones(nodes, vcpus)
    ]


def slug(name: str) -> str:
    """A milestone's name as a key: "run /init" -> "run_init"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


#: The kernel's printk time stamp at the start of a console line: `[  199.276477] `.
STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]")
#: A console (or VMM) line after which the kernel will not go on: a panic, or KVM's
#: emulation failure as QEMU reports it (QEMU then stops the vCPUs but stays alive;
#: dvmm exits by itself and says "the guest crashed").
DEATH = re.compile(r"Kernel panic|KVM internal error|emulation failure|the guest crashed")


class Timeline:
    """Reads a boot's console line by line: the wall time (seconds since the VMM
    started, given by the caller) and the kernel's own time stamp of each milestone's
    first appearance, the last stamp seen, and the first line saying the kernel died.
    Pure (no clock, no process): fed by `run_console` and by unit tests."""

    def __init__(self, marks: list[tuple[str, str, bool]]) -> None:
        self.marks = [(name, re.compile(rx), required) for name, rx, required in marks]
        self.wall: dict[str, float] = {}
        self.guest: dict[str, float] = {}
        self.last_guest_s: float | None = None
        self.death: str | None = None

    def feed(self, line: str, wall_s: float) -> list[str]:
        """One console line seen `wall_s` seconds after the start; returns the
        milestones it is the first sighting of."""
        line = line.rstrip("\r\n")
        m = STAMP.match(line)
        if m:
            self.last_guest_s = float(m.group(1))
        new = []
        for name, rx, _ in self.marks:
            if name not in self.wall and rx.search(line):
                self.wall[name] = wall_s
                if self.last_guest_s is not None:
                    # the line's own stamp, else the last one before it
                    self.guest[name] = self.last_guest_s
                new.append(name)
        if self.death is None and DEATH.search(line):
            self.death = line.strip()
        return new

    @property
    def required_seen(self) -> bool:
        return all(name in self.wall for name, _, req in self.marks if req)

    @property
    def reached(self) -> str | None:
        """The furthest milestone seen (in MILESTONES order), None before the first."""
        seen = [name for name, _, _ in self.marks if name in self.wall]
        return seen[-1] if seen else None


@dataclass
class BootTimes:
    """What one boot showed. `stopped`: "milestones" (every required one seen, then
    `grace_s` more), "died" (a DEATH line, `death`), "exited" (the VMM exited on its
    own, exit status `rc`) or "timeout"."""

    wall: dict[str, float]
    guest: dict[str, float]
    reached: str | None
    stopped: str
    detail: str
    wall_s: float
    last_guest_s: float | None
    rc: int | None
    death: str | None = None
    output: str = field(default="", repr=False)


# Seconds the VMM runs on after a DEATH line (the panic's or KVM's register dump).
DEATH_GRACE_S = 3.0


def run_console(
    cmd: list[str],
    marks: list[tuple[str, str, bool]],
    *,
    timeout: float,
    log_path: Path,
    grace_s: float,
    stop: Callable[[subprocess.Popen[str]], None],
    on_milestone: Callable[[str, float], None] | None = None,
    drain_s: float = 60.0,
) -> BootTimes:
    """Runs `cmd` (a VMM whose stdout and stderr carry the guest's console), times
    `marks` as their lines appear and ends the boot at the first of: every required
    milestone seen (then `grace_s` more seconds), a DEATH line (then DEATH_GRACE_S),
    the VMM's exit, `timeout` seconds. `stop` ends a VMM that is still running; the
    process is SIGKILLed on every other way out (an exception included). Everything
    the VMM printed goes to `log_path` (and `BootTimes.output`), up to `drain_s`
    seconds after the stop (dvmmctl prints its stats then)."""
    tl = Timeline(marks)
    lines: queue.Queue[str | None] = queue.Queue()
    out: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + timeout
    stop_at: float | None = None
    stopped, detail = "", ""
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace",
    )  # fmt: skip

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    eof = False
    try:
        with log_path.open("w") as logf:

            def take(line: str) -> None:
                out.append(line)
                logf.write(line)
                logf.flush()

            while True:
                now = time.monotonic()
                end = deadline if stop_at is None else min(deadline, stop_at)
                if now >= end:
                    if stop_at is None or deadline < stop_at:
                        stopped, detail = "timeout", f"no end after {timeout:.0f} s"
                    break
                try:
                    line = lines.get(timeout=end - now)
                except queue.Empty:
                    continue
                if line is None:
                    eof = True
                    break
                take(line)
                for name in tl.feed(line, time.monotonic() - t0):
                    if on_milestone is not None:
                        on_milestone(name, tl.wall[name])
                if stop_at is None and tl.death is not None:
                    stopped, detail = "died", tl.death
                    stop_at = time.monotonic() + DEATH_GRACE_S
                elif stop_at is None and tl.required_seen:
                    stopped, detail = "milestones", "every required milestone seen"
                    stop_at = time.monotonic() + grace_s
            wall_s = time.monotonic() - t0
            if proc.poll() is None:
                stop(proc)
            # The rest of the output (dvmmctl's stats after the stop).
            drain_end = time.monotonic() + drain_s
            while not eof and time.monotonic() < drain_end:
                try:
                    line = lines.get(timeout=max(0.1, drain_end - time.monotonic()))
                except queue.Empty:
                    break
                if line is None:
                    break
                take(line)
    finally:
        try:
            if proc.poll() is None:  # an exception (Ctrl-C) left it running
                stop(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            rc = proc.wait()
    if not stopped:
        stopped, detail = "exited", f"the VMM exited with {rc}"
        if tl.death is not None:
            stopped, detail = "died", tl.death
    return BootTimes(
        wall=dict(tl.wall), guest=dict(tl.guest), reached=tl.reached, stopped=stopped,
        detail=detail, wall_s=wall_s, last_guest_s=tl.last_guest_s, rc=rc, death=tl.death,
        output="".join(out),
    )  # fmt: skip


# Seconds the VM runs on after the last required milestone (for "/init prints").
STOP_GRACE_S = 60


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stops dvmmctl as Ctrl-C does (it prints its stats), killing it if it lingers."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Seconds QEMU gets to exit after SIGTERM before SIGKILL.
KILL_GRACE_S = 5.0


def _stop_qemu(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL after KILL_GRACE_S (a QEMU once ignored SIGTERM and kept
    a core busy)."""
    proc.terminate()
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def dvmm_cmd(
    kernel: Path, initrd: Path, cmdline: str, nodes: int, vcpus: int, memory: str,
    timeout: int, console_log: Path, extra: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    dvmmctl = REPO / ".venv" / "bin" / "dvmmctl"
    return [
        str(dvmmctl), "run", "--nodes", str(nodes), "--vcpus", str(vcpus), "--memory", memory,
        "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", cmdline,
        "--console-log", str(console_log), "--no-console-stdin", "--timeout", str(timeout), "--stats",
        *extra,
    ]  # fmt: skip


def qemu_cmd(kernel: Path, initrd: Path, cmdline: str, vcpus: int, memory: str) -> list[str]:
    """QEMU/KVM with the host's CPU, the console on stdio (-nographic), no NIC, and
    -no-reboot so that `panic=-1` ends it."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit(
            "linux-boot: qemu-system-x86_64 is not installed (Debian: qemu-system-x86)"
        )
    return [
        qemu, "-enable-kvm", "-cpu", "host", "-smp", str(vcpus), "-m", memory,
        "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
    ]  # fmt: skip


def time_boot(
    vmm: str, nodes: int, vcpus: int, memory: str, cmdline: str, timeout: int,
    extra: Sequence[str] = (), tag: str = "", grace_s: float = STOP_GRACE_S,
) -> BootTimes:  # fmt: skip
    """One boot under `vmm` ("dvmm" or "qemu"; QEMU runs one node), timed: its
    output in build/linux/{dvmmctl,qemu}-<tag>.log (dvmm: the console alone in
    console-<tag>.log); `tag` defaults to "<nodes>n"."""
    kernel, initrd = prepare()
    tag = tag or f"{nodes}n"
    if vmm == "qemu":
        cmd = qemu_cmd(kernel, initrd, cmdline, vcpus, memory)
        output_log, stop = CACHE / f"qemu-{tag}.log", _stop_qemu
    else:
        console_log = CACHE / f"console-{tag}.log"
        console_log.unlink(missing_ok=True)  # dvmmctl appends
        cmd = dvmm_cmd(kernel, initrd, cmdline, nodes, vcpus, memory, timeout, console_log, extra)
        output_log, stop = CACHE / f"dvmmctl-{tag}.log", _stop
    log(" ".join(cmd))

    def seen(name: str, wall_s: float) -> None:
        log(f"milestone {name!r} after {wall_s:.0f} s")

    # dvmmctl has its own --timeout; ours is the backstop.
    backstop = timeout if vmm == "qemu" else timeout + 90
    res = run_console(
        cmd, milestones(nodes, vcpus), timeout=backstop, log_path=output_log,
        grace_s=grace_s, stop=stop, on_milestone=seen,
    )  # fmt: skip
    log(
        f"{vmm} stopped ({res.stopped}: {res.detail[:200]}) after {res.wall_s:.0f} s, exit {res.rc}"
    )
    log(f"output: {output_log}")
    return res


def boot(
    nodes: int, vcpus: int, memory: str, cmdline: str, timeout: int, extra: list[str],
    vmm: str = "dvmm",
) -> int:  # fmt: skip
    res = time_boot(vmm, nodes, vcpus, memory, cmdline, timeout, extra)
    body, _, stats = res.output.partition("\nstats:\n")
    tail = [ln for ln in body.splitlines() if ln.strip()][-25:]
    print("\n".join("    " + ln for ln in tail))
    for ln in stats.splitlines():
        if "insns_completed" in ln or "exits_total" in ln:
            log(ln.strip())
    failed = False
    for name, ok, needed in check(res.output, nodes, vcpus):
        state = "ok" if ok else ("MISSING" if needed else "not reached")
        when = f" ({res.wall[name]:.0f} s" if name in res.wall else ""
        if name in res.guest:
            when += f", guest {res.guest[name]:.1f} s"
        log(f"{name:16} {state}{when}{')' if when else ''}")
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
    b.add_argument("--qemu", action="store_true", help="under QEMU/KVM (-cpu host), one node")
    b.add_argument("extra", nargs="*", help="more dvmmctl run options (after --)")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        k, i = prepare()
        print(k)
        print(i)
        return 0
    if a.qemu and a.nodes != 1:
        ap.error("--qemu boots one node")
    vcpus = a.vcpus or max(2, a.nodes)
    return boot(
        a.nodes, vcpus, a.memory, a.cmdline, a.timeout, a.extra, "qemu" if a.qemu else "dvmm"
    )


if __name__ == "__main__":
    sys.exit(main())
