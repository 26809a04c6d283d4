"""A node's share of a VM: one VMM worker process, its ports, console and result.

Every node that runs part of a VM (a *share*: its vCPUs and its home memory range,
numa[i]) serves these RPCs from the VM's owner (vm_owner.py):

- ``share_prepare``: the node checks its own free resources (the authority, so
  concurrent boots from different owners cannot overcommit it), reserves a data-path
  port, makes its X25519 key pair for this boot (dvmmd.security.keys) and answers its address and
  public key;
- ``share_start``: it writes its spec (the common spec + ``cluster = {node_index,
  nodes[{addr}], boot_node: 0, security, session_hex, node_pubkeys_hex}``: nothing
  secret; a recovery's ``console_keep``/``console_note`` continue the console log) and
  spawns the worker, ``WORKER_CMD SPEC.json RESULT.json`` (default
  ``python -m dvmmd.worker``) with ``--key-stdin``, writing its private key to the
  worker's stdin: it is never in a file or a message;
- ``share_stop``, ``share_forget``, ``share_stats``, ``console_read``,
  ``console_write``, ``boot_file_put``;
- ``share_control`` (boot node): a request for the running VM's control socket
  (``control.sock`` in the VM's directory; snapshot, vCPU migration, placement).

It tracks the worker and reports its exit to the owner (``share_exited``). Workers
die with their daemon (PR_SET_PDEATHSIG); a node whose VM's owner dies stops its
workers, so no worker is left behind.

Console: the boot node's worker writes the console to its ``console_log``; anyone can
read it through ``console_read`` (tail by byte offset). Live counters: the worker's
RESULT.json has ``stats`` at the end; while it runs, a worker may publish live
counters by atomically rewriting ``RESULT.json.stats`` (a JSON object).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from dvmmd.config import Config
from dvmmd.daemon.membership import MemberEvent, Membership
from dvmmd.daemon.store import SHARE_ACTIVE_STATES, ShareRecord, Store
from dvmmd.daemon.vm_common import BackgroundTasks, CallFn, VmError, log
from dvmmd.security.keys import NodeKey
from dvmmd.vm import boot_files, control
from dvmmd.vm.boot_files import BootFileError
from dvmmd.vm.names import check_node_name, check_vm_name
from dvmmd.vm.sizes import format_size
from dvmmd.vm.spec import SpecError, validate_spec

CONSOLE_CHUNK = 64 * 1024
PREPARE_EXPIRY = 60.0
#: The longest control socket path that fits a sockaddr_un (108 bytes with its NUL).
MAX_SOCKET_PATH = 100


def classify(result: dict[str, Any], stop_reason: str | None) -> tuple[str, str]:
    """Map a worker result to (state, human reason)."""
    reason = result.get("reason")
    err = result.get("error")
    if stop_reason is not None and reason in ("stopped", None, "crash", "error"):
        return "stopped", stop_reason
    if reason == "debug_exit":
        return "stopped", f"guest exited with status {result.get('status')}"
    if reason == "shutdown":
        return "stopped", "guest shut down"
    if reason == "stopped":
        return "stopped", "stopped"
    if reason == "timeout":
        return "failed", "timed out" + (f": {err}" if err else "")
    if reason == "crash":
        return "failed", "guest crashed" + (f": {err}" if err else "")
    return "failed", str(err or f"worker ended with reason {reason!r}")


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any], mode: int = 0o600) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class LocalShare:
    """This node's worker for one VM."""

    rec: ShareRecord
    dir: Path
    port: int | None = None
    proc: asyncio.subprocess.Process | None = None
    stop_reason: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    prepared_at: float = field(default_factory=time.monotonic)
    #: The console input FIFO, held open read-write by the daemon (boot node only) so
    #: input written before the VMM opened it waits in the pipe.
    console_in_fd: int | None = None
    #: This node's data-path key pair for this boot (multi-node), from share_prepare
    #: until the worker has the private half.
    key: NodeKey | None = None

    @property
    def console_in_path(self) -> Path:
        return self.dir / "console.in"

    @property
    def spec_path(self) -> Path:
        return self.dir / "spec.json"

    @property
    def result_path(self) -> Path:
        return self.dir / "result.json"

    @property
    def console_path(self) -> Path:
        return self.dir / "console.log"

    @property
    def control_path(self) -> Path:
        """The running VM's control socket (boot node; rust/src/vm/control.rs)."""
        return self.dir / "control.sock"

    @property
    def active(self) -> bool:
        return self.rec.state in SHARE_ACTIVE_STATES


