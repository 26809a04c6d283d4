"""dvmmctl doctor."""

from __future__ import annotations

import json
import os

import pytest
from conftest import dvmmctl, kvm_usable

from dvmmd import host
from dvmmd.cli import doctor

IS_PVM = os.path.exists("/sys/module/kvm_pvm")


def test_doctor_table() -> None:
    r = dvmmctl("doctor", timeout=120)
    assert "Traceback" not in r.stderr
    for name in ("/dev/kvm", "KVM API version", "KVM_CAP_USER_MEMORY", "KVM_CAP_MAX_VCPUS",
                 "virtualization", "userfaultfd", "UFFD_FEATURE_PAGEFAULT_FLAG_WP", "memfd"):  # fmt: skip
        assert name in r.stdout, name
    if kvm_usable():
        assert r.returncode == 0, r.stdout + r.stderr
        assert "this host can run dvmm" in r.stdout
    else:
        assert r.returncode != 0
        assert "/dev/kvm" in r.stderr


def test_doctor_json() -> None:
    r = dvmmctl("doctor", "--json", timeout=120)
    data = json.loads(r.stdout)
    for key in ("ok", "failed", "host_kind", "host_kind_meaning", "kvm", "userfaultfd", "host",
                "build", "checks"):  # fmt: skip
        assert key in data, key
    assert isinstance(data["checks"], list) and data["checks"]
    for c in data["checks"]:
        assert {"name", "ok", "required", "detail", "status"} <= set(c)
    assert data["ok"] == (r.returncode == 0)
    assert data["ok"] == (not data["failed"])
    if kvm_usable():
        assert data["ok"], data["failed"]
        assert data["kvm"]["api_version"] == 12
        caps = data["kvm"]["capabilities"]
        for cap in ("USER_MEMORY", "SET_TSS_ADDR", "EXT_CPUID", "IMMEDIATE_EXIT",
                    "X86_USER_SPACE_MSR", "X86_MSR_FILTER", "READONLY_MEM", "SYNC_REGS",
                    "EXIT_HYPERCALL", "MAX_VCPUS", "SPLIT_IRQCHIP", "X2APIC_API",
                    "DIRTY_LOG_RING"):  # fmt: skip
            assert cap in caps, cap
        assert caps["MAX_VCPUS"] >= 1
        assert data["userfaultfd"]["available"]
        assert data["userfaultfd"]["features"]["PAGEFAULT_FLAG_WP"]


@pytest.mark.skipif(not IS_PVM, reason="this host is not a PVM host (/sys/module/kvm_pvm)")
def test_doctor_names_pvm_here() -> None:
    r = dvmmctl("doctor", timeout=120)
    assert "PVM" in r.stdout
    assert "CPL0" in r.stdout and "emulated" in r.stdout
    data = json.loads(dvmmctl("doctor", "--json", timeout=120).stdout)
    assert data["host_kind"] == "pvm"
    assert "CPL3" in data["host_kind_meaning"]


CPUINFO_VMX = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\n"
CPUINFO_SVM = "processor\t: 0\nflags\t\t: fpu svm sse2\n"
CPUINFO_NONE = "processor\t: 0\nflags\t\t: fpu sse2 hypervisor\n"


@pytest.mark.parametrize(
    ("cpuinfo", "modules", "kvm", "kind"),
    [
        (CPUINFO_VMX, {"kvm", "kvm_intel"}, True, "vmx"),
        (CPUINFO_SVM, {"kvm", "kvm_amd"}, True, "svm"),
        (CPUINFO_NONE, {"kvm", "kvm_pvm"}, True, "pvm"),
        (CPUINFO_VMX, {"kvm", "kvm_pvm"}, True, "pvm"),
        (CPUINFO_NONE, set(), False, "none"),
        (CPUINFO_VMX, set(), False, "none"),
        (CPUINFO_NONE, {"kvm"}, True, "unknown"),
        (CPUINFO_VMX, {"kvm"}, True, "vmx"),
        ("", set(), False, "none"),
    ],
)
def test_host_kind(cpuinfo: str, modules: set[str], kvm: bool, kind: str) -> None:
    got, meaning = host.host_kind(cpuinfo, modules, kvm)
    assert got == kind
    assert meaning
    if kind == "pvm":
        assert "CPL0" in meaning and "emulated" in meaning and "CPL3" in meaning


def test_missing_kvm_device_fails_with_its_name() -> None:
    report = doctor.run_doctor(kvm_path="/nonexistent/kvm")
    assert not report.ok
    assert "/nonexistent/kvm" in report.failed
    text = doctor.format_report(report)
    assert "cannot run dvmm" in text and "/nonexistent/kvm" in text


def test_main_exit_status_names_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = doctor.run_doctor
    monkeypatch.setattr(doctor, "run_doctor", lambda: real(kvm_path="/nonexistent/kvm"))
    assert doctor.main(as_json=False) != 0
    assert "/nonexistent/kvm" in capsys.readouterr().err
    assert doctor.main(as_json=True) != 0
    out = capsys.readouterr().out
    assert json.loads(out)["ok"] is False


def test_cap_numbers_match_kernel_headers() -> None:
    # include/uapi/linux/kvm.h
    expected = {"USER_MEMORY": 3, "SET_TSS_ADDR": 4, "EXT_CPUID": 7, "MAX_VCPUS": 66,
                "SYNC_REGS": 74, "READONLY_MEM": 81, "SPLIT_IRQCHIP": 121, "X2APIC_API": 129,
                "IMMEDIATE_EXIT": 136, "X86_USER_SPACE_MSR": 188, "X86_MSR_FILTER": 189,
                "DIRTY_LOG_RING": 192, "EXIT_HYPERCALL": 201}  # fmt: skip
    assert {name: num for name, num, _r, _w in doctor.KVM_CAPS} == expected
    assert doctor.KVM_GET_API_VERSION == 0xAE00
    assert doctor.KVM_CHECK_EXTENSION == 0xAE03
    assert doctor.UFFDIO_API == 0xC018AA3F
    assert doctor.UFFDIO_REGISTER == 0xC020AA00


def test_memfd_probe() -> None:
    assert doctor.probe_memfd() == ""


def test_data_plane_mode_reported_from_the_daemon_config(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    missing = doctor.probe_data_plane(str(d / "nope.toml"))
    assert missing["mode"] == "encrypt" and "default" in missing["source"]
    secret = d / "secret"
    secret.write_text("00112233445566778899aabbccddeeff")
    secret.chmod(0o600)
    cfg = d / "dvmmd.toml"
    cfg.write_text(
        f'[node]\nname = "n1"\nlisten = "127.0.0.1:7000"\nstate_dir = "{d / "state"}"\n'
        f'[cluster]\nsecret_file = "{secret}"\ndata_plane = "integrity"\n'
    )
    got = doctor.probe_data_plane(str(cfg))
    assert got == {"mode": "integrity", "source": f"cluster.data_plane in {cfg}"}, got
    cfg.write_text('[cluster]\ndata_plane = "rot13"\n')
    bad = doctor.probe_data_plane(str(cfg))
    assert bad["mode"] == "unknown" and "data_plane" in bad["source"], bad


def test_rdma_devices_listed(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    assert doctor.probe_rdma(str(d / "none")) == []
    (d / "mlx5_0").mkdir()
    assert doctor.probe_rdma(str(d)) == ["mlx5_0"]
