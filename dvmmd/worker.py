"""The VMM worker: one process per VM per node, spawned by the daemon.

    python -m dvmmd.worker SPEC.json RESULT.json [--key-stdin]

With ``--key-stdin`` (every node of a multi-node VM) the worker first reads one line
from stdin: this node's X25519 private key for the VM's data path, 64 hex digits
(dvmmd.security.keys). It goes into the in-memory spec's ``cluster.private_key_hex`` and from
there to the VMM, never into a file: SPEC.json must not contain it. A spec with a
``cluster`` and no key on stdin is an error, as is a key that is not the one
``cluster.node_pubkeys_hex[node_index]`` names.

Runs ``dvmmd._native.run_vm`` on the spec and writes the result JSON to
RESULT.json atomically (a temporary file in the same directory, fsync'd, then
renamed), so a reader sees either no result or a whole one. The exit status
is the guest's debug-exit status, 0 for a clean shutdown or stop, 124 for a
timeout and 1 for any error (see ``dvmmd.vm.spec.exit_code``). SIGTERM or SIGINT
stops the VM: the result then says ``stopped`` and the worker exits 0.

``run_native`` is also what ``dvmmctl run`` uses: it runs the VM on a helper
thread (the native call releases the GIL) so that the main thread stays free
to take signals, and enforces the spec's timeout as a backstop should the VMM
itself fail to stop.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from dvmmd.security.keys import KeyMaterialError, check_key_hex, public_of
from dvmmd.vm.spec import SpecError, exit_code, parse_result, spec_to_json, validate_spec

__all__ = [
    "Interrupted",
    "NativeMissing",
    "VmmHung",
    "add_private_key",
    "load_native",
    "load_spec",
    "main",
    "read_key_line",
    "run_native",
]

#: How long past the spec's timeout the VMM may take to stop by itself.
TIMEOUT_GRACE_S = 10.0
#: Longest key line read from stdin (64 hex digits + newline, some slack for CRLF).
MAX_KEY_LINE = 80


class NativeMissing(RuntimeError):
    """The Rust extension dvmmd._native is not built or not importable."""


class VmmHung(RuntimeError):
    """The VMM did not stop within its timeout (plus grace)."""


class Interrupted(Exception):
    """A signal asked us to stop the VM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def load_native() -> Any:
    try:
        from dvmmd import _native
    except ImportError as e:
        raise NativeMissing(
            f"the dvmm native module (dvmmd._native) is not available: {e}; "
            "build it with `make setup` (maturin develop)"
        ) from None
    return _native


def multinode_supported(setting: str) -> tuple[bool, str]:
    """Can workers run one VM across several nodes? ("yes"/"no"/"auto" from config).

    "auto" asks the native module: a true ``MULTI_NODE`` (or ``SUPPORTS_CLUSTER``)
    attribute, or "cluster" in ``FEATURES``.
    """
    if setting == "yes":
        return True, "enabled by worker.multi_node"
    if setting == "no":
        return False, "disabled by worker.multi_node"
    try:
        native = load_native()
    except NativeMissing as e:
        return False, f"dvmmd._native is not available ({e})"
    for attr in ("MULTI_NODE", "SUPPORTS_CLUSTER"):
        v = getattr(native, attr, None)
        if isinstance(v, bool):
            return v, f"dvmmd._native.{attr} is {v}"
    feats = getattr(native, "FEATURES", None)
    if isinstance(feats, (list, tuple, set, frozenset, str)) and "cluster" in feats:
        return True, "dvmmd._native.FEATURES has 'cluster'"
    return False, "dvmmd._native does not advertise multi-node support (MULTI_NODE)"


def run_native(spec: dict[str, Any]) -> dict[str, Any]:
    """Run a validated spec to completion and return its parsed result.

    Raises NativeMissing, VmmHung, or Interrupted (from a signal handler that
    raises it, see ``main``), or KeyboardInterrupt. On Interrupted,
    KeyboardInterrupt and VmmHung the VM is still running on its thread: the
    caller must end the process (``os._exit``) after reporting.
    """
    native = load_native()
    spec_json = spec_to_json(spec)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = native.run_vm(spec_json)
        except BaseException as e:  # noqa: BLE001 - reported on the main thread
            box["exc"] = e

    sys.stdout.flush()
    sys.stderr.flush()
    t = threading.Thread(target=target, name="dvmm-vm", daemon=True)
    t.start()
    timeout = spec.get("timeout_s") or 0
    deadline = time.monotonic() + timeout + TIMEOUT_GRACE_S if timeout else None
    while t.is_alive():
        t.join(0.25)
        if deadline is not None and time.monotonic() > deadline and t.is_alive():
            raise VmmHung(
                f"the VM did not stop {TIMEOUT_GRACE_S:.0f} s after its {timeout} s timeout"
            )
    if "exc" in box:
        # The native module raises ValueError for a spec it rejects and
        # RuntimeError for a host/VMM failure (rust/src/python.rs).
        exc = box["exc"]
        if isinstance(exc, ValueError):
            error = f"invalid VM: {exc}"
        elif isinstance(exc, RuntimeError):
            error = f"VMM failure: {exc}"
        else:
            error = f"{type(exc).__name__}: {exc}"
        return {"reason": "error", "status": None, "error": error}
    return parse_result(box["result"])


