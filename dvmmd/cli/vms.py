"""The daemon-facing ``dvmmctl`` verbs on VMs and nodes: nodes, boot, start, list,
status, console, stop, rm, stats, top.

They talk to the local dvmmd over its API socket (client.py). ``console`` and
``boot``/``start --console`` stream the guest's console from its boot node (Ctrl-]
detaches) and, once the VM has ended, exit with its status as ``dvmmctl run`` does
(`vm_exit_status`). Every verb takes ``--json``.
"""

from __future__ import annotations

import argparse
import base64
import os
import select
import sys
import time
from collections.abc import Callable
from typing import Any

from dvmmd.cli.client import Client, call, default_socket
from dvmmd.cli.common import (
    CPU_HELP,
    CliError,
    cpu_model_arg,
    foreign_budget_arg,
    memory_arg,
    print_json,
    timeout_arg,
    vcpus_arg,
)
from dvmmd.config import DEFAULT_SOCKET
from dvmmd.vm.boot_files import BootFileError, open_boot_files
from dvmmd.vm.periodic_snapshots import SnapshotOptionError, parse_every
from dvmmd.vm.sizes import format_size
from dvmmd.vm.spec import EXIT_ERROR, MAX_VCPUS, exit_code

DETACH_KEY = b"\x1d"  # Ctrl-]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def format_nodes(res: dict[str, Any]) -> str:
    rows = []
    for n in res["nodes"]:
        me = " *" if n["name"] == res["self"] else ""
        rows.append(
            [
                n["name"] + me,
                n["addr"],
                n["state"],
                f"{n['used_vcpus']}/{n['vcpus']}",
                f"{format_size(n['used_memory'])}/{format_size(n['memory'])}",
                str(n["vms"]),
                f"{n['last_heard_s']:.1f}s" if not me else "-",
                str(n.get("data_plane") or "?"),
            ]
        )
    for p in res.get("pending", []):
        rows.append(["?", p["addr"], "unreachable", "-", "-", "-", p.get("error", "")[:40], "-"])
    table = _table(
        rows, ["NODE", "ADDRESS", "STATE", "VCPUS", "MEMORY", "VMS", "LAST SEEN", "DATA PLANE"]
    )
    planes = {n.get("data_plane") for n in res["nodes"] if n["state"] in ("alive", "suspect")}
    if len(planes) > 1:  # multi-node VMs would be refused: say why before anyone boots
        table += (
            "\nwarning: the nodes disagree on cluster.data_plane "
            f"({', '.join(sorted(str(p) for p in planes))}): VMs across them will not start"
        )
    return table


def _nodes_of(vm: dict[str, Any]) -> str:
    return ",".join(s["node"] for s in vm["placement"]["shares"])


def format_vms(vms: list[dict[str, Any]]) -> str:
    rows = [
        [
            v["name"],
            v["state"],
            str(v["request"]["vcpus"]),
            format_size(v["request"]["memory"]),
            _nodes_of(v),
            v["reason"],
        ]
        for v in vms
    ]
    return _table(rows, ["NAME", "STATE", "VCPUS", "MEMORY", "NODES", "REASON"])


def format_status(v: dict[str, Any]) -> str:
    req = v["request"]
    lines = [
        f"name:     {v['name']}",
        f"state:    {v['state']}",
        f"reason:   {v['reason']}",
        f"owner:    {v.get('owner', '?')}",
        f"vcpus:    {req['vcpus']}",
        f"memory:   {format_size(req['memory'])}",
        f"kernel:   {req['kernel']}",
        f"cmdline:  {req.get('cmdline', '')}",
    ]
    if len(v["placement"]["shares"]) > 1:
        plane = v["placement"].get("data_plane") or "?"
        lines.append(f"data plane: {plane} (between the VM's nodes)")
    lines += [
        "placement:",
    ]
    for i, s in enumerate(v["placement"]["shares"]):
        cpus = s["cpus"]
        lines.append(
            f"  [{i}] {s['node']}: vCPUs {cpus[0]}-{cpus[-1]}, memory "
            f"{format_size(s['mem_start'])}+{format_size(s['mem_size'])}, "
            f"{s.get('state', '?')}"
            + (f" ({s['reason']})" if s.get("reason") else "")
            + (" [boot node]" if i == 0 else "")
        )
    lines += _snapshot_lines(req)
    result = v.get("result")
    if result:
        lines.append(
            f"result:   {result.get('reason')} status={result.get('status')}"
            + (f" error={result['error']}" if result.get("error") else "")
        )
    return "\n".join(lines)


