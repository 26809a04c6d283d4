"""One VM across several local worker processes (issue 4): ``dvmmctl run --nodes N``.

Two groups of tests:

- The launcher itself (``dvmmd.launcher``) with a fake worker, so its
  lay-out, failure handling, signal forwarding and clean-up are tested on any
  host: a dead node is named, the others are stopped within a bound, no worker
  outlives the launcher (PR_SET_PDEATHSIG), SIGINT stops everything.
- Real distributed runs of the bundled guest (``python -m dvmmd.cli run``,
  which is what ``dvmmctl run --nodes N`` calls). They skip, with the reason,
  when /dev/kvm, the native module or the guest is missing, or while the native
  module still rejects a ``cluster`` spec ("not supported").

Every subprocess has a timeout; every test kills what it started.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    MakeKernel,
    assert_all_passed,
    code_exit,
    kvm_usable,
    parse_guest_output,
    require_guest,
    require_native,
)

from dvmmd.launcher import launch as launcher
from dvmmd.launcher.launch import Launcher, Options, UsageError, layout, validate
from dvmmd.vm import stats_report

MIB = 1024 * 1024

#: How long after a worker is killed the launcher must have exited.
KILLED_WORKER_BOUND_S = 20.0
#: Any one distributed run in these tests.
RUN_TIMEOUT_S = 600

# --------------------------------------------------------------------------- helpers


def _pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is a zombie of someone else)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if not _pid_gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if not _pid_gone(p)]
    return left


def _kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_NODE_PID = re.compile(r"dvmmctl: node (\d+)\b.* pid (\d+)")


@dataclass
class Launch:
    """A launcher started in the background, its output collected by threads."""

    proc: subprocess.Popen[str]
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def stdout(self) -> str:
        return "".join(self.out)

    def stderr(self) -> str:
        return "".join(self.err)

    def worker_pids(self) -> dict[int, int]:
        return {int(m[1]): int(m[2]) for m in _NODE_PID.finditer(self.stderr())}

    def wait_for(self, pattern: str, timeout: float, *, stream: str = "out") -> bool:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stdout() if stream == "out" else self.stderr()
            if rx.search(text):
                return True
            if self.proc.poll() is not None:
                time.sleep(0.2)
                text = self.stdout() if stream == "out" else self.stderr()
                return bool(rx.search(text))
            time.sleep(0.05)
        return False

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self.threads:
            t.join(timeout=5)
        return rc

    def kill_all(self) -> None:
        pids = list(self.worker_pids().values())
        if self.proc.poll() is None:
            _kill_quietly(self.proc.pid)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for p in pids:
            _kill_quietly(p)


def _pump(stream: Any, sink: list[str]) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)  # noqa: PERF402 - visible to the test while it runs
    stream.close()


_launch_tmp: str | None = None


def _launcher_tmpdir() -> str:
    """A TMPDIR for launchers, removed when the test run ends: a failed run keeps
    its node logs in a temporary directory, and these tests fail runs on purpose."""
    global _launch_tmp
    if _launch_tmp is None:
        _launch_tmp = tempfile.mkdtemp(prefix="dvmm-test-launch-")
        atexit.register(shutil.rmtree, _launch_tmp, True)
    return _launch_tmp


def start_launcher(*args: str, argv: list[str] | None = None) -> Launch:
    """Start ``python -m dvmmd.cli run ARGS`` (or ``argv``) in the background."""
    env = dict(os.environ)
    env.pop("DVMM_DEBUG", None)
    env["TMPDIR"] = _launcher_tmpdir()
    cmd = argv if argv is not None else [sys.executable, "-m", "dvmmd.cli", "run", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    launch = Launch(proc)
    for stream, sink in ((proc.stdout, launch.out), (proc.stderr, launch.err)):
        t = threading.Thread(target=_pump, args=(stream, sink), daemon=True)
        t.start()
        launch.threads.append(t)
    return launch


@pytest.fixture
def launches() -> Iterator[list[Launch]]:
    """Launchers a test started; killed (with their workers) at the end, whatever happened."""
    started: list[Launch] = []
    yield started
    for launch in started:
        launch.kill_all()


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float
    worker_pids: dict[int, int]


def run_cluster(launches: list[Launch], *args: str, timeout: float = RUN_TIMEOUT_S) -> RunResult:
    t0 = time.monotonic()
    launch = start_launcher(*args)
    launches.append(launch)
    try:
        rc = launch.finish(timeout)
    except subprocess.TimeoutExpired:
        launch.kill_all()
        pytest.fail(
            f"the launcher did not finish within {timeout} s\nstdout tail:\n"
            f"{launch.stdout()[-3000:]}\nstderr tail:\n{launch.stderr()[-3000:]}"
        )
    res = RunResult(
        rc, launch.stdout(), launch.stderr(), time.monotonic() - t0, launch.worker_pids()
    )
    left = _wait_gone(list(res.worker_pids.values()), 5)
    assert not left, f"worker processes {left} outlived the launcher"
    return res


def explain(res: RunResult) -> str:
    return (
        f"exit status {res.returncode}\nstdout tail:\n{res.stdout[-4000:]}\n"
        f"stderr tail:\n{res.stderr[-3000:]}"
    )


_VOLATILE = {
    "time_us", "write_us", "verify_us", "write_mb_s", "rtt_ns", "min_rtt_ns",
    "line_us", "page_us", "local_parts", "peer_node", "total_ms",
    "rtt_p50_ns", "rtt_p99_ns", "shift", "read_kind",
    "local_kind",
    *(f"{ph}_{q}_ns" for ph in ("read", "upgrade", "steal", "local") for q in ("p50", "p99", "max")),
}  # fmt: skip


def result_lines(output: str) -> dict[str, str]:
    """Workload name -> its result line without timing and placement figures."""
    rep = parse_guest_output(output)
    out: dict[str, str] = {}
    for body in rep.passed_lines + rep.failed_lines:
        tokens = body.split()
        kept = [t for t in tokens if t.split("=", 1)[0] not in _VOLATILE]
        out[tokens[0]] = " ".join(kept)
    return out


def summary_json(stdout: str) -> dict[str, Any]:
    """The ``--json`` summary: the last stdout line that is a JSON object."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    raise AssertionError("no JSON summary line in the output")


