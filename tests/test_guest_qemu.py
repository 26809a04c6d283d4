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
from test_faultlat import (
    DEFAULT_PAGES_PER_CPU,
    check_faultlat,
    check_ipi_percentiles,
    line_fields,
    result_line,
)

pytestmark = [requires_kvm, requires_qemu]


#: Two NUMA nodes of 128 MiB, CPU 0 on node 0 and CPU 1 on node 1 (for -smp 2 -m 256).
TWO_NODES = (
    "-object", "memory-backend-ram,id=m0,size=128M",
    "-object", "memory-backend-ram,id=m1,size=128M",
    "-numa", "node,nodeid=0,cpus=0,memdev=m0",
    "-numa", "node,nodeid=1,cpus=1,memdev=m1",
)  # fmt: skip


def qemu(
    kernel: Path, smp: int, append: str, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    qemu_bin = shutil.which("qemu-system-x86_64")
    assert qemu_bin is not None
    cmd = [
        qemu_bin, "-enable-kvm", "-cpu", "qemu64,+x2apic", "-smp", str(smp), "-m", "256",
        "-nographic", "-no-reboot", "-nic", "none",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        *extra, "-kernel", str(kernel), "-append", append,
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


@pytest.mark.parametrize(
    ("numa", "shift", "read_kind"), [(False, "0", "first_touch"), (True, "1", "remote")]
)
def test_faultlat_and_ipi_percentiles_under_qemu(
    guest_kernel: Path, numa: bool, shift: str, read_kind: str
) -> None:
    # The same lines as under dvmm; under QEMU every access is local, so only
    # the counts and the order of the percentiles are checked, never a figure.
    r = qemu(guest_kernel, 2, "run=faultlat,ipi", TWO_NODES if numa else ())
    rep = assert_all_passed(r.stdout, min_workloads=2)
    print("\n".join(rep.passed_lines))
    line = result_line(r.stdout, "faultlat")
    check_faultlat(line, cpus=2, pages_per_cpu=DEFAULT_PAGES_PER_CPU)
    assert line_fields(line)["shift"] == shift, line
    assert line_fields(line)["read_kind"] == read_kind, line
    check_ipi_percentiles(result_line(r.stdout, "ipi"), rounds=200)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:], r.stdout[-3000:])


def test_faultlat_first_touch_after_other_workloads_under_qemu(guest_kernel: Path) -> None:
    # On one node the read phase must touch memory no earlier workload used
    # (the allocator hands the same addresses to every workload): after a
    # sweep, and after a first faultlat, the reads still see zeros.
    r = qemu(guest_kernel, 2, "run=sweep,faultlat,faultlat faultlat.size=300")
    rep = assert_all_passed(r.stdout, min_workloads=3)
    lines = [b for b in rep.passed_lines if b.split()[0] == "faultlat"]
    assert len(lines) == 2, rep.explain()
    for line in lines:
        check_faultlat(line, cpus=2, pages_per_cpu=300)
        assert line_fields(line)["read_kind"] == "first_touch", line
