"""A daemon VM's periodic snapshots: the definition's option, the spec's plan, recovery's checks.

A VM defined with ``snapshot_every_s = E`` (``dvmmctl boot --snapshot-every E``) is
snapshotted by its boot node every E seconds into one directory (``snapshot_dir``,
default ``<vm.snapshot_dir>/<name>``), each snapshot replacing the last. When a node
of the VM is lost, its owner restores the VM from that directory on the surviving
nodes (dvmmd.daemon.vm_recovery). This module holds what that needs that is not
daemon state: checking the option, the spec's ``snapshot`` plan, whether a snapshot
directory holds a snapshot of *this* run, and where a restore puts the guest's NUMA
nodes.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvmmd.vm.placement import Placement
from dvmmd.vm.snapshots import SnapshotInfo, SnapshotSpecError, read_info

#: The request's key holding the VM's snapshot settings ({every_s, dir, since}).
REQUEST_KEY = "snapshot"


class SnapshotOptionError(ValueError):
    """A bad ``snapshot_every_s`` / ``snapshot_dir``; the message names the value."""


def check_every(value: Any) -> float | None:
    """``snapshot_every_s``: None (no snapshots) or a finite number of seconds > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SnapshotOptionError(f"snapshot_every_s must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise SnapshotOptionError(f"snapshot_every_s must be a number of seconds > 0, not {value}")
    return float(value)


def parse_every(text: str) -> float:
    """``--snapshot-every`` on the command line: the same rule, from text."""
    try:
        value = float(text)
    except ValueError:
        raise SnapshotOptionError(
            f"snapshot interval {text!r} is not a number of seconds"
        ) from None
    every = check_every(value)
    assert every is not None
    return every


def check_dir(value: Any) -> Path | None:
    """``snapshot_dir``: None (the default place) or an absolute path, in an existing
    directory, that is a snapshot directory, an empty directory or does not exist yet
    (each snapshot replaces the directory: dvmm never takes over one with other files)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise SnapshotOptionError(f"snapshot_dir must be a directory path, not {value!r}")
    path = Path(value)
    if not path.is_absolute():
        raise SnapshotOptionError(f"snapshot_dir {value!r} must be an absolute path")
    if not path.parent.is_dir():
        raise SnapshotOptionError(f"snapshot_dir {value}: its parent directory does not exist")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_dir():
            raise SnapshotOptionError(f"snapshot_dir {value}: exists and is not a directory")
        if any(path.iterdir()) and not (path / "manifest.json").is_file():
            raise SnapshotOptionError(
                f"snapshot_dir {value}: a directory that is neither empty nor a dvmm "
                "snapshot (each snapshot replaces the whole directory)"
            )
    return path


def plan(settings: dict[str, Any]) -> dict[str, Any]:
    """The spec's ``snapshot`` field for the request's snapshot settings: the first
    snapshot one interval after the start, then one every interval; the VM runs on."""
    every = float(settings["every_s"])
    return {"dir": str(settings["dir"]), "after_s": every, "every_s": every, "leave_running": True}


def taken_unix_s(directory: Path) -> int | None:
    """When the snapshot in `directory` was taken (its manifest's ``taken_unix_s``)."""
    try:
        raw = json.loads((directory / "manifest.json").read_text())
        return int(raw["taken_unix_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class UsableSnapshot:
    """A complete snapshot of this VM, taken during this run (or its recoveries)."""

    info: SnapshotInfo
    taken_unix_s: int


def usable_snapshot(settings: dict[str, Any], vcpus: int, memory: int) -> UsableSnapshot:
    """The snapshot a recovery restores, or SnapshotSpecError saying why there is none:
    no complete snapshot in the directory, one older than this run's boot, or one of
    another shape."""
    d = Path(str(settings["dir"]))
    info = read_info(d)
    taken = taken_unix_s(d)
    since = float(settings.get("since", 0.0))
    if taken is None:
        raise SnapshotSpecError(f"{d}/manifest.json: no taken_unix_s")
    if taken < math.floor(since):
        raise SnapshotSpecError(
            f"{d}: the snapshot there was taken before this run started (a stale one; "
            "this run has not taken one yet)"
        )
    if (info.vcpus, info.memory) != (vcpus, memory):
        raise SnapshotSpecError(
            f"{d}: a snapshot of a VM with {info.vcpus} vCPUs and {info.memory} bytes, "
            f"not this one ({vcpus} vCPUs, {memory} bytes)"
        )
    return UsableSnapshot(info, taken)


def restore_layout(
    info: SnapshotInfo, placement: Placement
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The guest's NUMA topology (the snapshot's) and, when the nodes' shares differ
    from it, ``cluster.placement`` (what node runs which vCPU, homes which RAM): a
    restore on these nodes is placed as a fresh boot on them would be."""
    phys = placement.numa()
    if info.numa == phys:
        return info.numa, None
    vcpu_node = [next(k for k, n in enumerate(phys) if v in n["cpus"]) for v in range(info.vcpus)]
    return info.numa, {
        "homes": [[n["mem_start"], n["mem_size"]] for n in phys],
        "vcpu_node": vcpu_node,
    }


def remove_default(request: dict[str, Any], name: str) -> None:
    """``dvmmctl rm``: delete the VM's snapshots when they are in the default place
    (a directory the user chose is theirs to keep)."""
    settings = request.get(REQUEST_KEY)
    if not settings or settings.get("explicit"):
        return
    d = Path(str(settings["dir"]))
    if d.name != name:
        return  # not a directory this daemon named after the VM
    for path in (d, d.with_name(d.name + ".partial"), d.with_name(d.name + ".old")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
