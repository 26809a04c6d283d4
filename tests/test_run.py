"""`dvmmctl run` and the VMM worker: the spec, bad inputs, and booting the bundled guest.

The unit tests of dvmmd.vm.spec need nothing; the boot tests need /dev/kvm, the
native module and the bundled guest (`make setup` builds both).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BOOT_TIMEOUT_S,
    CODE_UD2,
    REPO,
    MakeKernel,
    assert_all_passed,
    code_exit,
    code_out_port,
    code_store32,
    dvmmctl,
    multiboot_kernel,
    parse_guest_output,
    requires_kvm,
)

from dvmmd.vm import spec as vmspec
from dvmmd.vm.placement import PlacementError, layout_on
from dvmmd.vm.spec import SpecError, build_spec, exit_code, validate_spec

M = 1024 * 1024

# ------------------------------------------------------------------ the spec


@pytest.fixture
def elf_kernel(tmp_path: Path) -> Path:
    p = tmp_path / "kernel.elf"
    p.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 200)
    return p


def test_build_spec_defaults(elf_kernel: Path) -> None:
    spec = build_spec(vcpus=2, memory=256 * M, kernel=elf_kernel)
    assert spec == {
        "vcpus": 2,
        "memory": 256 * M,
        "kernel": str(elf_kernel.resolve()),
        "initrd": None,
        "cmdline": "run=all",
        "numa": [{"cpus": [0, 1], "mem_start": 0, "mem_size": 256 * M}],
        "console_log": None,
        "console_stdout": True,
        "timeout_s": 0,
        "cluster": None,
        "cpu": vmspec.host_default_cpu_model(),  # explicit: this host's default
    }
    assert json.loads(vmspec.spec_to_json(spec)) == spec


def test_build_spec_all_fields(elf_kernel: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    spec = build_spec(
        vcpus=4,
        memory=64 * M,
        kernel=elf_kernel,
        initrd=initrd,
        cmdline="run=counter iters=5",
        console_log=tmp_path / "console.log",
        console_stdout=False,
        timeout_s=2.5,
        numa=layout_on(["a", "b"], 4, 64 * M).numa(),
        cluster={"node_index": 1, "nodes": [{"addr": "127.0.0.1:7100"},
                 {"addr": "127.0.0.1:7101"}], "boot_node": 0, "session_hex": "ab" * 16,
                 "node_pubkeys_hex": ["11" * 32, "22" * 32]},
    )  # fmt: skip
    assert spec["initrd"] == str(initrd)
    assert spec["console_log"] == str(tmp_path / "console.log")
    assert spec["timeout_s"] == 3  # whole seconds, rounded up
    assert spec["numa"] == [
        {"cpus": [0, 1], "mem_start": 0, "mem_size": 32 * M},
        {"cpus": [2, 3], "mem_start": 32 * M, "mem_size": 32 * M},
    ]
    assert spec["cluster"]["node_index"] == 1
    assert spec["cluster"]["security"] == "encrypt"  # the default, made explicit


def test_bundled_guest_via_env(elf_kernel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVMM_GUEST", str(elf_kernel))
    assert build_spec(vcpus=1, memory=16 * M)["kernel"] == str(elf_kernel.resolve())
    monkeypatch.setenv("DVMM_GUEST", str(elf_kernel) + ".missing")
    with pytest.raises(SpecError, match="DVMM_GUEST"):
        build_spec(vcpus=1, memory=16 * M)


def test_bundled_guest_location() -> None:
    assert REPO / "guest" / "build" / "dvmm-guest" in vmspec.bundled_guest_candidates()


#: A valid one-node cluster object.
C1: dict[str, Any] = {"nodes": [{"addr": "a:1"}], "session_hex": "ab" * 16,
                      "node_pubkeys_hex": ["11" * 32]}  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"vcpus": 0}, "at least 1 vCPU"),
        ({"vcpus": 255}, "at most 254"),
        ({"vcpus": "2"}, "integer"),
        ({"vcpus": True}, "integer"),
        ({"memory": 1000}, "4 KiB"),
        ({"memory": 8 * M}, "too small"),
        ({"memory": "256M"}, "integer"),
        ({"kernel": "/nonexistent"}, "does not exist"),
        ({"initrd": "/nonexistent"}, "initrd file /nonexistent does not exist"),
        ({"cmdline": "a\0b"}, "NUL"),
        ({"cmdline": "x" * 5000}, "longer than"),
        ({"cmdline": 5}, "string"),
        ({"timeout_s": -1}, "timeout"),
        ({"timeout_s": float("nan")}, "timeout"),
        ({"console_stdout": "yes"}, "console_stdout"),
        ({"console_log": "/nonexistent-dir/log"}, "does not exist"),
        ({"bogus": 1}, "unknown VM spec field"),
        ({"numa": []}, "non-empty"),
        ({"numa": [{"cpus": [0], "mem_start": 0, "mem_size": 64 * M}]}, "in no node"),
        ({"numa": [{"cpus": [0, 1, 1], "mem_start": 0, "mem_size": 64 * M}]}, "more than one"),
        ({"numa": [{"cpus": [0, 2], "mem_start": 0, "mem_size": 64 * M}]}, "not a vCPU index"),
        ({"numa": [{"cpus": [0, 1], "mem_start": 0, "mem_size": 32 * M}]}, "adds up"),
        ({"numa": [{"cpus": [0], "mem_start": 0, "mem_size": 32 * M},
                   {"cpus": [1], "mem_start": 36 * M, "mem_size": 28 * M}]}, "follows"),
        ({"numa": [{"cpus": [0, 1], "mem_start": 0, "mem_size": 64 * M + 1}]}, "4 KiB"),
        ({"cluster": {"nodes": []}}, "cluster.nodes"),
        ({"cluster": {**C1, "nodes": [{"addr": "nope"}]}}, "host:port"),
        ({"cluster": {**C1, "node_index": 1}}, "node_index"),
        ({"cluster": {**C1, "nodes": [{"addr": "a:1"}, {"addr": "b:2"}],
                      "node_pubkeys_hex": ["11" * 32, "22" * 32]}}, "numa has 1"),
        # key material (keys.py): no shared secret, public keys per node, no private key
        ({"cluster": {**C1, "secret_hex": "00ff"}}, "cluster.secret_hex is no longer accepted"),
        ({"cluster": {**C1, "security": "rot13"}}, "cluster.security must be one of"),
        ({"cluster": {**C1, "session_hex": "AB" * 16}}, "cluster.session_hex must be 32"),
        ({"cluster": {**C1, "session_hex": "ab" * 8}}, "cluster.session_hex must be 32"),
        ({"cluster": {**C1, "node_pubkeys_hex": []}}, "has 0 keys for 1 nodes"),
        ({"cluster": {**C1, "node_pubkeys_hex": ["11" * 31]}},
         r"cluster.node_pubkeys_hex\[0\] must be 64 lowercase hex"),
        ({"cluster": {**C1, "private_key_hex": "33" * 32}},
         "cluster.private_key_hex must not be in a spec file"),
    ],
)  # fmt: skip
def test_validate_spec_rejects(elf_kernel: Path, changes: dict[str, Any], match: str) -> None:
    spec: dict[str, Any] = {"vcpus": 2, "memory": 64 * M, "kernel": str(elf_kernel)}
    spec.update(changes)
    with pytest.raises(SpecError, match=match):
        validate_spec(spec)


def test_validate_spec_requires_fields() -> None:
    with pytest.raises(SpecError, match="'kernel'"):
        validate_spec({"vcpus": 1, "memory": 16 * M})
    with pytest.raises(SpecError, match="JSON object"):
        validate_spec([1, 2])  # type: ignore[arg-type]


def test_sniff_kernel_formats(tmp_path: Path) -> None:
    elf = tmp_path / "elf"
    elf.write_bytes(b"\x7fELF\x02" + b"\0" * 64)
    assert vmspec.sniff_kernel(elf) == "elf"
    bz = tmp_path / "bz"
    bz.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 512)
    assert vmspec.sniff_kernel(bz) == "bzimage"
    mb = tmp_path / "mb"
    mb.write_bytes(b"\xaa" * 64 + multiboot_kernel(b"\x90"))
    assert vmspec.sniff_kernel(mb) == "multiboot"
    bad_mb = tmp_path / "badmb"
    bad_mb.write_bytes(struct.pack("<3I", 0x1BADB002, 0, 0) + b"\0" * 100)  # bad checksum
    with pytest.raises(SpecError, match="not a kernel image"):
        vmspec.sniff_kernel(bad_mb)
    bad_elf = tmp_path / "badelf"
    bad_elf.write_bytes(b"\x7fELF\x07")
    with pytest.raises(SpecError, match="malformed ELF"):
        vmspec.sniff_kernel(bad_elf)


@pytest.mark.parametrize(("vcpus", "nodes"), [(1, 1), (2, 2), (5, 2), (4, 3), (254, 7)])
def test_layout_on(vcpus: int, nodes: int) -> None:
    memory = 1000 * 4096
    layout = layout_on([f"n{i}" for i in range(nodes)], vcpus, memory).numa()
    assert len(layout) == nodes
    assert sorted(c for n in layout for c in n["cpus"]) == list(range(vcpus))
    assert sum(n["mem_size"] for n in layout) == memory
    for i, n in enumerate(layout):
        assert n["mem_size"] % 4096 == 0 and n["mem_size"] > 0
        assert n["mem_start"] == sum(x["mem_size"] for x in layout[:i])
    with pytest.raises(PlacementError):
        layout_on(["a", "b"], 1, memory)


@pytest.mark.parametrize(
    ("result", "code"),
    [
        ({"reason": "debug_exit", "status": 0}, 0),
        ({"reason": "debug_exit", "status": 3}, 3),
        ({"reason": "debug_exit", "status": 255}, 255),
        ({"reason": "debug_exit", "status": None}, 1),
        ({"reason": "shutdown"}, 0),
        ({"reason": "stopped"}, 0),
        ({"reason": "timeout"}, 124),
        ({"reason": "crash"}, 1),
        ({"reason": "error"}, 1),
    ],
)
def test_exit_code(result: dict[str, Any], code: int) -> None:
    assert exit_code(result) == code


def test_parse_result_malformed() -> None:
    assert vmspec.parse_result("not json")["reason"] == "error"
    assert vmspec.parse_result('{"reason": "weird"}')["reason"] == "error"
    ok = vmspec.parse_result('{"reason": "debug_exit", "status": 0}')
    assert ok == {"reason": "debug_exit", "status": 0}


# ------------------------------------------------------------------ the worker (no VM)


def run_worker(spec_path: Path, result_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvmmd.worker", str(spec_path), str(result_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_worker_usage() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dvmmd.worker"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2 and "usage" in r.stderr


def test_worker_bad_spec_writes_error_result(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"vcpus": 0, "memory": 1, "kernel": "/nonexistent"}))
    result = tmp_path / "result.json"
    r = run_worker(spec, result)
    assert r.returncode == 1
    data = json.loads(result.read_text())
    assert data["reason"] == "error" and "vCPU" in data["error"]
    assert list(tmp_path.glob(".result.json.*")) == []  # no temporary left behind
    spec.write_text("{not json")
    r = run_worker(spec, result)
    assert r.returncode == 1
    assert json.loads(result.read_text())["reason"] == "error"


# ------------------------------------------------------------------ booting the bundled guest


@requires_kvm
@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_run_bundled_guest(vcpus: int, guest_kernel: Path) -> None:
    r = dvmmctl(
        "run", "--vcpus", str(vcpus), "--memory", "256M", "--timeout", str(BOOT_TIMEOUT_S - 30),
        timeout=BOOT_TIMEOUT_S,
    )  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr
    assert_all_passed(r.stdout)
    assert r.returncode == 0, (r.returncode, r.stderr, r.stdout[-3000:])


@requires_kvm
def test_run_json_stats_and_console_log(guest_kernel: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    r = dvmmctl(
        "run", "--vcpus", "2", "--memory", "64M", "--kernel", str(guest_kernel),
        "--console-log", str(log), "--json", "--stats", "--timeout", "240",
        timeout=BOOT_TIMEOUT_S,
    )  # fmt: skip
    assert r.returncode == 0, (r.stderr, r.stdout[-3000:])
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["reason"] == "debug_exit" and result["status"] == 0
    assert "stats:" in r.stdout
    assert_all_passed(log.read_text(errors="replace"))


@requires_kvm
def test_worker_boots_bundled_guest(guest_kernel: Path, tmp_path: Path) -> None:
    spec = build_spec(
        vcpus=2, memory=128 * M, kernel=guest_kernel, console_log=tmp_path / "console.log",
        console_stdout=False, timeout_s=240,
    )  # fmt: skip
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    r = run_worker(spec_path, tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["reason"] == "debug_exit", result
    assert result["status"] == 0 and r.returncode == 0, (result, r.stderr)
    assert_all_passed((tmp_path / "console.log").read_text(errors="replace"))


@requires_kvm
def test_run_unknown_workload_fails(guest_kernel: Path) -> None:
    r = dvmmctl(
        "run", "--vcpus", "2", "--memory", "64M", "--cmdline", "run=bogus", "--timeout", "240",
        timeout=BOOT_TIMEOUT_S,
    )  # fmt: skip
    assert r.returncode != 0, r.stdout[-3000:]
    assert "Traceback" not in r.stderr
    rep = parse_guest_output(r.stdout)
    assert any("bogus" in line for line in rep.failed_lines), rep.explain()


# ------------------------------------------------------------------ bad guests


@requires_kvm
def test_multiboot_exit_status(make_kernel: MakeKernel) -> None:
    r = dvmmctl("run", "--kernel", str(make_kernel(code_exit(42))), "--memory", "16M",
                "--timeout", "120", timeout=BOOT_TIMEOUT_S)  # fmt: skip
    assert r.returncode == 42, (r.stdout, r.stderr)
    assert "status 42" in r.stderr


@requires_kvm
def test_triple_fault_is_a_crash_with_registers(make_kernel: MakeKernel) -> None:
    r = dvmmctl("run", "--kernel", str(make_kernel(CODE_UD2)), "--memory", "16M",
                "--timeout", "120", timeout=BOOT_TIMEOUT_S)  # fmt: skip
    assert r.returncode not in (0, 124), (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "crash" in r.stderr.lower(), r.stderr
    assert "rip" in r.stderr.lower(), r.stderr


@requires_kvm
@pytest.mark.parametrize(
    "garbage",
    [
        code_out_port(0x5555, 0xAB) + code_out_port(0x80, 0x12),  # unknown ports
        code_store32(0xFEE00300, 0xFFFFFFFF) + code_store32(0xFEE000F0, 0x12345678),  # APIC
        code_store32(0xFEC00000, 0x7F) + code_store32(0xFEC00010, 0xDEADBEEF),  # IOAPIC
    ],
    ids=["ports", "apic", "ioapic"],
)
def test_garbage_writes_never_hang(make_kernel: MakeKernel, garbage: bytes) -> None:
    """A guest writing garbage to devices gets either ignored (and exits 42) or
    stopped with a clear error; never a hang and never a traceback."""
    r = dvmmctl("run", "--kernel", str(make_kernel(garbage + code_exit(42))), "--memory", "16M",
                "--timeout", "60", timeout=BOOT_TIMEOUT_S)  # fmt: skip
    assert "Traceback" not in r.stderr
    assert r.returncode != 124, "the VM hung until its timeout"
    if r.returncode != 42:
        assert r.returncode != 0 and "error" in r.stderr, (r.returncode, r.stderr)


@requires_kvm
def test_timeout_stops_a_spinning_guest(make_kernel: MakeKernel) -> None:
    spin = b"\xeb\xfe"  # jmp $
    r = dvmmctl("run", "--kernel", str(make_kernel(spin)), "--memory", "16M", "--timeout", "2",
                timeout=120)  # fmt: skip
    assert r.returncode == 124, (r.returncode, r.stderr)
    assert "timeout" in r.stderr


@requires_kvm
def test_worker_sigterm_stops_the_vm(make_kernel: MakeKernel, tmp_path: Path) -> None:
    import signal
    import time

    spec = build_spec(vcpus=1, memory=16 * M, kernel=make_kernel(b"\xeb\xfe"), console_stdout=False)
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvmmd.worker", str(spec_path), str(result_path)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)
        assert proc.poll() is None, "the worker ended before it was stopped"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, err
    result = json.loads(result_path.read_text())
    assert result["reason"] == "stopped" and "SIGTERM" in result["error"]


def test_worker_death_quotes_its_last_words_not_a_startup_warning(tmp_path: Path) -> None:
    from dvmmd.launcher.launch import Node

    n = Node(0, "127.0.0.1", 7100, {}, tmp_path / "s", tmp_path / "r", tmp_path / "c")
    n.returncode = -9
    n.stderr_tail.extend(
        ["dvmm: starting", "dvmm: page 7: install failed: EEXIST",
         "dvmm: warning: KVM PVM shows host CPU features the model hides: sse4.2"]
    )  # fmt: skip
    assert n.death() == "killed by SIGKILL (last words: dvmm: page 7: install failed: EEXIST)"
    n.stderr_tail.clear()
    n.returncode = 3
    assert n.death() == "exited with status 3 without a result"
