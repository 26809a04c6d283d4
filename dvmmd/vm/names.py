"""Names that reach the file system: VM and node names, checked in one place.

A VM name becomes a directory (``STATE/vms/NAME``) on every node that runs part of
the VM, and a node name appears in paths and logs, so every handler that takes a
name (local API, remote API, peer RPCs) passes it through `check_vm_name` /
`check_node_name` before using it. Allowed: 1-63 characters of ``A-Z a-z 0-9 _ . -``,
starting with a letter or digit, and never containing ``..`` (so a name is always one
plain path component, never ``.``, ``..`` or anything with a ``/``).
"""

from __future__ import annotations

import re

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

RULE = "1-63 of A-Z a-z 0-9 _ . -, starting alphanumeric, no '..'"


class InvalidName(ValueError):
    """A name that is not allowed; the message names the value and the rule."""


def is_valid_name(name: object) -> bool:
    """True for a VM or node name that `check_vm_name` accepts."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None and ".." not in name


def check_name(name: object, what: str) -> str:
    """`name` if it is a valid `what` name, else InvalidName naming the value."""
    if not isinstance(name, str):
        raise InvalidName(f"invalid {what} name {name!r}: expected a string ({RULE})")
    if not is_valid_name(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidName(f"invalid {what} name {shown!r} ({RULE})")
    return name


def check_vm_name(name: object) -> str:
    return check_name(name, "VM")


def check_node_name(name: object) -> str:
    return check_name(name, "node")
