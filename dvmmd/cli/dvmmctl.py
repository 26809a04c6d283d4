"""``dvmmctl``, the dvmm command line: the parser of every verb, and error handling.

Each verb group registers itself from its module: doctor.py (``doctor``), run.py
(``run``), vms.py (``nodes``, ``boot``, ``list``, ``status``, ``console``, ``stop``,
``rm``, ``stats``, ``top``), demo.py (``demo``), certs.py (``cluster init`` /
``cluster add-node``), control.py (``snapshot``, ``migrate-vcpu``, ``placement``).

Errors are printed as ``dvmmctl: error: ...`` and never as a traceback (set
``DVMM_DEBUG=1`` to see one). Exit statuses: 0 success; 2 bad arguments; 1 any other
failure; ``run`` and ``console`` exit with the guest's status (common.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from dvmmd import __version__, native_version
from dvmmd.cli import certs, control, demo, doctor, run, vms
from dvmmd.cli.common import PROG, CliError
from dvmmd.vm.spec import EXIT_ERROR, EXIT_INTERRUPTED

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
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
    doctor.register(sub)
    run.register(sub)
    vms.register(sub)
    demo.register(sub)
    certs.register(sub)
    control.register(sub)
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