# --------------------------------------------------------------------------- availability

_CLUSTER_PROBE = textwrap.dedent(
    """
    import json, sys
    from dvmmd import _native
    spec = {"vcpus": 1, "memory": 16 << 20, "kernel": sys.argv[1], "initrd": None,
            "cmdline": "", "numa": [{"cpus": [0], "mem_start": 0, "mem_size": 16 << 20}],
            "console_log": None, "console_stdout": False, "timeout_s": 10,
            "cluster": {"node_index": 0, "nodes": [{"addr": "127.0.0.1:" + sys.argv[2]}],
                        "session_hex": "00112233445566778899aabbccddeeff", "boot_node": 0,
                        "node_pubkeys_hex": [
                            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"],
                        "private_key_hex":
                            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"}}
    try:
        print(_native.run_vm(json.dumps(spec)))
    except ValueError as e:
        print("ValueError:", e)
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_cluster_support: str | None = None


def cluster_unavailable(tmp_dir: Path) -> str | None:
    """Why real distributed runs cannot be tested here, or None when they can."""
    global _cluster_support
    if not kvm_usable():
        return "/dev/kvm is missing or not read-write for this user"
    require_guest()  # `make test` builds both: their absence fails, never skips
    require_native()
    from dvmmd import _native

    if getattr(_native, "MULTI_NODE", None) is True:
        return None  # the build says so; older builds are probed below
    if _cluster_support is None:
        kernel = tmp_dir / "probe-exit0.mb"
        from conftest import multiboot_kernel

        kernel.write_bytes(multiboot_kernel(code_exit(0)))
        try:
            cp = subprocess.run(
                [sys.executable, "-c", _CLUSTER_PROBE, str(kernel), str(_free_port())],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            out = cp.stdout + cp.stderr
        except subprocess.TimeoutExpired:
            out = "probe timed out"
        _cluster_support = out
    if "ValueError" in _cluster_support and "not supported" in _cluster_support:
        return (
            "the native module rejects `cluster` specs (distributed VMs not wired in yet): "
            + _cluster_support.strip()[-200:]
        )
    return None


@pytest.fixture
def cluster_ready(tmp_path: Path) -> None:
    reason = cluster_unavailable(tmp_path)
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)


# =========================================================================== launcher unit tests


def test_layout_spreads_vcpus_and_memory() -> None:
    numa = layout(3, 384 * MIB, 3)
    assert [n["cpus"] for n in numa] == [[0], [1], [2]]
    assert [n["mem_size"] for n in numa] == [128 * MIB] * 3
    assert [n["mem_start"] for n in numa] == [0, 128 * MIB, 256 * MIB]
    numa = layout(5, 256 * MIB, 2)
    assert [n["cpus"] for n in numa] == [[0, 1, 2], [3, 4]]
    # memory is homed with the vCPUs (3:2 in 2M units), as the daemon places it
    assert [n["mem_size"] for n in numa] == [154 * MIB, 102 * MIB]
    numa = layout(4, 100 * MIB + 4096, 3)
    assert all(n["mem_size"] % 4096 == 0 for n in numa)
    assert sum(n["mem_size"] for n in numa) == 100 * MIB + 4096


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (Options(nodes=17, vcpus=32), "1 to 16"),
        (Options(nodes=0, vcpus=1), "1 to 16"),
        (Options(nodes=3, vcpus=2), "at least 3 vCPUs"),
        (Options(nodes=2, vcpus=2, memory=256 * MIB + 1), "4 KiB"),
        (Options(nodes=2, vcpus=2, transport="shm", netns=True), "not with --netns"),
    ],
)
def test_validate_rejects(opts: Options, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        validate(opts)


def test_cli_usage_errors_exit_2() -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "dvmmd.cli", "run", "--nodes", "3", "--vcpus", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cp.returncode == 2, cp.stderr
    assert "at least 3 vCPUs" in cp.stderr
    cp = subprocess.run(
        [sys.executable, "-m", "dvmmd.cli", "run", "--nodes", "17"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cp.returncode == 2 and "16" in cp.stderr, cp.stderr


def test_cli_data_plane_option() -> None:
    from dvmmd.cli.dvmmctl import build_parser
    from dvmmd.cli.run import launcher_options

    args = build_parser().parse_args(["run", "--nodes", "2", "--data-plane", "none"])
    assert launcher_options(args).data_plane == "none"
    args = build_parser().parse_args(["run", "--nodes", "2"])
    assert launcher_options(args).data_plane == "encrypt"
    cp = subprocess.run(
        [sys.executable, "-m", "dvmmd.cli", "run", "--nodes", "2", "--data-plane", "rot13"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cp.returncode == 2 and "--data-plane: invalid choice: 'rot13'" in cp.stderr, cp.stderr


@pytest.mark.parametrize("value", ["65", "-1", "many"])
def test_cli_prefetch_max_pages_rejects(value: str) -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "dvmmd.cli", "run", "--nodes", "2", "--prefetch-max-pages", value],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cp.returncode == 2, cp.stderr
    assert "--prefetch-max-pages" in cp.stderr and "prefetch batch" in cp.stderr, cp.stderr


def test_stats_report_table_and_totals() -> None:
    hist = [0] * 24
    hist[6] = 90  # [32, 64) us
    hist[9] = 10  # [256, 512) us
    node0 = {
        "dsm": {
            "read_faults": 10, "write_faults": 5, "wp_faults": 2, "remote_faults": 100,
            "fault_mean_ns": 40000, "resident_peak": 1000, "bytes_sent": 3 * MIB,
            "latency_us_log2": hist,
        },
        "run_ms": 12.5,
    }  # fmt: skip
    node1 = {
        "dsm": {
            "read_faults": 1, "write_faults": 1, "remote_faults": 100, "fault_mean_ns": 20000,
            "resident_peak": 3000, "latency_us_log2": hist,
        }
    }  # fmt: skip
    tot = stats_report.totals([node0, node1])
    assert tot["read_faults"] == 11
    assert tot["fault_mean_ns"] == 30000
    assert tot["resident_peak_max"] == 3000
    assert tot["latency_us_log2"][6] == 180
    assert stats_report.latency_percentile_us(hist, 0.5) == 64
    assert stats_report.latency_percentile_us(hist, 0.99) == 512
    assert stats_report.latency_percentile_us([0] * 24, 0.5) is None
    table = stats_report.format_table(
        [
            {"node": 0, "addr": "127.0.0.1:1", "stats": node0},
            {"node": 1, "addr": "127.0.0.2:1", "stats": node1},
            {"node": 2, "addr": "127.0.0.3:1"},
        ]
    )
    print(table)
    assert "node 0" in table and "node 2" in table and "total" in table
    assert re.search(r"read faults\s+10\s+1\s+-\s+11", table), table
    assert "3.0 MiB" in table
    assert "40.0 us" in table


# ---------------------------------------------------------------- fake workers

#: A stand-in for ``python -m dvmmd.worker SPEC RESULT``: its behaviour comes
#: from the spec's command line, ``n<i>=<what>`` per node:
#: ok (debug exit 0 with DSM stats), die (SIGKILL itself), peerdead (an error
#: result naming node 1 after 1 s), wait (until SIGTERM: a "stopped" result),
#: hang (ignores SIGTERM).
FAKE_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    spec = json.load(open(sys.argv[1]))
    result_path = sys.argv[2]
    me = (spec.get("cluster") or {}).get("node_index", 0)
    what = dict(t.split("=", 1) for t in spec["cmdline"].split() if "=" in t).get(f"n{me}", "ok")
    def put(res):
        tmp = result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, result_path)
    def stopped(signum, frame):
        put({"reason": "stopped", "status": None, "error": "worker got SIGTERM", "node": me})
        os._exit(0)
    signal.signal(signal.SIGTERM, stopped)
    if spec.get("cluster"):  # multi-node: the private key comes on stdin, never in the spec
        assert "private_key_hex" not in spec["cluster"] and sys.argv[3:] == ["--key-stdin"]
        from dvmmd.security.keys import public_of
        key = sys.stdin.readline().strip()
        if public_of(key) != spec["cluster"]["node_pubkeys_hex"][me]:
            print("fake worker: wrong key on stdin", file=sys.stderr, flush=True)
            sys.exit(3)
    if what == "ok":
        nodes = (spec.get("cluster") or {}).get("nodes")
        if nodes:  # our address must be ours (its namespace, or 127.0.0.x)
            import socket
            host, port = nodes[me]["addr"].rsplit(":", 1)
            socket.create_server((host, int(port))).close()
        time.sleep(0.3)
        if spec.get("console_stdout"):
            print("dvmm-guest: 1 passed, 0 failed", flush=True)
        dsm = {"read_faults": me + 1, "resident_peak": 100 * (me + 1)}
        put({"reason": "debug_exit", "status": 0, "error": None, "node": me,
             "stats": {"dsm": dsm}})
        sys.exit(0)
    if what == "die":
        time.sleep(0.5)
        print("fake worker: dying", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "peerdead":
        time.sleep(1.0)
        put({"reason": "error", "status": None, "node": me,
             "error": "node 1 (peer) is dead: connection closed by peer (EOF)"})
        sys.exit(1)
    if what == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"fake worker {me}: waiting", file=sys.stderr, flush=True)
    while True:
        time.sleep(1)
    """
)

