"""One daemon per state directory: an exclusive flock on ``STATE/dvmmd.lock``.

The daemon takes the lock before it opens the database or touches any VM state: a
second dvmmd started on the same directory (a typo in a config, a unit started twice,
a manual run next to the service) must not mark the first one's live VMs failed,
which the start-up recovery (store.fail_active) would otherwise do before the second
daemon even tries to bind its ports. The lock is released by the kernel when the
process dies, however it dies, so a stale lock file never blocks a restart. The file
holds the owner's pid, only to name it in the error.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "dvmmd.lock"


class StateDirBusy(Exception):
    """Another process holds the state directory; the message names it and the pid."""


class StateLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StateDirBusy ("state directory X is in use by pid N")."""
        # O_CLOEXEC: a worker must not inherit the lock and keep it after the daemon died.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise StateDirBusy(
                f"state directory {self.path.parent} is in use by pid {holder} "
                f"(lock {self.path}); is another dvmmd running with this node.state_dir?"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None
