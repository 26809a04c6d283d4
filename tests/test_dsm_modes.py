"""Every fault-service mode of the DSM engine keeps the guest correct (issue 9).

The engine's waiting strategy is chosen with ``DVMM_DSM_MODE`` (rust/src/dsm/engine.rs
``ServiceMode``; perf/README.md has the A/B that chose the default ``rt-spin``). The
other modes stay selectable for A/B runs, so they must stay correct: each one boots the
bundled guest on 2 nodes and runs workloads that move pages both ways, upgrade and
steal them (faultlat), forward IPIs (ipi) and contend on one line (counter), with the
exact checks the guest makes. ``vcpu-serve`` serves incoming messages on a vCPU thread
(socket signals interrupt ``KVM_RUN``), a path nothing else exercises.
"""

from __future__ import annotations

import pytest
from conftest import BOOT_TIMEOUT_S, assert_all_passed, dvmmctl
from test_faultlat import DEFAULT_PAGES_PER_CPU, check_faultlat, dvmm_ready, result_line

__all__ = ["dvmm_ready"]  # the fixture, imported for pytest


@pytest.mark.parametrize("mode", ["legacy", "rt", "rt-idle", "vcpu-serve"])
def test_guest_passes_in_every_service_mode(dvmm_ready: None, mode: str) -> None:
    r = dvmmctl(
        "run", "--nodes", "2", "--vcpus", "2", "--memory", "256M",
        "--cmdline", "run=faultlat,ipi,counter ipi.iters=100 counter.iters=20000",
        timeout=BOOT_TIMEOUT_S, env={"DVMM_DSM_MODE": mode},
    )  # fmt: skip
    print(r.stdout[-3000:])
    assert r.returncode == 0, (mode, r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    assert_all_passed(r.stdout, min_workloads=3)
    check_faultlat(result_line(r.stdout, "faultlat"), cpus=2, pages_per_cpu=DEFAULT_PAGES_PER_CPU)
