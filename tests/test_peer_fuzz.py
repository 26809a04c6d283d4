"""Structure-aware fuzzing (hypothesis) of everything a peer can make the daemon parse.

Targets: the frame body decoder and schema validation (peer_protocol.decode_body), the
frame reader (Connection.recv: headers, lengths, truncation, the pre-authentication
limit), the name handshake (auth.accept_handshake), heartbeats as membership applies
them, and the JSON loader itself (safejson.loads). Inputs start from *valid* messages
built from peer_protocol.SCHEMAS and are then mutated: fields dropped, added or retyped,
values replaced by random JSON or by deep nesting, the encoded bytes flipped,
truncated or spliced. The property everywhere: a result that satisfies the schema,
or ProtocolError / AuthError / ConnectionError / JsonError; never anything else.

A short run is part of the normal suite (200 cases per target, ~5 s);
``DVMM_FUZZ_LONG=1`` (``make fuzz``) runs 10,000 per target (~6 min here) with fresh
random seeds, ``DVMM_FUZZ_LONG=N`` (N > 1) N per target. Each test prints how many
cases it tried.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvmmd.daemon.membership import Membership
from dvmmd.daemon.peer_protocol import (
    HEADER,
    MAGIC,
    PROTO_VERSION,
    SCHEMAS,
    Connection,
    Message,
    ProtocolError,
    decode_body,
    encode,
    validate,
)
from dvmmd.security import safejson
from dvmmd.security.auth import AuthError, Peer, accept_handshake

_LONG_ENV = os.environ.get("DVMM_FUZZ_LONG", "")
LONG = _LONG_ENV not in ("", "0")
EXAMPLES = (
    (int(_LONG_ENV) if _LONG_ENV.isdigit() and int(_LONG_ENV) > 1 else 10_000) if LONG else 200
)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG,  # the normal suite is reproducible; the long run explores
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# --------------------------------------------------------------------------- strategies

# (st.from_regex would be the obvious way; building from alphabets is 5x faster.)
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
names = st.builds(lambda a, b: a + b, st.sampled_from(_ALNUM), st.text(_ALNUM + "_-", max_size=12))
hex32 = st.text("0123456789abcdef", min_size=32, max_size=32)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)
info = st.fixed_dictionaries(
    {k: st.integers(0, 2**40) for k in ("vcpus", "memory", "used_vcpus", "used_memory", "vms")},
    optional={
        "started_at": st.floats(0, 2e9),
        "version": st.text(max_size=10),
        "data_plane": st.sampled_from(["encrypt", "integrity", "none"]),
    },
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "proto": st.just(PROTO_VERSION),
    "node": names,
    "addr": st.builds(lambda h, p: f"{h}:{p}", names, st.integers(0, 99999)),
    "role": st.sampled_from(["node", "client"]),
    "reason": st.text(max_size=60),
    "boot_id": hex32,
    "incarnation": st.integers(1, 2**31),
    "seq": st.integers(0, 2**31),
    "info": info,
    "members": st.lists(st.fixed_dictionaries({"name": names, "addr": st.text(max_size=20)})),
    "id": st.integers(0, 2**31),
    "method": st.text(max_size=20),
    "params": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    "ok": st.booleans(),
    "result": json_values,
    "error": st.none() | st.text(max_size=40),
}


@st.composite
def valid_messages(draw: st.DrawFn, mtype: str | None = None) -> Message:
    t = mtype or draw(st.sampled_from(sorted(SCHEMAS)))
    return {"type": t, **{f: draw(FIELDS[f]) for f in SCHEMAS[t]}}


class _Deep:
    """``depth`` nested arrays: serialised by `dump` as text, since building them as
    Python lists would break json.dumps itself."""

    def __init__(self, depth: int) -> None:
        self.depth = depth


def dump(v: Any) -> str:
    """json.dumps that also writes `_Deep` values."""
    if isinstance(v, _Deep):
        return "[" * v.depth + "0" + "]" * v.depth
    if isinstance(v, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dump(x) for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v)


def _nest(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@st.composite
def mutated_messages(draw: st.DrawFn, mtype: str | None = None) -> Any:
    """A valid message, then zero or more structural mutations."""
    msg: Any = draw(valid_messages(mtype))
    for _ in range(draw(st.integers(0, 3))):
        keys = sorted(msg) if isinstance(msg, dict) else []
        op = draw(st.sampled_from(["drop", "add", "retype", "nest", "replace", "wrap"]))
        if op == "drop" and keys:
            msg.pop(draw(st.sampled_from(keys)))
        elif op == "add" and isinstance(msg, dict):
            msg[draw(st.text(max_size=10))] = draw(json_values)
        elif op == "retype" and keys:
            msg[draw(st.sampled_from(keys))] = draw(json_values)
        elif op == "nest" and keys:
            msg[draw(st.sampled_from(keys))] = _Deep(draw(st.integers(1, 3000)))
        elif op == "replace":
            msg = draw(json_values)
        elif op == "wrap":
            msg = _nest(draw(st.integers(1, 40)), msg)
    return msg


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Encoded (mutated) messages, sometimes corrupted at the byte level."""
    body = dump(draw(mutated_messages())).encode()
    op = draw(st.sampled_from(["none", "none", "flip", "truncate", "splice", "raw"]))
    if op == "flip" and body:
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1 :]
    elif op == "truncate":
        body = body[: draw(st.integers(0, len(body)))]
    elif op == "splice":
        i = draw(st.integers(0, len(body)))
        body = body[:i] + draw(st.binary(max_size=20)) + body[i:]
    elif op == "raw":
        body = draw(st.binary(max_size=200))
    return body


