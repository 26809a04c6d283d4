"""Type stub for the Rust extension ``dvmmd._native`` (rust/src/python.rs)."""

FEATURES: list[str]
"""Capabilities of this build (``"cluster"``: multi-node VMs)."""
MULTI_NODE: bool
"""True when a VM can span several nodes."""

def run_vm(spec_json: str) -> str:
    """Run one VM (or this node's share of a distributed VM) to completion.

    ``spec_json`` is the VM spec and the return value the result, both JSON as
    described in docs/interfaces.md. Releases the GIL while the VM runs.
    """

def version() -> str:
    """The version of the native module."""
