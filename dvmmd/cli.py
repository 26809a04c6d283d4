"""``dvmmctl``: the dvmm command line.

Verbs defined here: ``doctor`` (can this host run dvmm?), ``run`` (boot one VM
in the foreground, without a daemon) and, as a fallback, ``demo``.

Cluster verbs (``boot``, ``list``, ``status``, ``nodes``, ``demo``, ...) come
from ``dvmmd.cluster_cli`` when that module exists. Its contract:

    def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None

adds one sub-parser per verb (``subparsers.add_parser(NAME, help=ONE_LINE,
description=...)``) and sets ``func`` on each with ``set_defaults(func=handler)``,
where ``handler(args: argparse.Namespace) -> int`` returns the exit status.
Handlers may raise ``dvmmd.cli.CliError`` for a clear one-line error (exit 1),
or call ``parser.error`` for a usage error (exit 2). If ``cluster_cli``
registers ``demo``, its demo (a local multi-node cluster) is the one ``make demo``
runs; until then ``demo`` here boots the bundled guest on one node with 2 vCPUs.

Errors are printed as ``dvmmctl: error: ...`` and never as a traceback
(set ``DVMM_DEBUG=1`` to see one). Exit statuses: 0 success; 2 bad arguments;
for ``run``: the guest's debug-exit status, 124 timeout, 130 interrupted,
1 for any other failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dvmmd import __version__
from dvmmd.sizes import SizeError, format_size, parse_guest_memory
from dvmmd.vmspec import (
    CPU_MODEL_HELP,
    CPU_MODELS,
    DEFAULT_CMDLINE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    LAPIC_KINDS,
    MAX_VCPUS,
    SpecError,
    build_spec,
    check_cpu_model,
    exit_code,
)

__all__ = ["CliError", "build_parser", "main"]

PROG = "dvmmctl"

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """An error to report as ``dvmmctl: error: <message>`` with exit status 1."""


# --------------------------------------------------------------------------- argument types


def vcpus_arg(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid vCPU count {text!r}: not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"a VM needs at least 1 vCPU, not {n}")
    if n > MAX_VCPUS:
        raise argparse.ArgumentTypeError(
            f"{n} vCPUs is more than dvmm supports (at most {MAX_VCPUS})"
        )
    return n


def memory_arg(text: str) -> int:
    try:
        return parse_guest_memory(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def nodes_arg(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid node count {text!r}: not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"a VM runs on at least 1 node, not {n}")
    return n


def timeout_arg(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: not a number") from None
    if not t >= 0 or t == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: use 0 (none) or seconds")
    return t


def cpu_model_arg(text: str) -> str:
    try:
        return check_cpu_model(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


CPU_HELP = (
    "CPU model for the guest (every node gets the same): "
    + "; ".join(f"{m} = {CPU_MODEL_HELP[m]}" for m in CPU_MODELS)
    + ". Default: baseline on a KVM PVM host, host on a VT-x/AMD-V host "
    "(`dvmmctl doctor` shows this host's)"
)


# --------------------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    from dvmmd import doctor

    return doctor.main(as_json=args.json)


# --------------------------------------------------------------------------- run


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
    from dvmmd.worker import NativeMissing, VmmHung, run_native

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
    if (args.nodes > 1 or args.netns) and args.lapic == "kernel":
        parser.error("--lapic kernel: one node only (a distributed VM routes IPIs in userspace)")
    if args.nodes > 1 or args.netns:
        # One VM over N local worker processes (loopback or network namespaces).
        from dvmmd import localcluster

        return localcluster.run(args)
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
        )
    except SpecError as e:
        parser.error(str(e))
    return run_vm_foreground(spec, show_json=args.json, show_stats=args.stats)


# --------------------------------------------------------------------------- demo (fallback)

DEMO_VCPUS = 2
DEMO_MEMORY = 256 * 1024 * 1024
DEMO_TIMEOUT_S = 600


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        spec = build_spec(
            vcpus=DEMO_VCPUS,
            memory=DEMO_MEMORY,
            cmdline=DEFAULT_CMDLINE,
            timeout_s=DEMO_TIMEOUT_S,
        )
    except SpecError as e:
        raise CliError(str(e)) from None
    print(
        f"dvmm demo: booting the bundled guest ({spec['kernel']}) on one node with "
        f"{DEMO_VCPUS} vCPUs and {format_size(DEMO_MEMORY)} of memory, "
        f"cmdline {spec['cmdline']!r}",
        flush=True,
    )
    code = run_vm_foreground(spec, show_json=False, show_stats=args.stats)
    print(f"dvmm demo: the guest exited with status {code}", flush=True)
    return code


# --------------------------------------------------------------------------- parser


def _add_run_parser(sub: Any) -> None:
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
    from dvmmd import localcluster

    localcluster.add_arguments(p)
    p.set_defaults(func=cmd_run, parser=p)


def _register_cluster_verbs(sub: Any) -> None:
    try:
        cluster_cli = importlib.import_module("dvmmd.cluster_cli")
    except ModuleNotFoundError as e:
        if e.name == "dvmmd.cluster_cli":
            return  # not written yet: this module's own `demo` is used
        print(f"{PROG}: warning: cluster verbs unavailable: {e}", file=sys.stderr)
        return
    except Exception as e:  # noqa: BLE001 - a broken cluster_cli must not take run/doctor down
        print(f"{PROG}: warning: cluster verbs unavailable: {e}", file=sys.stderr)
        return
    register: Callable[[Any], None] | None = getattr(cluster_cli, "register", None)
    if register is None:
        return
    try:
        register(sub)
    except Exception as e:  # noqa: BLE001 - as above
        print(f"{PROG}: warning: cluster verbs unavailable: {e}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from dvmmd import native_version

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="dvmm: a distributed virtual machine monitor. "
        "Run `dvmmctl VERB --help` for a verb's options.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PROG} {__version__} (native: {native_version() or 'not built'})",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    sub.required = True

    p = sub.add_parser(
        "doctor",
        help="check whether this host can run dvmm and what kind of host it is",
        description="Check /dev/kvm, the KVM capabilities dvmm needs, hardware "
        "virtualization or PVM, userfaultfd and memfd. Exit 0 when dvmm can run.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    _add_run_parser(sub)
    _register_cluster_verbs(sub)

    if "demo" not in sub.choices:
        p = sub.add_parser(
            "demo",
            help="boot the bundled guest on one node with 2 vCPUs and show its results",
            description="The embedded default: boot the bundled test guest on one node "
            "with 2 vCPUs and 256M, streaming its results.",
        )
        p.add_argument("--stats", action="store_true", help="print the VM's counters at the end")
        p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        func: Handler = args.func
        return func(args)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error worth a traceback.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_ERROR
    except Exception as e:
        if os.environ.get("DVMM_DEBUG"):
            raise
        print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    # Run the canonical dvmmd.cli (not this __main__ copy), so that modules
    # importing dvmmd.cli (cluster_cli's CliError) share its classes.
    from dvmmd.cli import main as _main

    sys.exit(_main())