# --------------------------------------------------------------------------- targets


def test_fuzz_decode_body() -> None:
    count = 0

    @FUZZ
    @given(bodies())
    def prop(body: bytes) -> None:
        nonlocal count
        count += 1
        try:
            msg = decode_body(body)
        except ProtocolError:
            return
        assert validate(dict(msg)) == msg
        assert decode_body(encode(msg)[HEADER.size :]) == msg  # a valid message round-trips

    prop()
    print(f"fuzz decode_body: {count} cases")
    assert count >= min(EXAMPLES, 100)


class _Writer:
    def get_extra_info(self, name: str) -> None:
        return None


async def _read_all(raw: bytes, authenticated: bool) -> list[Message]:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    conn = Connection(reader, _Writer())  # type: ignore[arg-type]
    if authenticated:
        conn.authenticated()
    out: list[Message] = []
    try:
        while True:
            out.append(await conn.recv())
    except (ProtocolError, ConnectionError):
        return out


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Several frames: valid ones and ones with bad magic, lengths or cut short."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        body = draw(bodies())
        op = draw(st.sampled_from(["ok", "ok", "magic", "length", "cut", "big"]))
        length = len(body)
        magic = MAGIC
        if op == "magic":
            magic = draw(st.binary(min_size=4, max_size=4))
        elif op == "length":
            length = draw(st.integers(0, 2**32 - 1))
        elif op == "big":
            body = b'{"type":"refused","reason":"' + b"x" * draw(st.integers(4000, 9000)) + b'"}'
            length = len(body)
        frame = HEADER.pack(magic, length) + body
        if op == "cut":
            frame = frame[: draw(st.integers(0, len(frame)))]
        parts.append(frame)
    return b"".join(parts)


