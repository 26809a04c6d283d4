"""Durable state: SQLite in the state directory.

Two tables:
- ``vms``: the VMs this node *owns* (was asked to boot): the request, the placement,
  the state (booting/running/recovering/stopping/stopped/failed), the reason and the
  result.
- ``shares``: this node's part of any VM (one VMM worker per VM per node), owned here
  or elsewhere.
plus ``meta`` (the node's incarnation counter, bumped on every start, so peers can tell
a restarted daemon from a live one).

Durability: WAL journal with ``synchronous=FULL`` and every change in one transaction,
so a daemon killed at any point leaves the database at the last committed state.
Values that are structured are stored as JSON text.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name       TEXT PRIMARY KEY,
    request    TEXT NOT NULL,
    placement  TEXT NOT NULL,
    state      TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    result     TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shares (
    vm         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    boot_id    TEXT NOT NULL,
    node_index INTEGER NOT NULL,
    vcpus      INTEGER NOT NULL,
    memory     INTEGER NOT NULL,
    state      TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    pid        INTEGER,
    result     TEXT,
    updated_at REAL NOT NULL
);
"""

#: ``recovering``: a node was lost and the owner restores the VM from its last
#: snapshot on the surviving nodes (dvmmd.daemon.vm_recovery).
VM_STATES = ("booting", "running", "recovering", "stopping", "stopped", "failed")
ACTIVE_STATES = ("booting", "running", "recovering", "stopping")
SHARE_ACTIVE_STATES = ("prepared", "running", "stopping")


@dataclass
class VmRecord:
    name: str
    request: dict[str, Any]
    placement: dict[str, Any]
    state: str
    reason: str = ""
    result: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "request": self.request,
            "placement": self.placement,
            "state": self.state,
            "reason": self.reason,
            "result": self.result,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass
class ShareRecord:
    vm: str
    owner: str
    boot_id: str
    node_index: int
    vcpus: int
    memory: int
    state: str
    reason: str = ""
    pid: int | None = None
    result: dict[str, Any] | None = None
    updated_at: float = field(default_factory=time.time)


class StoreError(Exception):
    pass


