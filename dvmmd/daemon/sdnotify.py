"""sd_notify(3) in pure Python: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

Does nothing when not started by systemd (no ``NOTIFY_SOCKET``). The watchdog interval
comes from ``WATCHDOG_USEC`` (set by systemd from ``WatchdogSec=``), honouring
``WATCHDOG_PID``; the daemon pings at half that interval from its event loop, so a
hung loop gets the daemon restarted.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send one notification; returns False if there is no systemd to tell."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the configured timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
