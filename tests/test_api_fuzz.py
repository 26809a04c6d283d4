"""Fuzzing the API (issue 11, item 4): whatever a client sends, an answer, never a crash.

Two targets:
- the request parser and argument checker in-process (``parse_request`` +
  ``check_args``): any bytes give (op, args) of the declared types or an ApiError,
  never another exception;
- a real dvmmd's API socket (fake VM worker): structure-aware requests (every op,
  valid arguments, then mutated: keys dropped or added, values of other JSON types,
  bad names, deep nesting), random JSON of random types, random bytes, oversized
  lines. Every complete line gets exactly one final reply, well-formed, never an
  "internal error"; afterwards the daemon still answers ``ping`` and is alive, and its
  log holds no traceback.

Short by default (a few hundred cases, seconds); ``DVMM_FUZZ_LONG=1`` runs ~20x more
(``make fuzz``). The counts of cases tried are printed at the end of the module
(``pytest -s``).
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_daemon_cluster import KERNEL, Cluster, Node

from dvmmd.daemon.api import ARGS, MAX_REQUEST, ApiError, check_args, parse_request

LONG = os.environ.get("DVMM_FUZZ_LONG") == "1"
SCALE = 20 if LONG else 1
COUNTS: Counter[str] = Counter()

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)
names = st.sampled_from(["f1", "f2", "nope", "../x", "", ".", "a/b", "x" * 64]) | st.text(
    max_size=8
)
#: A good value for each argument, before mutation.
GOOD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": names,
    "force": st.booleans(),
    "follow": st.just(False),  # following a running VM's console would block the fuzzer
    "data": st.text(max_size=20),
    "data_b64": st.sampled_from(["aGk=", "", "%%%", "aGk"]),
    "vcpus": st.integers(min_value=0, max_value=3),
    "memory": st.sampled_from([16 << 20, "32M", "1T", "-1", 4095]),
    "kernel": st.sampled_from([KERNEL, "/nonexistent", "vmdir:kernel-x.img", "rel"]),
    "initrd": st.sampled_from([None, KERNEL, "/etc/shadow-nonexistent"]),
    "kernel_fd": st.integers(min_value=-1, max_value=3),
    "initrd_fd": st.integers(min_value=-1, max_value=3),
    "cmdline": st.sampled_from(["sleep=0", "exit=3", "", "x" * 3000]),
    "nodes": st.lists(st.sampled_from(["n1", "zz", "../n"]), max_size=2),
    "timeout_s": st.sampled_from([0, 1.5, -1, 1e308]),
    "cpu": st.sampled_from(["baseline", "host", "pentium"]),
    "foreign_budget": st.sampled_from([None, "32M", 4096, 100, "-1", "lots"]),
    "snapshot_every_s": st.sampled_from([None, 0.5, 30, 0, -1, 1e308]),
    "snapshot_dir": st.sampled_from([None, "/etc", "rel", "/nonexistent/snap"]),
    "dir": st.sampled_from(["/etc", "rel", "/nonexistent/snap", ""]),
    "restore_dir": st.sampled_from([None, "/etc", "rel", "/nonexistent/snap"]),
    "leave_running": st.sampled_from([None, True, False]),
    "vcpu": st.integers(min_value=-1, max_value=3),
    "node": st.sampled_from(["n1", "zz", 0, 7, -1]),
}


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request line: valid for some op, then maybe mutated."""
    op = draw(st.sampled_from(sorted(ARGS)))
    spec = ARGS[op]
    keys = draw(st.lists(st.sampled_from(sorted(spec)), unique=True)) if spec else []
    if "name" in spec and "name" not in keys and draw(st.booleans()):
        keys.append("name")
    args: dict[str, Any] = {k: draw(GOOD_VALUES[k]) for k in keys}
    mutation = draw(st.sampled_from(["none", "none", "value", "key", "drop", "op", "nest"]))
    if mutation == "value" and args:
        args[draw(st.sampled_from(sorted(args)))] = draw(json_values)
    elif mutation == "key":
        args[draw(st.text(max_size=10))] = draw(json_values)
    elif mutation == "drop" and args:
        del args[draw(st.sampled_from(sorted(args)))]
    elif mutation == "op":
        op = draw(st.one_of(st.text(max_size=10), json_values))
    elif mutation == "nest":  # built as text: deeper than json.dumps could write
        depth = draw(st.integers(min_value=20, max_value=3000))
        nested = b"[" * depth + b"]" * depth
        return b'{"op": ' + encode(op).strip() + b', "args": {"name": ' + nested + b"}}\n"
    req: dict[str, Any] = {"op": op, "args": args}
    if draw(st.integers(0, 9)) == 0:
        req[draw(st.text(max_size=5))] = draw(json_values)
    return encode(req)


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# --------------------------------------------------------------------------- in-process


