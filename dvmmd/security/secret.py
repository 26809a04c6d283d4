"""The cluster secret file (secret mode): read, and refused when weak or exposed.

In secret mode (``cluster.secret_file``) every daemon derives the cluster CA from the
secret (pki.py); the file must be private to its owner and long enough.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MIN_SECRET_BYTES = 16


class SecretError(Exception):
    """The secret file is missing, unreadable, too short or too widely readable."""


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read the cluster secret: the file's contents with surrounding whitespace removed.

    Generate one with ``head -c 32 /dev/urandom | xxd -p -c 64 > /etc/dvmmd/secret``.
    Refuses secrets shorter than 16 bytes and files readable by group or others.
    """
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes().strip()
    except OSError as e:
        raise SecretError(f"cannot read cluster secret {p}: {e.strerror or e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"cluster secret {p} is accessible by group/others "
            f"(mode {oct(st.st_mode & 0o777)}); chmod 600 it"
        )
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(
            f"cluster secret {p} is too short ({len(data)} bytes; need at least {MIN_SECRET_BYTES})"
        )
    return data
