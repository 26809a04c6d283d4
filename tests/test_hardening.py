"""Daemon hardening (issue 11, item 3): names, boot files, state lock, bad input, SIGHUP.

Each confirmed bug has a test here that fails on the code before the fix:
- a VM name such as ``../../victim`` reached the file system (share_forget deleted
  files outside the state directory);
- a member of the API socket's group made the root daemon read a file it could not
  (``--initrd /etc/shadow``), and could not reach the socket at all when its
  directory was root:root 0750;
- a second daemon on the same state directory marked the first one's live VMs failed;
- deeply nested JSON on the API raised RecursionError; SIGHUP killed the daemon;
- ``failure_timeout = nan`` was accepted.

The "group member" is this test process forked and dropped to nobody/nogroup
(setresuid), which is what SO_PEERCRED then reports to the daemon.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon_cluster import KERNEL, ROOT, Cluster, Node, wait_for

from dvmmd.config import ConfigError, parse_config
from dvmmd.daemon.api import open_dir_to_group
from dvmmd.daemon.membership import Membership
from dvmmd.daemon.statelock import StateDirBusy, StateLock
from dvmmd.daemon.store import Store
from dvmmd.daemon.vms import VmManager
from dvmmd.vm import boot_files
from dvmmd.vm.names import InvalidName, check_vm_name, is_valid_name

NOBODY = 65534
NOGROUP = "nogroup"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setresuid, chown)")


# --------------------------------------------------------------------------- helpers


def as_nobody(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a forked child with uid/gid 65534 and no groups; its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            out = {"value": fn()}
        except BaseException as e:  # noqa: BLE001 -- reported to the parent
            out = {"raised": f"{type(e).__name__}: {e}"}
        try:
            os.write(w, json.dumps(out).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def api_call(
    path: str, op: str, args: dict[str, Any], fds: list[int] | None = None
) -> dict[str, Any]:
    """One request on a fresh connection; the final reply (events skipped)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        boot_files.send_request(s, json.dumps({"op": op, "args": args}).encode() + b"\n", fds or [])
        f = s.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                return {"closed": True}
            msg = json.loads(line)
            if "event" not in msg:
                return dict(msg)