#: Runs a Launcher with the fake worker; argv: KERNEL NODES CMDLINE FAKE [--stats --json].
LAUNCH_FAKE = textwrap.dedent(
    """
    import sys
    from dvmmd.launcher.launch import Launcher, Options
    kernel, nodes, cmdline, fake = sys.argv[1:5]
    flags = sys.argv[5:]
    opts = Options(nodes=int(nodes), vcpus=int(nodes), memory=64 << 20, kernel=kernel,
                   cmdline=cmdline, stats="--stats" in flags, json="--json" in flags,
                   netns="--netns" in flags)
    launcher = Launcher(opts, worker_argv=[sys.executable, fake], peer_grace_s=2.0,
                        term_grace_s=1.0)
    sys.exit(launcher.run())
    """
)


@pytest.fixture
def fake(tmp_path: Path, make_kernel: MakeKernel) -> tuple[Path, Path]:
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    return make_kernel(code_exit(0)), worker


def launch_fake(
    launches: list[Launch], fake: tuple[Path, Path], nodes: int, cmdline: str, *flags: str
) -> Launch:
    kernel, worker = fake
    argv = [sys.executable, "-c", LAUNCH_FAKE, str(kernel), str(nodes), cmdline, str(worker)]
    launch = start_launcher(argv=[*argv, *flags])
    launches.append(launch)
    return launch


