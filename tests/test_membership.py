"""Membership: restarts, reinstalls (incarnation reset) and stale messages."""

from __future__ import annotations

from typing import Any

import pytest

from dvmmd.daemon.membership import MAX_RETIRED, MemberEvent, Membership, new_boot_id
from dvmmd.daemon.peer_protocol import ProtocolError

INFO = {"vcpus": 2, "memory": 1 << 30, "used_vcpus": 0, "used_memory": 0, "vms": 0}


def _m() -> tuple[Membership, list[MemberEvent]]:
    m = Membership(
        "me", "127.0.0.1:1", 1, suspect_timeout=1.0, failure_timeout=2.0, local_info=dict
    )
    events: list[MemberEvent] = []
    m.listeners.append(events.append)
    return m, events


def _hb(node: str, boot_id: str, inc: int, **info: Any) -> dict[str, Any]:
    return {
        "type": "heartbeat",
        "node": node,
        "boot_id": boot_id,
        "incarnation": inc,
        "seq": 1,
        "info": {**INFO, **info},
        "members": [],
    }


def test_reinstalled_node_with_lower_incarnation_is_accepted() -> None:
    """Before: a node whose state was wiped (incarnation back to 1) was ignored forever."""
    m, events = _m()
    old, new = new_boot_id(), new_boot_id()
    m.on_heartbeat(_hb("b", old, 7), "127.0.0.2:1")
    m.on_leave({"type": "leave", "node": "b", "boot_id": old, "incarnation": 7})
    assert m.state_of("b") == "left"
    m.on_heartbeat(_hb("b", new, 1, vcpus=8), "127.0.0.2:1")
    assert m.state_of("b") == "alive"
    b = m.members["b"]
    assert (b.incarnation, b.boot_id, b.info["vcpus"], b.retired) == (1, new, 8, [old])
    assert events[-1] == MemberEvent(
        "b", "left", "alive", restarted=True, reason="node b restarted"
    )
    # The old instance is retired: anything late from it is ignored.
    m.on_heartbeat(_hb("b", old, 9), "127.0.0.2:1")
    assert (m.members["b"].boot_id, m.members["b"].incarnation) == (new, 1)
    m.on_leave({"type": "leave", "node": "b", "boot_id": old, "incarnation": 9})
    assert m.state_of("b") == "alive"


def test_dead_node_reinstalled_comes_back() -> None:
    m, events = _m()
    old = new_boot_id()
    m.on_heartbeat(_hb("b", old, 3), "127.0.0.2:1")
    m.check(now=m.members["b"].last_heard + 10)
    assert m.state_of("b") == "dead"
    m.on_heartbeat(_hb("b", new_boot_id(), 1), "127.0.0.2:1")
    assert m.state_of("b") == "alive" and events[-1].restarted


def test_same_instance_rules_unchanged() -> None:
    m, events = _m()
    boot = new_boot_id()
    m.on_heartbeat(_hb("b", boot, 2), "127.0.0.2:1")
    m.on_heartbeat(_hb("b", boot, 1), "127.0.0.2:1")  # stale: lower, same instance
    assert m.members["b"].incarnation == 2
    m.on_leave({"type": "leave", "node": "b", "boot_id": boot, "incarnation": 2})
    m.on_heartbeat(_hb("b", boot, 2), "127.0.0.2:1")  # sent just before leaving
    assert m.state_of("b") == "left"
    assert [e.new for e in events] == ["alive", "left"]


def test_retired_ids_are_bounded() -> None:
    m, _ = _m()
    for i in range(MAX_RETIRED + 5):
        m.on_heartbeat(_hb("b", new_boot_id(), i + 1), "127.0.0.2:1")
    assert len(m.members["b"].retired) == MAX_RETIRED


def test_heartbeat_carries_boot_id_and_data_plane() -> None:
    m = Membership(
        "other", "a:1", 4, suspect_timeout=1, failure_timeout=2,
        local_info=lambda: {**INFO, "data_plane": "integrity"}, boot_id="ab" * 16,
    )  # fmt: skip
    hb = m.heartbeat()
    assert hb["boot_id"] == "ab" * 16 and hb["info"]["data_plane"] == "integrity"
    assert m.leave_message()["boot_id"] == "ab" * 16
    m2, _ = _m()
    m2.on_heartbeat(hb, "a:1")
    assert [v["data_plane"] for v in m2.view() if v["name"] == "other"] == ["integrity"]
    with pytest.raises(ProtocolError, match="info.data_plane"):
        m2.on_heartbeat({**hb, "info": {**INFO, "data_plane": "rot13"}}, "a:1")
    with pytest.raises(ProtocolError, match="malformed members entry"):
        m2.on_heartbeat({**hb, "members": [{"name": "../x", "addr": "a:1"}]}, "a:1")
