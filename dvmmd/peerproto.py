"""Framed messages between daemons (the control plane; the VM data path is in Rust).

Frame: 8-byte header ``b"DVP1"`` (magic + protocol version 1) + big-endian u32 length,
then that many bytes of UTF-8 JSON holding one object with a ``"type"`` field.
Every message is validated strictly against `SCHEMAS`: unknown types, missing or extra
fields and wrong field types are protocol errors, and so are a bad magic, an oversized
frame, invalid UTF-8/JSON or a truncated frame. The caller disconnects the peer with
the logged reason and keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
from typing import Any

MAGIC = b"DVP1"
PROTO_VERSION = 1
HEADER = struct.Struct("!4sI")
MAX_FRAME = 4 << 20

Message = dict[str, Any]

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# field name -> allowed JSON types (None means JSON null). Every field is required.
SCHEMAS: dict[str, dict[str, tuple[type | None, ...]]] = {
    # authentication (see auth.py)
    "hello": {"proto": (int,), "node": (str,), "addr": (str,), "role": (str,), "nonce": (str,)},
    "challenge": {"node": (str,), "nonce": (str,), "mac": (str,)},
    "auth": {"mac": (str,)},
    "welcome": {},
    "refused": {"reason": (str,)},
    # membership
    "heartbeat": {
        "node": (str,),
        "incarnation": (int,),
        "seq": (int,),
        "info": (dict,),
        "members": (list,),
    },
    "leave": {"node": (str,), "incarnation": (int,)},
    # request / reply
    "rpc": {"id": (int,), "method": (str,), "params": (dict,)},
    "rpc_reply": {
        "id": (int,),
        "ok": (bool,),
        "result": (dict, list, str, int, float, bool, None),
        "error": (str, None),
    },
}


class ProtocolError(Exception):
    """The peer violated the protocol; the message says how."""


def _type_ok(value: Any, kinds: tuple[type | None, ...]) -> bool:
    for k in kinds:
        if k is None:
            if value is None:
                return True
        elif k is int or k is float:
            if isinstance(value, k) and not isinstance(value, bool):
                return True
        elif isinstance(value, k):
            return True
    return False


def validate(msg: Any) -> Message:
    """Check one decoded message against its schema; returns it or raises ProtocolError."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"message is a JSON {type(msg).__name__}, not an object")
    mtype = msg.get("type")
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(f"unknown message type {str(mtype)[:40]!r}")
    schema = SCHEMAS[mtype]
    for field, kinds in schema.items():
        if field not in msg:
            raise ProtocolError(f"{mtype}: missing field {field!r}")
        if not _type_ok(msg[field], kinds):
            raise ProtocolError(
                f"{mtype}: field {field!r} has the wrong type ({type(msg[field]).__name__})"
            )
    extra = set(msg) - set(schema) - {"type"}
    if extra:
        raise ProtocolError(f"{mtype}: unexpected field(s) {sorted(extra)[:5]}")
    if mtype in ("hello", "challenge") and not _HEX32.match(msg["nonce"]):
        raise ProtocolError(f"{mtype}: nonce must be 32 lowercase hex digits")
    if mtype in ("challenge", "auth") and not _HEX64.match(msg["mac"]):
        raise ProtocolError(f"{mtype}: mac must be 64 lowercase hex digits")
    if mtype == "hello" and msg["role"] not in ("node", "client"):
        raise ProtocolError("hello: role must be 'node' or 'client'")
    return msg


def encode(msg: Message) -> bytes:
    """Serialise one message into a frame (validating it first: we never send garbage)."""
    validate(msg)
    body = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message too large ({len(body)} bytes)")
    return HEADER.pack(MAGIC, len(body)) + body


def decode_body(body: bytes) -> Message:
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ProtocolError(f"invalid JSON payload: {e}") from None
    return validate(obj)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def check_header(header: bytes) -> int:
    magic, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (not a dvmm peer, or wrong version)")
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME} byte limit")
    return int(length)


class Connection:
    """One framed, validated connection. Sends are serialised; recv is single-reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._send_lock = asyncio.Lock()
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    async def recv(self, timeout: float | None = None) -> Message:
        """Next message; raises ProtocolError on garbage, ConnectionError on EOF."""

        async def _read() -> Message:
            try:
                header = await self.reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise ProtocolError("truncated frame header") from None
                raise ConnectionError("connection closed by peer") from None
            length = check_header(header)
            try:
                body = await self.reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise ProtocolError("truncated frame body") from None
            return decode_body(body)

        if timeout is None:
            return await _read()
        return await asyncio.wait_for(_read(), timeout)

    async def send(self, msg: Message) -> None:
        data = encode(msg)
        async with self._send_lock:
            self.writer.write(data)
            await self.writer.drain()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (TimeoutError, OSError):
            pass
