"""Memory sizes as people write them: ``256M``, ``1G``, ``1.5GiB``, ``4096``.

Suffixes are binary, as QEMU's ``-m`` and most VMM tools read them:
``K`` = 1024, ``M`` = 1024**2, ``G`` = 1024**3, ``T`` = 1024**4. ``KB``/``KiB``,
``MB``/``MiB`` ... mean the same (a VM's memory is never sized in powers of ten),
and ``B`` or no suffix means bytes. Case does not matter; a fraction is allowed
when it comes out to a whole number of bytes (``1.5G``).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "MAX_GUEST_MEMORY",
    "MIN_GUEST_MEMORY",
    "PAGE_SIZE",
    "SizeError",
    "format_size",
    "parse_guest_memory",
    "parse_size",
]

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4

PAGE_SIZE = 4 * KIB
#: The smallest guest dvmm boots: room for the guest-physical layout's low
#: area, the kernel and its page tables (see docs/interfaces.md).
MIN_GUEST_MEMORY = 16 * MIB
#: A sanity bound, not a host limit: a distributed VM may be larger than any
#: one node, so the host's own memory is not the limit here.
MAX_GUEST_MEMORY = 64 * TIB

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": KIB,
    "kb": KIB,
    "kib": KIB,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "t": TIB,
    "tb": TIB,
    "tib": TIB,
}

_SIZE_RE = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<unit>[a-zA-Z]*)\s*$")


class SizeError(ValueError):
    """A size that cannot be read, or that is not acceptable where it is used."""


def parse_size(text: str) -> int:
    """Return the number of bytes ``text`` stands for.

    >>> parse_size("256M")
    268435456
    >>> parse_size("1.5G")
    1610612736
    """
    if not isinstance(text, str):
        raise SizeError(f"size must be a string, not {type(text).__name__}")
    m = _SIZE_RE.match(text)
    if m is None:
        raise SizeError(
            f"invalid size {text!r}: expected a number with an optional unit "
            "(K, M, G, T; e.g. 256M or 1G)"
        )
    unit = m.group("unit").lower()
    if unit not in _UNITS:
        raise SizeError(
            f"invalid size {text!r}: unknown unit {m.group('unit')!r} (use K, M, G or T)"
        )
    value = Fraction(m.group("num")) * _UNITS[unit]
    if value.denominator != 1:
        raise SizeError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """The shortest exact way to write ``n`` bytes: ``268435456`` -> ``256M``."""
    if n < 0:
        raise SizeError(f"negative size {n}")
    for suffix, unit in (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n}B" if n else "0"


def parse_guest_memory(text: str) -> int:
    """Parse a guest memory size and check it is one dvmm can give a VM."""
    n = parse_size(text)
    return check_guest_memory(n, text)


def check_guest_memory(n: int, shown: str | None = None) -> int:
    """Check that ``n`` bytes is a usable guest memory size; return it."""
    what = shown if shown is not None else str(n)
    if isinstance(n, bool) or not isinstance(n, int):
        raise SizeError(f"memory size must be an integer number of bytes, not {n!r}")
    if n % PAGE_SIZE != 0:
        raise SizeError(f"memory size {what} ({n} bytes) is not a multiple of the 4 KiB page size")
    if n < MIN_GUEST_MEMORY:
        raise SizeError(
            f"memory size {what} is too small: a guest needs at least "
            f"{format_size(MIN_GUEST_MEMORY)}"
        )
    if n > MAX_GUEST_MEMORY:
        raise SizeError(
            f"memory size {what} is too large: dvmm supports at most "
            f"{format_size(MAX_GUEST_MEMORY)}"
        )
    return n