def read_key_line(fd: int = 0) -> str:
    """One line from ``fd`` (stdin), read a byte at a time so that nothing after the
    newline is consumed (a buffered reader could swallow console input)."""
    data = bytearray()
    while len(data) <= MAX_KEY_LINE:
        try:
            b = os.read(fd, 1)
        except OSError as e:
            raise SpecError(f"--key-stdin: cannot read stdin: {e.strerror or e}") from None
        if not b or b == b"\n":
            break
        data += b
    else:
        raise SpecError(f"--key-stdin: the key line is longer than {MAX_KEY_LINE} bytes")
    if not data:
        raise SpecError("--key-stdin: no key on stdin (expected 64 hex digits and a newline)")
    return data.decode("ascii", errors="replace").strip()


def add_private_key(spec: dict[str, Any], private_hex: str) -> dict[str, Any]:
    """The spec with this node's private key in ``cluster.private_key_hex``, checked
    against the public key the spec lists for this node. Errors never show the key."""
    cluster = spec.get("cluster")
    if cluster is None:
        raise SpecError("--key-stdin: the spec has no cluster: a single-node VM takes no key")
    try:
        check_key_hex(private_hex, "the private key on stdin")
    except KeyMaterialError as e:
        raise SpecError(str(e)) from None
    index = cluster["node_index"]
    if public_of(private_hex) != cluster["node_pubkeys_hex"][index]:
        raise SpecError(
            f"the private key on stdin does not belong to cluster.node_pubkeys_hex[{index}]"
        )
    return validate_spec(
        {**spec, "cluster": {**cluster, "private_key_hex": private_hex}}, allow_private_key=True
    )


def ensure_console_fifo(spec: dict[str, Any]) -> None:
    """Create the spec's ``console_input`` FIFO if it does not exist yet."""
    path = spec.get("console_input")
    if not path:
        return
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        pass


def write_result_atomic(path: Path, result: dict[str, Any]) -> None:
    data = json.dumps(result, indent=1, sort_keys=True) + "\n"
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def load_spec(spec_path: Path, key_stdin: bool, key_fd: int = 0) -> dict[str, Any]:
    """The spec file, checked, plus (``key_stdin``) the private key read from ``key_fd``."""
    spec = validate_spec(json.loads(spec_path.read_text()))  # refuses a key in the file
    if key_stdin:
        return add_private_key(spec, read_key_line(key_fd))
    if spec["cluster"] is not None:
        raise SpecError(
            "a multi-node spec needs this node's private key: run the worker with "
            "--key-stdin and write the key to its stdin"
        )
    return spec


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    key_stdin = "--key-stdin" in args
    args = [a for a in args if a != "--key-stdin"]
    if len(args) != 2:
        print("usage: python -m dvmmd.worker SPEC.json RESULT.json [--key-stdin]", file=sys.stderr)
        return 2
    spec_path, result_path = Path(args[0]), Path(args[1])
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        try:
            spec = load_spec(spec_path, key_stdin)
        except (OSError, ValueError) as e:  # SpecError and JSONDecodeError are ValueErrors
            what = "bad VM spec" if isinstance(e, SpecError) else "cannot read VM spec"
            result: dict[str, Any] = {"reason": "error", "status": None, "error": f"{what}: {e}"}
        else:
            try:
                ensure_console_fifo(spec)
                result = run_native(spec)
            except OSError as e:
                result = {
                    "reason": "error",
                    "status": None,
                    "error": f"cannot create console input {spec.get('console_input')}: {e}",
                }
            except (NativeMissing, VmmHung) as e:
                result = {"reason": "error", "status": None, "error": str(e)}
        write_result_atomic(result_path, result)
    except Interrupted as e:
        write_result_atomic(
            result_path, {"reason": "stopped", "status": None, "error": f"worker got {e}"}
        )
        os._exit(0)  # the VM thread may still be running: end the process now
    if result.get("error") and result.get("reason") != "snapshot":
        print(f"dvmm worker: {result['reason']}: {result['error']}", file=sys.stderr)
    code = exit_code(result)
    if result.get("reason") != "debug_exit" or code != 0:
        # The VM thread may be stuck; do not wait for it at interpreter exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
