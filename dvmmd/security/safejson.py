"""JSON from untrusted peers and clients: bounded nesting, standard constants only.

``json.loads`` recurses once per nesting level: a few thousand ``[`` in a frame raise
RecursionError, an exception no caller expects from a parser, and a structure just
under the interpreter's limit still breaks every recursive consumer after it (schema
checks, ``json.dumps`` of a reply). ``loads`` turns both into `JsonError` (a
ValueError) with a message naming the problem, and refuses NaN/Infinity, which are
not JSON and which other implementations reject.

Used by the peer protocol (dvmmd.daemon.peer_protocol); the API socket (dvmmd.daemon.api)
should use it too.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_DEPTH", "JsonError", "check_depth", "loads"]

#: Deepest nesting of arrays/objects accepted. Real messages nest a handful of
#: levels (an RPC reply carrying a VM record: ~6).
MAX_DEPTH = 32


class JsonError(ValueError):
    """Not acceptable JSON; the message says why."""


def _reject_constant(name: str) -> Any:
    raise JsonError(f"non-standard JSON constant {name}")


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise JsonError if ``value`` nests arrays/objects deeper than ``max_depth``.

    Iterative (an explicit stack), so it cannot itself run out of recursion.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth + 1 > max_depth:
            raise JsonError(f"JSON nested deeper than {max_depth} levels")
        stack.extend((c, depth + 1) for c in children)


def loads(data: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data`` (UTF-8 if bytes); raises JsonError for anything unacceptable."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, parse_constant=_reject_constant)
    except JsonError:
        raise
    except UnicodeDecodeError as e:
        raise JsonError(f"not UTF-8: {e.reason} at byte {e.start}") from None
    except RecursionError:
        raise JsonError(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError
        raise JsonError(f"invalid JSON: {e}") from None
    check_depth(value, max_depth)
    return value
