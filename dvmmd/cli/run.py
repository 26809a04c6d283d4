"""``dvmmctl run``: boot one VM in the foreground, without a daemon.

One node: the native VMM runs in this process (dvmmd.worker.run_native), the console
on stdout. ``--nodes N`` / ``--netns``: one worker process per node on this machine
(dvmmd.launcher). Exit status: the guest's debug-exit status, 124 timeout, 130
interrupted, 1 for any other failure, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from dvmmd.cli.common import (
    CPU_HELP,
    PROG,
    CliError,
    cpu_model_arg,
    foreign_budget_arg,
    memory_arg,
    nodes_arg,
    timeout_arg,
    vcpus_arg,
)
from dvmmd.cli.snapshot_args import (
    add_snapshot_arguments,
    apply_restore,
    migration_plan,
    snapshot_plan,
)
from dvmmd.launcher import launch
from dvmmd.security.keys import DATA_PLANE_HELP, DATA_PLANE_MODES
from dvmmd.vm.spec import (
    DEFAULT_CMDLINE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    LAPIC_KINDS,
    MAX_VCPUS,
    SpecError,
    build_spec,
    exit_code,
)
from dvmmd.worker import NativeMissing, VmmHung, run_native


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "-"
    if isinstance(v, int):
        return f"{v:#x}" if v > 9 or v < 0 else str(v)
    return str(v)


def format_vcpu_dump(dump: Any) -> str:
    """Registers and exit reason of a crashed vCPU, whatever shape the VMM gave them."""
    if not isinstance(dump, dict):
        return f"  {dump}"
    lines: list[str] = []
    flat: list[tuple[str, Any]] = []
    for key, value in dump.items():
        if isinstance(value, dict):
            lines.append(f"  {key}:")
            items = list(value.items())
            for i in range(0, len(items), 4):
                lines.append(
                    "    " + "  ".join(f"{k}={_fmt_value(v)}" for k, v in items[i : i + 4])
                )
        elif isinstance(value, list):
            lines.append(f"  {key}: " + " ".join(_fmt_value(v) for v in value))
        else:
            flat.append((key, value))
    head = [f"  {k}: {_fmt_value(v)}" for k, v in flat]
    return "\n".join(head + lines)


def _flatten_stats(stats: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(stats, dict):
        out: list[tuple[str, Any]] = []
        for k, v in stats.items():
            out.extend(_flatten_stats(v, f"{prefix}{k}." if prefix or k else ""))
        return out
    return [(prefix.rstrip("."), stats)]


def format_stats(stats: Any) -> str:
    rows = _flatten_stats(stats)
    if not rows:
        return "stats: (none)"
    width = max(len(k) for k, _ in rows)
    return "stats:\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def describe_result(result: dict[str, Any], timeout_s: int = 0) -> str | None:
    """A one-paragraph explanation for a result that is not a clean pass."""
    reason = result.get("reason")
    error = result.get("error")
    if reason == "debug_exit":
        status = result.get("status")
        if status == 0:
            return None
        return f"the guest exited with status {status}" + (f" ({error})" if error else "")
    if reason in ("shutdown", "stopped"):
        return None if not error else f"the VM {reason}: {error}"
    if reason == "snapshot":
        print(f"{PROG}: the VM stopped after its snapshot in {error}", file=sys.stderr)
        return None
    if reason == "timeout":
        return f"the VM did not finish within its {timeout_s} s timeout" + (
            f": {error}" if error else ""
        )
    if reason == "crash":
        msg = f"the guest crashed: {error or 'no details'}"
        dump = result.get("vcpu_dump")
        if dump:
            msg += "\n" + format_vcpu_dump(dump)
        return msg
    return f"the VM failed: {error or reason}"


def run_vm_foreground(spec: dict[str, Any], *, show_json: bool, show_stats: bool) -> int:
    """Run ``spec`` with the console on stdout; report; return the exit status."""
    try:
        result = run_native(spec)
    except NativeMissing as e:
        raise CliError(str(e)) from None
    except VmmHung as e:
        _die(f"{PROG}: error: {e}", EXIT_ERROR)
    except KeyboardInterrupt:
        _die(f"\n{PROG}: interrupted: the VM was stopped", EXIT_INTERRUPTED)
    sys.stdout.flush()
    problem = describe_result(result, spec.get("timeout_s") or 0)
    if show_stats:
        print(format_stats(result.get("stats") or {}))
    if show_json:
        print(json.dumps(result, sort_keys=True))
    sys.stdout.flush()
    if problem:
        prefix = "" if result.get("reason") == "debug_exit" else "error: "
        print(f"{PROG}: {prefix}{problem}", file=sys.stderr)
    return exit_code(result)


def _die(message: str, code: int) -> None:
    """Report and end the process now: the VM thread may still be running."""
    sys.stdout.flush()
    print(message, file=sys.stderr)
    sys.stderr.flush()
    os._exit(code)


def _want_console_stdin(args: argparse.Namespace) -> bool:
    """--console-stdin / --no-console-stdin, else: when stdin is a terminal."""
    flag = getattr(args, "console_stdin", None)
    if flag is not None:
        return bool(flag)
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (OSError, ValueError):
        return False


def cmd_run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    args.snapshot = snapshot_plan(args, parser)
    args.migrate = migration_plan(args, parser)
    info = apply_restore(args, parser)
    args.restore_numa = info.numa if info is not None else None
    if (args.nodes > 1 or args.netns) and args.lapic == "kernel":
        parser.error("--lapic kernel: one node only (a distributed VM routes IPIs in userspace)")
    if args.nodes > 1 or args.netns:
        # One VM over N local worker processes (loopback or network namespaces).
        return run_nodes(args)
    try:
        spec = build_spec(
            vcpus=args.vcpus,
            memory=args.memory,
            kernel=args.kernel,
            initrd=args.initrd,
            cmdline=args.cmdline,
            console_log=args.console_log,
            console_stdout=True,
            timeout_s=args.timeout,
            console_stdin=_want_console_stdin(args),
            cpu=args.cpu,
            lapic=args.lapic,
            numa=args.restore_numa,
            snapshot=args.snapshot,
            restore=args.restore,
            control=args.control,
        )
    except SpecError as e:
        parser.error(str(e))
    return run_vm_foreground(spec, show_json=args.json, show_stats=args.stats)


def register(sub: Any) -> None:
    """Add ``run`` to dvmmctl's verbs."""
    p = sub.add_parser(
        "run",
        help="boot one VM in the foreground (no daemon) and exit with the guest's status",
        description=(
            "Boot one VM in the foreground, without a daemon: stream its serial console "
            "to stdout and exit with the status the guest writes to the debug-exit port "
            "(0xf4). Defaults to the bundled test guest."
        ),
    )
    p.add_argument(
        "--vcpus", type=vcpus_arg, default=1, metavar="N", help=f"vCPUs, 1..{MAX_VCPUS} (1)"
    )
    p.add_argument(
        "--memory",
        type=memory_arg,
        default=256 * 1024 * 1024,
        metavar="SIZE",
        help="guest memory, e.g. 256M or 1G; a multiple of 4 KiB, at least 16M (256M)",
    )
    p.add_argument(
        "--kernel",
        metavar="PATH",
        help="kernel: PVH ELF, Multiboot or Linux bzImage "
        "(default: $DVMM_GUEST or the bundled guest, guest/build/dvmm-guest)",
    )
    p.add_argument("--initrd", metavar="PATH", help="initrd (Linux) or first module (Multiboot)")
    p.add_argument(
        "--cmdline",
        default=DEFAULT_CMDLINE,
        metavar="STR",
        help=f"kernel command line ({DEFAULT_CMDLINE!r})",
    )
    p.add_argument("--console-log", metavar="PATH", help="also write the console to PATH")
    p.add_argument(
        "--console-stdin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="feed stdin to the guest's serial console (default: when stdin is a terminal; "
        "single-node runs only)",
    )
    p.add_argument(
        "--timeout",
        type=timeout_arg,
        default=0.0,
        metavar="SECONDS",
        help="stop the VM after SECONDS (exit 124); 0 = no timeout (0)",
    )
    p.add_argument(
        "--nodes",
        type=nodes_arg,
        default=1,
        metavar="N",
        help="local nodes (worker processes on 127.0.0.x) to spread the VM over, 1-16 (1)",
    )
    p.add_argument("--cpu", type=cpu_model_arg, default=None, metavar="MODEL", help=CPU_HELP)
    p.add_argument(
        "--lapic",
        choices=LAPIC_KINDS,
        default=None,
        help="local APIC: user = dvmm's (default; exact SDM behaviour, every node of a "
        "distributed VM), kernel = KVM's in-kernel LAPIC (one node only: IPIs, timer and "
        "HLT stay in the kernel, about twice as fast on PVM, with KVM's deviations from "
        "the SDM), auto = kernel on one node",
    )
    p.add_argument("--json", action="store_true", help="print the result JSON at the end")
    p.add_argument("--stats", action="store_true", help="print the VM's counters at the end")
    add_launcher_arguments(p)
    add_snapshot_arguments(p)
    p.set_defaults(func=cmd_run, parser=p)


