"""What every ``dvmmctl`` verb shares: the error type and the argument types.

A verb's handler takes the parsed ``argparse.Namespace`` and returns the exit status.
It raises `CliError` for a clear one-line error (``dvmmctl: error: ...``, exit 1) or
calls ``parser.error`` for a usage error (exit 2). Counts, sizes, durations and CPU
models are checked here, once, for every verb that takes them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dvmmd.vm.sizes import PAGE_SIZE, SizeError, parse_guest_memory, parse_size
from dvmmd.vm.spec import CPU_MODEL_HELP, CPU_MODELS, MAX_VCPUS, SpecError, check_cpu_model

PROG = "dvmmctl"


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


def foreign_budget_arg(text: str) -> int:
    """Memory aggregation's bound: a size of at least one 4 KiB page."""
    try:
        n = parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"--foreign-budget {text}: at least one 4 KiB page")
    return n


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))
