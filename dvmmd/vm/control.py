"""The client of a running VM's control socket (rust/src/vm/control.rs): one
JSON request line, one JSON answer line; ``{"ok": true, "report": ...}`` or
``{"error": ...}``. Used by ``dvmmctl snapshot`` and ``dvmmctl migrate-vcpu``."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class ControlError(RuntimeError):
    """The socket cannot be reached, or the VM refused the request (its reason)."""


def request(path: str | Path, req: dict[str, Any], *, timeout: float = 600.0) -> Any:
    """Send ``req`` to the control socket at ``path``; the answer's ``report``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise ControlError(f"control socket {path}: {e.strerror or e}") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ControlError(f"control socket {path}: no answer within {timeout:.0f} s") from None
    finally:
        s.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"control socket {path}: a malformed answer {data[:200]!r}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"control socket {path}: a malformed answer {data[:200]!r}")
    if answer.get("error") is not None:
        raise ControlError(str(answer["error"]))
    return answer.get("report")