class NodeShares:
    """This node's shares of VMs (whoever owns them), by VM name."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        membership: Membership,
        call: CallFn,
        tasks: BackgroundTasks,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.node_name
        self.store = store
        self.membership = membership
        self.call = call
        self.spawn = tasks.spawn
        self.vm_dir = cfg.state_dir / "vms"
        self.shares: dict[str, LocalShare] = {}
        self.ports_in_use: set[int] = set()

    def rpc_handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]:
        return {
            "share_prepare": self.share_prepare,
            "share_start": self.share_start,
            "share_stop": self.share_stop,
            "share_forget": self.share_forget,
            "share_stats": self.share_stats,
            "console_read": self.console_read,
            "console_write": self.console_write,
            "boot_file_put": self.boot_file_put,
            "share_control": self.share_control,
        }

    def used(self) -> tuple[int, int]:
        active = [s for s in self.shares.values() if s.active]
        return sum(s.rec.vcpus for s in active), sum(s.rec.memory for s in active)

    def is_active(self, name: str) -> bool:
        sh = self.shares.get(name)
        return sh is not None and sh.active

    def on_member_event(self, ev: MemberEvent) -> None:
        """A VM's owner that dies, leaves or restarts: stop its workers here."""
        if ev.name == self.name or not (ev.new in ("dead", "left") or ev.restarted):
            return
        why = ev.reason or f"node {ev.name} is {ev.new}"
        for sh in list(self.shares.values()):
            if sh.rec.owner == ev.name and sh.active:
                log.warning(
                    "VM %s: its owner %s is gone (%s); stopping the local worker",
                    sh.rec.vm,
                    ev.name,
                    why,
                )
                self.spawn(self._stop_local(sh, f"owner node {ev.name} failed: {why}", force=True))

    # --- share side (every node) ----------------------------------------------------

    def _reserve_port(self) -> int:
        lo, hi = self.cfg.data_ports
        host = self.cfg.advertise[0]
        for port in range(lo, hi + 1):
            if port in self.ports_in_use:
                continue
            try:
                with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                    s.bind((host, port))
            except OSError:
                continue
            self.ports_in_use.add(port)
            return port
        raise VmError(f"node {self.name}: no free data port in {lo}-{hi} (worker.data_ports)")

    def _release(self, sh: LocalShare) -> None:
        if sh.port is not None:
            self.ports_in_use.discard(sh.port)
            sh.port = None

    async def share_prepare(self, p: dict[str, Any]) -> dict[str, Any]:
        name = check_vm_name(p["name"])
        check_node_name(p["owner"])
        old = self.shares.get(name)
        if old is not None and old.active:
            if old.rec.boot_id == p["boot_id"]:
                host = self.cfg.advertise[0]
                return {
                    "addr": f"{host}:{old.port}" if old.port else "",
                    "pubkey_hex": old.key.public_hex if old.key else "",
                }
            raise VmError(f"node {self.name} already runs VM {name}")
        vcpus, memory = int(p["vcpus"]), int(p["memory"])
        used_v, used_m = self.used()
        if used_v + vcpus > self.cfg.vcpus:
            raise VmError(
                f"node {self.name} has {self.cfg.vcpus - used_v} free vCPUs, {vcpus} needed"
            )
        if used_m + memory > self.cfg.memory:
            raise VmError(
                f"node {self.name} has {format_size(self.cfg.memory - used_m)} free "
                f"memory, {format_size(memory)} needed"
            )
        for what in ("kernel", "initrd"):  # every node's worker loads the spec's files
            path = p.get(what)
            if not path:
                continue
            try:  # a copy the owner pushed into this node's VM directory (dvmmd.vm.boot_files)?
                copy = boot_files.vmdir_file(path)
            except BootFileError as e:
                raise VmError(f"node {self.name}: {e}") from None
            if copy is not None:
                if not (self.vm_dir / name / copy).is_file():
                    raise VmError(f"{what} {copy} was not transferred to node {self.name}")
            elif not os.access(str(path), os.R_OK):
                raise VmError(f"{what} {path} is not readable on node {self.name}")
        d = self.vm_dir / name
        d.mkdir(parents=True, exist_ok=True, mode=0o750)
        rec = ShareRecord(
            vm=name,
            owner=str(p["owner"]),
            boot_id=str(p["boot_id"]),
            node_index=int(p["node_index"]),
            vcpus=vcpus,
            memory=memory,
            state="prepared",
        )
        sh = LocalShare(rec, d)
        if p.get("multi"):
            sh.port = self._reserve_port()
            sh.key = NodeKey.generate()  # the private half stays in this process
        self.store.put_share(rec)
        self.shares[name] = sh
        self.spawn(self._expire_prepared(sh))
        return {
            "addr": f"{self.cfg.advertise[0]}:{sh.port}" if sh.port else "",
            "pubkey_hex": sh.key.public_hex if sh.key else "",
        }

    async def _expire_prepared(self, sh: LocalShare) -> None:
        await asyncio.sleep(PREPARE_EXPIRY)
        if sh.rec.state == "prepared" and self.shares.get(sh.rec.vm) is sh:
            log.warning("VM %s: prepared but never started; releasing", sh.rec.vm)
            self._finish(sh, "failed", "prepared but never started", None)

    async def share_start(self, p: dict[str, Any]) -> dict[str, Any]:
        name = check_vm_name(p["name"])
        sh = self.shares.get(name)
        if sh is None or sh.rec.boot_id != p["boot_id"] or sh.rec.state != "prepared":
            raise VmError(f"VM {name} was not prepared on node {self.name}")
        # vmdir: kernel/initrd copies live in this node's own VM directory (dvmmd.vm.boot_files).
        spec = boot_files.resolve_vmdir(dict(p["spec"]), sh.dir)
        spec["console_log"] = str(sh.console_path)
        cluster = p.get("cluster")
        boot_index = 0 if cluster is None else int(cluster.get("boot_node", 0))
        if int(p.get("node_index", 0)) == boot_index:
            try:
                self._open_console_input(sh)
            except OSError as e:
                self._finish(sh, "failed", f"cannot create the console input FIFO: {e}", None)
                raise VmError(
                    f"node {self.name}: cannot create {sh.console_in_path}: {e}"
                ) from None
            spec["console_input"] = str(sh.console_in_path)
            if len(str(sh.control_path)) <= MAX_SOCKET_PATH:
                spec["control"] = str(sh.control_path)
        spec["cluster"] = (
            None if cluster is None else {"node_index": int(p["node_index"]), **cluster}
        )
        try:
            # Refuses a private key in the request: no key travels between nodes.
            spec = validate_spec(spec)
            if spec["cluster"] is not None:
                self._check_share_keys(sh, spec["cluster"])
        except SpecError as e:
            self._finish(sh, "failed", f"invalid VM spec: {e}", None)
            raise VmError(f"node {self.name}: invalid VM spec: {e}") from None
        for f in (sh.result_path, sh.result_path.with_suffix(".json.stats")):
            f.unlink(missing_ok=True)
        _write_json(sh.spec_path, spec)
        _start_console_log(sh.console_path, bool(p.get("console_keep")), p.get("console_note"))
        key, sh.key = sh.key, None  # from here on only the worker has it
        cmd = [*self.cfg.worker_command, str(sh.spec_path), str(sh.result_path)]
        if spec["cluster"] is not None:
            cmd.append("--key-stdin")
        logf = _open_log(sh.dir / "worker.log")
        try:
            self._release(sh)  # the worker binds the port itself now
            sh.proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE if key else asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                preexec_fn=_set_pdeathsig,
                cwd=str(sh.dir),
            )
        except OSError as e:
            self._finish(sh, "failed", f"cannot start worker {cmd[0]}: {e}", None)
            raise VmError(
                f"node {self.name}: cannot start worker ({' '.join(cmd[:3])}): {e}"
            ) from None
        finally:
            logf.close()
        if key is not None:
            await _send_key(sh.proc, key)
        sh.rec.state = "running"
        sh.rec.pid = sh.proc.pid
        self.store.put_share(sh.rec)
        log.info(
            "VM %s: worker pid %d started (node index %d)", name, sh.proc.pid, sh.rec.node_index
        )
        self.spawn(self._watch(sh))
        return {"pid": sh.proc.pid}

    def _check_share_keys(self, sh: LocalShare, cluster: dict[str, Any]) -> None:
        """The owner's cluster object must match this node: its setting and its key."""
        if cluster["security"] != self.cfg.data_plane:
            raise SpecError(
                f"the VM's data plane is {cluster['security']!r} but node {self.name} is "
                f"configured for {self.cfg.data_plane!r} (cluster.data_plane must be the "
                "same on every node)"
            )
        transport = cluster.get("transport", "tcp")
        if transport != self.cfg.transport:
            raise SpecError(
                f"the VM's data-plane transport is {transport!r} but node {self.name} is "
                f"configured for {self.cfg.transport!r} (cluster.transport must be the same "
                "on every node)"
            )
        mine = cluster["node_pubkeys_hex"][cluster["node_index"]]
        if sh.key is None or mine != sh.key.public_hex:
            raise SpecError(
                f"cluster.node_pubkeys_hex[{cluster['node_index']}] is not the key node "
                f"{self.name} made for this boot"
            )

    async def _watch(self, sh: LocalShare) -> None:
        assert sh.proc is not None
        rc = await sh.proc.wait()
        result = _read_json(sh.result_path)
        if result is None:
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            result = {
                "reason": "crash" if sh.stop_reason is None else "stopped",
                "status": None,
                "error": f"worker {how} without writing a result (see {sh.dir / 'worker.log'})",
                "vcpu_dump": None,
                "stats": {},
            }
        state, reason = classify(result, sh.stop_reason)
        self._finish(sh, state, reason, result)
        log.info("VM %s: worker on this node ended: %s", sh.rec.vm, reason)
        await self._report_exit(sh, result)

    def _open_console_input(self, sh: LocalShare) -> None:
        self._close_console_input(sh)
        sh.console_in_path.unlink(missing_ok=True)
        os.mkfifo(sh.console_in_path, 0o600)
        sh.console_in_fd = os.open(sh.console_in_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def _close_console_input(self, sh: LocalShare) -> None:
        if sh.console_in_fd is not None:
            os.close(sh.console_in_fd)
            sh.console_in_fd = None

    def _finish(
        self, sh: LocalShare, state: str, reason: str, result: dict[str, Any] | None
    ) -> None:
        self._release(sh)
        self._close_console_input(sh)
        sh.rec.state, sh.rec.reason, sh.rec.result, sh.rec.pid = state, reason, result, None
        self.store.put_share(sh.rec)
        sh.done.set()

    async def _report_exit(self, sh: LocalShare, result: dict[str, Any]) -> None:
        params = {
            "name": sh.rec.vm,
            "boot_id": sh.rec.boot_id,
            "node": self.name,
            "node_index": sh.rec.node_index,
            "state": sh.rec.state,
            "reason": sh.rec.reason,
            "result": result,
        }
        for attempt in range(5):
            try:
                await self.call(sh.rec.owner, "share_exited", params)
                return
            except Exception as e:  # noqa: BLE001 -- retried, then logged
                if attempt == 4 or self.membership.state_of(sh.rec.owner) in ("dead", "left"):
                    log.warning(
                        "VM %s: cannot report the worker's exit to owner %s: %s",
                        sh.rec.vm,
                        sh.rec.owner,
                        e,
                    )
                    return
                await asyncio.sleep(1.0)

    async def _stop_local(self, sh: LocalShare, reason: str, force: bool) -> None:
        if sh.proc is None:
            if sh.rec.state == "prepared":
                self._finish(sh, "stopped", reason, None)
            return
        if sh.done.is_set():
            return
        if sh.proc.returncode is not None:
            # Exited on its own, not reaped by _watch yet: a stop returns once the share
            # is no longer active (a recovery prepares this node again right after).
            try:
                await asyncio.wait_for(sh.done.wait(), 10.0)
            except TimeoutError:
                log.error(
                    "VM %s: worker %d exited but its end was not recorded", sh.rec.vm, sh.proc.pid
                )
            return
        if sh.stop_reason is None:
            sh.stop_reason = reason
        sh.rec.state = "stopping"
        self.store.put_share(sh.rec)
        pid = sh.proc.pid
        if not force:
            _kill(pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(sh.done.wait(), self.cfg.stop_grace)
                return
            except TimeoutError:
                log.warning(
                    "VM %s: worker %d ignored SIGTERM for %.0fs; killing it",
                    sh.rec.vm,
                    pid,
                    self.cfg.stop_grace,
                )
        _kill(pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(sh.done.wait(), 10.0)
        except TimeoutError:
            log.error("VM %s: worker %d did not die after SIGKILL", sh.rec.vm, pid)

    async def share_stop(self, p: dict[str, Any]) -> dict[str, Any]:
        sh = self.shares.get(check_vm_name(p["name"]))
        if sh is None:
            return {"state": "absent"}
        await self._stop_local(sh, str(p.get("reason") or "stopped"), bool(p.get("force")))
        return {"state": sh.rec.state}

    async def share_forget(self, p: dict[str, Any]) -> dict[str, Any]:
        # The name becomes a path to delete: "../../x" must never reach the file system.
        name = check_vm_name(p["name"])
        sh = self.shares.get(name)
        if sh is not None and sh.active:
            raise VmError(f"VM {name} is still active on node {self.name}")
        self.shares.pop(name, None)
        self.store.delete_share(name)
        d = self.vm_dir / name
        if d.is_symlink():
            d.unlink()  # never follow a link out of the state directory
        elif d.is_dir():
            shutil.rmtree(d)
        return {}

    async def boot_file_put(self, p: dict[str, Any]) -> dict[str, Any]:
        """Receive one chunk of a VM's copied kernel/initrd from its owner (dvmmd.vm.boot_files)."""
        name = check_vm_name(p["name"])
        boot_id, kind = str(p["boot_id"]), str(p["kind"])
        sh = self.shares.get(name)
        if sh is not None and sh.active and sh.rec.boot_id != boot_id:
            raise VmError(f"node {self.name} already runs VM {name}")
        try:
            data = base64.b64decode(str(p["data"]), validate=True)
        except ValueError:
            raise VmError(f"boot_file_put: {kind} data is not valid base64") from None
        offset, size, sha256 = int(p["offset"]), int(p["size"]), str(p["sha256"])
        d = self.vm_dir / name
        if offset == 0 and (sh is None or not sh.active):
            boot_files.remove_stale(d, boot_id)
        try:
            done = await asyncio.to_thread(
                boot_files.PartialFile.put, d, kind, boot_id, offset, data, size, sha256
            )
        except BootFileError as e:
            raise VmError(f"node {self.name}: {e}") from None
        return {"done": done}

    def live_stats(self, sh: LocalShare) -> dict[str, Any]:
        if sh.rec.result is not None and isinstance(sh.rec.result.get("stats"), dict):
            return dict(sh.rec.result["stats"])
        return _read_json(sh.result_path.with_suffix(".json.stats")) or {}

    async def share_stats(self, p: dict[str, Any]) -> dict[str, Any]:
        name = check_vm_name(p["name"])
        sh = self.shares.get(name)
        if sh is None:
            rec = self.store.get_share(name)
            if rec is None:
                raise VmError(f"VM {name} has no worker on node {self.name}")
            sh = LocalShare(rec, self.vm_dir / name)
        return {
            "node": self.name,
            "node_index": sh.rec.node_index,
            "state": sh.rec.state,
            "reason": sh.rec.reason,
            "pid": sh.rec.pid,
            "stats": self.live_stats(sh),
        }

    async def share_control(self, p: dict[str, Any]) -> Any:
        """Pass a request to the running VM's control socket (this is its boot node)."""
        name = check_vm_name(p["name"])
        sh = self.shares.get(name)
        if sh is None or sh.rec.state != "running":
            raise VmError(f"VM {name} is not running on node {self.name}")
        if not sh.control_path.is_socket():
            raise VmError(
                f"VM {name} has no control socket on node {self.name} "
                f"({sh.control_path} would be longer than {MAX_SOCKET_PATH} bytes, or the "
                "VM is not its boot node's)"
            )
        req = p["request"]
        if not isinstance(req, dict):
            raise VmError("share_control: the request must be an object")
        try:
            return await asyncio.to_thread(control.request, sh.control_path, req)
        except control.ControlError as e:
            raise VmError(f"VM {name}: {e}") from None

    async def console_read(self, p: dict[str, Any]) -> dict[str, Any]:
        name = check_vm_name(p["name"])
        offset = max(0, int(p.get("offset", 0)))
        sh = self.shares.get(name)
        path = self.vm_dir / name / "console.log"
        offset, data, size = read_chunk(path, offset, CONSOLE_CHUNK)
        return {
            "data": data.decode("utf-8", "replace"),
            "offset": offset + len(data),
            "size": size,
            "active": bool(sh is not None and sh.active),
        }

    async def console_write(self, p: dict[str, Any]) -> dict[str, Any]:
        """Write base64 `data` into the console input FIFO of the local boot share."""
        name = check_vm_name(p["name"])
        try:
            data = base64.b64decode(str(p.get("data", "")), validate=True)
        except ValueError:
            raise VmError("console input: data is not valid base64") from None
        sh = self.shares.get(name)
        if sh is None or not sh.active or sh.console_in_fd is None:
            raise VmError(f"VM {name} is not running with its console on node {self.name}")
        fd = sh.console_in_fd
        deadline = time.monotonic() + CONSOLE_WRITE_TIMEOUT_S
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
                view = view[n:]
            except BlockingIOError:
                # The pipe is full: the guest is not reading its console.
                if time.monotonic() > deadline:
                    raise VmError(
                        f"VM {name}: console input not consumed "
                        f"({len(data) - len(view)} of {len(data)} bytes sent)"
                    ) from None
                await asyncio.sleep(0.02)
                if sh.console_in_fd != fd:
                    raise VmError(f"VM {name} stopped") from None
        return {"written": len(data)}

    async def stop_all(self, reason: str) -> None:
        """Daemon stop: stop every local worker (gracefully, bounded by stop_grace)."""
        active = [s for s in self.shares.values() if s.active]
        await asyncio.gather(
            *(self._stop_local(s, reason, force=False) for s in active),
            return_exceptions=True,
        )


#: How long console_write waits for a full console input pipe to drain.
CONSOLE_WRITE_TIMEOUT_S = 5.0


def _start_console_log(path: Path, keep: bool, note: Any) -> None:
    """A boot's console log starts empty; a recovered run's (``keep``) goes on after the
    lost run's, on the same node. ``note`` (a line for the reader) goes first."""
    if not keep:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    with os.fdopen(fd, "ab") as f:
        if isinstance(note, str) and note:
            f.write(note.encode("utf-8", "replace"))


def _open_log(path: Path) -> BinaryIO:
    return open(path, "ab")  # handed to the child, closed after the spawn


def read_chunk(path: Path, offset: int, limit: int) -> tuple[int, bytes, int]:
    """(offset actually used, up to `limit` bytes from it, file size); a missing file is
    empty, an offset past the end (the log was recreated by a new boot) restarts at 0."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset > size:
                offset = 0
            f.seek(offset)
            return offset, f.read(limit), size
    except FileNotFoundError:
        return 0, b"", 0


async def _send_key(proc: asyncio.subprocess.Process, key: NodeKey) -> None:
    """Hand the worker its private key on stdin (one line), then close the pipe."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(key.private_hex.encode("ascii") + b"\n")
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the worker died at once: _watch reports its exit
    finally:
        proc.stdin.close()


def _kill(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the worker leads its own session/process group
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
