"""The guest measures what it sees (issue 9): ``run=faultlat,ipi`` under dvmm.

``faultlat`` times single accesses from inside the guest (fenced rdtsc at
CPL3) in three phases -- a read of a page homed on another node, the upgrade
of that read-shared page, and stealing back a page another node holds
modified -- and prints nearest-rank percentiles over every vCPU's samples;
``ipi`` prints percentiles of its round trips. These tests check behaviour
only: the run passes, every sample is accounted for, the percentiles are
ordered. Timings depend on the host and are never asserted.

The helpers that read the result lines are also used by test_guest_qemu.py
(the same binary prints the same lines under QEMU).

Runs need /dev/kvm, the native module and the built guest: they skip with the
printed reason where those are missing, and fail instead when the environment
says it is CI (``CI`` set, as CI services do), so a CI host that lost KVM does
not pass silently.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import BOOT_TIMEOUT_S, assert_all_passed, dvmmctl, parse_guest_output, skip_or_fail
from test_multinode import cluster_unavailable

PHASES = ("read", "upgrade", "steal", "local")
#: Every latency field of the faultlat line, in print order.
LATENCY_FIELDS = tuple(f"{ph}_{q}_ns" for ph in PHASES for q in ("p50", "p99", "max"))
#: faultlat's default buffer, pages per vCPU.
DEFAULT_PAGES_PER_CPU = 1024


def line_fields(line: str) -> dict[str, str]:
    """``key=value`` tokens of one result line (without the ``dvmm-guest:`` prefix)."""
    return dict(t.split("=", 1) for t in line.split()[1:] if "=" in t)


def result_line(output: str, workload: str) -> str:
    """The PASS line of ``workload``; fails the test (with every guest line) if absent."""
    rep = parse_guest_output(output)
    found = [b for b in rep.passed_lines if b.split()[0] == workload]
    assert len(found) == 1, f"no single passing {workload} line\n" + rep.explain()
    return found[0]


def check_faultlat(line: str, cpus: int, pages_per_cpu: int) -> dict[str, int]:
    """The faultlat line's counts are exact and each phase's p50 <= p99 <= max."""
    f = line_fields(line)
    assert line.split()[-1] == "PASS", line
    assert f["cpus"] == str(cpus), line
    assert int(f["pages"]) == cpus * pages_per_cpu, line
    missing = [k for k in LATENCY_FIELDS if k not in f]
    assert not missing, (missing, line)
    ns = {k: int(f[k]) for k in LATENCY_FIELDS}
    for ph in PHASES:
        p50, p99, top = ns[f"{ph}_p50_ns"], ns[f"{ph}_p99_ns"], ns[f"{ph}_max_ns"]
        assert 0 <= p50 <= p99 <= top, (ph, line)
    return ns


def check_ipi_percentiles(line: str, rounds: int) -> None:
    """The ipi line keeps its old fields and adds ordered round-trip percentiles."""
    f = line_fields(line)
    assert f["rounds"] == f["pings"] == f["pongs"] == str(rounds), line
    for key in ("rtt_ns", "min_rtt_ns", "rtt_p50_ns", "rtt_p99_ns"):
        assert key in f, (key, line)
    assert int(f["min_rtt_ns"]) <= int(f["rtt_p50_ns"]) <= int(f["rtt_p99_ns"]), line


@pytest.fixture
def dvmm_ready(tmp_path: Path) -> None:
    """test_multinode's availability check; a missing piece fails under CI."""
    reason = cluster_unavailable(tmp_path)
    if reason is None:
        return
    skip_or_fail(reason)


def run_dvmm(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        r = dvmmctl("run", *args, timeout=BOOT_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(
            f"dvmmctl run {args} did not finish in {BOOT_TIMEOUT_S} s:\n{(out or '')[-3000:]}"
        )
    print(r.stdout[-3000:])
    assert r.returncode == 0, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    return r


def test_faultlat_and_ipi_two_nodes(dvmm_ready: None) -> None:
    r = run_dvmm(
        "--nodes", "2", "--vcpus", "2", "--memory", "256M", "--cmdline", "run=faultlat,ipi"
    )  # fmt: skip
    assert_all_passed(r.stdout, min_workloads=2)
    line = result_line(r.stdout, "faultlat")
    check_faultlat(line, cpus=2, pages_per_cpu=DEFAULT_PAGES_PER_CPU)
    # one vCPU per node: each reads the other node's pages
    assert line_fields(line)["shift"] == "1", line
    assert line_fields(line)["read_kind"] == "remote", line
    check_ipi_percentiles(result_line(r.stdout, "ipi"), rounds=200)


def test_faultlat_one_node(dvmm_ready: None) -> None:
    r = run_dvmm("--vcpus", "2", "--memory", "256M", "--cmdline", "run=faultlat")
    assert_all_passed(r.stdout, min_workloads=1)
    line = result_line(r.stdout, "faultlat")
    check_faultlat(line, cpus=2, pages_per_cpu=DEFAULT_PAGES_PER_CPU)
    # no other node to read from: the read phase times first touches
    assert line_fields(line)["shift"] == "0", line
    assert line_fields(line)["read_kind"] == "first_touch", line
