"""``dvmmctl snapshot``, ``dvmmctl migrate-vcpu`` and ``dvmmctl placement``: ask a
running VM for a snapshot, a live vCPU migration or where its vCPUs run — a
daemon's VM by name (through the daemon: ``--socket`` is its API socket), or a
``dvmmctl run --control PATH`` VM through that control socket (``--control
PATH``); ``--json`` prints the VMM's report for scripts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dvmmd.cli.client import call, default_socket
from dvmmd.cli.common import CliError
from dvmmd.config import DEFAULT_SOCKET
from dvmmd.vm.control import ControlError, request


def _split(args: argparse.Namespace, want: list[str]) -> tuple[str | None, list[str]]:
    """(VM name or None with --control, the other positional values) of ``args.words``."""
    words: list[str] = args.words
    n = len(want) if args.control else len(want) + 1
    if len(words) != n:
        usage = " ".join(want) if args.control else "NAME " + " ".join(want)
        how = "with --control PATH" if args.control else "(or --control PATH without NAME)"
        args.parser.error(f"expected {usage} {how}, got {len(words)} value(s)")
    return (None, words) if args.control else (words[0], words[1:])


def _ask(args: argparse.Namespace, name: str | None, op: str, params: dict[str, Any]) -> Any:
    """The report of ``op``: from the daemon for VM ``name``, else the control socket."""
    if name is not None:
        return call(args, op, {"name": name, **params}, timeout=None)
    req = dict(params, op="migrate" if op == "migrate_vcpu" else op)
    if "node" in req:
        try:
            req["node"] = int(req["node"])
        except ValueError:
            args.parser.error(f"NODE {req['node']!r}: with --control, a node index")
    try:
        return request(args.control, req)
    except ControlError as e:
        raise CliError(str(e)) from None


def _whole(text: str, what: str, args: argparse.Namespace) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        v = -1
    if v < 0:
        args.parser.error(f"{what} {text!r}: a whole number >= 0")
    return v


def cmd_snapshot(args: argparse.Namespace) -> int:
    name, (dir_,) = _split(args, ["DIR"])
    d = Path(dir_).absolute()
    if not d.parent.is_dir():
        args.parser.error(f"{dir_}: its parent directory does not exist")
    rep = _ask(args, name, "snapshot", {"dir": str(d), "leave_running": args.leave_running})
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        print(
            f"snapshot {rep['dir']}: {rep['pages_stored']} pages "
            f"({rep['bytes'] / (1 << 20):.1f} MiB in {rep['files']} files) written in "
            f"{rep['write_ms']:.0f} ms; the guest stood still {rep['pause_ms']:.0f} ms"
            + ("" if args.leave_running else "; the VM has stopped")
        )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    name, (vcpu, node) = _split(args, ["VCPU", "NODE"])
    v = _whole(vcpu, "VCPU", args)
    where: str | int = int(node) if node.isdigit() else node
    rep = _ask(args, name, "migrate_vcpu", {"vcpu": v, "node": where})
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        print(
            f"vCPU {rep['vcpu']} moved from node {rep['from']} to node {rep['to']}: "
            f"stopped {rep['stopped_ms']:.2f} ms"
        )
    return 0


def cmd_placement(args: argparse.Namespace) -> int:
    name, _ = _split(args, [])
    rep = _ask(args, name, "placement", {})
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        names = rep.get("nodes")
        for v, n in enumerate(rep["vcpu_node"]):
            print(f"vCPU {v}: node {n}" + (f" ({names[n]})" if names else ""))
    return 0


def _common(p: argparse.ArgumentParser, words: str) -> None:
    p.add_argument("words", nargs="*", metavar=words)
    p.add_argument(
        "--socket",
        default=default_socket(),
        help=f"dvmmd API socket (default: $DVMM_SOCKET or {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--control",
        metavar="PATH",
        help="talk to a `dvmmctl run --control PATH` VM instead of a daemon's (no NAME)",
    )
    p.add_argument("--json", action="store_true", help="print the VMM's report as JSON")


def register(sub: Any) -> None:
    """Add ``snapshot``, ``migrate-vcpu`` and ``placement`` to dvmmctl's verbs."""
    p = sub.add_parser(
        "snapshot",
        help="snapshot a running VM (every node) into DIR",
        description="Take a consistent snapshot of a running VM into DIR (replacing a "
        "snapshot there); the VM stops after it unless --leave-running. Restore it with "
        "`dvmmctl run --restore DIR [--nodes M]`. Through a daemon: root only.",
    )
    _common(p, "[NAME] DIR")
    p.add_argument("--leave-running", action="store_true", help="the VM runs on after it")
    p.set_defaults(func=cmd_snapshot, parser=p)
    p = sub.add_parser(
        "migrate-vcpu",
        help="move a running vCPU to another node",
        description="Move vCPU VCPU of a running distributed VM to node NODE (a node name or "
        "index; an index with --control) while the guest runs (it stops for a few ms).",
    )
    _common(p, "[NAME] VCPU NODE")
    p.set_defaults(func=cmd_migrate, parser=p)
    p = sub.add_parser(
        "placement",
        help="which node runs each vCPU of a running VM",
        description="Print the node each vCPU of a running VM runs on.",
    )
    _common(p, "[NAME]")
    p.set_defaults(func=cmd_placement, parser=p)
