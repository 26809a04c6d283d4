"""dvmm: a distributed virtual machine monitor.

Python orchestrates (CLI, daemon, cluster, placement); the data path (KVM,
userspace APIC, devices, guest-memory coherence) is the Rust extension
``dvmmd._native``. Importing this package does not import the extension, so
``dvmmctl doctor`` and the daemon's control plane work before it is built.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "native_version"]


def native_version() -> str | None:
    """The Rust extension's version, or None when it is not built."""
    try:
        from dvmmd import _native
    except ImportError:
        return None
    try:
        return str(_native.version())
    except Exception:  # noqa: BLE001 - a broken build reads as 'not built'
        return None
