"""The daemon-facing ``dvmmctl`` verbs: nodes, boot, list, status, console, stop, rm,
stats, top, demo; and ``cluster init`` / ``cluster add-node`` (certificates, pki.py).

They talk to the local dvmmd over its unix socket (api.py): ``--socket PATH``, else
``$DVMM_SOCKET``, else /run/dvmmd/dvmmd.sock. `register` adds them to the main parser
(dvmmd/cli.py); ``python -m dvmmd.cluster_cli`` runs them on their own.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from .cli import CliError
from .config import DEFAULT_SOCKET
from .images import BootFileError, open_boot_files, send_request
from .sizes import SizeError, format_size, parse_size

DETACH_KEY = b"\x1d"  # Ctrl-]


def default_socket() -> str:
    return os.environ.get("DVMM_SOCKET") or DEFAULT_SOCKET


# --------------------------------------------------------------------------- client


class Client:
    """One JSON-lines connection to a daemon's API socket."""

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            raise CliError(
                f"cannot reach dvmmd: no socket at {path} (is dvmmd running? "
                "`systemctl start dvmmd`, or pass --socket / set DVMM_SOCKET)"
            ) from None
        except PermissionError:
            raise CliError(
                f"cannot reach dvmmd at {path}: permission denied (run as root or "
                "as a member of the socket's group)"
            ) from None
        except OSError as e:
            raise CliError(f"cannot reach dvmmd at {path}: {e.strerror or e}") from None
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, op: str, args: dict[str, Any], fds: Sequence[int] = ()) -> None:
        # `fds` (boot files opened with the user's rights) ride on the request's bytes.
        send_request(self.sock, json.dumps({"op": op, "args": args}).encode() + b"\n", fds)

    def read_message(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise CliError("dvmmd did not answer in time") from None
            if not chunk:
                raise CliError("dvmmd closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise CliError("malformed reply from dvmmd")
        return msg

    def request(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        fds: Sequence[int] = (),
    ) -> Any:
        self.send(op, args or {}, fds)
        while True:
            msg = self.read_message()
            if "event" in msg:
                if on_event is not None:
                    on_event(msg)
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise CliError(str(msg.get("error") or "request failed"))


def call(
    args: argparse.Namespace,
    op: str,
    params: dict[str, Any] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = 60.0,
    fds: Sequence[int] = (),
) -> Any:
    with Client(args.socket, timeout) as c:
        return c.request(op, params, on_event, fds)


# --------------------------------------------------------------------------- formatting


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
    result = v.get("result")
    if result:
        lines.append(
            f"result:   {result.get('reason')} status={result.get('status')}"
            + (f" error={result['error']}" if result.get("error") else "")
        )
    return "\n".join(lines)


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


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- verbs


def cmd_nodes(args: argparse.Namespace) -> int:
    res = call(args, "nodes")
    _print_json(res) if args.json else print(format_nodes(res))
    return 0


def _progress_printer() -> Callable[[dict[str, Any]], None]:
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
        params["nodes"] = [n.strip() for n in args.nodes.split(",") if n.strip()]
    # The daemon (root) reads the kernel/initrd only through descriptors we opened with
    # our own rights (images.py): a path alone is refused for non-root users.
    try:
        fds = open_boot_files(params)
    except BootFileError as e:
        raise CliError(str(e)) from None
    try:
        progress = None if args.json else _progress_printer()
        res = call(args, "boot", params, progress, timeout=None, fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    if args.json:
        _print_json(res)
    else:
        print(f"VM {res['name']}: {res['state']} on {_nodes_of(res)}")
    if args.console:
        return _console(args, args.name, follow=True)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    res = call(args, "list")
    if args.json:
        _print_json(res)
        return 0
    print(format_vms(res["vms"]) if res["vms"] else "no VMs")
    for u in res["unreachable"]:
        print(f"warning: could not ask {u}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    res = call(args, "status", {"name": args.name})
    _print_json(res) if args.json else print(format_status(res))
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


def _console(args: argparse.Namespace, name: str, follow: bool) -> int:
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
                    return 0
        except KeyboardInterrupt:
            print(f"\n[detached from {name}; the VM keeps running]", file=sys.stderr)
            return 0
        finally:
            if saved is not None:
                import termios

                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def cmd_console(args: argparse.Namespace) -> int:
    return _console(args, args.name, follow=not args.no_follow)


def cmd_stop(args: argparse.Namespace) -> int:
    res = call(args, "stop", {"name": args.name, "force": args.force}, timeout=None)
    _print_json(res) if args.json else print(f"VM {res['name']}: {res['state']} ({res['reason']})")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    call(args, "rm", {"name": args.name})
    print(f"VM {args.name} removed")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    res = call(args, "stats", {"name": args.name})
    _print_json(res) if args.json else print(format_stats(res))
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
            if args.once:
                print(screen, end="")
                return 0
            sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n(Ctrl-C to quit)\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


# --------------------------------------------------------------------------- demo


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


class LocalCluster:
    """N dvmmd processes on loopback addresses with a generated secret (demo, tests).

    Secret mode (pki.py): every daemon derives the cluster CA from the secret and issues
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
                f'[worker]\ndata_ports = "{dp}-{dp + 16}"\n{extra}'
            )
            self.configs.append(cfg)
            self.sockets.append(str(state / "dvmmd.sock"))

    def start(self) -> None:
        env = dict(os.environ)  # run this very package, installed or not
        pkg_parent = str(Path(__file__).resolve().parent.parent)
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
    from .vmmanager import multinode_supported
    from .vmspec import SpecError, find_bundled_guest

    try:
        kernel = str(find_bundled_guest())
    except SpecError as e:
        raise CliError(f"demo: {e}") from None
    multi, why = multinode_supported("auto")
    cluster = LocalCluster(2)
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
            f"{args.memory} {where}",
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
            _progress_printer(),
            timeout=None,
        )
        print(f"dvmm demo: VM demo is {res['state']}; console:", flush=True)
        _console(ns, "demo", follow=True)
        st = cluster.request(0, "status", {"name": "demo"})
        print(format_status(st))
        print(format_stats(cluster.request(0, "stats", {"name": "demo"})))
        result = st.get("result") or {}
        ok = result.get("reason") == "debug_exit" and result.get("status") == 0
        code = 0 if ok else 1
        print(f"dvmm demo: {'PASS' if ok else 'FAIL'}: {st['reason']}")
    finally:
        print("dvmm demo: stopping the daemons", flush=True)
        cluster.stop(keep=args.keep)
    return code


# --------------------------------------------------------------------------- certificates

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


def cmd_cluster_init(args: argparse.Namespace) -> int:
    from .pki import PkiError, init_cluster

    directory = Path(args.dir)
    try:
        written = init_cluster(directory, args.node, days=args.days, force=args.force)
    except PkiError as e:
        raise CliError(str(e)) from None
    print(_pki_report(directory, args.node, written, first=True))
    return 0


def cmd_cluster_add_node(args: argparse.Namespace) -> int:
    from .pki import PkiError, add_node

    directory = Path(args.dir)
    try:
        written = add_node(directory, args.name, days=args.days, force=args.force)
    except PkiError as e:
        raise CliError(str(e)) from None
    print(_pki_report(directory, args.name, written, first=False))
    return 0


def _register_cluster_pki(subparsers: Any) -> None:
    from .pki import NODE_DAYS

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


# --------------------------------------------------------------------------- parser

Handler = Callable[[argparse.Namespace], int]


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(subparsers: Any) -> None:
    """Add the cluster verbs to the main `dvmmctl` parser."""

    def add(
        name: str, help_: str, func: Handler, json_flag: bool = True, vm: bool = False
    ) -> argparse.ArgumentParser:
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

    add("nodes", "list the cluster's nodes: state, offered and used resources", cmd_nodes)
    p = add("boot", "define and boot a VM on the cluster (placed by dvmmd)", cmd_boot, vm=True)
    p.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    p.add_argument("--memory", type=_size, default=256 << 20, help="RAM, e.g. 256M (default)")
    p.add_argument("--nodes", help="comma-separated nodes to span (first = boot node)")
    p.add_argument("--kernel", help="kernel image (default: vm.kernel or the bundled guest)")
    p.add_argument("--initrd", help="initrd image")
    p.add_argument("--cmdline", help="kernel command line")
    p.add_argument("--timeout", type=float, default=0, help="stop the VM after S seconds")
    p.add_argument(
        "--cpu",
        help="CPU model: host or baseline (default: the safe one for the host kind, "
        "see `dvmmctl doctor`); the same on every node",
    )
    p.add_argument(
        "--foreign-budget",
        type=_size,
        help="memory aggregation: at most this much of other nodes' memory per node "
        "(default: half of the node's own share)",
    )
    p.add_argument("--console", action="store_true", help="attach to the console after boot")
    add("list", "list the VMs of the whole cluster", cmd_list)
    add("status", "show a VM's state, placement and result", cmd_status, vm=True)
    p = add(
        "console",
        "attach to a VM's console (Ctrl-] detaches)",
        cmd_console,
        json_flag=False,
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
    add("rm", "remove a stopped VM's definition", cmd_rm, json_flag=False, vm=True)
    add("stats", "show a VM's counters per node (coherence, exits, IPIs...)", cmd_stats, vm=True)
    p = add("top", "live view of nodes and VMs", cmd_top, json_flag=False)
    p.add_argument("--interval", type=float, default=2.0, help="refresh every S seconds")
    p.add_argument("--once", action="store_true", help="print once and exit")
    p = subparsers.add_parser(
        "demo",
        help="run a local 2-node cluster and boot the bundled guest on it",
        description="start two dvmmd daemons on "
        "loopback, boot the bundled guest, stream its console, print "
        "per-node counters, tear everything down",
    )
    p.add_argument("--vcpus", type=int, default=2, help="vCPUs (default 2)")
    p.add_argument("--memory", default="256M", help="RAM (default 256M)")
    p.add_argument("--cmdline", default=None, help="guest command line")
    p.add_argument("--timeout", type=float, default=600, help="VM timeout in seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    p.set_defaults(func=cmd_demo)
    _register_cluster_pki(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dvmmctl")
    sub = parser.add_subparsers(dest="verb", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except CliError as e:
        print(f"dvmmctl: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