def test_fake_cluster_success_stats_json(launches: list[Launch], fake: tuple[Path, Path]) -> None:
    launch = launch_fake(launches, fake, 3, "n0=ok n1=ok n2=ok", "--stats", "--json")
    rc = launch.finish(60)
    out, err = launch.stdout(), launch.stderr()
    assert rc == 0, out + err
    assert "1 passed, 0 failed" in out
    assert "dvmm stats:" in out and "read faults" in out, out
    summary = summary_json(out)
    assert summary["status"] == 0 and summary["reason"] == "debug_exit"
    assert [n["node"] for n in summary["nodes"]] == [0, 1, 2]
    assert [n["addr"].split(":")[0] for n in summary["nodes"]] == [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
    ]
    assert summary["totals"]["read_faults"] == 6
    assert summary["data_plane"] == "encrypt"
    assert "dvmmctl: data plane: encrypt (guest memory and every message encrypted" in err
    assert summary["totals"]["resident_peak_max"] == 300
    assert len(launch.worker_pids()) == 3
    assert not _wait_gone(list(launch.worker_pids().values()), 5)


def test_fake_dead_node_is_named_and_others_stopped(
    launches: list[Launch], fake: tuple[Path, Path]
) -> None:
    # node 1 dies; node 0 notices (an error naming node 1); node 2 never does
    # and must be stopped by the launcher after its grace.
    t0 = time.monotonic()
    launch = launch_fake(launches, fake, 3, "n0=peerdead n1=die n2=wait")
    rc = launch.finish(60)
    took = time.monotonic() - t0
    err = launch.stderr()
    assert rc == 1, err
    assert re.search(r"dvmmctl: error: node 1 \(127\.0\.0\.2:\d+\) died: killed by SIGKILL", err)
    assert "fake worker: dying" in err  # last words quoted
    assert took < 15, took
    assert not _wait_gone(list(launch.worker_pids().values()), 5)


