"""``dvmmctl run``'s snapshot and migration options: ``--snapshot-dir/
--snapshot-after/--snapshot-every/--leave-running`` (take snapshots during the
run), ``--restore DIR`` (start from a snapshot instead of booting; the VM's
vCPUs, memory, NUMA topology and CPU model come from the snapshot) and
``--migrate-vcpu VCPU:NODE@SECONDS`` (move a vCPU during the run)."""

from __future__ import annotations

import argparse
from typing import Any

from dvmmd.vm.migrations import MigrationSpecError, parse_move
from dvmmd.vm.snapshots import SnapshotInfo, SnapshotSpecError, read_info


def _seconds_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number >= 0")
    return v


def _move_arg(text: str) -> dict[str, Any]:
    try:
        return parse_move(text)
    except MigrationSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_snapshot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        metavar="PATH",
        help="listen on the unix socket PATH (mode 0600) for `dvmmctl snapshot/migrate-vcpu/"
        "placement --socket PATH` while the VM runs",
    )
    p.add_argument(
        "--migrate-vcpu",
        type=_move_arg,
        action="append",
        default=None,
        metavar="VCPU:NODE@SECONDS",
        help="move vCPU VCPU to node NODE, SECONDS after the start, while the guest runs "
        "(repeatable; needs --nodes >= 2)",
    )
    p.add_argument(
        "--snapshot-dir",
        metavar="DIR",
        help="take a snapshot of the whole VM (every node) into DIR; each later one replaces it",
    )
    p.add_argument(
        "--snapshot-after",
        type=_seconds_arg,
        default=None,
        metavar="SECONDS",
        help="with --snapshot-dir: take the first snapshot SECONDS after the start (0)",
    )
    p.add_argument(
        "--snapshot-every",
        type=_seconds_arg,
        default=None,
        metavar="SECONDS",
        help="with --snapshot-dir: then again every SECONDS (implies --leave-running)",
    )
    p.add_argument(
        "--leave-running",
        action="store_true",
        help="with --snapshot-dir: the VM runs on after a snapshot (default: it stops, exit 0)",
    )
    p.add_argument(
        "--restore",
        metavar="DIR",
        help="start the VM from the snapshot in DIR instead of booting a kernel (its vCPUs, "
        "memory, NUMA topology and CPU model come from the snapshot; --nodes M spreads them "
        "over M nodes as a fresh boot on M nodes would be, whatever the snapshot's nodes)",
    )


def snapshot_plan(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> dict[str, Any] | None:
    """The spec's ``snapshot`` field from the options (None: no snapshots)."""
    d = getattr(args, "snapshot_dir", None)
    after, every = getattr(args, "snapshot_after", None), getattr(args, "snapshot_every", None)
    if d is None:
        if after is not None or every is not None or getattr(args, "leave_running", False):
            parser.error("--snapshot-after/--snapshot-every/--leave-running need --snapshot-dir")
        return None
    if every == 0:
        parser.error("--snapshot-every: must be > 0")
    plan: dict[str, Any] = {
        "dir": d,
        "after_s": after or 0.0,
        "leave_running": bool(getattr(args, "leave_running", False) or every is not None),
    }
    if every is not None:
        plan["every_s"] = every
    return plan


def apply_restore(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SnapshotInfo | None:
    """With ``--restore``: read the snapshot's manifest and take the VM's shape
    from it (``args.vcpus``, ``memory``, ``cpu``); None without ``--restore``."""
    d = getattr(args, "restore", None)
    if d is None:
        return None
    try:
        info = read_info(d)
    except SnapshotSpecError as e:
        parser.error(f"--restore: {e}")
    args.vcpus, args.memory, args.cpu = info.vcpus, info.memory, info.cpu
    return info


def migration_plan(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> list[dict[str, Any]] | None:
    """The spec's ``migrate`` list from ``--migrate-vcpu`` (None: no moves)."""
    moves: list[dict[str, Any]] | None = getattr(args, "migrate_vcpu", None)
    if not moves:
        return None
    if getattr(args, "nodes", 1) < 2:
        parser.error("--migrate-vcpu: vCPUs move between nodes; give --nodes 2 or more")
    return sorted(moves, key=lambda m: float(m["after_s"]))