# --------------------------------------------------------------------------- --nodes N


def launcher_options(args: argparse.Namespace) -> launch.Options:
    """The launcher's options from ``dvmmctl run``'s arguments (missing ones: defaults)."""
    d = launch.Options()
    return launch.Options(
        nodes=getattr(args, "nodes", d.nodes),
        vcpus=getattr(args, "vcpus", d.vcpus),
        memory=getattr(args, "memory", d.memory),
        kernel=getattr(args, "kernel", d.kernel),
        initrd=getattr(args, "initrd", d.initrd),
        cmdline=getattr(args, "cmdline", d.cmdline),
        console_log=getattr(args, "console_log", d.console_log),
        timeout=getattr(args, "timeout", d.timeout) or 0.0,
        netns=bool(getattr(args, "netns", d.netns)),
        base_port=getattr(args, "base_port", d.base_port),
        stats=bool(getattr(args, "stats", d.stats)),
        json=bool(getattr(args, "json", d.json)),
        foreign_budget=getattr(args, "foreign_budget", d.foreign_budget),
        hold_window_us=getattr(args, "hold_window_us", d.hold_window_us),
        prefetch_max_pages=getattr(args, "prefetch_max_pages", d.prefetch_max_pages),
        transport=getattr(args, "transport", d.transport),
        cpu=getattr(args, "cpu", d.cpu),
        data_plane=getattr(args, "data_plane", d.data_plane) or d.data_plane,
        snapshot=getattr(args, "snapshot", d.snapshot),
        restore=getattr(args, "restore", d.restore),
        restore_numa=getattr(args, "restore_numa", d.restore_numa),
        migrate=getattr(args, "migrate", d.migrate),
        control=getattr(args, "control", d.control),
    )