def test_fake_hung_worker_is_killed(launches: list[Launch], fake: tuple[Path, Path]) -> None:
    launch = launch_fake(launches, fake, 2, "n0=ok n1=hang")
    rc = launch.finish(60)
    err = launch.stderr()
    # The guest's own status stands; the straggler is reported and killed.
    assert rc == 0, err
    assert "node 1 did not stop" in err
    assert not _wait_gone(list(launch.worker_pids().values()), 5)


def test_fake_sigint_stops_every_worker(launches: list[Launch], fake: tuple[Path, Path]) -> None:
    launch = launch_fake(launches, fake, 2, "n0=wait n1=hang")
    assert launch.wait_for(r"fake worker 1: waiting", 30, stream="err"), launch.stderr()
    pids = list(launch.worker_pids().values())
    assert len(pids) == 2
    os.kill(launch.proc.pid, signal.SIGINT)
    rc = launch.finish(30)
    assert rc == 130, launch.stderr()
    assert "interrupted by SIGINT" in launch.stderr()
    assert not _wait_gone(pids, 5)


def test_fake_workers_die_with_a_killed_launcher(
    launches: list[Launch], fake: tuple[Path, Path]
) -> None:
    launch = launch_fake(launches, fake, 2, "n0=wait n1=hang")
    assert launch.wait_for(r"fake worker 1: waiting", 30, stream="err"), launch.stderr()
    pids = list(launch.worker_pids().values())
    assert len(pids) == 2
    os.kill(launch.proc.pid, signal.SIGKILL)
    launch.finish(30)
    left = _wait_gone(pids, 10)
    assert not left, f"workers {left} outlived a SIGKILLed launcher (PR_SET_PDEATHSIG)"


