"""Data-path key material (keys.py) and how a worker gets its private key: on stdin
only, never from a file. No native module or KVM needed: every case here ends before
the VMM would start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from dvmmd import worker
from dvmmd.security import keys
from dvmmd.vm.spec import SpecError, build_spec, validate_spec

M = 1 << 20


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF\x02" + b"\0" * 64)
    return k


def _spec(kernel: Path, node_keys: list[keys.NodeKey], index: int) -> dict[str, Any]:
    return build_spec(
        vcpus=2,
        memory=64 * M,
        kernel=kernel,
        numa=[
            {"cpus": [0], "mem_start": 0, "mem_size": 32 * M},
            {"cpus": [1], "mem_start": 32 * M, "mem_size": 32 * M},
        ],
        cluster={
            "node_index": index,
            "nodes": [{"addr": "127.0.0.1:7100"}, {"addr": "127.0.0.2:7100"}],
            "boot_node": 0,
            "session_hex": keys.new_session_hex(),
            "node_pubkeys_hex": [k.public_hex for k in node_keys],
        },
        console_stdout=False,
        cpu="baseline",
    )


def test_node_keys() -> None:
    a, b = keys.NodeKey.generate(), keys.NodeKey.generate()
    assert a.private_hex != b.private_hex and len(a.private_hex) == len(a.public_hex) == 64
    assert keys.public_of(a.private_hex) == a.public_hex
    assert a.private_hex not in repr(a) and "hidden" in repr(a)
    s = keys.new_session_hex()
    assert keys.is_session_hex(s) and s != keys.new_session_hex()
    with pytest.raises(keys.KeyMaterialError, match="64 lowercase hex") as ei:
        keys.check_key_hex("AB" * 32, "the private key")
    assert "AB" * 32 not in str(ei.value)  # the value is never echoed


def test_private_key_only_in_memory(kernel: Path, tmp_path: Path) -> None:
    ks = [keys.NodeKey.generate(), keys.NodeKey.generate()]
    spec = _spec(kernel, ks, 1)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    r, w = os.pipe()
    os.write(w, ks[1].private_hex.encode() + b"\nconsole input after the key")
    os.close(w)
    try:
        loaded = worker.load_spec(path, key_stdin=True, key_fd=r)
        # Read a byte at a time: what follows the key line is left for the console.
        assert os.read(r, 100) == b"console input after the key"
    finally:
        os.close(r)
    assert loaded["cluster"]["private_key_hex"] == ks[1].private_hex
    assert "private_key_hex" not in json.loads(path.read_text())["cluster"]
    # What a worker hands the VMM validates as an in-memory spec, and only as one.
    assert validate_spec(loaded, allow_private_key=True)["cluster"]["private_key_hex"]
    with pytest.raises(SpecError, match="must not be in a spec file"):
        validate_spec(loaded)


def _worker(spec: Path, stdin: bytes | None, *flags: str) -> dict[str, Any]:
    result = spec.with_name("result.json")
    result.unlink(missing_ok=True)
    r = subprocess.run(
        [sys.executable, "-m", "dvmmd.worker", str(spec), str(result), *flags],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1, r.stderr
    out: dict[str, Any] = json.loads(result.read_text())
    assert out["reason"] == "error"
    return out


def test_worker_refuses_keys_in_files_and_wrong_keys(kernel: Path, tmp_path: Path) -> None:
    ks = [keys.NodeKey.generate(), keys.NodeKey.generate()]
    spec = _spec(kernel, ks, 0)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    err = _worker(path, None)["error"]
    assert "needs this node's private key: run the worker with --key-stdin" in err
    err = _worker(path, ks[1].private_hex.encode() + b"\n", "--key-stdin")["error"]
    assert "does not belong to cluster.node_pubkeys_hex[0]" in err
    assert ks[1].private_hex not in err
    err = _worker(path, b"", "--key-stdin")["error"]
    assert "--key-stdin: no key on stdin" in err
    err = _worker(path, b"zz" * 32 + b"\n", "--key-stdin")["error"]
    assert "the private key on stdin must be 64 lowercase hex digits" in err
    path.write_text(
        json.dumps({**spec, "cluster": {**spec["cluster"], "private_key_hex": ks[0].private_hex}})
    )
    err = _worker(path, None, "--key-stdin")["error"]
    assert "cluster.private_key_hex must not be in a spec file" in err
