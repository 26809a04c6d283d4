"""Console input: `dvmmctl run --console-stdin` and `dvmmctl console --input` through dvmmd.

The guest is a tiny Multiboot kernel that polls the UART's LSR (bit 0: data ready),
reads RBR and echoes each byte to THR until it reads 'q', then writes status 7 to the
debug-exit port.
"""

from __future__ import annotations

import argparse
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BOOT_TIMEOUT_S,
    REPO,
    code_exit,
    multiboot_kernel,
    require_native,
    requires_kvm,
)
from test_daemon_cluster import Cluster

from dvmmd.cli.run import _want_console_stdin
from dvmmd.vm.spec import SpecError, validate_spec
from dvmmd.worker import ensure_console_fifo

M = 1024 * 1024


def echo_code() -> bytes:
    loop = b"\x66\xba\xfd\x03" + b"\xec\xa8\x01\x74\xf7"  # mov dx,LSR; in; test al,1; jz loop
    # mov dx,RBR; in al,dx; cmp al,'q'; je done; out dx,al; jmp loop
    body = b"\x66\xba\xf8\x03" + b"\xec\x3c\x71\x74\x03\xee\xeb\xeb"
    return loop + body + code_exit(7)


@pytest.fixture
def echo_kernel(tmp_path: Path) -> Path:
    p = tmp_path / "echo.mb"
    p.write_bytes(multiboot_kernel(echo_code()))
    return p


# ------------------------------------------------------------------ spec and helpers


def test_spec_console_input_fields(echo_kernel: Path, tmp_path: Path) -> None:
    base = {"vcpus": 1, "memory": 16 * M, "kernel": str(echo_kernel)}
    s = validate_spec(base)
    assert "console_input" not in s and "console_stdin" not in s
    fifo = tmp_path / "in.fifo"
    s = validate_spec({**base, "console_input": str(fifo), "console_stdin": True})
    assert s["console_input"] == str(fifo) and s["console_stdin"] is True
    ensure_console_fifo(s)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    ensure_console_fifo(s)  # already there: fine
    with pytest.raises(SpecError, match="not a FIFO"):
        validate_spec({**base, "console_input": str(echo_kernel)})
    with pytest.raises(SpecError, match="does not exist"):
        validate_spec({**base, "console_input": "/nonexistent-dir/in"})
    with pytest.raises(SpecError, match="console_stdin"):
        validate_spec({**base, "console_stdin": "yes"})


def test_console_stdin_flag_defaults() -> None:
    assert _want_console_stdin(argparse.Namespace(console_stdin=True))
    assert not _want_console_stdin(argparse.Namespace(console_stdin=False))
    # Under pytest stdin is not a terminal.
    assert _want_console_stdin(argparse.Namespace(console_stdin=None)) == sys.stdin.isatty()


# ------------------------------------------------------------------ dvmmctl run


@requires_kvm
def test_run_feeds_stdin_to_the_guest(echo_kernel: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dvmmd.cli", "run", "--kernel", str(echo_kernel),
         "--memory", "16M", "--timeout", "60", "--console-stdin"],
        cwd=REPO,
        input="xyz q",
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    assert r.returncode == 7, (r.stdout, r.stderr)
    assert r.stdout.startswith("xyz "), r.stdout
    assert "q" not in r.stdout


# ------------------------------------------------------------------ through dvmmd


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
        for n in c.nodes:
            print(f"--- {n.name} log ---\n{n.log()}")


@requires_kvm
@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote-boot-node"])
def test_console_input_through_the_daemon(
    one_node: Cluster, echo_kernel: Path, remote: bool
) -> None:
    """`dvmmctl console --input` on n1; the VM runs on n1 or (remote) on n2 only, so
    the input is forwarded over the authenticated peer protocol."""
    require_native()
    nodes = one_node.add(2 if remote else 1)
    for n in nodes:
        n.write_config([m.addr for m in nodes if m is not n], fake_worker=False)
    one_node.start_all()
    a, boot = nodes[0], nodes[-1]
    r = a.ctl("console", "nosuch", "--input", "x")
    assert r.returncode != 0 and "nosuch" in r.stderr, r.stderr
    r = a.ctl("boot", "echo", "--memory", "16M", "--kernel", str(echo_kernel),
              "--nodes", boot.name, "--timeout", "120", timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO((boot.dir / "vms" / "echo" / "console.in").stat().st_mode)
    r = a.ctl("console", "echo", "--input", "abc q", timeout=150)
    assert r.returncode == 7, r.stderr  # the guest's status, as `dvmmctl run` exits
    assert r.stdout == "abc ", (r.stdout, r.stderr)
    st = a.req("status", name="echo")
    assert st["state"] == "stopped", st
    assert st["result"]["reason"] == "debug_exit" and st["result"]["status"] == 7, st
    # Input to a stopped VM is a clear error.
    r = a.ctl("console", "echo", "--input", "x", "--no-follow")
    assert r.returncode != 0 and "not running" in r.stderr, r.stderr