def test_spec_files_hold_no_key(tmp_path: Path, fake: tuple[Path, Path]) -> None:
    """Each spec lists every node's public key and the session id; private keys stay
    in the launcher's memory (they go to each worker's stdin)."""
    kernel, _ = fake
    launcher = Launcher(
        Options(nodes=2, vcpus=2, memory=64 * MIB, kernel=str(kernel), data_plane="integrity")
    )
    launcher.tmpdir = tmp_path
    launcher._make_specs()
    pubkeys = [n.key.public_hex for n in launcher.nodes if n.key is not None]
    assert len(pubkeys) == 2 and pubkeys[0] != pubkeys[1]
    for node in launcher.nodes:
        assert node.spec_path.stat().st_mode & 0o777 == 0o600
        text = node.spec_path.read_text()
        spec = json.loads(text)
        cluster = spec["cluster"]
        assert cluster["node_index"] == node.index
        assert cluster["node_pubkeys_hex"] == pubkeys
        assert cluster["security"] == "integrity" and len(cluster["session_hex"]) == 32
        assert "private_key_hex" not in cluster and "secret_hex" not in cluster
        assert all(n.key is not None and n.key.private_hex not in text for n in launcher.nodes)
        assert spec["console_stdout"] == (node.index == 0)
        assert spec["numa"][node.index]["cpus"] == [node.index]
        assert [n["addr"].split(":")[0] for n in cluster["nodes"]] == ["127.0.0.1", "127.0.0.2"]


# =========================================================================== real distributed runs

_single_node_lines: dict[tuple[int, str], dict[str, str]] = {}


def single_node_reference(launches: list[Launch], vcpus: int, memory: str) -> dict[str, str]:
    key = (vcpus, memory)
    if key not in _single_node_lines:
        res = run_cluster(launches, "--nodes", "1", "--vcpus", str(vcpus), "--memory", memory)
        assert res.returncode == 0, explain(res)
        assert_all_passed(res.stdout)
        _single_node_lines[key] = result_lines(res.stdout)
    return _single_node_lines[key]


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize(("nodes", "memory"), [(2, "256M"), (3, "384M")])
def test_every_workload_passes_as_on_one_node(
    cluster_ready: None, launches: list[Launch], nodes: int, memory: str, transport: str
) -> None:
    reference = single_node_reference(launches, nodes, memory)
    res = run_cluster(
        launches, "--nodes", str(nodes), "--vcpus", str(nodes), "--memory", memory, "--stats",
        "--transport", transport,
    )  # fmt: skip
    print(f"{nodes} nodes over {transport}, run=all: {res.elapsed_s:.1f} s")
    print(res.stdout[-3000:])
    assert res.returncode == 0, explain(res)
    assert_all_passed(res.stdout)
    got = result_lines(res.stdout)
    assert set(got) == set(reference), (sorted(got), sorted(reference))
    for name, line in reference.items():
        assert got[name] == line, (
            f"{name}: {nodes} nodes gave\n  {got[name]}\none node gave\n  {line}"
        )
    assert re.search(rf"dvmm-guest: boot cpus={nodes} nodes={nodes}\b", res.stdout), res.stdout


