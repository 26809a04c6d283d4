"""The bundled guest under QEMU with KVM: the baseline dvmm is compared with.

QEMU's isa-debug-exit device makes QEMU exit with ``(status << 1) | 1``, so a
guest that passes everything (status 0) makes QEMU exit 1.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import (
    BOOT_TIMEOUT_S,
    assert_all_passed,
    parse_guest_output,
    requires_kvm,
    requires_qemu,
)

pytestmark = [requires_kvm, requires_qemu]


def qemu(kernel: Path, smp: int, append: str) -> subprocess.CompletedProcess[str]:
    qemu_bin = shutil.which("qemu-system-x86_64")
    assert qemu_bin is not None
    cmd = [
        qemu_bin, "-enable-kvm", "-cpu", "qemu64,+x2apic", "-smp", str(smp), "-m", "256",
        "-nographic", "-no-reboot", "-nic", "none",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(kernel), "-append", append,
    ]  # fmt: skip
    try:
        return subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=BOOT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(f"QEMU did not finish in {BOOT_TIMEOUT_S} s; output:\n{(out or '')[-3000:]}")


@pytest.mark.parametrize("smp", [1, 2, 4])
def test_guest_passes_under_qemu(guest_kernel: Path, smp: int) -> None:
    r = qemu(guest_kernel, smp, "run=all")
    assert_all_passed(r.stdout)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:], r.stdout[-3000:])


@pytest.mark.parametrize(
    ("append", "named"),
    [("run=bogus", "bogus"), ("run=counter iters=notanumber", "iters")],
)
def test_broken_parameter_fails_under_qemu(guest_kernel: Path, append: str, named: str) -> None:
    r = qemu(guest_kernel, 2, append)
    rep = parse_guest_output(r.stdout)
    assert any(named in line for line in rep.failed_lines), rep.explain()
    # exited through the debug-exit port (odd status), with a non-zero guest status
    assert r.returncode != 1, rep.explain()
    assert r.returncode % 2 == 1, (r.returncode, rep.explain())
