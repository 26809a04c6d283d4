"""Framed messages between daemons (the control plane; the VM data path is in Rust).

Every connection is mutual TLS 1.3 (dvmmd.security.tls); inside it, a frame is an 8-byte header
``b"DVP2"`` (magic + protocol version 2) + big-endian u32 length, then that many bytes
of UTF-8 JSON holding one object with a ``"type"`` field. Every message is validated
strictly against `SCHEMAS`: unknown types, missing or extra fields and wrong field
types are protocol errors, and so are a bad magic, an oversized frame, invalid
UTF-8/JSON, JSON nested too deeply (dvmmd.security.safejson) or a truncated frame. Before the
peer has said who it is (``hello``/``welcome``, auth.py) a frame may be at most
`PREAUTH_MAX_FRAME` bytes; after, `MAX_FRAME`. The caller disconnects the peer with
the logged reason and keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
from typing import Any

from dvmmd.security import safejson, tls
from dvmmd.security.logsafe import shown
from dvmmd.vm.names import is_valid_name

MAGIC = b"DVP2"
PROTO_VERSION = 2
HEADER = struct.Struct("!4sI")
MAX_FRAME = 4 << 20
#: Largest frame before the handshake is over: ``hello`` and ``welcome`` are ~150 bytes.
PREAUTH_MAX_FRAME = 4 << 10
#: Longest ``host:port`` a peer may advertise.
MAX_ADDR = 300

Message = dict[str, Any]

_HEX32 = re.compile(r"^[0-9a-f]{32}$")

# field name -> allowed JSON types (None means JSON null). Every field is required.
SCHEMAS: dict[str, dict[str, tuple[type | None, ...]]] = {
    # who is who, over TLS (see auth.py)
    "hello": {"proto": (int,), "node": (str,), "addr": (str,), "role": (str,)},
    "welcome": {"node": (str,)},
    "refused": {"reason": (str,)},
    # membership
    "heartbeat": {
        "node": (str,),
        "boot_id": (str,),
        "incarnation": (int,),
        "seq": (int,),
        "info": (dict,),
        "members": (list,),
    },
    "leave": {"node": (str,), "boot_id": (str,), "incarnation": (int,)},
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
        raise ProtocolError(f"unknown message type {shown(mtype, 40)}")
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
    if "node" in schema and not is_valid_name(msg["node"]):
        raise ProtocolError(f"{mtype}: invalid node name {shown(msg['node'])}")
    if "boot_id" in schema and not _HEX32.match(msg["boot_id"]):
        raise ProtocolError(f"{mtype}: boot_id must be 32 lowercase hex digits")
    if mtype == "hello":
        if msg["role"] not in ("node", "client"):
            raise ProtocolError(f"hello: role must be 'node' or 'client', not {shown(msg['role'])}")
        if len(msg["addr"]) > MAX_ADDR:
            raise ProtocolError(f"hello: addr longer than {MAX_ADDR} characters")
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
        obj = safejson.loads(body)
    except safejson.JsonError as e:
        raise ProtocolError(f"invalid JSON payload: {e}") from None
    return validate(obj)


def check_header(header: bytes, max_frame: int = MAX_FRAME) -> int:
    magic, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (not a dvmm peer, or wrong version)")
    if length > max_frame:
        when = " before authentication" if max_frame < MAX_FRAME else ""
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_frame} byte limit{when}")
    return int(length)


class Connection:
    """One framed, validated connection. Sends are serialised; recv is single-reader.

    ``max_frame`` starts at `PREAUTH_MAX_FRAME`; the owner raises it to `MAX_FRAME`
    once the peer is authenticated (`authenticated`).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_frame: int = PREAUTH_MAX_FRAME,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame
        self._send_lock = asyncio.Lock()
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def authenticated(self) -> None:
        """The peer is who it says: lift the pre-authentication frame limit."""
        self.max_frame = MAX_FRAME

    def peer_names(self) -> tuple[str, ...]:
        """Names in the peer's verified TLS certificate; () on a plain connection."""
        return tls.peer_names(self.writer.get_extra_info("ssl_object"))

    async def recv(self, timeout: float | None = None) -> Message:
        """Next message; raises ProtocolError on garbage, ConnectionError on EOF."""

        async def _read() -> Message:
            try:
                header = await self.reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise ProtocolError("truncated frame header") from None
                raise ConnectionError("connection closed by peer") from None
            length = check_header(header, self.max_frame)
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