@pytest.mark.parametrize(("nodes", "memory"), [(2, "256M"), (3, "384M")])
def test_counter_and_spinlock_cross_node_exact(
    cluster_ready: None, launches: list[Launch], nodes: int, memory: str
) -> None:
    counter_iters, spin_iters = 100_000, 50_000
    cmdline = f"run=counter,spinlock counter.iters={counter_iters} spinlock.iters={spin_iters}"
    res = run_cluster(
        launches, "--nodes", str(nodes), "--vcpus", str(nodes), "--memory", memory,
        "--cmdline", cmdline, "--stats",
    )  # fmt: skip
    print(f"{nodes} nodes, {cmdline}: {res.elapsed_s:.1f} s")
    print(res.stdout[-3000:])
    assert res.returncode == 0, explain(res)
    rep = assert_all_passed(res.stdout, min_workloads=2)
    lines = {b.split()[0]: b for b in rep.passed_lines}
    counter = re.search(r"\btotal=(\d+)", lines["counter"])
    spin = re.search(r"\btotal=(\d+) list=(\d+)", lines["spinlock"])
    assert counter and spin, rep.explain()
    assert int(counter[1]) == nodes * counter_iters >= 100_000
    assert int(spin[1]) == int(spin[2]) == nodes * spin_iters >= 100_000


@pytest.mark.parametrize("budget_quarters", [1, None], ids=["flag-S/4", "default-S/2"])
def test_memory_aggregation(
    cluster_ready: None, launches: list[Launch], budget_quarters: int | None
) -> None:
    # 3 nodes each giving S = 128M; the guest has 3S and sweeps most of it; each
    # node may keep S/4 (--foreign-budget) or, with no flag, S/2 (the default) of
    # other nodes' memory, so it should hold at most S + 25% / S + 50%.
    share = 128 * MIB
    sweep = 320 * MIB
    flag = () if budget_quarters is None else ("--foreign-budget", f"{share // 4 // MIB}M")
    res = run_cluster(
        launches, "--nodes", "3", "--vcpus", "3", "--memory", "384M",
        "--cmdline", f"run=sweep sweep.mem={sweep // MIB}M", "--stats", "--json", *flag,
    )  # fmt: skip
    print(f"memory aggregation: {res.elapsed_s:.1f} s")
    print(res.stdout[-4000:])
    assert res.returncode == 0, explain(res)
    assert_all_passed(res.stdout, min_workloads=1)
    summary = summary_json(res.stdout)
    extra = 0.25 if budget_quarters is not None else 0.5
    bound = int(share * (1 + extra)) // 4096
    peaks = [n["stats"]["dsm"]["resident_peak"] for n in summary["nodes"]]
    print(
        "per-node peak resident guest pages: "
        + ", ".join(f"node {i}: {p} ({p * 4096 / MIB:.1f} MiB)" for i, p in enumerate(peaks))
        + f"; bound S+{extra:.0%} = {bound} pages ({bound * 4096 / MIB:.0f} MiB), "
        f"sweep {sweep // MIB} MiB of {3 * share // MIB} MiB"
    )
    assert all(p <= bound for p in peaks), (peaks, bound)
    # The bound did the work (unbounded, each node peaks at ~214 MiB here).
    evictions = [n["stats"]["dsm"]["evictions"] for n in summary["nodes"]]
    assert all(e > 0 for e in evictions), evictions


