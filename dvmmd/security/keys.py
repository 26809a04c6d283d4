"""Key material of the VM data path (the Rust side derives the session keys from it).

For each VM boot, every node makes its own X25519 key pair; the VM's spec (the
``cluster`` object, docs/interfaces.md) lists every node's *public* key
(``node_pubkeys_hex``, in node order) and a random, public ``session_hex`` (16 bytes,
the same on every node); each pair of nodes derives its link keys from an X25519
exchange bound to that session, so no key ever crosses the network. The *private* key
goes only from the process that made it to the node's worker, on the worker's stdin
(``python -m dvmmd.worker SPEC RESULT --key-stdin``), never into a file: spec files on
disk are refused if they hold one (dvmmd.vm.spec).

``security`` (per cluster: config ``cluster.data_plane``, ``dvmmctl run --data-plane``)
is one of `DATA_PLANE_MODES`: ``encrypt`` (default: pages and messages encrypted and
authenticated), ``integrity`` (authenticated, readable on the wire) or ``none`` (for
a dedicated, physically isolated fabric).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

__all__ = [
    "DATA_PLANE_HELP",
    "DATA_PLANE_MODES",
    "KeyMaterialError",
    "NodeKey",
    "check_key_hex",
    "new_session_hex",
    "public_of",
]

DATA_PLANE_MODES = ("encrypt", "integrity", "none")
DATA_PLANE_HELP = {
    "encrypt": "guest memory and every message encrypted and authenticated (default)",
    "integrity": "every message authenticated, but readable on the wire",
    "none": "no protection: only for a dedicated, physically isolated fabric",
}

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


class KeyMaterialError(ValueError):
    """Malformed key material; the message names the field (never the key's value)."""


def new_session_hex() -> str:
    """A fresh VM session id: 16 random bytes as 32 lowercase hex digits (public)."""
    return secrets.token_hex(16)


def is_session_hex(text: object) -> bool:
    return isinstance(text, str) and _HEX32.fullmatch(text) is not None


def check_key_hex(text: object, what: str) -> str:
    """``text`` if it is 64 lowercase hex digits (32 raw bytes), else KeyMaterialError naming
    ``what`` but not the value (it may be a private key)."""
    if not isinstance(text, str) or _HEX64.fullmatch(text) is None:
        raise KeyMaterialError(f"{what} must be 64 lowercase hex digits (a raw 32-byte X25519 key)")
    return text


def public_of(private_hex: str) -> str:
    """The X25519 public key (hex) of a private key (hex)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.from_private_bytes(bytes.fromhex(check_key_hex(private_hex, "key")))
    return key.public_key().public_bytes_raw().hex()


@dataclass(frozen=True)
class NodeKey:
    """One node's X25519 key pair for one VM boot. ``repr`` hides the private half."""

    private_hex: str
    public_hex: str

    @classmethod
    def generate(cls) -> NodeKey:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        key = X25519PrivateKey.generate()
        return cls(key.private_bytes_raw().hex(), key.public_key().public_bytes_raw().hex())

    def __repr__(self) -> str:
        return f"NodeKey(public_hex={self.public_hex!r}, private_hex=<hidden>)"
