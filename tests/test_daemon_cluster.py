"""Real dvmmd processes on loopback: membership, authentication, faults, VM lifecycle.

Each test starts `python -m dvmmd.daemon --config ...` processes with temporary configs
and random ports and drives them with `dvmmctl` (python -m dvmmd.cli). VM lifecycle
tests use a stand-in worker (FAKE_WORKER below, no KVM needed) so that placement,
spawning, console, stop and failure handling are tested everywhere; the test with the
tests with the bundled guest need dvmmd._native and guest/build/dvmm-guest (conftest:
their absence is a failure, as `make test` builds both).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_guest, require_native
from prometheus_client.parser import text_string_to_metric_families

from dvmmd.cli.client import Client

ROOT = Path(__file__).resolve().parent.parent
HB = 0.2
TIMEOUT = 1.5
KERNEL = os.path.realpath(sys.executable)  # any ELF passes the spec check for the fake

FAKE_WORKER = r'''
"""Stand-in VMM worker: SPEC.json RESULT.json; options in the spec's cmdline."""
import json, os, signal, sys, time

spec = json.load(open(sys.argv[1]))
result_path = sys.argv[2]
opts = dict(t.partition("=")[::2] for t in spec["cmdline"].split())
idx = (spec.get("cluster") or {}).get("node_index", 0)
cpus = spec["numa"][idx]["cpus"]
log = open(spec["console_log"], "a", buffering=1)

def stats(n):
    """Counters in the real worker's shape (a `dvmmctl run --nodes 2 --json` node's
    stats, trimmed): VM exits at the top, the DSM engine's under "dsm"."""
    log2 = [0] * 24
    log2[7], log2[8], log2[10] = 1, n, 1  # 64-128 us, 128-256 us, 512 us-1 ms
    return {
        "exits": {"hlt": 32 + n, "msr": 118}, "exits_total": 150 + n, "per_vcpu_exits": [150 + n],
        "run_ms": 810.5, "ipis_sent": 2,
        "dsm": {
            "read_faults": n, "write_faults": 9, "pages_sent": 100 + n, "remote_faults": 2 + n,
            "fault_mean_ns": 293378, "fault_p50_ns": 165887, "fault_p90_ns": 629759,
            "fault_p99_ns": 1033215, "fault_p999_ns": 1033215, "fault_max_ns": 1033215,
            "latency_us_log2": log2,
            "latency_ns_hdr": [[90879, 1]] + [[165887, 1]] * n + [[1033215, 1]],
        },
    }

def finish(reason, status=None, error=None):
    with open(result_path + ".tmp", "w") as f:
        json.dump({"reason": reason, "status": status, "error": error, "vcpu_dump": None,
                   "stats": stats(10 + idx)}, f)
    os.replace(result_path + ".tmp", result_path)
    sys.exit(0)

signal.signal(signal.SIGTERM, lambda *a: finish("stopped"))
with open(result_path + ".stats", "w") as f:
    json.dump(stats(idx), f)
log.write(f"fake guest on node {idx}: vcpus {cpus}, cluster={spec['cluster'] is not None}\n")
if "--key-stdin" in sys.argv:  # multi-node: this node's private key arrives on stdin
    from dvmmd.security.keys import public_of
    key = sys.stdin.readline().strip()
    ok = public_of(key) == spec["cluster"]["node_pubkeys_hex"][idx]
    log.write(f"data-path key on stdin matches node_pubkeys_hex[{idx}]: {ok}\n")
for i in range(int(float(opts.get("sleep", "0")) * 10)):
    if i % 10 == 0:
        log.write(f"tick {i // 10}\n")
    time.sleep(0.1)