@settings(max_examples=1000 * SCALE, deadline=None)
@given(st.one_of(st.binary(max_size=200), requests(), json_values.map(encode)))
def test_parser_answers_any_bytes(line: bytes) -> None:
    COUNTS["parser"] += 1
    try:
        op, args = parse_request(line.rstrip(b"\n"))
        check_args(op, args)
    except ApiError as e:
        assert str(e)
        return
    except ValueError as e:  # InvalidName: a ValueError naming the bad name
        assert "invalid VM name" in str(e)
        return
    assert isinstance(op, str) and isinstance(args, dict)
    for key, value in args.items():
        kinds = ARGS[op][key]
        assert isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds)


# --------------------------------------------------------------------------- real daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    c = Cluster(tmp_path_factory.mktemp("fuzz"))
    (a,) = c.add(1)
    c.start_all()
    try:
        yield a
    finally:
        alive = a.proc is not None and a.proc.poll() is None
        c.stop_all()
        cases = {k: v for k, v in COUNTS.items() if not k.startswith("replies")}
        print(
            "\napi fuzz: cases tried: "
            + ", ".join(f"{k} {v}" for k, v in sorted(cases.items()))
            + f" (total {sum(cases.values())}); daemon answered "
            + f"{COUNTS['replies ok']} ok, {COUNTS['replies error']} with an error"
        )
        assert alive, a.log()
        assert "Traceback" not in a.log(), a.log()[-5000:]


def exchange(path: str, data: bytes) -> list[dict[str, Any]]:
    """Send `data`, close our side, collect every reply line until the daemon closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it closed on an oversized line: its reply is still there to read
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def check_replies(daemon: Node, data: bytes, replies: list[dict[str, Any]]) -> None:
    finals = [r for r in replies if "event" not in r]
    for r in finals:
        assert isinstance(r.get("ok"), bool), r
        COUNTS["replies ok" if r["ok"] else "replies error"] += 1
        if r["ok"]:
            assert "result" in r, r
        else:
            assert isinstance(r.get("error"), str) and r["error"], r
            assert not r["error"].startswith("internal error"), (data[:200], r)
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    if len(data) > MAX_REQUEST or any(len(x) > MAX_REQUEST for x in lines):
        assert len(finals) >= 1 and "too large" in finals[-1]["error"], finals
    else:
        expected = sum(1 for x in complete if x.strip()) + (1 if tail.strip() else 0)
        assert len(finals) == expected, (data[:200], replies)
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-3000:]


FUZZ = settings(
    max_examples=250 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(data=requests())
def test_api_structured(daemon: Node, data: bytes) -> None:
    COUNTS["structured"] += 1
    check_replies(daemon, data, exchange(daemon.socket, data))


@FUZZ
@given(
    data=st.one_of(
        json_values.map(encode),
        st.lists(json_values.map(encode), min_size=2, max_size=4).map(b"".join),
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: b + b"\n"),
        st.integers(1, 60_000).map(lambda n: b"[" * n + b"\n"),
    )
)
def test_api_random(daemon: Node, data: bytes) -> None:
    COUNTS["random"] += 1
    check_replies(daemon, data, exchange(daemon.socket, data))


@settings(max_examples=6 * SCALE, deadline=None)
@given(extra=st.integers(1, 200_000), newline=st.booleans())
def test_api_oversized(daemon: Node, extra: int, newline: bool) -> None:
    COUNTS["oversized"] += 1
    data = b'{"op": "ping", "args": {"pad": "' + b"x" * (MAX_REQUEST + extra)
    data += b'"}}\n' if newline else b""
    check_replies(daemon, data, exchange(daemon.socket, data))


def test_api_still_serving_after_fuzzing(daemon: Node) -> None:
    """Runs last in this module: the daemon answers and lists its VMs."""
    assert daemon.ping()
    assert isinstance(daemon.req("list")["vms"], list)
    assert daemon.req("nodes")["self"] == "n1"