class Store:
    """A small synchronous wrapper; every public method is one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            _private(self.path)
            self.db = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            with self._tx():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if row is None:
                    self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) != SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path}: schema version {row[0]} is not "
                        f"supported (expected {SCHEMA_VERSION})"
                    )
        except (sqlite3.DatabaseError, OSError) as e:
            raise StoreError(f"cannot open state database {self.path}: {e}") from None

    def _tx(self) -> _Tx:
        return _Tx(self.db)

    def close(self) -> None:
        self.db.close()

    def integrity_ok(self) -> bool:
        row = self.db.execute("PRAGMA integrity_check").fetchone()
        return bool(row and row[0] == "ok")

    # --- meta ----------------------------------------------------------------

    def bump_incarnation(self) -> int:
        """Increment and return this node's incarnation (one per daemon start)."""
        with self._tx():
            row = self.db.execute("SELECT value FROM meta WHERE key='incarnation'").fetchone()
            value = int(row[0]) + 1 if row else 1
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('incarnation', ?)", (str(value),))
        return value

    # --- vms -----------------------------------------------------------------

    def put_vm(self, rec: VmRecord) -> None:
        rec.updated_at = time.time()
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO vms VALUES (?,?,?,?,?,?,?,?)",
                (
                    rec.name,
                    json.dumps(rec.request),
                    json.dumps(rec.placement),
                    rec.state,
                    rec.reason,
                    None if rec.result is None else json.dumps(rec.result),
                    rec.created_at,
                    rec.updated_at,
                ),
            )

    def get_vm(self, name: str) -> VmRecord | None:
        row = self.db.execute("SELECT * FROM vms WHERE name=?", (name,)).fetchone()
        return None if row is None else _vm_from_row(row)

    def list_vms(self) -> list[VmRecord]:
        return [_vm_from_row(r) for r in self.db.execute("SELECT * FROM vms ORDER BY name")]

    def update_vm(
        self,
        name: str,
        *,
        state: str | None = None,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
        placement: dict[str, Any] | None = None,
    ) -> VmRecord:
        with self._tx():
            rec = self.get_vm(name)
            if rec is None:
                raise StoreError(f"no VM named {name!r}")
            if state is not None:
                if state not in VM_STATES:
                    raise StoreError(f"invalid VM state {state!r}")
                rec.state = state
            if reason is not None:
                rec.reason = reason
            if result is not None:
                rec.result = result
            if placement is not None:
                rec.placement = placement
            rec.updated_at = time.time()
            self.db.execute(
                "UPDATE vms SET state=?, reason=?, result=?, placement=?, updated_at=? "
                "WHERE name=?",
                (
                    rec.state,
                    rec.reason,
                    None if rec.result is None else json.dumps(rec.result),
                    json.dumps(rec.placement),
                    rec.updated_at,
                    name,
                ),
            )
        return rec

    def delete_vm(self, name: str) -> bool:
        with self._tx():
            cur = self.db.execute("DELETE FROM vms WHERE name=?", (name,))
        return cur.rowcount > 0

    # --- shares --------------------------------------------------------------

    def put_share(self, rec: ShareRecord) -> None:
        rec.updated_at = time.time()
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO shares VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.vm,
                    rec.owner,
                    rec.boot_id,
                    rec.node_index,
                    rec.vcpus,
                    rec.memory,
                    rec.state,
                    rec.reason,
                    rec.pid,
                    None if rec.result is None else json.dumps(rec.result),
                    rec.updated_at,
                ),
            )

    def get_share(self, vm: str) -> ShareRecord | None:
        row = self.db.execute("SELECT * FROM shares WHERE vm=?", (vm,)).fetchone()
        return None if row is None else _share_from_row(row)

    def list_shares(self) -> list[ShareRecord]:
        return [_share_from_row(r) for r in self.db.execute("SELECT * FROM shares ORDER BY vm")]

    def delete_share(self, vm: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM shares WHERE vm=?", (vm,))

    def fail_active(self, reason: str) -> tuple[list[str], list[str]]:
        """At start-up: everything that was active when the daemon died has lost its worker.

        Marks such VMs and shares failed with `reason`; returns (vm names, share vm names).
        """
        with self._tx():
            q = ",".join("?" * len(ACTIVE_STATES))
            vms = [
                r[0]
                for r in self.db.execute(
                    f"SELECT name FROM vms WHERE state IN ({q})", ACTIVE_STATES
                )
            ]
            sq = ",".join("?" * len(SHARE_ACTIVE_STATES))
            shares = [
                r[0]
                for r in self.db.execute(
                    f"SELECT vm FROM shares WHERE state IN ({sq})", SHARE_ACTIVE_STATES
                )
            ]
            now = time.time()
            self.db.execute(
                f"UPDATE vms SET state='failed', reason=?, updated_at=? WHERE state IN ({q})",
                (reason, now, *ACTIVE_STATES),
            )
            self.db.execute(
                f"UPDATE shares SET state='failed', reason=?, pid=NULL, "
                f"updated_at=? WHERE state IN ({sq})",
                (reason, now, *SHARE_ACTIVE_STATES),
            )
        return vms, shares


def _private(path: Path) -> None:
    """Create the database file (and tighten its journal files) with mode 0600.

    The database holds every VM's request and result; SQLite would create it with the
    process umask, so a state directory opened to the API socket's group (or a 0022
    umask outside systemd) would let others read it. The WAL and shm files copy the
    database file's mode when SQLite creates them.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if os.stat(p).st_mode & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception. Re-entrant."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.outer = False

    def __enter__(self) -> Self:
        self.outer = not self.db.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.outer:
            return
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _vm_from_row(row: tuple[Any, ...]) -> VmRecord:
    return VmRecord(
        name=row[0],
        request=json.loads(row[1]),
        placement=json.loads(row[2]),
        state=row[3],
        reason=row[4],
        result=_loads(row[5]),
        created_at=row[6],
        updated_at=row[7],
    )


def _share_from_row(row: tuple[Any, ...]) -> ShareRecord:
    return ShareRecord(
        vm=row[0],
        owner=row[1],
        boot_id=row[2],
        node_index=row[3],
        vcpus=row[4],
        memory=row[5],
        state=row[6],
        reason=row[7],
        pid=row[8],
        result=_loads(row[9]),
        updated_at=row[10],
    )