def test_fuzz_frame_reader() -> None:
    count = 0

    # Each case is 1-3 frames: half the cases give as many frames as elsewhere.
    @settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
    @given(streams(), st.booleans())
    def prop(raw: bytes, authenticated: bool) -> None:
        nonlocal count
        count += 1
        msgs = asyncio.run(_read_all(raw, authenticated))
        for m in msgs:
            assert validate(dict(m)) == m
            if not authenticated:  # nothing larger than 4 KiB got through before auth
                assert len(encode(m)) <= 4096 + HEADER.size

    prop()
    print(f"fuzz frame reader: {count} cases")
    assert count >= min(EXAMPLES // 2, 100)


class _HandshakeConn:
    """Just enough of a Connection for accept_handshake: one message, a certificate."""

    def __init__(self, msg: Message, names: tuple[str, ...]) -> None:
        self.msg, self.names = msg, names
        self.sent: list[Message] = []
        self.peer = "127.0.0.1:1"
        self.max_frame = 0

    def peer_names(self) -> tuple[str, ...]:
        return self.names

    async def recv(self, timeout: float | None = None) -> Message:
        return self.msg

    async def send(self, msg: Message) -> None:
        validate(msg)
        self.sent.append(msg)

    def authenticated(self) -> None:
        self.max_frame = 1


def test_fuzz_accept_handshake() -> None:
    """Whatever decodes as a message, the acceptor either welcomes a hello whose node
    is a name of the certificate, or refuses it."""
    count = 0
    any_message = st.one_of(valid_messages("hello"), valid_messages(), mutated_messages("hello"))

    @FUZZ
    @given(any_message, st.lists(names, min_size=1, max_size=2))
    def prop(raw: Any, cert_names: list[str]) -> None:
        nonlocal count
        count += 1
        try:
            msg = decode_body(dump(raw).encode())
        except ProtocolError:
            return
        if msg["type"] == "hello" and count % 2:
            msg = {**msg, "node": cert_names[0]}  # half the time: the honest claim
        conn = _HandshakeConn(msg, tuple(cert_names))
        try:
            peer = asyncio.run(accept_handshake(conn, "acc"))  # type: ignore[arg-type]
        except (AuthError, ProtocolError):
            assert conn.max_frame == 0  # still unauthenticated
            return
        assert isinstance(peer, Peer) and peer.node in cert_names
        assert msg["type"] == "hello" and msg["proto"] == PROTO_VERSION
        assert conn.max_frame == 1 and conn.sent == [{"type": "welcome", "node": "acc"}]

    prop()
    print(f"fuzz accept_handshake: {count} cases")
    assert count >= min(EXAMPLES, 100)


def test_fuzz_heartbeats() -> None:
    count = 0
    m = Membership("me", "127.0.0.1:1", 1, suspect_timeout=1, failure_timeout=2, local_info=dict)

    @FUZZ
    @given(st.one_of(valid_messages("heartbeat"), mutated_messages("heartbeat")))
    def prop(raw: Any) -> None:
        nonlocal count
        count += 1
        try:
            msg = decode_body(dump(raw).encode())
        except ProtocolError:
            return
        if msg["type"] != "heartbeat":
            return
        try:
            addrs = m.on_heartbeat(msg, "127.0.0.2:1")
        except ProtocolError:
            return
        assert all(isinstance(a, str) for a in addrs)
        assert m.members[msg["node"]].state == "alive" or msg["node"] in m.members

    prop()
    print(f"fuzz heartbeats: {count} cases")
    assert count >= min(EXAMPLES, 100)


def test_fuzz_safejson() -> None:
    count = 0
    texts = st.one_of(
        st.text(max_size=200),
        st.builds(lambda d, s: "[" * d + s + "]" * d, st.integers(0, 5000), st.text(max_size=5)),
        st.builds(lambda d: '{"a":' * d + "1" + "}" * d, st.integers(0, 3000)),
        json_values.map(json.dumps),
    )

    @FUZZ
    @given(texts)
    def prop(text: str) -> None:
        nonlocal count
        count += 1
        try:
            value = safejson.loads(text)
        except safejson.JsonError:
            return
        safejson.check_depth(value)
        json.dumps(value)  # whatever loads is safe to serialise again

    prop()
    print(f"fuzz safejson: {count} cases")
    assert count >= min(EXAMPLES, 100)


def test_fuzz_header_struct() -> None:
    """Every 8-byte header either names a length within the limit or is refused."""
    count = 0

    @FUZZ
    @given(st.binary(min_size=8, max_size=8), st.binary(max_size=64))
    def prop(header: bytes, body: bytes) -> None:
        nonlocal count
        count += 1
        msgs = asyncio.run(_read_all(header + body, False))
        magic, length = struct.unpack("!4sI", header)
        if msgs:
            assert magic == MAGIC and length <= 4096

    prop()
    print(f"fuzz frame header: {count} cases")
    assert count >= min(EXAMPLES, 100)