@pytest.mark.parametrize("seed", [11, 2024, 987654321])
def test_randomized_stress(cluster_ready: None, launches: list[Launch], seed: int) -> None:
    # The guest's `stress` workload: every vCPU does random atomic adds, plain
    # reads and writes of its own words over a shared 1 MiB region whose pages
    # are homed on all three nodes; readers check coherence and ordering as they
    # go, CPU 0 replays every stream and compares the region word by word. The
    # checksum depends only on seed/cpus/iters/mem, so it must equal one node's.
    iters = 20_000
    cmdline = f"run=stress seed={seed} stress.iters={iters} stress.mem=1M"
    args = ("--vcpus", "3", "--memory", "384M", "--cmdline", cmdline)
    res = run_cluster(launches, "--nodes", "3", *args)
    print(f"stress seed={seed}, 3 nodes: {res.elapsed_s:.1f} s")
    print(res.stdout[-1500:])
    assert res.returncode == 0, explain(res)
    rep = assert_all_passed(res.stdout, min_workloads=1)
    line = next(b for b in rep.passed_lines if b.split()[0] == "stress")
    counts = dict(t.split("=", 1) for t in line.split()[1:] if "=" in t)
    assert counts["cpus"] == "3" and counts["seed"] == str(seed), line
    assert int(counts["adds"]) + int(counts["reads"]) + int(counts["writes"]) == 3 * iters, line
    assert re.search(r"\bdvmm-guest: boot cpus=3 nodes=3\b", res.stdout), res.stdout[-2000:]

    one = run_cluster(launches, "--nodes", "1", *args)
    assert one.returncode == 0, explain(one)
    assert_all_passed(one.stdout, min_workloads=1)
    assert result_lines(res.stdout)["stress"] == result_lines(one.stdout)["stress"], (
        f"3 nodes: {line}\n1 node:  {result_lines(one.stdout)['stress']}"
    )


def test_killed_worker_stops_the_vm(cluster_ready: None, launches: list[Launch]) -> None:
    launch = start_launcher(
        "--nodes", "2", "--vcpus", "2", "--memory", "256M", "--cmdline", "run=ep ep.size=64G"
    )  # fmt: skip
    launches.append(launch)
    assert launch.wait_for(r"dvmm-guest: boot ", 120), launch.stdout() + launch.stderr()
    time.sleep(1.0)
    assert launch.proc.poll() is None, "the run ended before the worker could be killed"
    pids = launch.worker_pids()
    assert set(pids) == {0, 1}, launch.stderr()
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    try:
        rc = launch.finish(KILLED_WORKER_BOUND_S + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher did not exit after node 1 was killed\n{launch.stderr()}")
    took = time.monotonic() - t0
    err = launch.stderr()
    print(f"killed node 1: launcher exited {rc} after {took:.1f} s\n{err[-2000:]}")
    assert rc != 0
    assert took < KILLED_WORKER_BOUND_S, took
    final = [line for line in err.splitlines() if line.startswith("dvmmctl: error:")]
    assert final and "node 1" in final[-1], err
    assert not _wait_gone(list(pids.values()), 5), "a worker process remains"


def test_stats_table_and_json(cluster_ready: None, launches: list[Launch]) -> None:
    res = run_cluster(
        launches, "--nodes", "2", "--vcpus", "2", "--memory", "256M",
        "--cmdline", "run=counter,falseshare", "--stats", "--json",
    )  # fmt: skip
    assert res.returncode == 0, explain(res)
    assert "dvmm stats:" in res.stdout
    table = res.stdout.split("dvmm stats:", 1)[1]
    print("dvmm stats:" + table)
    for row in ("read faults", "write faults", "resident pages (peak)", "pages sent"):
        assert row in table, row
    summary = summary_json(res.stdout)
    assert summary["status"] == 0 and summary["exit_code"] == 0
    assert [n["node"] for n in summary["nodes"]] == [0, 1]
    for n in summary["nodes"]:
        assert "dsm" in n["stats"], n
    assert summary["totals"]["write_faults"] > 0
    assert launcher.MAX_NODES == 16
