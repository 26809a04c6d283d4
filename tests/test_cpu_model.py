"""CPU models (issue 12/13): CPUID must not promise what the host cannot run.

``dvmmctl run --cpu host|baseline``: ``host`` offers what KVM_GET_SUPPORTED_CPUID
offers, ``baseline`` leaves out what KVM PVM's CPL0 instruction emulator refuses
(rust/src/cpuid.rs ``BASELINE_REMOVED``). The default is ``baseline`` on a PVM host
and ``host`` on a VT-x/AMD-V host, as ``dvmmctl doctor`` reports it.

Runs need /dev/kvm (and, for two nodes, the native module with multi-node support
and the bundled guest): they skip with the printed reason where those are missing,
and fail instead when the environment says it is CI (as tests/test_faultlat.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import (
    BOOT_TIMEOUT_S,
    MakeKernel,
    assert_all_passed,
    dvmmctl,
    kvm_usable,
    require_guest,
    require_native,
    skip_or_fail,
)
from test_multinode import cluster_unavailable

from dvmmd import host
from dvmmd.cli import doctor
from dvmmd.launcher import launch
from dvmmd.vm import spec as vmspec
from dvmmd.vm.spec import SpecError, build_spec, validate_spec

KNOWN = "known models: host, baseline"


@pytest.fixture
def kvm_ready() -> None:
    """One-node runs: /dev/kvm, the native module and the bundled guest."""
    if not kvm_usable():
        skip_or_fail("/dev/kvm is missing or not read-write for this user")
    require_guest()
    require_native()


@pytest.fixture
def cluster_ready(tmp_path: Path) -> None:
    reason = cluster_unavailable(tmp_path)
    if reason is not None:
        skip_or_fail(reason)


def _host_flags() -> set[str]:
    return host._cpu_flags(Path("/proc/cpuinfo").read_text())


# ------------------------------------------------------------------ defaults and checks


@pytest.mark.parametrize(
    ("kind", "model"),
    [("vmx", "host"), ("svm", "host"), ("pvm", "baseline"), ("unknown", "baseline"),
     ("none", "baseline")],
)  # fmt: skip
def test_default_model_per_host_kind(kind: str, model: str) -> None:
    assert vmspec.default_cpu_model(kind) == model


def test_host_default_follows_doctor() -> None:
    kind = host.current_host_kind()
    assert vmspec.host_default_cpu_model() == vmspec.default_cpu_model(kind)
    assert doctor.run_doctor().host_kind == kind


@pytest.mark.parametrize("bad", ["pentium", "Host", "", 3, ["host"]])
def test_validate_spec_rejects_unknown_model(tmp_path: Path, bad: object) -> None:
    kernel = tmp_path / "k.mb"
    from conftest import code_exit, multiboot_kernel

    kernel.write_bytes(multiboot_kernel(code_exit(0)))
    with pytest.raises(SpecError, match=f"unknown CPU model .*\\({KNOWN}\\)"):
        validate_spec({"vcpus": 1, "memory": 16 << 20, "kernel": str(kernel), "cpu": bad})


@pytest.mark.parametrize("model", ["host", "baseline", None])
def test_spec_always_names_the_model(tmp_path: Path, model: str | None) -> None:
    kernel = tmp_path / "k.mb"
    from conftest import code_exit, multiboot_kernel

    kernel.write_bytes(multiboot_kernel(code_exit(0)))
    spec = build_spec(vcpus=1, memory=16 << 20, kernel=kernel, cpu=model)
    assert spec["cpu"] == (model or vmspec.host_default_cpu_model())
    assert validate_spec(spec) == spec


def test_every_node_gets_the_same_explicit_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher resolves the default once and writes it into every node's spec."""
    calls: list[int] = []

    def fake_default() -> str:
        calls.append(1)
        return "baseline" if len(calls) == 1 else "host"  # a second call would differ

    monkeypatch.setattr(launch, "host_default_cpu_model", fake_default)
    monkeypatch.setattr(vmspec, "host_default_cpu_model", fake_default)
    kernel = tmp_path / "k.mb"
    from conftest import code_exit, multiboot_kernel

    kernel.write_bytes(multiboot_kernel(code_exit(0)))
    launcher = launch.Launcher(
        launch.Options(nodes=3, vcpus=3, memory=48 << 20, kernel=str(kernel))
    )
    launcher.tmpdir = tmp_path
    launcher._make_specs()
    models = [json.loads(n.spec_path.read_text())["cpu"] for n in launcher.nodes]
    assert models == ["baseline"] * 3
    assert len(calls) == 1


def test_native_rejects_unknown_model(tmp_path: Path) -> None:
    require_native()
    from dvmmd import _native

    spec = {"vcpus": 1, "memory": 16 << 20, "kernel": str(tmp_path / "none"), "cpu": "486"}
    with pytest.raises(ValueError, match=f'cpu: unknown CPU model "486" \\({KNOWN}\\)'):
        _native.run_vm(json.dumps(spec))