def _snapshot_lines(req: dict[str, Any]) -> list[str]:
    """``status``: the VM's periodic snapshots and its recoveries from them."""
    snap = req.get("snapshot")
    if not snap:
        return []
    lines = [f"snapshots: every {snap['every_s']:g} s into {snap['dir']}"]
    for e in req.get("recovered") or []:
        taken = time.strftime("%H:%M:%S", time.localtime(e["taken_unix_s"]))
        at = time.strftime("%H:%M:%S", time.localtime(e["at"]))
        lines.append(
            f"recovered: at {at}, node {', '.join(e['lost'])} lost; restored on "
            f"{', '.join(e['nodes'])} from the snapshot taken {taken} ({e['snapshot']})"
        )
    return lines


def _flat(stats: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(stats, dict):
        for k, v in stats.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(stats, list) and len(stats) <= 16:
        out[prefix[:-1]] = " ".join(str(x) for x in stats)
    elif isinstance(stats, list):
        # Histograms (the engine's HDR buckets run to thousands): a count, not a
        # column thousands of characters wide; --json has every value.
        out[prefix[:-1]] = f"({len(stats)} values, see --json)"
    elif isinstance(stats, float):
        out[prefix[:-1]] = f"{stats:.3f}"
    else:
        out[prefix[:-1]] = str(stats)
    return out


def format_stats(res: dict[str, Any]) -> str:
    nodes = res["nodes"]
    flats = [_flat(n.get("stats") or {}) for n in nodes]
    keys = sorted({k for f in flats for k in f})
    head = f"VM {res['name']}: {res['state']} ({res['reason']})"
    if not keys:
        return (
            head + "\n(no counters yet: workers report them in their result, or live in "
            "RESULT.json.stats)"
        )
    rows = [[k] + [f.get(k, "-") for f in flats] for k in keys]
    header = ["COUNTER"] + [f"{n['node']}" + (" (!)" if n.get("error") else "") for n in nodes]
    return head + "\n" + _table(rows, header)


def snapshot_every_arg(text: str) -> float:
    """``--snapshot-every``: seconds > 0 (dvmmd.vm.periodic_snapshots's rule)."""
    try:
        return parse_every(text)
    except SnapshotOptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_nodes(args: argparse.Namespace) -> int:
    res = call(args, "nodes")
    print_json(res) if args.json else print(format_nodes(res))
    return 0


def progress_printer() -> Callable[[dict[str, Any]], None]:
    t0 = time.monotonic()

    def show(ev: dict[str, Any]) -> None:
        if ev.get("event") == "progress":
            print(f"[{time.monotonic() - t0:6.2f}s] {ev['message']}", file=sys.stderr, flush=True)

    return show


def _abs(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def cmd_boot(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "name": args.name,
        "vcpus": args.vcpus,
        "memory": args.memory,
        "kernel": _abs(args.kernel),
        "initrd": _abs(args.initrd),
        "cmdline": args.cmdline,
        "timeout_s": args.timeout,
    }
    if args.cpu is not None:
        params["cpu"] = args.cpu
    if args.foreign_budget is not None:
        params["foreign_budget"] = args.foreign_budget
    if args.nodes:
        params["nodes"] = _node_list(args.nodes)
    if args.snapshot_dir is not None and args.snapshot_every is None:
        raise CliError("--snapshot-dir needs --snapshot-every (the snapshot interval)")
    if args.snapshot_every is not None:
        params["snapshot_every_s"] = args.snapshot_every
        params["snapshot_dir"] = _abs(args.snapshot_dir)
    # The daemon (root) reads the kernel/initrd only through descriptors we opened with
    # our own rights (dvmmd.vm.boot_files): a path alone is refused for non-root users.
    try:
        fds = open_boot_files(params)
    except BootFileError as e:
        raise CliError(str(e)) from None
    try:
        progress = None if args.json else progress_printer()
        res = call(args, "boot", params, progress, timeout=None, fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    return _booted(args, res)


def cmd_drain(args: argparse.Namespace) -> int:
    """``dvmmctl drain NODE``: every running VM moves off NODE (stop-and-copy)."""
    progress = None if args.json else progress_printer()
    res = call(args, "drain", {"node": args.node}, progress, timeout=None)
    if args.json:
        print_json(res)
        return 0
    failed = 0
    for v in res["vms"]:
        if "error" in v:
            failed += 1
            print(f"VM {v['name']}: not moved: {v['error']}")
        else:
            print(f"VM {v['name']}: {v['state']} ({v['reason']})")
    if not res["vms"]:
        print(f"no running VM uses {res['node']}")
    return 1 if failed else 0


def cmd_restore(args: argparse.Namespace) -> int:
    """``dvmmctl restore DIR NAME``: a new VM NAME from the snapshot in DIR (its vCPUs,
    memory, NUMA topology and CPU model are the snapshot's), placed by the daemons."""
    params: dict[str, Any] = {"name": args.name, "restore_dir": _abs(args.dir)}
    if args.nodes:
        params["nodes"] = _node_list(args.nodes)
    if args.timeout:
        params["timeout_s"] = args.timeout
    progress = None if args.json else progress_printer()
    res = call(args, "boot", params, progress, timeout=None)
    return _booted(args, res)


def _booted(args: argparse.Namespace, res: dict[str, Any]) -> int:
    if args.json and not args.console:
        print_json(res)
    elif not args.json:
        print(f"VM {res['name']}: {res['state']} on {_nodes_of(res)}")
    if args.console:
        return console(args, args.name, follow=True)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    progress = None if args.json else progress_printer()
    res = call(args, "start", {"name": args.name}, progress, timeout=None)
    return _booted(args, res)


ACTIVE = ("booting", "running", "recovering", "stopping")


def vm_exit_status(st: dict[str, Any]) -> int:
    """A VM's end as an exit status, as ``dvmmctl run`` gives it: the guest's debug-exit
    status, 124 for a timeout, 1 for a failure, 0 for a shutdown or a stop by the user;
    0 while the VM still runs."""
    if st.get("state") in ACTIVE:
        return 0
    result = st.get("result")
    code = exit_code(result) if isinstance(result, dict) else 0
    if st.get("state") == "failed" and code == 0:
        code = EXIT_ERROR
    return code


def cmd_list(args: argparse.Namespace) -> int:
    res = call(args, "list")
    if args.json:
        print_json(res)
        return 0
    print(format_vms(res["vms"]) if res["vms"] else "no VMs")
    for u in res["unreachable"]:
        print(f"warning: could not ask {u}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    res = call(args, "status", {"name": args.name})
    print_json(res) if args.json else print(format_status(res))
    return 0


def _send_input(args: argparse.Namespace, name: str, data: bytes) -> None:
    """Send `data` to the serial console of VM `name` (console_input op)."""
    if data:
        b64 = base64.b64encode(data).decode("ascii")
        call(args, "console_input", {"name": name, "data_b64": b64})


def _raw_mode(fd: int) -> list[Any]:
    """Put terminal `fd` in raw mode (keystrokes go to the guest as typed, Ctrl-C
    included), keeping output post-processing so the guest's newlines render; return
    the saved attributes."""
    import termios
    import tty as ttymod

    saved = termios.tcgetattr(fd)
    ttymod.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[1] |= termios.OPOST | termios.ONLCR
    termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
    return saved


def console(args: argparse.Namespace, name: str, follow: bool) -> int:
    out = sys.stdout
    text = getattr(args, "input", None)
    if text is not None:
        _send_input(args, name, text.encode("utf-8"))
    tty = follow and sys.stdin.isatty()
    if tty:
        print(
            f"[attached to {name}; typing goes to the guest; Ctrl-] to detach]",
            file=sys.stderr,
            flush=True,
        )
    with Client(args.socket, None) as c:
        c.send("console", {"name": name, "follow": follow})
        saved = None
        if tty:
            saved = _raw_mode(sys.stdin.fileno())
        input_error = False
        try:
            while True:
                if tty and not c.buf:
                    ready, _, _ = select.select([c.sock, sys.stdin], [], [])
                    if sys.stdin in ready:
                        typed = os.read(sys.stdin.fileno(), 1024)
                        before, detach, _ = typed.partition(DETACH_KEY)
                        try:
                            _send_input(args, name, before)
                        except CliError as e:
                            if not input_error:
                                print(f"\r\n[console input: {e}]", file=sys.stderr, flush=True)
                            input_error = True
                        if detach or not typed:
                            print(
                                f"\n[detached from {name}; the VM keeps running]",
                                file=sys.stderr,
                            )
                            return 0
                    if c.sock not in ready:
                        continue
                msg = c.read_message()
                if msg.get("event") == "console":
                    out.write(msg["data"])
                    out.flush()
                elif "event" not in msg:
                    if not msg.get("ok"):
                        raise CliError(str(msg.get("error")))
                    st = msg["result"]
                    if follow:
                        print(f"[{name}: {st['state']}: {st['reason']}]", file=sys.stderr)
                    if getattr(args, "json", False):
                        print_json(st)
                    return vm_exit_status(st)
        except KeyboardInterrupt:
            print(f"\n[detached from {name}; the VM keeps running]", file=sys.stderr)
            return 0
        finally:
            if saved is not None:
                import termios

                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def cmd_console(args: argparse.Namespace) -> int:
    return console(args, args.name, follow=not args.no_follow)


def cmd_stop(args: argparse.Namespace) -> int:
    res = call(args, "stop", {"name": args.name, "force": args.force}, timeout=None)
    print_json(res) if args.json else print(f"VM {res['name']}: {res['state']} ({res['reason']})")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    res = call(args, "rm", {"name": args.name})
    print_json(res) if args.json else print(f"VM {args.name} removed")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    res = call(args, "stats", {"name": args.name})
    print_json(res) if args.json else print(format_stats(res))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    try:
        while True:
            with Client(args.socket) as c:
                nodes = c.request("nodes")
                vms = c.request("list")
            screen = (
                f"dvmm cluster seen from {nodes['self']} at {time.strftime('%H:%M:%S')}"
                f"\n\n{format_nodes(nodes)}\n\n"
                + (format_vms(vms["vms"]) if vms["vms"] else "no VMs")
                + "\n"
            )
            if args.json:  # one snapshot for a machine
                print_json({"nodes": nodes, "vms": vms})
                return 0
            if args.once:
                print(screen, end="")
                return 0
            sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n(Ctrl-C to quit)\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


Handler = Callable[[argparse.Namespace], int]


def add_verb(
    subparsers: Any, name: str, help_: str, func: Handler, json_flag: bool = True, vm: bool = False
) -> argparse.ArgumentParser:
    """A verb that talks to the daemon: ``--socket``, ``--json`` and the VM name."""
    p: argparse.ArgumentParser = subparsers.add_parser(name, help=help_, description=help_)
    p.add_argument(
        "--socket",
        default=default_socket(),
        help=f"dvmmd API socket (default: $DVMM_SOCKET or {DEFAULT_SOCKET})",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    if vm:
        p.add_argument("name", help="VM name")
    p.set_defaults(func=func)
    return p


def _add_nodes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", help="comma-separated nodes to span (first = boot node)")


def _add_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=timeout_arg,
        default=0.0,
        metavar="SECONDS",
        help="stop the VM after SECONDS; 0 = no timeout (0)",
    )


def _add_console(p: argparse.ArgumentParser, after: str = "boot") -> None:
    p.add_argument(
        "--console",
        action="store_true",
        help=f"attach to the console after {after}; exit with the guest's status",
    )


def _node_list(text: str) -> list[str]:
    """``--nodes a,b`` as a list (blanks dropped)."""
    return [n.strip() for n in text.split(",") if n.strip()]


def register(subparsers: Any) -> None:
    """Add the VM and node verbs to dvmmctl's verbs."""

    def add(
        name: str, help_: str, func: Handler, json_flag: bool = True, vm: bool = False
    ) -> argparse.ArgumentParser:
        return add_verb(subparsers, name, help_, func, json_flag, vm)

    add("nodes", "list the cluster's nodes: state, offered and used resources", cmd_nodes)
    p = add("boot", "define and boot a VM on the cluster (placed by dvmmd)", cmd_boot, vm=True)
    # The same argument types, so the same checks and messages, as `dvmmctl run`.
    p.add_argument(
        "--vcpus", type=vcpus_arg, default=1, metavar="N", help=f"vCPUs, 1..{MAX_VCPUS} (1)"
    )
    p.add_argument(
        "--memory",
        type=memory_arg,
        default=256 << 20,
        metavar="SIZE",
        help="guest memory, e.g. 256M or 1G; a multiple of 4 KiB, at least 16M (256M)",
    )
    _add_nodes(p)
    p.add_argument("--kernel", help="kernel image (default: vm.kernel or the bundled guest)")
    p.add_argument("--initrd", help="initrd image")
    p.add_argument("--cmdline", help="kernel command line")
    _add_timeout(p)
    p.add_argument("--cpu", type=cpu_model_arg, default=None, metavar="MODEL", help=CPU_HELP)
    p.add_argument(
        "--foreign-budget",
        type=foreign_budget_arg,
        metavar="SIZE",
        help="memory aggregation: at most this much of other nodes' memory per node "
        "(default: half of the node's own share)",
    )
    p.add_argument(
        "--snapshot-every",
        type=snapshot_every_arg,
        default=None,
        metavar="SECONDS",
        help="snapshot the whole VM every SECONDS (each replaces the last); when a node "
        "other than the owner is lost, the VM is restored from the last one on the others",
    )
    p.add_argument(
        "--snapshot-dir",
        metavar="DIR",
        help="with --snapshot-every (root only): the snapshot directory, seen by every node "
        "(default: vm.snapshot_dir/NAME, else STATE_DIR/snapshots/NAME on the owner)",
    )
    _add_console(p)
    p = add(
        "start",
        "boot a defined VM again from its stored definition (after it stopped)",
        cmd_start,
        vm=True,
    )
    _add_console(p)
    p = add(
        "restore",
        "boot a new VM NAME from the snapshot in DIR (root; the snapshot's shape)",
        cmd_restore,
    )
    p.add_argument("dir", metavar="DIR", help="a snapshot directory (dvmmctl snapshot)")
    p.add_argument("name", help="VM name")
    _add_nodes(p)
    _add_timeout(p)
    _add_console(p, after="the restore")
    p = add(
        "drain",
        "move every running VM off NODE: snapshot, then restore on the VMs' other nodes",
        cmd_drain,
    )
    p.add_argument("node", metavar="NODE", help="the node to empty (not the VMs' owner)")
    add("list", "list the VMs of the whole cluster", cmd_list)
    add("status", "show a VM's state, placement and result", cmd_status, vm=True)
    p = add(
        "console",
        "attach to a VM's console (Ctrl-] detaches); once the VM ended, exit with the "
        "guest's status (--json: its final status at the end)",
        cmd_console,
        vm=True,
    )
    p.add_argument("--no-follow", action="store_true", help="print the log so far and exit")
    p.add_argument(
        "--input",
        metavar="TEXT",
        help="send TEXT to the guest's serial console first (non-interactive input)",
    )
    p = add("stop", "stop a VM (SIGTERM to its workers; --force kills them)", cmd_stop, vm=True)
    p.add_argument("--force", action="store_true", help="kill the workers immediately")
    add("rm", "remove a stopped VM's definition", cmd_rm, vm=True)
    add("stats", "show a VM's counters per node (coherence, exits, IPIs...)", cmd_stats, vm=True)
    p = add("top", "live view of nodes and VMs (--json: one snapshot)", cmd_top)
    p.add_argument("--interval", type=float, default=2.0, help="refresh every S seconds")
    p.add_argument("--once", action="store_true", help="print once and exit")
