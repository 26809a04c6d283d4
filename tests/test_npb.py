"""The NAS Parallel Benchmark kernels in the bundled guest (issue 16): npb.ep, npb.is,
npb.cg, npb.mg and npb.ft, class S, verify under QEMU/KVM and under dvmm on one and
two nodes, and a corrupted input is reported as ``verified=no ... FAIL``.

Each boot runs all five kernels (class S: a few seconds of guest time), so the
whole module costs a handful of boots. Timings are printed, never asserted.
Runs need /dev/kvm (and QEMU, the native module, the built guest): they skip
with the reason where those are missing and fail instead under CI.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import (
    BOOT_TIMEOUT_S,
    assert_all_passed,
    dvmmctl,
    parse_guest_output,
    requires_kvm,
    requires_qemu,
)
from test_faultlat import dvmm_ready, run_dvmm
from test_guest_qemu import TWO_NODES, qemu

__all__ = ["dvmm_ready"]  # a fixture used below by name

KERNELS = ("ep", "is", "cg", "mg", "ft")
ALL_S = "run=" + ",".join(f"npb.{k}" for k in KERNELS) + " class=S"
#: The line every kernel prints (guest/README.md, "NPB").
NPB_LINE = re.compile(
    r"^npb\.(?P<kernel>ep|is|cg|mg|ft) class=(?P<cls>[SWA]) cpus=(?P<cpus>\d+) "
    r"time_us=(?P<time_us>\d+) mops=(?P<mops>\d+\.\d\d) verified=(?P<verified>yes|no) "
    r"(?P<result>PASS|FAIL)$"
)


def npb_lines(output: str) -> dict[str, re.Match[str]]:
    """The npb result lines of a boot, by kernel (each must appear exactly once)."""
    rep = parse_guest_output(output)
    found: dict[str, re.Match[str]] = {}
    for body in rep.lines:
        m = NPB_LINE.match(body)
        if m:
            assert m["kernel"] not in found, (
                "npb." + m["kernel"] + " printed twice\n" + rep.explain()
            )
            found[m["kernel"]] = m
    assert sorted(found) == sorted(KERNELS), "missing npb lines\n" + rep.explain()
    return found


def check_verified(output: str, cpus: int) -> None:
    assert_all_passed(output, min_workloads=len(KERNELS))
    for k, m in npb_lines(output).items():
        print(m.group(0))
        assert m["cls"] == "S" and m["cpus"] == str(cpus), m.group(0)
        assert m["verified"] == "yes" and m["result"] == "PASS", m.group(0)
        assert int(m["time_us"]) > 0 and float(m["mops"]) > 0, (k, m.group(0))


def check_corrupted(output: str) -> None:
    rep = parse_guest_output(output)
    for m in npb_lines(output).values():
        assert m["verified"] == "no" and m["result"] == "FAIL", m.group(0)
    # the guest says what it got against the reference value
    notes = [b for b in rep.lines if b.startswith("note: npb.")]
    assert len(notes) == len(KERNELS), rep.explain()
    assert rep.summary == (0, len(KERNELS)), rep.explain()


@requires_kvm
@requires_qemu
def test_npb_class_s_verifies_under_qemu_two_numa_nodes(guest_kernel: Path) -> None:
    r = qemu(guest_kernel, 2, ALL_S, TWO_NODES)
    check_verified(r.stdout, cpus=2)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:], r.stdout[-3000:])


@requires_kvm
@requires_qemu
def test_npb_corrupted_input_is_not_verified_under_qemu(guest_kernel: Path) -> None:
    r = qemu(guest_kernel, 2, ALL_S + " npb.corrupt=1 numa=ignore")
    check_corrupted(r.stdout)
    # guest status 1 through the debug-exit port: (1 << 1) | 1
    assert r.returncode == 3, (r.returncode, r.stdout[-3000:])


def test_npb_class_s_verifies_on_dvmm_one_node(dvmm_ready: None) -> None:
    r = run_dvmm("--vcpus", "2", "--memory", "256M", "--cmdline", ALL_S)
    check_verified(r.stdout, cpus=2)


def test_npb_class_s_verifies_on_dvmm_two_nodes(dvmm_ready: None) -> None:
    r = run_dvmm("--nodes", "2", "--vcpus", "2", "--memory", "256M", "--cmdline", ALL_S)
    check_verified(r.stdout, cpus=2)


def _dvmm_failing(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        r = dvmmctl("run", *args, timeout=BOOT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"dvmmctl run {args} did not finish in {BOOT_TIMEOUT_S} s")
    print(r.stdout[-3000:])
    return r


def test_npb_corrupted_input_is_not_verified_on_dvmm(dvmm_ready: None) -> None:
    r = _dvmm_failing("--vcpus", "2", "--memory", "256M", "--cmdline", ALL_S + " npb.corrupt=1")
    check_corrupted(r.stdout)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize(
    ("cmdline", "named"),
    [("run=npb.ep class=Q", "class"), ("run=npb.cg npb.cg.bogus=1", "npb.cg")],
)
def test_npb_bad_parameters_fail_before_running(dvmm_ready: None, cmdline: str, named: str) -> None:
    r = _dvmm_failing("--vcpus", "1", "--memory", "64M", "--cmdline", cmdline)
    rep = parse_guest_output(r.stdout)
    assert any(named in line for line in rep.failed_lines), rep.explain()
    assert not [b for b in rep.lines if NPB_LINE.match(b)], rep.explain()
    assert r.returncode == 1, (r.returncode, rep.explain())
