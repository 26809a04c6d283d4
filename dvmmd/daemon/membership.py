"""Cluster membership: who is in the cluster, in which state, offering what.

Every daemon sends a heartbeat to every member it knows, every `heartbeat_interval`
seconds, over its authenticated outgoing connection (see peers.py). A heartbeat says
who the sender is (name, incarnation: bumped on every daemon start), what it offers and
uses (vCPUs, memory) and which members it knows (name, address): a node that joins
through a seed learns everyone else from the seed's heartbeats, and the seed learns the
newcomer from its incoming connection.

Failure detection is local and timeout-based: a member not heard from for
`suspect_timeout` is *suspect*, for `failure_timeout` *dead*; a heartbeat makes it
*alive* again. A member that shuts down cleanly says so (*left*). A heartbeat with a
higher incarnation than known means the daemon restarted (its VM workers are gone):
listeners are told, as for a death.

Every daemon start also draws a random *boot id*, sent with every heartbeat and
leave. The incarnation lives in the node's state directory, so a reinstalled node
(state wiped) starts again at 1: a heartbeat with a boot id not seen before is a new
instance of that node whatever its incarnation, and replaces the old one (which is
then *retired*: anything still arriving from it is stale and ignored).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dvmmd.daemon.peer_protocol import Message, ProtocolError
from dvmmd.security.keys import DATA_PLANE_MODES
from dvmmd.vm.names import is_valid_name

log = logging.getLogger("dvmmd.membership")

STATES = ("alive", "suspect", "dead", "left")
MAX_GOSSIP = 1024
#: Retired boot ids remembered per member (a node restarting in a loop stays bounded).
MAX_RETIRED = 16
_INFO_INTS = ("vcpus", "memory", "used_vcpus", "used_memory", "vms")


def new_boot_id() -> str:
    return secrets.token_hex(16)


@dataclass
class Member:
    name: str
    addr: str
    state: str
    incarnation: int
    info: dict[str, Any] = field(default_factory=dict)
    last_heard: float = field(default_factory=time.monotonic)
    since: float = field(default_factory=time.time)  # wall time of the last state change
    boot_id: str = ""
    retired: list[str] = field(default_factory=list)  # boot ids of earlier instances

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        age = (now if now is not None else time.monotonic()) - self.last_heard
        return {
            "name": self.name,
            "addr": self.addr,
            "state": self.state,
            "incarnation": self.incarnation,
            "last_heard_s": round(age, 3),
            "since": self.since,
            **{k: self.info.get(k, 0) for k in _INFO_INTS},
            "data_plane": self.info.get("data_plane"),
        }


@dataclass(frozen=True)
class MemberEvent:
    """A state change of a member; `restarted` means a new incarnation replaced the old."""

    name: str
    old: str
    new: str
    restarted: bool = False
    reason: str = ""


Listener = Callable[[MemberEvent], None]


def validate_heartbeat(msg: Message) -> None:
    """Deep checks of a heartbeat beyond the frame schema; raises ProtocolError."""
    info = msg["info"]
    for k in _INFO_INTS:
        v = info.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ProtocolError(f"heartbeat: info.{k} must be a non-negative integer")
    if set(info) - set(_INFO_INTS) - {"started_at", "version", "data_plane"}:
        raise ProtocolError("heartbeat: unexpected info field(s)")
    if "data_plane" in info and info["data_plane"] not in DATA_PLANE_MODES:
        raise ProtocolError(f"heartbeat: info.data_plane must be one of {DATA_PLANE_MODES}")
    if msg["incarnation"] < 1 or msg["seq"] < 0:
        raise ProtocolError("heartbeat: bad incarnation/seq")
    members = msg["members"]
    if len(members) > MAX_GOSSIP:
        raise ProtocolError("heartbeat: too many members")
    for m in members:
        if (
            not isinstance(m, dict)
            or set(m) != {"name", "addr"}
            or not is_valid_name(m["name"])
            or not isinstance(m["addr"], str)
            or len(m["addr"]) > 300
        ):
            raise ProtocolError("heartbeat: malformed members entry")


class Membership:
    def __init__(
        self,
        name: str,
        addr: str,
        incarnation: int,
        *,
        suspect_timeout: float,
        failure_timeout: float,
        local_info: Callable[[], dict[str, Any]],
        boot_id: str | None = None,
    ) -> None:
        self.name = name
        self.addr = addr
        self.incarnation = incarnation
        self.boot_id = boot_id or new_boot_id()
        self.suspect_timeout = suspect_timeout
        self.failure_timeout = failure_timeout
        self.local_info = local_info
        self.members: dict[str, Member] = {
            name: Member(name, addr, "alive", incarnation, boot_id=self.boot_id)
        }
        self.listeners: list[Listener] = []
        self.seq = 0

    # --- outgoing --------------------------------------------------------------

    def heartbeat(self) -> Message:
        self.seq += 1
        return {
            "type": "heartbeat",
            "node": self.name,
            "boot_id": self.boot_id,
            "incarnation": self.incarnation,
            "seq": self.seq,
            "info": self.local_info(),
            "members": [
                {"name": m.name, "addr": m.addr}
                for m in self.members.values()
                if m.state in ("alive", "suspect")
            ],
        }

    def leave_message(self) -> Message:
        return {
            "type": "leave",
            "node": self.name,
            "boot_id": self.boot_id,
            "incarnation": self.incarnation,
        }

    # --- incoming --------------------------------------------------------------

    def on_heartbeat(self, msg: Message, addr: str) -> list[str]:
        """Apply a (validated) heartbeat; returns gossiped addresses not known yet."""
        validate_heartbeat(msg)
        name = msg["node"]
        if name == self.name:
            raise ProtocolError(f"heartbeat claims to be this node ({name})")
        inc = msg["incarnation"]
        boot_id = msg["boot_id"]
        m = self.members.get(name)
        now = time.monotonic()
        if m is None:
            m = Member(name, addr, "alive", inc, dict(msg["info"]), now, boot_id=boot_id)
            self.members[name] = m
            log.info("node %s (%s) joined", name, addr)
            self._emit(MemberEvent(name, "unknown", "alive"))
        elif boot_id in m.retired:
            return []  # stale: from an instance a newer one has replaced
        elif boot_id != m.boot_id:
            # A new instance of the node: restarted, or reinstalled with its state (and
            # so its incarnation count) wiped. It replaces the old one either way.
            m.retired = [*m.retired, m.boot_id][-MAX_RETIRED:]
            old, old_inc = m.state, m.incarnation
            m.boot_id, m.incarnation, m.info, m.addr, m.last_heard = (
                boot_id,
                inc,
                dict(msg["info"]),
                addr,
                now,
            )
            m.state = "alive"
            m.since = time.time()
            how = (
                "restarted"
                if inc > old_inc
                else f"rejoined with a new identity (incarnation reset from {old_inc})"
            )
            log.warning("node %s %s (incarnation %d)", name, how, inc)
            self._emit(
                MemberEvent(name, old, "alive", restarted=True, reason=f"node {name} restarted")
            )
        elif inc < m.incarnation or (inc == m.incarnation and m.state == "left"):
            return []  # stale: a previous incarnation, or sent just before leaving
        else:
            restarted = inc > m.incarnation
            old = m.state
            m.incarnation = inc
            m.info = dict(msg["info"])
            m.addr = addr
            m.last_heard = now
            if restarted:
                log.warning("node %s restarted (incarnation %d)", name, inc)
                m.state = "alive"
                m.since = time.time()
                self._emit(
                    MemberEvent(name, old, "alive", restarted=True, reason=f"node {name} restarted")
                )
            elif old != "alive":
                m.state = "alive"
                m.since = time.time()
                log.info("node %s is alive again (was %s)", name, old)
                self._emit(MemberEvent(name, old, "alive"))
        known = {x.addr for x in self.members.values()}
        return [
            g["addr"]
            for g in msg["members"]
            if g["name"] != self.name and g["name"] not in self.members and g["addr"] not in known
        ]

    def on_leave(self, msg: Message) -> None:
        m = self.members.get(msg["node"])
        if (
            m is None
            or msg["boot_id"] != m.boot_id
            or msg["incarnation"] < m.incarnation
            or m.state == "left"
        ):
            return
        old = m.state
        m.state = "left"
        m.since = time.time()
        log.info("node %s left the cluster", m.name)
        self._emit(MemberEvent(m.name, old, "left", reason=f"node {m.name} left the cluster"))

    # --- failure detection -----------------------------------------------------

    def check(self, now: float | None = None) -> list[MemberEvent]:
        """Re-evaluate every member against the timeouts; returns the transitions."""
        now = time.monotonic() if now is None else now
        events = []
        for m in self.members.values():
            if m.name == self.name or m.state in ("dead", "left"):
                continue
            age = now - m.last_heard
            new = (
                "alive"
                if age <= self.suspect_timeout
                else "suspect"
                if age <= self.failure_timeout
                else "dead"
            )
            if new != m.state:
                ev = MemberEvent(
                    m.name,
                    m.state,
                    new,
                    reason=f"node {m.name} is {new} (no heartbeat for {age:.1f}s)",
                )
                (log.warning if new == "dead" else log.info)("%s", ev.reason)
                m.state = new
                m.since = time.time()
                events.append(ev)
                self._emit(ev)
        return events

    def _emit(self, ev: MemberEvent) -> None:
        for listener in self.listeners:
            try:
                listener(ev)
            except Exception:  # a listener bug must not break failure detection
                log.exception("membership listener failed on %s", ev)

    # --- views -----------------------------------------------------------------

    def refresh_self(self) -> None:
        me = self.members[self.name]
        me.info = self.local_info()
        me.last_heard = time.monotonic()

    def state_of(self, name: str) -> str | None:
        m = self.members.get(name)
        return m.state if m else None

    def alive(self) -> list[Member]:
        self.refresh_self()
        return [m for m in self.members.values() if m.state == "alive"]

    def view(self) -> list[dict[str, Any]]:
        self.refresh_self()
        now = time.monotonic()
        return [m.to_json(now) for m in sorted(self.members.values(), key=lambda m: m.name)]
