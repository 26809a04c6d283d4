"""``dvmmctl snapshot`` and ``dvmmctl migrate-vcpu``: ask a running VM, through
its control socket (``dvmmctl run --control PATH``), for a snapshot or a live
vCPU migration; ``--json`` prints the VMM's report for scripts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dvmmd.cli.common import CliError
from dvmmd.vm.control import ControlError, request


def _ask(args: argparse.Namespace, req: dict[str, Any]) -> Any:
    try:
        return request(args.socket, req)
    except ControlError as e:
        raise CliError(str(e)) from None


def cmd_snapshot(args: argparse.Namespace) -> int:
    d = Path(args.dir).absolute()
    if not d.parent.is_dir():
        args.parser.error(f"{args.dir}: its parent directory does not exist")
    rep = _ask(args, {"op": "snapshot", "dir": str(d), "leave_running": args.leave_running})
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
    if args.vcpu < 0 or args.node < 0:
        args.parser.error("VCPU and NODE are whole numbers >= 0")
    rep = _ask(args, {"op": "migrate", "vcpu": args.vcpu, "node": args.node})
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        print(
            f"vCPU {rep['vcpu']} moved from node {rep['from']} to node {rep['to']}: "
            f"stopped {rep['stopped_ms']:.2f} ms"
        )
    return 0


def cmd_placement(args: argparse.Namespace) -> int:
    rep = _ask(args, {"op": "placement"})
    nodes = rep["vcpu_node"]
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        for v, n in enumerate(nodes):
            print(f"vCPU {v}: node {n}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        required=True,
        metavar="PATH",
        help="the VM's control socket (dvmmctl run --control PATH)",
    )
    p.add_argument("--json", action="store_true", help="print the VMM's report as JSON")


def register(sub: Any) -> None:
    """Add ``snapshot``, ``migrate-vcpu`` and ``placement`` to dvmmctl's verbs."""
    p = sub.add_parser(
        "snapshot",
        help="snapshot a running VM (every node) into DIR",
        description="Take a consistent snapshot of a running VM into DIR (replacing one "
        "there); the VM stops after it unless --leave-running. Restore it with "
        "`dvmmctl run --restore DIR [--nodes M]`.",
    )
    _common(p)
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--leave-running", action="store_true", help="the VM runs on after it")
    p.set_defaults(func=cmd_snapshot, parser=p)
    p = sub.add_parser(
        "migrate-vcpu",
        help="move a running vCPU to another node",
        description="Move vCPU VCPU of a running distributed VM to node NODE while the guest "
        "runs (it stops for a few ms).",
    )
    _common(p)
    p.add_argument("vcpu", type=int, metavar="VCPU")
    p.add_argument("node", type=int, metavar="NODE")
    p.set_defaults(func=cmd_migrate, parser=p)
    p = sub.add_parser(
        "placement",
        help="which node runs each vCPU of a running VM",
        description="Print the node each vCPU of a running VM runs on.",
    )
    _common(p)
    p.set_defaults(func=cmd_placement, parser=p)
