"""The choice of local APIC (``dvmmctl run --lapic``, spec field ``lapic``): dvmm's
userspace LAPIC by default, KVM's in-kernel one for one-node VMs on request, refused
for a distributed VM; and a real one-node run with KVM's LAPIC passes the workloads
that use IPIs, the timer and HLT with exact results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BOOT_TIMEOUT_S, assert_all_passed, dvmmctl, requires_kvm

from dvmmd.vm.spec import LAPIC_KINDS, SpecError, build_spec, check_lapic, validate_spec


def test_kinds() -> None:
    assert LAPIC_KINDS == ("user", "kernel", "auto")
    for k in LAPIC_KINDS:
        assert check_lapic(k, distributed=False) == k
    assert check_lapic("auto", distributed=True) == "auto"
    assert check_lapic("user", distributed=True) == "user"


@pytest.mark.parametrize("bad", ["KERNEL", "", "x2apic", 1, None, ["kernel"]])
def test_unknown_kind_is_refused(bad: object) -> None:
    with pytest.raises(SpecError, match="unknown LAPIC"):
        check_lapic(bad, distributed=False)


def test_kernel_lapic_needs_one_node() -> None:
    with pytest.raises(SpecError, match="lapic = kernel needs a one-node VM"):
        check_lapic("kernel", distributed=True)


def test_spec_carries_the_choice_only_when_given(guest_kernel: Path) -> None:
    plain = build_spec(vcpus=1, memory=64 << 20, kernel=guest_kernel)
    assert "lapic" not in plain
    spec = build_spec(vcpus=1, memory=64 << 20, kernel=guest_kernel, lapic="kernel")
    assert spec["lapic"] == "kernel"
    assert validate_spec(spec)["lapic"] == "kernel"
    with pytest.raises(SpecError, match="unknown LAPIC"):
        validate_spec({**spec, "lapic": "bogus"})


def test_native_refuses_an_unknown_kind(tmp_path: Path) -> None:
    from dvmmd import _native

    spec = {"vcpus": 1, "memory": 16 << 20, "kernel": str(tmp_path / "none"), "lapic": "nope"}
    with pytest.raises(ValueError, match='lapic = "nope": expected user, kernel or auto'):
        _native.run_vm(json.dumps(spec))


def test_cli_refuses_kernel_lapic_on_several_nodes() -> None:
    r = dvmmctl("run", "--nodes", "2", "--vcpus", "2", "--lapic", "kernel")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "--lapic kernel: one node only" in r.stderr, r.stderr


def test_cli_refuses_an_unknown_kind() -> None:
    r = dvmmctl("run", "--lapic", "bogus")
    assert r.returncode == 2
    assert "argument --lapic: invalid choice: 'bogus'" in r.stderr, r.stderr


@requires_kvm
@pytest.mark.parametrize("lapic", ["kernel", "auto"])
def test_one_node_run_with_kvm_lapic(lapic: str) -> None:
    r = dvmmctl(
        "run", "--vcpus", "2", "--memory", "128M", "--lapic", lapic,
        "--cmdline", "run=ipi,counter,spinlock,ring,stress", "--json",
        timeout=BOOT_TIMEOUT_S,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = assert_all_passed(r.stdout, min_workloads=5)
    assert rep.summary == (5, 0)
    assert "counter cpus=2 iters=100000 total=200000" in r.stdout
    result = json.loads(r.stdout[r.stdout.index("\n{") + 1 :])
    # IPIs, timer and HLT never came to the userspace LAPIC.
    assert result["stats"]["lapic_accesses"] == 0, result["stats"]
    assert result["stats"]["interrupts_injected"] == 0, result["stats"]
