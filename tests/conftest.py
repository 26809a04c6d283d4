"""Shared helpers for the Python tests.

Tests that need /dev/kvm or QEMU skip with the reason when the host lacks
them, and fail instead when the environment says it is CI (``CI`` set). Tests that need the native module or the bundled guest do not skip:
`make test` builds both, so their absence is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "guest" / "build" / "dvmm-guest"

#: Seconds any one VM boot may take in a test before it counts as a hang.
BOOT_TIMEOUT_S = 300


def kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def in_ci() -> bool:
    """The environment says it is CI (``CI`` set, as CI services and .ci/run do)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip with the reason printed; under CI fail instead (CI must run every test)."""
    if in_ci():
        pytest.fail(f"CI must run the dvmm tests, but: {reason}")
    print(f"SKIP: {reason}")
    pytest.skip(reason)


@pytest.fixture
def need_kvm() -> None:
    if not kvm_usable():
        skip_or_fail("/dev/kvm is missing or not read-write for this user")


@pytest.fixture
def need_qemu() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        skip_or_fail(
            "qemu-system-x86_64 not installed (Debian package qemu-system-x86; `make setup`)"
        )


#: Marks for tests that need /dev/kvm or QEMU: skipped with the reason elsewhere,
#: failed under CI.
requires_kvm = pytest.mark.usefixtures("need_kvm")
requires_qemu = pytest.mark.usefixtures("need_qemu")


def dvmmctl(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``dvmmctl ARGS`` (as ``python -m dvmmd.cli`` with this interpreter)."""
    full_env = dict(os.environ)
    full_env.pop("DVMM_DEBUG", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "dvmmd.cli", *args],
        cwd=REPO,
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def guest_kernel() -> Path:
    return require_guest()


def require_guest() -> Path:
    """The bundled guest (``$DVMM_GUEST`` if set); its absence fails the test."""
    env = os.environ.get("DVMM_GUEST")
    guest = Path(env) if env else GUEST
    if not guest.is_file():
        pytest.fail(f"the bundled guest is not built ({guest}): run `make -C guest`")
    return guest


def require_native() -> None:
    """The native module must be importable: `make test` builds it, so a test that
    needs it fails (never skips) without it."""
    try:
        from dvmmd import _native  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the native module dvmmd._native is not built ({e}): run `make setup`")


# ---------------------------------------------------------------- guest output

_GUEST_LINE = re.compile(r"dvmm-guest: (.*?)\s*$")
_SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed\b")


@dataclass
class GuestReport:
    lines: list[str]  # the text after "dvmm-guest: " of every guest line
    passed_lines: list[str]
    failed_lines: list[str]
    summary: tuple[int, int] | None  # (passed, failed) from the closing line

    def explain(self) -> str:
        return "guest lines:\n  " + "\n  ".join(self.lines)


def parse_guest_output(text: str) -> GuestReport:
    lines: list[str] = []
    for raw in text.replace("\r", "\n").splitlines():
        m = _GUEST_LINE.search(raw)
        if m:
            lines.append(m.group(1))
    passed: list[str] = []
    failed: list[str] = []
    summary: tuple[int, int] | None = None
    for body in lines:
        s = _SUMMARY.match(body)
        if s:
            summary = (int(s.group(1)), int(s.group(2)))
            continue
        tokens = body.split()
        if "FAIL" in tokens:
            failed.append(body)
        elif tokens and tokens[-1] == "PASS":
            passed.append(body)
    return GuestReport(lines, passed, failed, summary)


def assert_all_passed(output: str, min_workloads: int = 7) -> GuestReport:
    """Every workload line ends in PASS, none FAILs, and the summary says ``0 failed``."""
    rep = parse_guest_output(output)
    assert rep.summary is not None, "no 'dvmm-guest: N passed, M failed' line\n" + output[-4000:]
    assert not rep.failed_lines, "FAIL lines:\n  " + "\n  ".join(rep.failed_lines)
    assert rep.summary[1] == 0, rep.explain()
    assert rep.summary[0] == len(rep.passed_lines), rep.explain()
    assert len(rep.passed_lines) >= min_workloads, rep.explain()
    return rep


# ---------------------------------------------------------------- tiny test kernels

MB_LOAD = 0x100000
MB_MAGIC = 0x1BADB002
MB_FLAG_ADDRESS_FIELDS = 1 << 16

#: 32-bit code snippets for the tiny Multiboot kernels below.
CODE_HALT_LOOP = bytes([0xFA, 0xF4, 0xEB, 0xFC])  # cli; hlt; jmp back to cli


def code_exit(status: int) -> bytes:
    """mov al, status; out 0xf4, al; then halt forever (never reached)."""
    return bytes([0xB0, status & 0xFF, 0xE6, 0xF4]) + CODE_HALT_LOOP


def code_out_port(port: int, value: int) -> bytes:
    """mov dx, port; mov al, value; out dx, al."""
    return b"\x66\xba" + struct.pack("<H", port) + bytes([0xB0, value & 0xFF, 0xEE])


def code_store32(addr: int, value: int) -> bytes:
    """mov dword [addr], value (flat 32-bit protected mode, no paging)."""
    return b"\xc7\x05" + struct.pack("<II", addr, value)


CODE_UD2 = b"\x0f\x0b"  # #UD with no IDT: a triple fault


def multiboot_kernel(code: bytes) -> bytes:
    """A flat Multiboot v1 kernel (a.out kludge) that runs ``code`` at entry."""
    flags = MB_FLAG_ADDRESS_FIELDS
    checksum = (-(MB_MAGIC + flags)) & 0xFFFFFFFF
    header_size = 32
    header = struct.pack(
        "<8I",
        MB_MAGIC,
        flags,
        checksum,
        MB_LOAD,  # header_addr
        MB_LOAD,  # load_addr
        0,  # load_end_addr: the whole file
        0,  # bss_end_addr: no bss
        MB_LOAD + header_size,  # entry_addr
    )
    return header + code


MakeKernel = Callable[[bytes], Path]


@pytest.fixture
def make_kernel(tmp_path: Path) -> MakeKernel:
    def make(code: bytes) -> Path:
        name = f"tiny-{len(list(tmp_path.glob('tiny-*')))}.mb"
        p = tmp_path / name
        p.write_bytes(multiboot_kernel(code))
        return p

    return make
