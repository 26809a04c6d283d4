"""The raw-measurement probes in perf/probes/*.c, compiled at run time into perf/build/."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from perf.common import BUILD, NODE_ADDRS, PERF

SOURCES = {
    "tcp_probe": PERF / "probes" / "tcp_probe.c",
    "uffd_probe": PERF / "probes" / "uffd_probe.c",
}


class ProbeError(RuntimeError):
    pass


def build(name: str) -> Path:
    """Compile probe ``name`` with gcc unless the binary is newer than its source."""
    src = SOURCES[name]
    out = BUILD / name
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise ProbeError("no C compiler (gcc) to build the probes")
    BUILD.mkdir(parents=True, exist_ok=True)
    cmd = [cc, "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(out), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise ProbeError(f"building {name} failed:\n{r.stderr}")
    return out


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        port: int = s.getsockname()[1]
        return port


def _client_server(client_args: list[str], timeout: float) -> dict[str, Any]:
    """Start the server on node 2's address, run the client from node 1's, return its JSON."""
    exe = build("tcp_probe")
    src, dst = NODE_ADDRS
    port = _free_port(dst)
    server = subprocess.Popen(
        [str(exe), "server", dst, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise ProbeError(
                f"tcp_probe server did not start: {server.stderr.read() if server.stderr else ''}"
            )
        r = subprocess.run(
            [str(exe), client_args[0], src, dst, str(port), *client_args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if r.returncode != 0:
            raise ProbeError(
                f"tcp_probe {client_args[0]} failed ({r.returncode}): {r.stderr.strip()}"
            )
        result: dict[str, Any] = json.loads(r.stdout)
        return result
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def tcp_rtt(mode: str, *, size: int = 64, count: int = 5000) -> dict[str, Any]:
    """Ping-pong ``count`` messages of ``size`` bytes; mode ``block`` or ``busy``."""
    return _client_server(["rtt", str(size), str(count), mode], timeout=120)


def tcp_stream(seconds: float = 2.0) -> dict[str, Any]:
    """Bulk throughput from one process to another for ``seconds``."""
    return _client_server(["stream", str(seconds)], timeout=seconds + 60)


def uffd_fault(mode: str, handler: str, *, pages: int = 64, rounds: int = 5) -> dict[str, Any]:
    """Local userfaultfd round trips: mode ``kvm`` (guest touch) or ``host`` (host thread)."""
    exe = build("uffd_probe")
    r = subprocess.run(
        [str(exe), mode, handler, str(pages), str(rounds)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if r.returncode != 0:
        raise ProbeError(f"uffd_probe {mode} {handler} failed ({r.returncode}): {r.stderr.strip()}")
    result: dict[str, Any] = json.loads(r.stdout)
    return result
