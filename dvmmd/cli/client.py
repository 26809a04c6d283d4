"""The client side of a daemon's local API: JSON lines over its unix socket
(dvmmd.daemon.api).

``--socket PATH``, else ``$DVMM_SOCKET``, else the default (config.DEFAULT_SOCKET,
the daemon's default too).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Self

from dvmmd.cli.common import CliError
from dvmmd.config import DEFAULT_SOCKET
from dvmmd.vm.boot_files import send_request


def default_socket() -> str:
    return os.environ.get("DVMM_SOCKET") or DEFAULT_SOCKET


class Client:
    """One JSON-lines connection to a daemon's API socket."""

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            raise CliError(
                f"cannot reach dvmmd: no socket at {path} (is dvmmd running? "
                "`systemctl start dvmmd`, or pass --socket / set DVMM_SOCKET)"
            ) from None
        except PermissionError:
            raise CliError(
                f"cannot reach dvmmd at {path}: permission denied (run as root or "
                "as a member of the socket's group)"
            ) from None
        except OSError as e:
            raise CliError(f"cannot reach dvmmd at {path}: {e.strerror or e}") from None
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, op: str, args: dict[str, Any], fds: Sequence[int] = ()) -> None:
        # `fds` (boot files opened with the user's rights) ride on the request's bytes.
        send_request(self.sock, json.dumps({"op": op, "args": args}).encode() + b"\n", fds)

    def read_message(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise CliError("dvmmd did not answer in time") from None
            if not chunk:
                raise CliError("dvmmd closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise CliError("malformed reply from dvmmd")
        return msg

    def request(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        fds: Sequence[int] = (),
    ) -> Any:
        self.send(op, args or {}, fds)
        while True:
            msg = self.read_message()
            if "event" in msg:
                if on_event is not None:
                    on_event(msg)
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise CliError(str(msg.get("error") or "request failed"))


def call(
    args: argparse.Namespace,
    op: str,
    params: dict[str, Any] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = 60.0,
    fds: Sequence[int] = (),
) -> Any:
    with Client(args.socket, timeout) as c:
        return c.request(op, params, on_event, fds)