log.write("0 failed\n")
finish("debug_exit", int(opts.get("exit", "0")))
'''


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Node:
    def __init__(self, base: Path, name: str, host: str, secret: Path) -> None:
        self.name = name
        self.host = host
        self.port = free_port(host)
        self.dir = base / name
        self.dir.mkdir()
        self.secret = secret
        self.config = self.dir / "dvmmd.toml"
        self.socket = str(self.dir / "dvmmd.sock")
        self.logfile = self.dir / "dvmmd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def write_config(
        self,
        peers: list[str],
        seed: str | None = None,
        extra: str = "",
        vcpus: int = 2,
        fake_worker: bool = True,
        cluster_extra: str = "",
    ) -> None:
        """Fake worker (multi-node on) by default; else the real one, multi-node "auto"."""
        dp = free_port(self.host)
        while dp <= self.port <= dp + 8:  # the data ports must not include node.listen's
            dp = free_port(self.host)
        worker = (
            f'command = ["{sys.executable}", "{self.dir.parent / "fake.py"}"]\nmulti_node = true\n'
            if fake_worker
            else 'multi_node = "auto"\n'
        )
        self.config.write_text(
            f'[node]\nname = "{self.name}"\nlisten = "{self.addr}"\n'
            f'state_dir = "{self.dir}"\nvcpus = {vcpus}\nmemory = "1G"\nlog_level = "debug"\n'
            f'\n[cluster]\nsecret_file = "{self.secret}"\n{cluster_extra}'
            f"peers = {json.dumps(peers)}\n"
            + (f'seed = "{seed}"\n' if seed else "")
            + f"heartbeat_interval = {HB}\nfailure_timeout = {TIMEOUT}\n"
            f'\n[worker]\n{worker}data_ports = "{dp}-{dp + 8}"\nstop_grace = 2\n'
            + self._with_socket(extra)
        )

    def _with_socket(self, extra: str) -> str:
        """``extra`` with ``api.socket`` = this node's socket, unless it sets one (the
        default, /run/dvmmd/dvmmd.sock, is the system daemon's)."""
        if "[api]" not in extra:
            return extra + f'\n[api]\nsocket = "{self.socket}"\n'
        if "socket =" in extra.split("[api]", 1)[1].split("\n[", 1)[0]:
            return extra
        return extra.replace("[api]\n", f'[api]\nsocket = "{self.socket}"\n', 1)

    def start(self, **env_extra: str) -> None:
        assert self.proc is None or self.proc.poll() is not None
        env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dvmmd.daemon", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        wait_for(
            lambda: self.ping() or self.proc is None or self.proc.poll() is not None,
            15,
            f"{self.name} to serve its API",
        )
        assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"

    def ping(self) -> bool:
        try:
            with Client(self.socket, 2.0) as c:
                c.request("ping")
            return True
        except Exception:  # noqa: BLE001 -- not up yet
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def req(self, op: str, **args: Any) -> Any:
        with Client(self.socket, 30.0) as c:
            return c.request(op, args)

    def ctl(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), DVMM_SOCKET=self.socket)
        return subprocess.run(
            [sys.executable, "-m", "dvmmd.cli", *argv],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def states(self) -> dict[str, str]:
        return {n["name"]: n["state"] for n in self.req("nodes")["nodes"]}


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.nodes: list[Node] = []
        (base / "fake.py").write_text(FAKE_WORKER)
        self.secret = self.make_secret("secret", os.urandom(32).hex())

    def make_secret(self, name: str, value: str) -> Path:
        p = self.base / name
        p.write_text(value + "\n")
        p.chmod(0o600)
        return p

    def add(self, n: int = 2, extra: str = "") -> list[Node]:
        new = [
            Node(
                self.base,
                f"n{len(self.nodes) + i + 1}",
                f"127.0.0.{len(self.nodes) + i + 1}",
                self.secret,
            )
            for i in range(n)
        ]
        self.nodes += new
        for node in new:
            node.write_config([m.addr for m in self.nodes if m is not node], extra=extra)
        return new

    def start_all(self) -> None:
        for n in self.nodes:
            n.start()
        wait_for(
            lambda: all(
                set(n.states().values()) == {"alive"} and len(n.states()) == len(self.nodes)
                for n in self.nodes
            ),
            15,
            "all nodes alive everywhere",
        )

    def stop_all(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
        if any(n.proc and n.proc.returncode not in (0, -9, None) for n in c.nodes):
            for n in c.nodes:
                print(f"--- {n.name} log ---\n{n.log()}")


def logged_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster whose daemons' logs are printed at the end, whatever the outcome
    (for the long real-guest tests: `yield from` it in a fixture)."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
        for n in c.nodes:
            print(f"--- {n.name} log ---\n{n.log()[-6000:]}")


def require_multinode() -> None:
    """Skip (saying why) where the native module cannot run a VM over several nodes."""
    from dvmmd.worker import multinode_supported

    multi, why = multinode_supported("auto")
    if not multi:
        pytest.skip(f"multi-node VMs are not available: {why}")


def start_real_nodes(cluster: Cluster, n: int) -> list[Node]:
    """`n` daemons that know each other, with the real VMM worker, started."""
    nodes = cluster.add(n)
    for d in nodes:
        d.write_config([m.addr for m in nodes if m is not d], fake_worker=False)
    cluster.start_all()
    return nodes


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


# --------------------------------------------------------------------------- membership


def test_nodes_see_each_other_static_and_seed(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    cluster.start_all()
    for node in (a, b):
        r = node.ctl("nodes")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split()[:3] == ["NODE", "ADDRESS", "STATE"]
        assert sum(" alive " in line for line in lines) == 2, r.stdout
        assert a.addr in r.stdout and b.addr in r.stdout
    # a third node joins through a seed only, and everyone learns of it
    c = Node(cluster.base, "n3", "127.0.0.3", cluster.secret)
    c.write_config([], seed=a.addr)
    cluster.nodes.append(c)
    c.start()
    wait_for(
        lambda: all(n.states() == {"n1": "alive", "n2": "alive", "n3": "alive"} for n in (a, b, c)),
        10,
        "the seed-joined node everywhere",
    )
    info = {n["name"]: n for n in b.req("nodes")["nodes"]}
    assert info["n3"]["vcpus"] == 2 and info["n3"]["memory"] == 1 << 30
    r = c.ctl("nodes", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["self"] == "n3"


def test_wrong_secret_is_refused(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    b.secret = cluster.make_secret("other", os.urandom(32).hex())
    b.write_config([a.addr])
    a.start()
    b.start()
    time.sleep(TIMEOUT + 1)
    assert a.states() == {"n1": "alive"}, "a node with the wrong key must not be a member"
    assert b.states() == {"n2": "alive"}
    # Another secret is another CA: each side's TLS refuses the other's certificate.
    for node in (a, b):
        log = node.log()
        assert f"authentication with {(b if node is a else a).addr} failed: TLS" in log, log
        assert "certificate verify failed" in log, log
        assert "refused connection from" in log and "TLS handshake failed" in log, log


def test_garbage_on_peer_port_daemon_keeps_serving(cluster: Cluster) -> None:
    a, _ = cluster.add(2)
    cluster.start_all()
    payloads = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"DVP1\x00\x00\x00\x05hello",
        b"DVP1\xff\xff\xff\xff",
        os.urandom(4096),
        b'DVP1\x00\x00\x00\x10{"type":"hello"}',
    ]
    for p in payloads:
        with socket.create_connection((a.host, a.port), 5) as s:
            s.sendall(p)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass  # the daemon closes the connection
            except (ConnectionResetError, TimeoutError):
                pass
    assert a.proc is not None and a.proc.poll() is None
    # None of it is TLS: refused in the handshake, before any frame is parsed.
    assert "TLS handshake failed: the client does not speak TLS" in a.log()
    assert a.states() == {"n1": "alive", "n2": "alive"}
    assert a.ctl("nodes").returncode == 0


def test_killed_daemon_detected_dead_within_timeout(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    cluster.start_all()
    b.stop(signal.SIGKILL)
    took = wait_for(lambda: a.states()["n2"] == "dead", TIMEOUT + 3, "n2 dead")
    assert took <= TIMEOUT + 1.0, f"detection took {took:.2f}s (timeout {TIMEOUT}s)"
    # it comes back as alive (restarted) when started again
    b.start()
    wait_for(lambda: a.states()["n2"] == "alive", 10, "n2 alive again")


def test_reinstalled_node_rejoins(cluster: Cluster) -> None:
    """A node whose state directory was wiped comes back with incarnation 1: its peers
    used to ignore it forever (a lower incarnation than they knew); a new boot id now
    makes it a new instance of the node."""
    a, b = cluster.add(2)
    cluster.start_all()
    for _ in range(2):  # incarnation 3 on a's books
        b.stop()
        wait_for(lambda: a.states()["n2"] == "left", 5, "n2 left")
        b.start()
        wait_for(lambda: a.states()["n2"] == "alive", 5, "n2 alive")
    b.stop()
    wait_for(lambda: a.states()["n2"] == "left", 5, "n2 left")
    for f in b.dir.glob("dvmmd.db*"):
        f.unlink()  # reinstalled: the incarnation count starts again
    b.start()
    wait_for(lambda: a.states()["n2"] == "alive", 5, "the reinstalled n2 alive on n1")
    n2 = {n["name"]: n for n in a.req("nodes")["nodes"]}["n2"]
    assert n2["incarnation"] == 1
    assert "node n2 rejoined with a new identity (incarnation reset from 3)" in a.log()


def test_clean_leave(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    cluster.start_all()
    b.stop()
    wait_for(lambda: a.states()["n2"] == "left", 5, "n2 left")


# --------------------------------------------------------------------------- bad input


def test_bad_config_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[node]\nname = "x"\nlisten = "127.0.0.1:1"\nstate_dir = "/tmp/x"\n'
        'vcpus = "many"\n[cluster]\nsecret_file = "/nope"\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "dvmmd.daemon", "--config", str(cfg)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 2
    assert f"{cfg}:5: node.vcpus: must be int" in r.stderr
    cfg.write_text("[node\n")
    r = subprocess.run(
        [sys.executable, "-m", "dvmmd.daemon", "--config", str(cfg)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 2 and "invalid TOML" in r.stderr and f"{cfg}:1" in r.stderr


def test_missing_secret_clear_error(cluster: Cluster) -> None:
    (a,) = cluster.add(1)
    a.secret = cluster.base / "missing-secret"
    a.write_config([])
    r = subprocess.run(
        [sys.executable, "-m", "dvmmd.daemon", "--config", str(a.config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 1 and "cannot read cluster secret" in r.stderr


def test_unknown_vm_and_impossible_requests(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    cluster.start_all()
    for verb in ("status", "stop", "console", "stats"):
        r = a.ctl(verb, "nope")
        assert r.returncode == 1 and "no VM named 'nope'" in r.stderr, (verb, r.stderr)
    r = a.ctl("boot", "big", "--vcpus", "5", "--memory", "64M", "--kernel", KERNEL)
    assert r.returncode == 1 and "impossible request" in r.stderr and "4 free vCPUs" in r.stderr
    r = a.ctl("boot", "huge", "--vcpus", "2", "--memory", "3G", "--kernel", KERNEL)
    assert r.returncode == 1 and "impossible request" in r.stderr
    r = a.ctl("boot", "where", "--nodes", "n1,zz", "--vcpus", "2", "--kernel", KERNEL)
    assert r.returncode == 1 and "zz" in r.stderr
    r = a.ctl("boot", "bad name!", "--kernel", KERNEL)
    assert r.returncode == 1 and "invalid VM name" in r.stderr
    r = a.ctl("boot", "nokernel", "--kernel", str(cluster.base / "none"))
    assert r.returncode == 1 and "not readable" in r.stderr
    # a refused request defines nothing (no record, nothing running), on either node
    for node in (a, b):
        r = node.ctl("list")
        assert r.returncode == 0 and r.stdout.strip() == "no VMs", r.stdout
        assert node.req("list") == {"vms": [], "unreachable": []}
    assert [n["used_vcpus"] for n in a.req("nodes")["nodes"]] == [0, 0]


# --------------------------------------------------------------------------- VM lifecycle


def boot(node: Node, name: str, *extra: str, cmdline: str = "sleep=60") -> dict[str, Any]:
    r = node.ctl("boot", name, "--kernel", KERNEL, "--cmdline", cmdline, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_console_exit_status_start_and_json(cluster: Cluster) -> None:
    """``console`` and ``boot --console`` exit with the guest's status as ``run`` does;
    ``start NAME`` boots a stored definition again; ``rm`` and ``top`` speak ``--json``."""
    (a,) = cluster.add(1)
    cluster.start_all()
    r = a.ctl("boot", "g", "--kernel", KERNEL, "--cmdline", "sleep=0.3 exit=7", "--console")
    assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)
    assert "0 failed" in r.stdout and "[g: stopped: guest exited with status 7]" in r.stderr
    r = a.ctl("console", "g")  # an ended VM: its log, then the guest's status
    assert r.returncode == 7 and "0 failed" in r.stdout
    r = a.ctl("console", "g", "--no-follow", "--json")
    assert r.returncode == 7
    assert json.loads(r.stdout[r.stdout.index("{\n") :])["result"]["status"] == 7
    # start: the same definition (vCPUs, memory, kernel, command line) boots again
    before = a.req("status", name="g")
    r = a.ctl("start", "g", "--console")
    assert r.returncode == 7, r.stderr
    after = a.req("status", name="g")
    assert after["request"]["boot_id"] != before["request"]["boot_id"]
    for key in ("vcpus", "memory", "cmdline", "cpu", "timeout_s"):
        assert after["request"][key] == before["request"][key], key
    # the kernel came as a descriptor and was copied: the same file, copied again
    old_k, new_k = (
        before["request"]["boot_files"]["kernel"],
        after["request"]["boot_files"]["kernel"],
    )
    assert new_k["sha256"] == old_k["sha256"] and new_k["source"] == old_k["source"]
    r = a.ctl("start", "nope")
    assert r.returncode == 1 and "no VM named 'nope'" in r.stderr
    boot(a, "live", cmdline="sleep=60")
    r = a.ctl("start", "live")
    assert r.returncode == 1 and "already running" in r.stderr
    r = a.ctl("start", "live", "--json")
    assert r.returncode == 1
    assert a.ctl("stop", "live").returncode == 0
    r = a.ctl("start", "live", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] in ("booting", "running")
    assert a.ctl("stop", "live", "--json").returncode == 0
    # --json everywhere: rm and top too
    r = a.ctl("rm", "g", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"name": "g", "removed": True}
    top = json.loads(a.ctl("top", "--json").stdout)
    assert [v["name"] for v in top["vms"]["vms"]] == ["live"]
    assert top["nodes"]["self"] == "n1"


def test_daemon_places_like_run_nodes(cluster: Cluster) -> None:
    """The daemon lays a request out over its nodes as ``dvmmctl run --nodes`` does
    (one placement function): 3 vCPUs and 96M over 2 nodes is 2+1 vCPUs, 64M+32M,
    in the placement the owner records and in the spec each node's worker gets."""
    from dvmmd.launcher.launch import layout

    a, b = cluster.add(2)
    cluster.start_all()
    boot(a, "uneven", "--vcpus", "3", "--memory", "96M")
    st = a.req("status", name="uneven")
    shares = st["placement"]["shares"]
    assert [s["node"] for s in shares] == ["n1", "n2"]
    got = [{k: s[k] for k in ("cpus", "mem_start", "mem_size")} for s in shares]
    assert got == layout(3, 96 << 20, 2)
    assert [len(s["cpus"]) for s in got] == [2, 1] and got[0]["mem_size"] == 64 << 20
    for node in (a, b):
        spec = json.loads((node.dir / "vms" / "uneven" / "spec.json").read_text())
        assert spec["numa"] == got


def test_vm_lifecycle_across_two_nodes(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    cluster.start_all()
    r = a.ctl(
        "boot",
        "vm1",
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--kernel",
        KERNEL,
        "--cmdline",
        "sleep=60",
    )
    assert r.returncode == 0, r.stderr
    assert "placement: 2 vCPU(s), 64M on n1 (vCPUs 0, 32M), n2 (vCPUs 1, 32M)" in r.stderr
    assert "starting worker on n2" in r.stderr and "running" in r.stdout
    # visible from the other node
    r = b.ctl("list")
    assert r.returncode == 0 and "vm1" in r.stdout and "running" in r.stdout
    st = b.req("status", name="vm1")
    assert st["owner"] == "n1" and [s["node"] for s in st["placement"]["shares"]] == ["n1", "n2"]
    # each node's worker got its share and the cluster field: public key material only
    specs = []
    secret = cluster.secret.read_text().strip()
    for i, node in enumerate((a, b)):
        text = (node.dir / "vms" / "vm1" / "spec.json").read_text()
        spec = json.loads(text)
        specs.append(spec)
        c = spec["cluster"]
        assert c["node_index"] == i and len(c["nodes"]) == 2
        assert c["security"] == "encrypt" and len(c["session_hex"]) == 32
        assert (
            len(c["node_pubkeys_hex"]) == 2 and c["node_pubkeys_hex"][0] != c["node_pubkeys_hex"][1]
        )
        assert "private_key_hex" not in c and "secret_hex" not in c
        assert secret not in text and bytes.fromhex(secret).hex() not in text
        assert spec["numa"][i]["cpus"] == [i] and spec["numa"][i]["mem_size"] == 32 << 20
        assert (node.dir / "vms" / "vm1" / "spec.json").stat().st_mode & 0o077 == 0
    assert specs[0]["cluster"]["session_hex"] == specs[1]["cluster"]["session_hex"]
    assert specs[0]["cluster"]["node_pubkeys_hex"] == specs[1]["cluster"]["node_pubkeys_hex"]
    st = a.req("status", name="vm1")
    assert st["placement"]["data_plane"] == "encrypt"
    assert "data plane: encrypt (between the VM's nodes)" in a.ctl("status", "vm1").stdout
    r = a.ctl("nodes")
    assert r.stdout.splitlines()[0].split()[-2:] == ["DATA", "PLANE"]
    assert all(line.rstrip().endswith("encrypt") for line in r.stdout.splitlines()[1:]), r.stdout
    used = {n["name"]: n["used_vcpus"] for n in b.req("nodes")["nodes"]}
    assert used == {"n1": 1, "n2": 1}
    # console (from the other node) and live stats
    wait_for(lambda: "tick 1" in b.ctl("console", "--no-follow", "vm1").stdout, 10, "console")
    r = b.ctl("console", "--no-follow", "vm1")
    assert "fake guest on node 0: vcpus [0], cluster=True" in r.stdout
    assert "data-path key on stdin matches node_pubkeys_hex[0]: True" in r.stdout
    stats = json.loads(a.ctl("stats", "vm1", "--json").stdout)
    assert [n["node"] for n in stats["nodes"]] == ["n1", "n2"]
    assert [n["stats"]["dsm"]["read_faults"] for n in stats["nodes"]] == [0, 1]
    pids = [n["pid"] for n in stats["nodes"]]
    assert all(pid_alive(p) for p in pids)
    # stop from the other node
    r = b.ctl("stop", "vm1")
    assert r.returncode == 0 and "stopped (stopped by user)" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: not any(pid_alive(p) for p in pids), 5, "workers gone")
    r = a.ctl("stats", "vm1")
    assert r.returncode == 0 and "dsm.read_faults" in r.stdout and "dsm.pages_sent" in r.stdout
    assert a.ctl("stop", "vm1").returncode == 1  # not running any more
    # a finished VM: boot to completion, the console follow ends with the guest
    boot(a, "quick", "--vcpus", "2", cmdline="sleep=0.5")
    r = a.ctl("console", "quick", timeout=30)
    assert r.returncode == 0 and "0 failed" in r.stdout
    assert "[quick: stopped: guest exited with status 0" in r.stderr
    st = a.req("status", name="quick")
    assert st["result"]["reason"] == "debug_exit" and st["result"]["status"] == 0
    # names are unique in the cluster; rm frees them
    r = b.ctl("boot", "quick", "--kernel", KERNEL)
    assert r.returncode == 1 and "defined on node n1" in r.stderr
    assert b.ctl("rm", "quick").returncode == 0
    assert "quick" not in a.ctl("list").stdout
    # metrics are not configured here: the top view works
    r = a.ctl("top", "--once")
    assert r.returncode == 0 and "n2" in r.stdout and "vm1" in r.stdout


def test_data_plane_setting_must_agree(cluster: Cluster) -> None:
    """A VM across nodes configured for different data-plane protection is refused
    (never silently downgraded), and `dvmmctl nodes` warns about the disagreement."""
    a, b = cluster.add(2)
    a.write_config([b.addr], cluster_extra='data_plane = "none"\n')
    cluster.start_all()
    r = a.ctl("nodes")
    assert "warning: the nodes disagree on cluster.data_plane (encrypt, none)" in r.stdout
    r = a.ctl("boot", "vm", "--vcpus", "2", "--memory", "64M", "--kernel", KERNEL)
    assert r.returncode == 1
    assert "the VM's data plane is 'none' but node n2 is configured for 'encrypt'" in r.stderr, (
        r.stderr
    )
    assert a.req("status", name="vm")["state"] == "failed"


def test_transport_setting_reaches_every_share(cluster: Cluster) -> None:
    """cluster.transport = "shm" on every node: each node's share of the VM is told to
    use the shared-memory transport; a node configured otherwise refuses its share."""
    a, b, c = cluster.add(3)
    for node in (a, b, c):
        others = [m.addr for m in (a, b, c) if m is not node]
        t = "tcp" if node is c else "shm"
        node.write_config(others, cluster_extra=f'transport = "{t}"\n')
    cluster.start_all()
    r = a.ctl("boot", "vm1", "--vcpus", "2", "--memory", "64M", "--kernel", KERNEL,
              "--nodes", "n1,n2")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for node in (a, b):
        spec = json.loads((node.dir / "vms" / "vm1" / "spec.json").read_text())
        assert spec["cluster"]["transport"] == "shm"
    r = a.ctl("boot", "vm2", "--vcpus", "2", "--memory", "64M", "--kernel", KERNEL,
              "--nodes", "n1,n3")  # fmt: skip
    assert r.returncode == 1
    assert "the VM's data-plane transport is 'shm' but node n3 is configured for 'tcp'" in (
        r.stderr
    ), r.stderr


def test_force_stop(cluster: Cluster) -> None:
    (a,) = cluster.add(1)
    cluster.start_all()
    boot(a, "v", "--vcpus", "1")
    r = a.ctl("stop", "--force", "v")
    assert r.returncode == 0 and "forced" in r.stdout


def test_node_death_fails_vm_and_leaves_no_worker(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    cluster.start_all()
    boot(a, "vm", "--vcpus", "2", "--memory", "64M")
    pids = [n["pid"] for n in a.req("stats", name="vm")["nodes"]]
    assert all(pid_alive(p) for p in pids)
    b.stop(signal.SIGKILL)
    wait_for(
        lambda: a.req("status", name="vm")["state"] == "failed", TIMEOUT + 3, "the VM marked failed"
    )
    st = a.req("status", name="vm")
    assert "node n2" in st["reason"] and "dead" in st["reason"], st["reason"]
    r = a.ctl("status", "vm")
    assert "failed" in r.stdout and "n2" in r.stdout
    wait_for(lambda: not any(pid_alive(p) for p in pids), 5, "both workers gone")


def test_owner_death_stops_remote_worker(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    cluster.start_all()
    boot(b, "vm", "--vcpus", "2", "--memory", "64M")  # n2 owns it, n1 runs share 1
    pids = [n["pid"] for n in a.req("stats", name="vm")["nodes"]]
    b.stop(signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in pids), TIMEOUT + 5, "both workers gone")
    # n1 logs why once it has reaped its worker: a moment after the process is gone
    wait_for(lambda: "owner node n2 failed" in a.log(), 5, "n1 to log why it stopped")


def test_restart_keeps_definitions(cluster: Cluster) -> None:
    (a,) = cluster.add(1)
    cluster.start_all()
    boot(a, "done", cmdline="sleep=0")
    wait_for(lambda: a.req("status", name="done")["state"] == "stopped", 10, "done to end")
    boot(a, "busy", cmdline="sleep=60")
    pid = a.req("stats", name="busy")["nodes"][0]["pid"]
    a.stop(signal.SIGKILL)  # killed mid-run: the worker dies with it
    wait_for(lambda: not pid_alive(pid), 5, "the worker to die with its daemon")
    a.start()
    vms = {v["name"]: v for v in a.req("list")["vms"]}
    assert vms["done"]["state"] == "stopped"
    assert vms["busy"]["state"] == "failed" and "dvmmd restarted" in vms["busy"]["reason"]
    r = a.ctl("list")
    assert "done" in r.stdout and "busy" in r.stdout
    a.stop()
    a.start()
    assert {v["name"] for v in a.req("list")["vms"]} == {"done", "busy"}


def test_metrics_endpoint(cluster: Cluster) -> None:
    (a,) = cluster.add(1)
    port = free_port()
    a.write_config([], extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    cluster.start_all()
    boot(a, "m", cmdline="sleep=60")

    def scrape() -> str:
        with socket.create_connection(("127.0.0.1", port), 5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    wait_for(lambda: "dvmm_vm_dsm_read_faults" in scrape(), 10, "the worker's live counters")
    text = scrape()
    head, _, body = text.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200 OK") and "Content-Type: text/plain; version=" in head
    fams = {f.name: f for f in text_string_to_metric_families(body)}

    def sample(family: str, **labels: str) -> float:
        found = [s.value for s in fams[family].samples if s.labels == labels]
        assert len(found) == 1, (family, labels, fams[family].samples)
        return float(found[0])

    assert fams["dvmm_node_state"].type == "gauge"
    assert sample("dvmm_node_state", node="n1", state="alive") == 1
    assert sample("dvmm_vm_info", vm="m", state="running") == 1
    # the worker's counters as the real worker nests them: the DSM's under "dsm"
    assert fams["dvmm_vm_dsm_read_faults"].type == "counter"
    assert sample("dvmm_vm_dsm_read_faults", vm="m", node="n1") == 0
    assert fams["dvmm_vm_exits_hlt"].type == "counter"
    assert sample("dvmm_vm_exits_hlt", vm="m", node="n1") == 32
    # the fault latency is a real histogram: le buckets, _sum and _count
    h = fams["dvmm_vm_dsm_fault_latency_seconds"]
    assert h.type == "histogram"
    les = [s.labels["le"] for s in h.samples if s.name.endswith("_bucket")]
    assert les[-1] == "+Inf" and len(les) == 24
    [count] = [s.value for s in h.samples if s.name.endswith("_count")]
    assert count == 2  # the fake worker's live log2 buckets: 1 + 0 + 1
    assert {s.name for s in h.samples} == {
        "dvmm_vm_dsm_fault_latency_seconds_bucket",
        "dvmm_vm_dsm_fault_latency_seconds_sum",
        "dvmm_vm_dsm_fault_latency_seconds_count",
    }
    assert fams["dvmmd_auth_failures"].type == "counter"
    assert fams["dvmmd_rpcs_served"].samples[0].name == "dvmmd_rpcs_served_total"


def test_api_socket_permissions(cluster: Cluster) -> None:
    (a,) = cluster.add(1)
    cluster.start_all()
    assert os.stat(a.socket).st_mode & 0o777 == 0o660
    with socket.socket(socket.AF_UNIX) as s:  # garbage on the API socket: an error reply
        s.connect(a.socket)
        s.sendall(b"not json\n")
        reply = json.loads(s.makefile().readline())
    assert reply["ok"] is False and "bad request" in reply["error"]
    assert a.ping()


def test_systemd_notify_ready_and_watchdog(cluster: Cluster) -> None:
    (a,) = cluster.add(1)
    path = str(cluster.base / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(10)
        a.start(NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
        got = [s.recv(4096).decode() for _ in range(3)]
    assert got[0].startswith("READY=1") and "STATUS=node n1 serving" in got[0]
    assert all(g.startswith("WATCHDOG=1") for g in got[1:])
    a.stop()


# --------------------------------------------------------------------------- real guest


def test_boot_bundled_guest(cluster: Cluster) -> None:
    require_native()
    guest = require_guest()
    from dvmmd.worker import multinode_supported

    multi, why = multinode_supported("auto")
    a, b = cluster.add(2)
    for n in (a, b):  # the real worker, multi-node only if the native module says so
        n.write_config([m.addr for m in (a, b) if m is not n], fake_worker=False)
    cluster.start_all()
    nodes = "n1,n2" if multi else "n1"
    print(f"booting the bundled guest on {nodes} ({why})")
    r = a.ctl(
        "boot",
        "guest",
        "--vcpus",
        "2",
        "--memory",
        "256M",
        "--kernel",
        str(guest),
        "--nodes",
        nodes,
        "--timeout",
        "300",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    r = a.ctl("console", "guest", timeout=330)
    assert r.returncode == 0
    st = a.req("status", name="guest")
    assert st["state"] == "stopped", (st, r.stdout[-2000:])
    assert st["result"]["reason"] == "debug_exit" and st["result"]["status"] == 0
    assert r.stdout.strip(), "the guest printed nothing on its console"
    assert re.search(r"dvmm-guest: \d+ passed, 0 failed", r.stdout), r.stdout[-2000:]


def _worker_pids(base: Path) -> list[int]:
    """Live worker processes whose command line mentions a path under ``base``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "dvmmd.worker" in cmd and str(base) in cmd and pid_alive(int(d.name)):
            pids.append(int(d.name))
    return pids


def test_stop_real_guest_across_two_nodes(cluster: Cluster) -> None:
    """A real VM spread over 2 nodes: list shows it running, stop ends every worker."""
    require_native()
    guest = require_guest()
    require_multinode()
    a, b = start_real_nodes(cluster, 2)
    # ep over 64 GiB of samples runs for minutes: long enough to be stopped.
    r = a.ctl(
        "boot", "long", "--vcpus", "2", "--memory", "128M", "--kernel", str(guest),
        "--nodes", "n1,n2", "--cmdline", "run=ep ep.size=64G timeout=600", timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while "boot cpus=2 nodes=2" not in a.ctl("console", "long", "--no-follow").stdout:
        assert time.monotonic() < deadline, "the guest never printed its boot line"
        time.sleep(0.5)
    r = b.ctl("list")
    assert r.returncode == 0 and "long" in r.stdout and "running" in r.stdout
    assert len(_worker_pids(cluster.base)) == 2
    r = b.ctl("stop", "long", timeout=60)
    assert r.returncode == 0, r.stderr
    st = a.req("status", name="long")
    assert st["state"] == "stopped", st
    deadline = time.monotonic() + 15
    while _worker_pids(cluster.base):
        assert time.monotonic() < deadline, "a worker was left behind after stop"
        time.sleep(0.2)
