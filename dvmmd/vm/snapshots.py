"""Snapshots on the Python side: the ``snapshot`` field of a VM spec (when a run
takes them) and what a restore needs from a snapshot's ``manifest.json`` (the
VM's shape). The native VMM writes the snapshots and checks every file of one
before it restores from it (rust/src/vm/snapshot.rs, docs/snapshots.md)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The format name and version the native VMM writes and reads.
FORMAT = "dvmm-snapshot"
VERSION = 1


class SnapshotSpecError(ValueError):
    """A malformed snapshot plan or an unusable snapshot directory."""


def _seconds(v: Any, what: str, *, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SnapshotSpecError(f"{what} must be a number of seconds, not {v!r}")
    if v < 0 or (positive and v == 0):
        raise SnapshotSpecError(f"{what} must be {'> 0' if positive else '>= 0'}, not {v}")
    return float(v)


def check_plan(plan: Any) -> dict[str, Any]:
    """The spec's ``snapshot`` field, checked and normalized (absolute ``dir``)."""
    if not isinstance(plan, Mapping):
        raise SnapshotSpecError("snapshot must be an object {dir, after_s, every_s, leave_running}")
    unknown = sorted(set(plan) - {"dir", "after_s", "every_s", "leave_running"})
    if unknown:
        raise SnapshotSpecError(f"snapshot: unknown field(s) {', '.join(unknown)}")
    d = plan.get("dir")
    if not isinstance(d, str) or not d:
        raise SnapshotSpecError("snapshot.dir: a directory path is required")
    path = Path(d).absolute()
    if not path.parent.is_dir():
        raise SnapshotSpecError(f"snapshot.dir {d}: its parent directory does not exist")
    out: dict[str, Any] = {
        "dir": str(path),
        "after_s": _seconds(plan.get("after_s"), "snapshot.after_s", positive=False),
        "leave_running": bool(plan.get("leave_running", False)),
    }
    every = plan.get("every_s")
    if every is not None:
        out["every_s"] = _seconds(every, "snapshot.every_s", positive=True)
    if not isinstance(plan.get("leave_running", False), bool):
        raise SnapshotSpecError("snapshot.leave_running must be true or false")
    return out


@dataclass(frozen=True)
class SnapshotInfo:
    """What a restore needs to know about a snapshot before the VMM checks it."""

    dir: Path
    vcpus: int
    memory: int
    numa: list[dict[str, Any]]
    cpu: str
    nodes: int
    vcpu_node: list[int]


def read_info(directory: str | Path) -> SnapshotInfo:
    """The VM's shape from ``directory/manifest.json``; a clear error when it is
    not a snapshot of a format this dvmm reads."""
    d = Path(directory).absolute()
    m = d / "manifest.json"
    if not m.is_file():
        raise SnapshotSpecError(
            f"{d}: not a dvmm snapshot (no manifest.json: incomplete, or not a snapshot directory)"
        )
    try:
        raw = json.loads(m.read_text())
    except (OSError, ValueError) as e:
        raise SnapshotSpecError(f"{m}: not a readable snapshot manifest: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SnapshotSpecError(f"{m}: not a {FORMAT} manifest")
    if raw.get("version") != VERSION:
        raise SnapshotSpecError(
            f"{m}: snapshot format version {raw.get('version')!r}, "
            f"this dvmm reads version {VERSION} only"
        )
    try:
        info = SnapshotInfo(
            dir=d,
            vcpus=int(raw["vcpus"]),
            memory=int(raw["memory"]),
            numa=[
                {
                    "cpus": [int(c) for c in n["cpus"]],
                    "mem_start": int(n["mem_start"]),
                    "mem_size": int(n["mem_size"]),
                }
                for n in raw["numa"]
            ],
            cpu=str(raw["cpu"]),
            nodes=int(raw["nodes"]),
            vcpu_node=[int(x) for x in raw["vcpu_node"]],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotSpecError(f"{m}: malformed manifest ({e})") from None
    return info


def check_restore(directory: Any) -> str:
    """The spec's ``restore`` field: an existing snapshot directory (absolute)."""
    if not isinstance(directory, str) or not directory:
        raise SnapshotSpecError("restore: a snapshot directory is required")
    return str(read_info(directory).dir)
