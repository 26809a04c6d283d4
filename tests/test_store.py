"""The durable store: survives reopening, transactions, a SIGKILL mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvmmd.daemon.store import ShareRecord, Store, StoreError, VmRecord


def vm(name: str, state: str = "running") -> VmRecord:
    return VmRecord(
        name=name,
        request={"vcpus": 2, "memory": 1 << 28},
        placement={"shares": [{"node": "a", "cpus": [0, 1], "mem_start": 0, "mem_size": 1 << 28}]},
        state=state,
    )


def test_roundtrip_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    s = Store(db)
    s.put_vm(vm("x"))
    s.put_vm(vm("y", "stopped"))
    s.update_vm("x", state="failed", reason="node b died", result={"reason": "error"})
    s.put_share(ShareRecord("x", "a", "id1", 0, 2, 1 << 28, "running", pid=42))
    assert s.bump_incarnation() == 1
    s.close()
    s = Store(db)
    assert s.bump_incarnation() == 2
    x = s.get_vm("x")
    assert x is not None and x.state == "failed" and x.reason == "node b died"
    assert x.result == {"reason": "error"} and x.request["vcpus"] == 2
    assert [v.name for v in s.list_vms()] == ["x", "y"]
    sh = s.get_share("x")
    assert sh is not None and sh.pid == 42 and sh.boot_id == "id1"
    assert s.delete_vm("y") and not s.delete_vm("y")
    assert s.integrity_ok()


def test_update_unknown_and_bad_state(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    with pytest.raises(StoreError, match="no VM"):
        s.update_vm("nope", state="stopped")
    s.put_vm(vm("x"))
    with pytest.raises(StoreError, match="invalid VM state"):
        s.update_vm("x", state="exploded")
    rec = s.get_vm("x")
    assert rec is not None and rec.state == "running"  # the failed update changed nothing


def test_transaction_rolls_back(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    s.put_vm(vm("x"))
    with pytest.raises(RuntimeError), s._tx():
        s.db.execute("DELETE FROM vms")
        raise RuntimeError("boom")
    assert s.get_vm("x") is not None


def test_fail_active_after_restart(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    s.put_vm(vm("run"))
    s.put_vm(vm("done", "stopped"))
    s.put_share(ShareRecord("run", "a", "id", 0, 1, 4096, "running", pid=1))
    vms, shares = s.fail_active("dvmmd restarted")
    assert vms == ["run"] and shares == ["run"]
    r = s.get_vm("run")
    assert r is not None and r.state == "failed" and r.reason == "dvmmd restarted"
    d = s.get_vm("done")
    assert d is not None and d.state == "stopped"


WRITER = """
import sys
from dvmmd.daemon.store import Store, VmRecord
s = Store(sys.argv[1])
i = 0
print("ready", flush=True)
while True:
    s.put_vm(VmRecord(name=f"vm{i % 50}", request={"i": i, "pad": "x" * 2000},
                      placement={"shares": []}, state="running"))
    s.update_vm(f"vm{i % 50}", state="stopped", reason=f"r{i}")
    i += 1
"""


def test_sigkill_during_writes_never_corrupts(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for _ in range(3):
        p = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db)], env=env, stdout=subprocess.PIPE
        )
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
            time.sleep(0.3)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        s = Store(db)
        assert s.integrity_ok()
        recs = s.list_vms()
        assert recs and all(r.request.get("pad") == "x" * 2000 for r in recs)
        s.close()