def run_nodes(args: argparse.Namespace) -> int:
    """Run ``dvmmctl run`` with ``args`` (``--nodes`` >= 1) and return the exit status.

    Reads ``args.nodes, vcpus, memory (bytes), kernel, initrd, cmdline,
    console_log, timeout (s), netns, base_port, foreign_budget (bytes), stats,
    json`` (missing ones take
    their defaults). Errors are printed as ``dvmmctl: error: ...``; a bad
    request calls ``args.parser.error`` when there is a parser (exit 2).
    """
    opts = launcher_options(args)
    try:
        return launch.Launcher(opts).run()
    except launch.UsageError as e:
        parser: argparse.ArgumentParser | None = getattr(args, "parser", None)
        if parser is not None:
            parser.error(str(e))
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except launch.LaunchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def _hold_arg(text: str) -> int:
    try:
        us = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid hold window {text!r}: not an integer") from None
    if not 0 <= us <= 100_000:
        raise argparse.ArgumentTypeError(f"hold window {us} us: must be 0..100000")
    return us


def _prefetch_arg(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid prefetch batch {text!r}: not an integer"
        ) from None
    if not 0 <= n <= launch.MAX_PREFETCH_PAGES:
        raise argparse.ArgumentTypeError(
            f"prefetch batch {n} pages: must be 0..{launch.MAX_PREFETCH_PAGES}"
        )
    return n


def _port_arg(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not an integer") from None
    if not 1 <= n <= 65535 - launch.MAX_NODES:
        raise argparse.ArgumentTypeError(f"port {n} out of range 1..{65535 - launch.MAX_NODES}")
    return n


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the multi-node options beyond ``dvmmctl run``'s own.

    ``dvmmctl run`` already has ``--nodes``, ``--vcpus``, ``--memory``,
    ``--kernel``, ``--initrd``, ``--cmdline``, ``--console-log``, ``--timeout``,
    ``--stats`` and ``--json``; this adds ``--netns``, ``--base-port`` and
    ``--foreign-budget``.
    """
    parser.add_argument(
        "--netns",
        action="store_true",
        help="with --nodes: put each node in its own network namespace, joined by veth "
        "links to a bridge, addresses 198.18.0.(i+1) (needs root and iproute2)",
    )
    parser.add_argument(
        "--base-port",
        type=_port_arg,
        default=None,
        metavar="PORT",
        help="with --nodes: node i listens on PORT+i (default: a free port per node; "
        f"{launch.NETNS_PORT} with --netns)",
    )
    parser.add_argument(
        "--foreign-budget",
        type=foreign_budget_arg,
        default=None,
        metavar="SIZE",
        help="with --nodes: memory aggregation: each node keeps at most SIZE of other "
        "nodes' memory resident, evicting the least recently faulted (clean first) back "
        "home, so it holds at most its share + SIZE (default: half of its share)",
    )
    parser.add_argument(
        "--hold-window-us",
        type=_hold_arg,
        default=None,
        metavar="US",
        help="with --nodes: keep a page just written here for up to US microseconds before "
        "giving it away (against ping-pong pages); 0 = plain invalidation protocol "
        "(default: 0, off: it did not gain in the perf suite)",
    )
    parser.add_argument(
        "--prefetch-max-pages",
        type=_prefetch_arg,
        default=None,
        metavar="N",
        help="with --nodes: sequential prefetch: when a node's reads of another node's "
        f"pages look sequential, request up to N (0..{launch.MAX_PREFETCH_PAGES}) following pages "
        "at once; 0 = off (default: the engine's)",
    )
    parser.add_argument(
        "--transport",
        choices=("tcp", "shm"),
        default="tcp",
        help="with --nodes: how the nodes' messages move: tcp (default) or shm (rings in "
        "shared memory, for nodes on one host; each node still keeps its own copy of "
        "guest memory; not with --netns)",
    )
    parser.add_argument(
        "--data-plane",
        choices=DATA_PLANE_MODES,
        default="encrypt",
        help="with --nodes: protection of the traffic between nodes: "
        + "; ".join(f"{m} = {h}" for m, h in DATA_PLANE_HELP.items()),
    )