# ------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("nodes", ["1", "2"])
def test_run_bad_cpu_exits_2(nodes: str) -> None:
    r = dvmmctl("run", "--nodes", nodes, "--vcpus", "2", "--cpu", "pentium")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert errors == [
        f"dvmmctl run: error: argument --cpu: unknown CPU model 'pentium' ({KNOWN})"
    ], r.stderr


def test_run_nodes_bad_cpu_exits_2() -> None:
    from dvmmd.cli.dvmmctl import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", "--nodes", "2", "--cpu", "nope"])
    assert e.value.code == 2


def test_run_help_lists_models_and_defaults() -> None:
    r = dvmmctl("run", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "--cpu MODEL" in text
    for needle in ("host =", "baseline =", "Default: baseline on a KVM PVM host",
                   "host on a VT-x/AMD-V host"):  # fmt: skip
        assert needle in text, (needle, text)


def test_doctor_names_the_default_model() -> None:
    r = dvmmctl("doctor", "--json")
    assert r.returncode in (0, 1), r.stderr
    report = json.loads(r.stdout)
    assert report["default_cpu_model"] == vmspec.default_cpu_model(report["host_kind"])
    assert report["cpu_models"] == ["host", "baseline"]
    check = next(c for c in report["checks"] if c["name"] == "default CPU model")
    assert check["value"] == report["default_cpu_model"]
    r = dvmmctl("doctor")
    assert f"default CPU model: {report['default_cpu_model']}" in r.stdout


# ------------------------------------------------------------------ what the guest sees

#: 32-bit Multiboot code: exit status = CPUID.1:ECX.CX16 | CPUID.1:ECX.XSAVE << 1.
CODE_CPUID_STATUS = bytes(
    [
        0xB8, 0x01, 0x00, 0x00, 0x00,  # mov eax, 1
        0x0F, 0xA2,  # cpuid
        0x89, 0xC8,  # mov eax, ecx
        0xC1, 0xE8, 0x0D,  # shr eax, 13
        0x83, 0xE0, 0x01,  # and eax, 1          (CX16)
        0x89, 0xCA,  # mov edx, ecx
        0xC1, 0xEA, 0x19,  # shr edx, 25
        0x83, 0xE2, 0x02,  # and edx, 2          (XSAVE)
        0x09, 0xD0,  # or eax, edx
        0xE6, 0xF4,  # out 0xf4, al
        0xFA, 0xF4, 0xEB, 0xFC,  # cli; hlt; jmp back
    ]
)  # fmt: skip


@pytest.mark.parametrize("model", ["baseline", "host"])
def test_guest_cpuid_follows_model(kvm_ready: None, make_kernel: MakeKernel, model: str) -> None:
    """The guest's CPUID follows the model where KVM lets it, and dvmm says where not.

    KVM PVM overrides KVM_SET_CPUID2 for host features it cannot hide (XSAVE among
    them); CX16 it does hide. Whatever KVM puts back is named in a warning.
    """
    kernel = make_kernel(CODE_CPUID_STATUS)
    r = dvmmctl("run", "--kernel", str(kernel), "--memory", "16M", "--cpu", model,
                "--timeout", "120", timeout=BOOT_TIMEOUT_S)  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr
    assert 0 <= r.returncode <= 3, (r.returncode, r.stderr)
    cx16, xsave = r.returncode & 1, r.returncode >> 1
    warning = [line for line in r.stderr.splitlines() if "dvmm: warning: CPU model" in line]
    if model == "baseline":
        assert cx16 == 0, ("baseline offers CX16", r.stderr)
        if xsave:
            assert len(warning) == 1 and "XSAVE" in warning[0], r.stderr
        else:
            assert warning == [], r.stderr
    else:
        assert cx16 == ("cx16" in _host_flags()), r.stderr
        assert warning == [], r.stderr


def _run_guest(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        r = dvmmctl("run", *args, "--timeout", str(BOOT_TIMEOUT_S - 30), timeout=BOOT_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(f"dvmmctl run {args} did not finish:\n{(out or '')[-3000:]}")
    print(r.stdout[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    assert_all_passed(r.stdout)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:], r.stdout[-3000:])
    return r


@pytest.mark.parametrize("model", ["baseline", "host"])
def test_bundled_guest_passes_one_node(kvm_ready: None, model: str) -> None:
    _run_guest("--cpu", model, "--vcpus", "2", "--memory", "256M")


def test_bundled_guest_passes_two_nodes_baseline(cluster_ready: None) -> None:
    _run_guest("--cpu", "baseline", "--nodes", "2", "--vcpus", "2", "--memory", "256M")
