"""``dvmmctl demo``: a local 2-node cluster of real daemons running the bundled guest.

`LocalDaemons` starts N ``dvmmd`` processes on 127.0.0.x with a generated secret
(also used by tests); ``demo`` boots the bundled guest across both nodes, streams
its console, prints the per-node counters and tears everything down. ``make demo``
runs it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dvmmd.cli.client import Client, call
from dvmmd.cli.common import CliError, memory_arg, print_json, timeout_arg, vcpus_arg
from dvmmd.cli.vms import console, format_nodes, format_stats, format_status, progress_printer
from dvmmd.vm.sizes import format_size
from dvmmd.vm.spec import SpecError, find_bundled_guest
from dvmmd.worker import multinode_supported


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise CliError(f"demo: timed out waiting for {what}")


class LocalDaemons:
    """N dvmmd processes on loopback addresses with a generated secret (demo, tests).

    Secret mode (dvmmd.security.pki): every daemon derives the cluster CA from the secret and issues
    itself a certificate, so the control plane is mutual TLS as in a real cluster.
    ``data_plane`` sets cluster.data_plane (default: the daemon's, ``encrypt``).
    """

    def __init__(
        self,
        n: int = 2,
        base: Path | None = None,
        extra: str = "",
        heartbeat: float = 0.5,
        timeout: float = 3.0,
        data_plane: str | None = None,
    ) -> None:
        self.dir = base or Path(tempfile.mkdtemp(prefix="dvmm-demo-"))
        self.names = [f"node{i + 1}" for i in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        secret = self.dir / "secret"
        self.secret_path = secret
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        plane = f'data_plane = "{data_plane}"\n' if data_plane else ""
        hosts = [f"127.0.0.{i + 1}" for i in range(n)]
        ports = [_free_port(h) for h in hosts]
        self.configs = []
        self.sockets = []
        for i, name in enumerate(self.names):
            state = self.dir / name
            state.mkdir(exist_ok=True)
            peers = ", ".join(f'"{hosts[j]}:{ports[j]}"' for j in range(n) if j != i)
            dp = _free_port(hosts[i])
            while dp <= ports[i] <= dp + 16:  # worker.data_ports must not hold node.listen
                dp = _free_port(hosts[i])
            cfg = state / "dvmmd.toml"
            cfg.write_text(
                f'[node]\nname = "{name}"\nlisten = "{hosts[i]}:{ports[i]}"\n'
                f'state_dir = "{state}"\nvcpus = 2\nmemory = "1G"\n\n'
                f'[cluster]\nsecret_file = "{secret}"\n{plane}peers = [{peers}]\n'
                f"heartbeat_interval = {heartbeat}\nfailure_timeout = {timeout}\n\n"
                f'[worker]\ndata_ports = "{dp}-{dp + 16}"\n\n'
                f'[api]\nsocket = "{state / "dvmmd.sock"}"\n{extra}'
            )
            self.configs.append(cfg)
            self.sockets.append(str(state / "dvmmd.sock"))

    def start(self) -> None:
        env = dict(os.environ)  # run this very package, installed or not
        pkg_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
        for name, cfg in zip(self.names, self.configs):
            log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 -- owned by the child
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dvmmd.daemon", "--config", str(cfg)],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            )
            log.close()

    def request(self, i: int, op: str, args: dict[str, Any] | None = None) -> Any:
        with Client(self.sockets[i], 30.0) as c:
            return c.request(op, args)

    def all_alive(self) -> bool:
        try:
            return all(
                sum(1 for n in self.request(i, "nodes")["nodes"] if n["state"] == "alive")
                == len(self.names)
                for i in range(len(self.names))
            )
        except (CliError, OSError):
            return False

    def stop(self, keep: bool = False) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        kernel = str(find_bundled_guest())
    except SpecError as e:
        raise CliError(f"demo: {e}") from None
    multi, why = multinode_supported("auto")
    cluster = LocalDaemons(2)
    print(
        f"dvmm demo: starting 2 dvmmd daemons on 127.0.0.1/127.0.0.2 (state in {cluster.dir})",
        flush=True,
    )
    code = 1
    try:
        cluster.start()
        _wait(lambda: all(os.path.exists(s) for s in cluster.sockets), 20, "the daemons")
        _wait(cluster.all_alive, 20, "both nodes to see each other")
        print(format_nodes(cluster.request(0, "nodes")), flush=True)
        nodes = cluster.names if multi else cluster.names[:1]
        where = (
            "across both nodes"
            if multi
            else f"on {nodes[0]} only (multi-node VMs unavailable: {why})"
        )
        print(
            f"dvmm demo: booting the bundled guest ({kernel}) with {args.vcpus} vCPUs, "
            f"{format_size(args.memory)} {where}",
            flush=True,
        )
        ns = argparse.Namespace(socket=cluster.sockets[0])
        res = call(
            ns,
            "boot",
            {
                "name": "demo",
                "vcpus": args.vcpus,
                "memory": args.memory,
                "kernel": kernel,
                "nodes": nodes,
                "cmdline": args.cmdline,
                "timeout_s": args.timeout,
            },
            progress_printer(),
            timeout=None,
        )
        print(f"dvmm demo: VM demo is {res['state']}; console:", flush=True)
        console(ns, "demo", follow=True)
        st = cluster.request(0, "status", {"name": "demo"})
        stats = cluster.request(0, "stats", {"name": "demo"})
        print(format_status(st))
        print(format_stats(stats))
        result = st.get("result") or {}
        ok = result.get("reason") == "debug_exit" and result.get("status") == 0
        code = 0 if ok else 1
        print(f"dvmm demo: {'PASS' if ok else 'FAIL'}: {st['reason']}")
        if args.json:
            print_json({"ok": ok, "status": st, "stats": stats})
    finally:
        print("dvmm demo: stopping the daemons", flush=True)
        cluster.stop(keep=args.keep)
    return code


def register(subparsers: Any) -> None:
    """Add ``demo`` to dvmmctl's verbs."""
    p = subparsers.add_parser(
        "demo",
        help="run a local 2-node cluster and boot the bundled guest on it",
        description="start two dvmmd daemons on "
        "loopback, boot the bundled guest, stream its console, print "
        "per-node counters, tear everything down",
    )
    p.add_argument("--vcpus", type=vcpus_arg, default=2, metavar="N", help="vCPUs (2)")
    p.add_argument(
        "--memory", type=memory_arg, default=256 << 20, metavar="SIZE", help="RAM (256M)"
    )
    p.add_argument("--cmdline", default=None, help="guest command line")
    p.add_argument(
        "--timeout", type=timeout_arg, default=600.0, metavar="SECONDS", help="VM timeout (600)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    p.add_argument(
        "--json", action="store_true", help="print the VM's final status and counters as JSON"
    )
    p.set_defaults(func=cmd_demo)
