"""vCPU migrations on the Python side: the ``migrate`` field of a VM spec (the
moves a run makes, each ``{after_s, vcpu, node}``) and ``dvmmctl run``'s
``--migrate-vcpu VCPU:NODE@SECONDS`` syntax for one. The native VMM moves the
vCPUs (rust/src/vm/migrate.rs, docs/snapshots.md)."""

from __future__ import annotations

import math
from typing import Any


class MigrationSpecError(ValueError):
    """A malformed migration list or ``--migrate-vcpu`` value."""


def parse_move(text: str) -> dict[str, Any]:
    """``VCPU:NODE@SECONDS`` -> ``{"after_s", "vcpu", "node"}``."""
    what, at, when = text.partition("@")
    vcpu, colon, node = what.partition(":")
    if not at or not colon:
        raise MigrationSpecError(f"{text!r}: expected VCPU:NODE@SECONDS, e.g. 1:0@0.5")
    try:
        move = {"after_s": float(when), "vcpu": int(vcpu, 10), "node": int(node, 10)}
    except ValueError:
        raise MigrationSpecError(
            f"{text!r}: expected VCPU:NODE@SECONDS with whole VCPU and NODE numbers"
        ) from None
    return check_moves([move], vcpus=None, nodes=None)[0]


def check_moves(moves: Any, *, vcpus: int | None, nodes: int | None) -> list[dict[str, Any]]:
    """The spec's ``migrate`` list, checked (and sorted by time) against a VM of
    ``vcpus`` vCPUs on ``nodes`` nodes (None: not known yet)."""
    if not isinstance(moves, list):
        raise MigrationSpecError("migrate must be a list of {after_s, vcpu, node}")
    out: list[dict[str, Any]] = []
    for m in moves:
        if not isinstance(m, dict) or set(m) != {"after_s", "vcpu", "node"}:
            raise MigrationSpecError(f"migrate: {m!r} is not an object {{after_s, vcpu, node}}")
        after, vcpu, node = m["after_s"], m["vcpu"], m["node"]
        if isinstance(after, bool) or not isinstance(after, (int, float)):
            raise MigrationSpecError(f"migrate: after_s {after!r} is not a number")
        if not (math.isfinite(after) and after >= 0):
            raise MigrationSpecError(f"migrate: after_s {after}: must be a finite number >= 0")
        for name, v, limit in (("vcpu", vcpu, vcpus), ("node", node, nodes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MigrationSpecError(f"migrate: {name} {v!r} is not a whole number >= 0")
            if limit is not None and v >= limit:
                raise MigrationSpecError(f"migrate: {name} {v}: the VM has {name}s 0-{limit - 1}")
        out.append({"after_s": float(after), "vcpu": vcpu, "node": node})
    return sorted(out, key=lambda m: m["after_s"])