def raw_exchange(path: str, data: bytes, shut: bool = False) -> list[dict[str, Any]]:
    """Send raw bytes; every reply line until the daemon closes or goes quiet."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = []
        f = s.makefile("rb")
        while True:
            try:
                line = f.readline()
            except TimeoutError:
                break
            if not line:
                break
            out.append(json.loads(line))
            if shut is False and len(out) >= data.count(b"\n"):
                break
        return out


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


@pytest.fixture
def pubdir() -> Iterator[Path]:
    """A private (0700 root) directory under /tmp, which nobody can reach through /tmp."""
    d = Path(tempfile.mkdtemp(prefix="dvmm-hard-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def group_node(cluster: Cluster, pubdir: Path, extra: str = "") -> Node:
    """One daemon whose API socket is in `pubdir`, for group nogroup."""
    (a,) = cluster.add(1)
    a.socket = str(pubdir / "dvmmd.sock")
    a.write_config([], extra=f'\n[api]\nsocket = "{a.socket}"\nsocket_group = "{NOGROUP}"\n{extra}')
    return a


# --------------------------------------------------------------------------- names


def test_vm_name_rule() -> None:
    for ok in ("a", "vm-1", "A.b_c", "x" * 63, "a.b"):
        assert check_vm_name(ok) == ok and is_valid_name(ok)
    for bad in ("", ".", "..", "../x", "a/b", "a..b", "-a", ".a", "x" * 64, "a b", "é", "a\n"):
        with pytest.raises(InvalidName) as ei:
            check_vm_name(bad)
        assert f"invalid VM name {bad!r}" in str(ei.value)
    for bad_type in (None, 3, ["a"], {"a": 1}):
        with pytest.raises(InvalidName, match="expected a string"):
            check_vm_name(bad_type)


def _vmm(tmp_path: Path) -> VmManager:
    state = tmp_path / "state"
    state.mkdir()
    cfg = parse_config(
        f'[node]\nname = "n1"\nlisten = "127.0.0.1:7400"\nstate_dir = "{state}"\n'
        f'[cluster]\nsecret_file = "{tmp_path / "secret"}"\n'
    )
    m = Membership(
        "n1", "127.0.0.1:7400", 1, suspect_timeout=1.0, failure_timeout=3.0, local_info=dict
    )

    async def call(node: str, method: str, params: dict[str, Any], timeout: float) -> Any:
        raise AssertionError("no peer calls expected")

    return VmManager(cfg=cfg, store=Store(state / "dvmmd.db"), membership=m, call=call)


def test_share_forget_traversal_keeps_victim(tmp_path: Path) -> None:
    """The confirmed bug: share_forget {"name": "../../victim"} deleted that directory."""
    vmm = _vmm(tmp_path)
    vmm.vm_dir.mkdir()  # STATE/vms exists on any node that ever ran a VM
    victim = tmp_path / "victim"  # = STATE/vms/../../victim
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    for call in (
        lambda: vmm.node_shares.share_forget({"name": "../../victim"}),
        lambda: vmm.handle_rpc("share_forget", {"name": "../../victim"}),
    ):
        with pytest.raises(InvalidName) as ei:
            asyncio.run(call())
        assert "invalid VM name '../../victim'" in str(ei.value)
    assert (victim / "precious").read_text() == "keep me"


@pytest.mark.parametrize(
    "method",
    [
        "share_prepare",
        "share_start",
        "share_stop",
        "share_forget",
        "share_stats",
        "share_exited",
        "console_read",
        "console_write",
        "vm_op",
        "vm_find",
        "boot_file_put",
    ],
)
def test_every_peer_rpc_checks_the_vm_name(tmp_path: Path, method: str) -> None:
    vmm = _vmm(tmp_path)
    params = {
        "name": "../x",
        "owner": "n2",
        "boot_id": "0" * 32,
        "node": "n2",
        "node_index": 0,
        "op": "status",
        "data": "",
    }
    with pytest.raises(InvalidName, match=r"invalid VM name '\.\./x'"):
        asyncio.run(vmm.handle_rpc(method, params))
    handler = {
        "share_exited": vmm.owner.on_share_exited,
        "vm_op": vmm.owner._rpc_vm_op,
        "vm_find": vmm.owner._rpc_vm_find,
    }.get(method) or getattr(vmm.node_shares, method)
    with pytest.raises(InvalidName):  # the handler itself checks too
        asyncio.run(handler(params))
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- boot files


def _kernel_in(d: Path, name: str = "kernel.elf", mode: int = 0o644) -> Path:
    p = d / name
    shutil.copyfile(KERNEL, p)
    p.chmod(mode)
    return p


def test_group_member_cannot_make_the_daemon_read_a_file(cluster: Cluster, pubdir: Path) -> None:
    """`--initrd /etc/shadow` by a socket-group member: refused, naming the file; the
    member can reach the socket at all only because the daemon opened its directory."""
    a = group_node(cluster, pubdir)
    cluster.start_all()
    st = os.stat(pubdir)
    assert st.st_gid == grp.getgrnam(NOGROUP).gr_gid and stat.S_IMODE(st.st_mode) == 0o710
    kernel = _kernel_in(pubdir)
    secret = pubdir / "secret-initrd"
    secret.write_text("root:$6$very-secret\n")
    secret.chmod(0o600)

    def attack() -> Any:
        params: dict[str, Any] = {"name": "steal", "kernel": str(kernel), "initrd": str(secret)}
        fds = boot_files.open_boot_files({"kernel": str(kernel)})  # the kernel it may read
        params["kernel_fd"] = 0
        return api_call(a.socket, "boot", params, fds)

    reply = as_nobody(attack)["value"]
    assert reply["ok"] is False
    assert reply["error"].startswith(
        f"initrd {secret}: dvmmd does not open files for uid {NOBODY} (pid "
    )
    assert reply["error"].endswith(
        "): pass the file itself (dvmmctl boot sends it; API: initrd_fd with SCM_RIGHTS)"
    )
    # The client side (what dvmmctl does) cannot open it either:
    r = as_nobody(lambda: boot_files.open_boot_files({"initrd": str(secret)}))
    assert r == {"raised": f"BootFileError: initrd {secret} is not readable: Permission denied"}

    # An O_PATH descriptor can be had without read permission: the daemon must not
    # read through it with its own rights.
    def opath() -> Any:
        kfd = os.open(kernel, os.O_RDONLY)
        ifd = os.open(secret, os.O_PATH)
        args = {"name": "steal", "kernel_fd": 0, "initrd_fd": 1}
        return api_call(a.socket, "boot", args, [kfd, ifd])

    reply = as_nobody(opath)["value"]
    assert reply["ok"] is False
    assert reply["error"].startswith("initrd <initrd passed by uid 65534")
    assert reply["error"].endswith("cannot read the passed file: Bad file descriptor")
    assert a.req("list")["vms"] == []  # nothing was booted, nothing recorded
    assert "very-secret" not in a.log()


def test_fd_passing_boot_runs_the_callers_file(cluster: Cluster, pubdir: Path) -> None:
    a = group_node(cluster, pubdir)
    cluster.start_all()
    kernel = _kernel_in(pubdir)
    digest = hashlib.sha256(kernel.read_bytes()).hexdigest()

    def boot() -> Any:
        params: dict[str, Any] = {"name": "mine", "kernel": str(kernel), "cmdline": "sleep=0"}
        fds = boot_files.open_boot_files(params)
        try:
            return api_call(a.socket, "boot", params, fds)
        finally:
            for fd in fds:
                os.close(fd)

    reply = as_nobody(boot)["value"]
    assert reply["ok"] is True, reply
    req = reply["result"]["request"]
    assert req["kernel"].startswith("vmdir:kernel-") and req["kernel"].endswith(".img")
    assert req["boot_files"]["kernel"] == {
        "source": str(kernel),
        "by": req["boot_files"]["kernel"]["by"],
        "size": kernel.stat().st_size,
        "sha256": digest,
    }
    assert req["boot_files"]["kernel"]["by"].startswith(f"uid {NOBODY} ")
    wait_for(lambda: a.req("status", name="mine")["state"] == "stopped", 10, "the VM to end")
    vm_dir = a.dir / "vms" / "mine"
    spec = json.loads((vm_dir / "spec.json").read_text())
    copy = vm_dir / req["kernel"].removeprefix("vmdir:")
    assert spec["kernel"] == str(copy)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    # A path from a non-root caller is refused even for a file it can read...
    reply = as_nobody(lambda: api_call(a.socket, "boot", {"name": "p", "kernel": str(kernel)}))
    assert "dvmmd does not open files for uid 65534" in reply["value"]["error"]
    # ...and rm removes the copy with the VM's directory.
    a.req("rm", name="mine")
    assert not vm_dir.exists()


def test_images_dir_paths_for_non_root(cluster: Cluster, pubdir: Path) -> None:
    imgs = pubdir / "images"
    imgs.mkdir(mode=0o755)
    a = group_node(cluster, pubdir, extra=f'\n[vm]\nimages_dir = "{imgs}"\n')
    cluster.start_all()
    ok = _kernel_in(imgs, "ok.elf", 0o644)
    private = _kernel_in(imgs, "private.elf", 0o640)
    (imgs / "link.elf").symlink_to(pubdir / "elsewhere.elf")
    _kernel_in(pubdir, "elsewhere.elf", 0o644)

    def boot(path: Path, name: str) -> Any:
        return api_call(a.socket, "boot", {"name": name, "kernel": str(path), "cmdline": "x"})

    r = as_nobody(lambda: boot(ok, "img1"))["value"]
    assert r["ok"] is True and r["result"]["request"]["boot_files"]["kernel"]["source"] == str(ok)
    r = as_nobody(lambda: boot(private, "img2"))["value"]
    assert r["ok"] is False and r["error"].startswith(f"kernel {private}: not world-readable")
    r = as_nobody(lambda: boot(imgs / "link.elf", "img3"))["value"]
    assert r["ok"] is False and "dvmmd does not open files for uid 65534" in r["error"]


def test_multinode_fd_boot_sends_the_copy_to_the_other_node(cluster: Cluster) -> None:
    a, b = cluster.add(2)
    cluster.start_all()
    params: dict[str, Any] = {
        "name": "wide",
        "kernel": KERNEL,
        "vcpus": 4,
        "memory": "64M",
        "nodes": ["n1", "n2"],
        "cmdline": "sleep=0",
    }
    fds = boot_files.open_boot_files(params)
    try:
        reply = api_call(a.socket, "boot", params, fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert reply["ok"] is True, reply
    file = reply["result"]["request"]["kernel"].removeprefix("vmdir:")
    wait_for(lambda: a.req("status", name="wide")["state"] == "stopped", 10, "the VM to end")
    for node in (a, b):
        spec = json.loads((node.dir / "vms" / "wide" / "spec.json").read_text())
        assert spec["kernel"] == str(node.dir / "vms" / "wide" / file)
        assert Path(spec["kernel"]).read_bytes() == Path(KERNEL).read_bytes()
    a.req("rm", name="wide")
    assert not (a.dir / "vms" / "wide").exists() and not (b.dir / "vms" / "wide").exists()


def test_copy_fd_refuses_what_is_not_a_readable_regular_file(tmp_path: Path) -> None:
    dest = tmp_path / "out.img"
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(boot_files.BootFileError, match="kernel k: not a regular file"):
            boot_files.copy_fd("kernel", "k", fd, dest)
    finally:
        os.close(fd)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    fd = os.open(empty, os.O_RDONLY)
    try:
        with pytest.raises(boot_files.BootFileError, match="initrd e: the file is empty"):
            boot_files.copy_fd("initrd", "e", fd, dest)
    finally:
        os.close(fd)
    assert list(tmp_path.iterdir()) == [empty]  # no partial copy left behind


def test_vmdir_references_stay_in_the_vm_directory(tmp_path: Path) -> None:
    ok = "kernel-" + "a" * 32 + ".img"
    assert boot_files.resolve_vmdir({"kernel": "vmdir:" + ok, "initrd": None}, tmp_path) == {
        "kernel": str(tmp_path / ok),
        "initrd": None,
    }
    for bad in ("vmdir:../../etc/shadow", "vmdir:kernel-x.img", "vmdir:/etc/shadow"):
        with pytest.raises(boot_files.BootFileError, match="malformed boot file reference"):
            boot_files.resolve_vmdir({"kernel": bad}, tmp_path)
    assert (
        boot_files.resolve_vmdir({"kernel": "/boot/vmlinuz"}, tmp_path)["kernel"] == "/boot/vmlinuz"
    )


def test_boot_file_put_chunks_checked(tmp_path: Path) -> None:
    data = os.urandom(3000)
    digest = hashlib.sha256(data).hexdigest()
    boot_id = "b" * 32
    put = boot_files.PartialFile.put
    assert put(tmp_path, "initrd", boot_id, 0, data[:1000], len(data), digest) is False
    with pytest.raises(boot_files.BootFileError, match="chunk at offset 2000, expected 1000"):
        put(tmp_path, "initrd", boot_id, 2000, data[2000:], len(data), digest)
    assert put(tmp_path, "initrd", boot_id, 1000, data[1000:], len(data), digest) is True
    assert (tmp_path / f"initrd-{boot_id}.img").read_bytes() == data
    with pytest.raises(boot_files.BootFileError, match="does not match its sha256"):
        put(tmp_path, "kernel", boot_id, 0, b"evil", 4, digest)
    assert not (tmp_path / f"kernel-{boot_id}.img").exists()
    with pytest.raises(boot_files.BootFileError, match="bad boot file"):
        put(tmp_path, "../k", boot_id, 0, b"x", 1, digest)


# --------------------------------------------------------------------------- socket dir


def test_socket_dir_opened_to_the_group_only_when_needed(pubdir: Path) -> None:
    gid = grp.getgrnam(NOGROUP).gr_gid
    d = pubdir / "run"
    d.mkdir(mode=0o750)  # what systemd's RuntimeDirectory gives: root:root 0750
    open_dir_to_group(d, gid, NOGROUP)
    st = os.stat(d)
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o710)
    shared = pubdir / "shared"
    shared.mkdir()
    shared.chmod(0o755)  # reachable by everyone already: left alone
    open_dir_to_group(shared, gid, NOGROUP)
    st = os.stat(shared)
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    theirs = pubdir / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, -1)
    with pytest.raises(OSError, match="not dvmmd's to change"):
        open_dir_to_group(theirs, gid, NOGROUP)


# --------------------------------------------------------------------------- state lock


def test_second_daemon_leaves_live_vms_alone(cluster: Cluster) -> None:
    (a,) = cluster.add(1)
    cluster.start_all()
    r = a.ctl("boot", "live", "--kernel", KERNEL, "--cmdline", "sleep=60")
    assert r.returncode == 0, r.stderr
    assert a.proc is not None
    second = subprocess.run(
        [sys.executable, "-m", "dvmmd.daemon", "--config", str(a.config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )
    assert second.returncode == 1
    assert f"state directory {a.dir} is in use by pid {a.proc.pid}" in second.stderr
    st = a.req("status", name="live")
    assert st["state"] == "running", st["reason"]
    assert a.ping()


def test_state_lock_released_with_its_holder(tmp_path: Path) -> None:
    first = StateLock(tmp_path)
    first.acquire()
    with pytest.raises(StateDirBusy, match=f"in use by pid {os.getpid()}"):
        StateLock(tmp_path).acquire()
    first.release()
    again = StateLock(tmp_path)
    again.acquire()
    again.release()


# --------------------------------------------------------------------------- bad input


def test_api_answers_every_malformed_request(cluster: Cluster) -> None:
    (a,) = cluster.add(1)
    cluster.start_all()
    cases: list[tuple[bytes, str]] = [
        (b"[" * 100_000 + b"\n", "bad request: JSON nested deeper than 32 levels"),
        (b'{"op": "ping", "args": ' + b"[" * 40 + b"]" * 40 + b"}\n", "nested deeper"),
        (b'{"op": "p\xffing"}\n', "bad request: not UTF-8: invalid start byte at byte 9"),
        (b"[1, 2]\n", 'bad request: expected a JSON object {"op": ..., "args": {...}}, got array'),
        (b'"ping"\n', "got string"),
        (b'{"op": 7}\n', "bad request: 'op' must be a string, got number"),
        (b'{"op": "ping", "args": []}\n', "bad request: 'args' must be an object, got array"),
        (b'{"op": "ping", "x": 1}\n', "bad request: unknown field 'x' (expected op, args)"),
        (b'{"op": "status", "args": {"name": NaN}}\n', "non-standard JSON constant NaN"),
        (b'{"op": "reboot"}\n', "unknown op 'reboot' (known: boot, console,"),
        (b'{"op": "status"}\n', "status: missing argument 'name'"),
        (b'{"op": "status", "args": {"name": 5}}\n', "argument 'name' must be string, got number"),
        (b'{"op": "stop", "args": {"name": "a", "force": "yes"}}\n', "'force' must be boolean"),
        (b'{"op": "status", "args": {"name": "../x"}}\n', "invalid VM name '../x'"),
        (b'{"op": "boot", "args": {"name": "a", "vcpus": true}}\n', "'vcpus' must be"),
        (b'{"op": "boot", "args": {"name": "a", "colour": 1}}\n', "unknown argument 'colour'"),
        (b'{"op": "boot", "args": {"name": "a", "kernel_fd": 0}}\n', "index 0 but 0 file"),
        (b'{"op": "boot", "args": {"name": "a", "timeout_s": -1}}\n', "timeout_s must be a"),
        (b'{"op": "console_input", "args": {"name": "a", "data_b64": "%%"}}\n', "not valid b"),
        (b'{"op": "status", "args": {"name": "a"}}\n' * 2, "no VM named 'a'"),
        (b"1" * 5000 + b"\n", "invalid JSON: Exceeds the limit (4300 digits)"),
    ]
    for data, expected in cases:
        replies = raw_exchange(a.socket, data)
        assert replies, data[:60]
        for reply in replies:
            assert reply["ok"] is False and expected in reply["error"], (data[:60], reply)
    # Several errors on one connection: the connection stays usable.
    replies = raw_exchange(a.socket, b'{"op": 1}\nnope\n{"op": "ping"}\n')
    assert [r["ok"] for r in replies] == [False, False, True]
    # A line without its newline, then EOF.
    assert raw_exchange(a.socket, b'{"op": "ping"', shut=True) == [
        {"ok": False, "error": "bad request: incomplete line (no newline)"}
    ]
    # Oversized: answered, then the connection is closed.
    big = raw_exchange(a.socket, b" " * ((1 << 20) + 1))
    assert big == [{"ok": False, "error": "request too large (over 1048576 bytes)"}]
    assert a.ping()
    assert "Traceback" not in a.log()


# --------------------------------------------------------------------------- SIGHUP


def test_sighup_reloads_the_log_level_and_keeps_serving(cluster: Cluster) -> None:
    (a,) = cluster.add(1)
    cluster.start_all()
    assert a.proc is not None
    text = a.config.read_text()
    a.config.write_text(
        text.replace('log_level = "debug"', 'log_level = "info"').replace("vcpus = 2", "vcpus = 1")
    )
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: vcpus changed" in a.log(), 10, "the reload to be logged")
    assert a.ping() and a.proc.poll() is None
    assert "SIGHUP: log level DEBUG -> INFO" in a.log()
    assert f"SIGHUP: vcpus changed in {a.config}; restart dvmmd to apply" in a.log()
    a.config.write_text("[node\n")  # a broken file is reported and ignored
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in a.log(), 10, "the error to be logged")
    assert a.ping() and a.proc.poll() is None
    assert f"SIGHUP: configuration not reloaded: {a.config}:1: invalid TOML" in a.log()
    a.config.write_text(text)
    a.stop()
    assert a.proc.returncode == 0


# --------------------------------------------------------------------------- config values


def _cfg(**cluster: str) -> str:
    lines = "".join(f"{k} = {v}\n" for k, v in cluster.items())
    return (
        '[node]\nname = "n1"\nlisten = "127.0.0.1:7400"\nstate_dir = "/var/lib/dvmmd"\n'
        f'[cluster]\nsecret_file = "/etc/dvmmd/secret"\n{lines}'
    )


@pytest.mark.parametrize(
    ("values", "key", "message"),
    [
        ({"failure_timeout": "nan"}, "cluster.failure_timeout", "finite positive number, got nan"),
        ({"failure_timeout": "inf"}, "cluster.failure_timeout", "finite positive number, got inf"),
        ({"heartbeat_interval": "nan"}, "cluster.heartbeat_interval", "got nan"),
        ({"heartbeat_interval": "-0.5"}, "cluster.heartbeat_interval", "got -0.5"),
        ({"suspect_timeout": "nan"}, "cluster.suspect_timeout", "got nan"),
        (
            {"heartbeat_interval": "1.0", "failure_timeout": "1.5"},
            "cluster.failure_timeout",
            "must be greater than 2 x cluster.heartbeat_interval (2 x 1.0), got 1.5",
        ),
        (
            {"heartbeat_interval": "1.0", "failure_timeout": "5", "suspect_timeout": "1"},
            "cluster.suspect_timeout",
            "must be greater than cluster.heartbeat_interval (1.0), got 1.0",
        ),
        ({"failure_timeout": "1e9"}, "cluster.failure_timeout", "at most 86400.0 seconds"),
    ],
)
def test_config_durations_finite_and_consistent(
    values: dict[str, str], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(_cfg(**values), "/etc/dvmmd/dvmmd.toml")
    assert ei.value.key == key and message in str(ei.value), str(ei.value)


def test_config_other_values(tmp_path: Path) -> None:
    cases = [
        ("\n[worker]\nstop_grace = nan\n", "worker.stop_grace", "got nan"),
        ('\n[worker]\ndata_ports = "7300-7500"\n', "worker.data_ports", "port 7400"),
        ('\n[api]\nsocket_mode = "0060"\n', "api.socket_mode", "owner needs read-write"),
        ('\n[api]\nsocket_group = "no-such-group-x"\n', "api.socket_group", "no group named"),
        ('\n[vm]\nimages_dir = "images"\n', "vm.images_dir", "absolute path"),
    ]
    for extra, key, message in cases:
        with pytest.raises(ConfigError) as ei:
            parse_config(_cfg() + extra, "x.toml")
        assert ei.value.key == key and message in str(ei.value), str(ei.value)
    c = parse_config(_cfg() + f'\n[vm]\nimages_dir = "{tmp_path}"\n')
    assert c.images_dir == tmp_path


def test_state_database_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        Store(tmp_path / "dvmmd.db").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "dvmmd.db").stat().st_mode) == 0o600
