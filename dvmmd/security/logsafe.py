"""Logging what strangers send: escaped, truncated and rate-limited.

Anyone who can reach the peer port can make the daemon log, and chooses part of
the text (a node name, an address). `shown` makes such text one short, printable
line (no terminal escapes, no forged log lines); `RateLimitedLog` caps how many
lines an unauthenticated flood can write and says how many it dropped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimitedLog", "shown"]


def shown(value: Any, limit: int = 64) -> str:
    """``value`` as a quoted, escaped string of at most about ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    cut = len(text) > limit
    out = repr(text[:limit])  # escapes control characters, quotes the text
    return out + ("..." if cut else "")


class RateLimitedLog:
    """At most ``burst`` lines per ``period`` seconds; the rest are counted and
    reported in the next line that gets through."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self.window_start = -float("inf")
        self.in_window = 0
        self.suppressed = 0

    def log(self, level: int, msg: str, *args: Any) -> bool:
        """Log like ``logger.log`` if the budget allows; returns whether it did."""
        now = time.monotonic()
        if now - self.window_start >= self.period:
            self.window_start, self.in_window = now, 0
        if self.in_window >= self.burst:
            self.suppressed += 1
            return False
        self.in_window += 1
        if self.suppressed:
            msg += " (%d similar message(s) suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.log(level, msg, *args)
        return True
