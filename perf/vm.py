"""Running the bundled guest: under QEMU/KVM (the baseline) and under dvmm."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from perf.common import GUEST, REPO, GuestResult, parse_results


class VmError(RuntimeError):
    pass


@dataclass
class VmRun:
    output: str
    results: dict[str, GuestResult]
    wall_s: float
    result_json: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, workload: str) -> GuestResult:
        r = self.results.get(workload)
        if r is None:
            raise VmError(f"no result line for {workload}; output tail:\n{self.output[-1500:]}")
        if not r.passed:
            raise VmError(f"{workload} FAILED: {r.values}")
        return r


def _tail(text: str, n: int = 1200) -> str:
    """The lines that say what went wrong (argparse's "error:" line first), else the tail."""
    errs = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
    return (" | ".join(errs[-3:]) if errs else text.strip())[-n:]


def run_qemu(cmdline: str, *, smp: int = 2, memory_mb: int = 256, timeout: float = 600) -> VmRun:
    """The guest under ``qemu-system-x86_64 -enable-kvm -cpu qemu64,+x2apic``."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VmError("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
    if not GUEST.is_file():
        raise VmError(f"the bundled guest is not built ({GUEST}): make -C guest")
    cmd = [
        qemu, "-enable-kvm", "-cpu", "qemu64,+x2apic", "-smp", str(smp), "-m", str(memory_mb),
        "-nographic", "-no-reboot", "-nic", "none",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(GUEST), "-append", cmdline,
    ]  # fmt: skip
    t = time.monotonic()
    r = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
        timeout=timeout, check=False,
    )  # fmt: skip
    wall = time.monotonic() - t
    # isa-debug-exit: QEMU exits with (status << 1) | 1; status 0 = all passed
    if r.returncode != 1:
        raise VmError(f"qemu exited {r.returncode}: {_tail(r.stderr)} {_tail(r.stdout)}")
    return VmRun(r.stdout, parse_results(r.stdout), wall)


def dvmmctl_cmd() -> list[str]:
    return [sys.executable, "-m", "dvmmd.cli"]


def dvmmctl_run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``dvmmctl ARGS`` in the checkout under test, its output captured (no
    DVMM_DEBUG: its logging would be measured too)."""
    env = dict(os.environ)
    env.pop("DVMM_DEBUG", None)
    return subprocess.run(
        [*dvmmctl_cmd(), *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, errors="replace", timeout=timeout, check=False,
    )  # fmt: skip


def run_dvmm(
    cmdline: str,
    *,
    vcpus: int = 2,
    nodes: int = 1,
    memory: str = "256M",
    timeout: float = 600,
    extra_args: tuple[str, ...] = (),
    hold_window_us: int | None = None,
) -> VmRun:
    """``dvmmctl run --nodes N --vcpus V --memory M --cmdline ... --json``.

    ``hold_window_us``: the DSM hold window against ping-pong pages (``None``: the
    engine's default; 0: the plain invalidation protocol)."""
    cmd = [
        *dvmmctl_cmd(), "run", "--vcpus", str(vcpus), "--memory", memory,
        "--cmdline", cmdline, "--json", "--timeout", str(int(timeout)),
    ]  # fmt: skip
    if nodes != 1:
        cmd += ["--nodes", str(nodes)]
    if hold_window_us is not None:
        cmd += ["--hold-window-us", str(hold_window_us)]
    cmd += list(extra_args)
    env = dict(os.environ)
    env.pop("DVMM_DEBUG", None)
    t = time.monotonic()
    r = subprocess.run(
        cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        errors="replace", timeout=timeout + 60, check=False,
    )  # fmt: skip
    wall = time.monotonic() - t
    result_json: dict[str, Any] | None = None
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result_json = json.loads(line)
            except json.JSONDecodeError:
                continue
            break
    if r.returncode != 0:
        raise VmError(
            f"dvmmctl run --nodes {nodes} --vcpus {vcpus} exited {r.returncode}: "
            f"{_tail(r.stderr, 600)} {_tail(r.stdout, 600)}".strip()
        )
    return VmRun(r.stdout, parse_results(r.stdout), wall, result_json)
