"""``dvmmctl cluster init`` / ``cluster add-node``: the cluster CA and node certificates.

Run on one admin machine; each node's files are then copied to it (README:
certificates). The certificates themselves are made by dvmmd.security.pki.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dvmmd.cli.common import CliError, print_json
from dvmmd.security.pki import NODE_DAYS, PkiError, add_node, init_cluster

DEFAULT_PKI_DIR = "/etc/dvmmd/tls"


def _pki_report(directory: Path, node: str, written: list[Path], first: bool) -> str:
    d = directory.resolve()
    lines = [f"wrote {', '.join(p.name for p in written)} in {d}"]
    if first:
        lines.append(
            f"  ca.key signs new nodes: keep it on this machine only (mode 0600); "
            f"issue more with `dvmmctl cluster add-node NAME --dir {d}`"
        )
    lines += [
        (
            f"  copy ca.crt, {node}.crt and {node}.key (mode 0600) to node {node}'s "
            f"{DEFAULT_PKI_DIR}/, and put this in its dvmmd.toml instead of cluster.secret_file:"
        ),
        "",
        "[tls]",
        f'ca_file = "{DEFAULT_PKI_DIR}/ca.crt"',
        f'cert_file = "{DEFAULT_PKI_DIR}/{node}.crt"',
        f'key_file = "{DEFAULT_PKI_DIR}/{node}.key"',
    ]
    return "\n".join(lines)


def _report(
    args: argparse.Namespace, directory: Path, node: str, written: list[Path], first: bool
) -> None:
    if args.json:
        print_json(
            {"dir": str(directory.resolve()), "node": node, "written": [str(p) for p in written]}
        )
    else:
        print(_pki_report(directory, node, written, first))


def cmd_cluster_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        written = init_cluster(directory, args.node, days=args.days, force=args.force)
    except PkiError as e:
        raise CliError(str(e)) from None
    _report(args, directory, args.node, written, first=True)
    return 0


def cmd_cluster_add_node(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        written = add_node(directory, args.name, days=args.days, force=args.force)
    except PkiError as e:
        raise CliError(str(e)) from None
    _report(args, directory, args.name, written, first=False)
    return 0


def register(subparsers: Any) -> None:
    """Add ``cluster init`` and ``cluster add-node`` to dvmmctl's verbs."""
    p = subparsers.add_parser(
        "cluster",
        help="certificates for a real cluster: init (CA + first node), add-node",
        description="Create and extend the cluster CA that gives every node its own "
        "identity on the control plane (mutual TLS). Run it on one admin machine; "
        "copy each node's files to it (README: certificates).",
    )
    sub = p.add_subparsers(dest="cluster_verb", metavar="VERB", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--dir",
            default=DEFAULT_PKI_DIR,
            help=f"directory of the CA and the node files (default {DEFAULT_PKI_DIR})",
        )
        q.add_argument(
            "--days",
            type=int,
            default=NODE_DAYS,
            help=f"validity of the node certificate in days (default {NODE_DAYS})",
        )
        q.add_argument("--force", action="store_true", help="overwrite existing files")
        q.add_argument("--json", action="store_true", help="machine-readable output")

    q = sub.add_parser(
        "init",
        help="create the cluster CA and the first node's key and certificate",
        description="Create ca.key/ca.crt and NODE.key/NODE.crt in --dir.",
    )
    q.add_argument("--node", required=True, help="name of the first node (its node.name)")
    common(q)
    q.set_defaults(func=cmd_cluster_init)
    q = sub.add_parser(
        "add-node",
        help="issue a key and certificate for another node, signed by the cluster CA",
        description="Create NAME.key/NAME.crt in --dir, signed with --dir's ca.key.",
    )
    q.add_argument("name", help="the node's name (its node.name)")
    common(q)
    q.set_defaults(func=cmd_cluster_add_node)
