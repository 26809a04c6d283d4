"""Kernels and initrds: read with the caller's rights, never with the daemon's.

dvmmd runs as root and its workers load the VM's kernel and initrd. If the daemon
opened any path a client names, every member of the API socket's group could read
any file on the host (``--initrd /etc/shadow``, then read it on the guest's
console). So where a boot file comes from decides who may name it:

- **A passed file descriptor** (``args.kernel_fd`` / ``args.initrd_fd``, an index into
  the descriptors sent with the request over the unix socket with SCM_RIGHTS): the
  client opened the file with its own rights; anyone may. ``dvmmctl boot`` does this
  (`open_boot_files` + `send_request`). The path in ``args.kernel`` is then only a label.
- **A path** (``args.kernel``): only from a local root client (SO_PEERCRED uid 0),
  who could read the file anyway, or, for anyone (local non-root users and remote API
  clients), a world-readable regular file under the admin's ``vm.images_dir``
  (resolved, symlinks included, and checked after opening).
- **Nothing**: the configured ``vm.kernel`` or the bundled guest, which the admin chose.

Anything a non-root caller supplies is *copied* by the owner into the VM's directory
(``STATE/vms/NAME/kernel-BOOTID.img``, mode 0600), from the descriptor, with a size
limit, and the VM's request then names it ``vmdir:kernel-BOOTID.img``: a name every
node resolves in its own VM directory (`resolve_vmdir`). The owner pushes the copy to
the other nodes of a multi-node VM before it prepares them (``boot_file_put`` RPCs,
`PartialFile`), and `rm` deletes it with the VM's directory. A root client's path is
used in place, as before: it must exist on every node of the VM.
"""

from __future__ import annotations

import array
import hashlib
import os
import re
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The two kinds of boot file.
KINDS = ("kernel", "initrd")

#: Largest file accepted per kind (the copy lands in the state directory).
MAX_BYTES = {"kernel": 256 << 20, "initrd": 2 << 30}

#: Descriptors accepted with one API request (kernel + initrd, and some slack).
MAX_FDS = 4

#: Prefix of a boot file that lives in the VM's directory on each node.
VMDIR_PREFIX = "vmdir:"

#: Bytes per ``boot_file_put`` RPC (base64 in a JSON frame: ~700 KiB on the wire).
PUSH_CHUNK = 512 << 10

_VMDIR_FILE = re.compile(r"(kernel|initrd)-[0-9a-f]{32}\.img")
_BOOT_ID = re.compile(r"[0-9a-f]{32}")


class BootFileError(ValueError):
    """A kernel/initrd the caller may not use, or cannot be read; names the file."""


@dataclass(frozen=True)
class Caller:
    """Who sent an API request.

    Local clients are identified by the kernel (SO_PEERCRED on the unix socket);
    remote clients (peer port, role "client") by their authenticated node name.
    """

    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    remote_node: str | None = None

    @property
    def is_local_root(self) -> bool:
        return self.remote_node is None and self.uid == 0

    def describe(self) -> str:
        if self.remote_node is not None:
            return f"remote client {self.remote_node}"
        return f"uid {self.uid} (pid {self.pid})"


@dataclass
class BootSource:
    """Where one boot file comes from, once the caller's right to it is established."""

    kind: str
    label: str  # what the user named (a path), for messages and `status`
    path: str | None = None  # use this path in place (root, defaults)
    fd: int | None = None  # copy from this open file (passed, or opened in images_dir)
    owned_fd: bool = False  # we opened `fd` (images_dir) and must close it


def resolve(
    kind: str,
    args: dict[str, Any],
    fds: Sequence[int],
    caller: Caller,
    images_dir: Path | None,
) -> BootSource | None:
    """The source of boot file `kind` for this request, or None when none was given.

    Raises BootFileError naming the file when the caller may not use it.
    """
    path = args.get(kind)
    index = args.get(f"{kind}_fd")
    if path is not None and not isinstance(path, str):
        raise BootFileError(f"{kind}: expected a path string, got {type(path).__name__}")
    label = path or f"<{kind} passed by {caller.describe()}>"
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise BootFileError(f"{kind}_fd: expected an integer index, got {index!r}")
        if not 0 <= index < len(fds):
            raise BootFileError(
                f"{kind}_fd: index {index} but {len(fds)} file descriptor(s) came with "
                "the request (send them with SCM_RIGHTS)"
            )
        return BootSource(kind, label, fd=fds[index])
    if not path:
        return None
    if path.startswith(VMDIR_PREFIX):
        raise BootFileError(f"{kind} {path!r}: the {VMDIR_PREFIX} prefix is reserved")
    if caller.is_local_root:
        return BootSource(kind, path, path=path)  # root can read it anyway
    if images_dir is not None:
        src = _open_in_images_dir(kind, path, images_dir)
        if src is not None:
            return src
    where = f" or a world-readable file under vm.images_dir ({images_dir})" if images_dir else ""
    raise BootFileError(
        f"{kind} {path}: dvmmd does not open files for {caller.describe()}: "
        f"pass the file itself (dvmmctl boot sends it; API: {kind}_fd with SCM_RIGHTS){where}"
    )


def _open_in_images_dir(kind: str, path: str, images_dir: Path) -> BootSource | None:
    """Open `path` if it is a world-readable regular file inside `images_dir`, else None.

    Checked on the opened descriptor (its /proc path and its mode), so a symlink or a
    rename between the check and the open cannot point the daemon elsewhere, and a
    hard link to a private file (not world-readable) is refused.
    """
    try:
        base = os.path.realpath(images_dir)
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return None
    if os.path.commonpath([base, real]) != base or real == base:
        return None
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise BootFileError(f"{kind} {path}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        opened = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.commonpath([base, opened]) != base:
            raise BootFileError(f"{kind} {path}: resolves outside vm.images_dir ({base})")
        if not stat.S_ISREG(st.st_mode):
            raise BootFileError(f"{kind} {path}: not a regular file")
        if not st.st_mode & stat.S_IROTH:
            raise BootFileError(
                f"{kind} {path}: not world-readable; files in vm.images_dir ({base}) are "
                "served to every client, so they must be readable by all (chmod o+r)"
            )
    except BaseException:
        os.close(fd)
        raise
    return BootSource(kind, path, fd=fd, owned_fd=True)


def copy_fd(kind: str, label: str, fd: int, dest: Path) -> tuple[int, str]:
    """Copy the regular file open on `fd` to `dest` (mode 0600); (size, sha256 hex).

    Blocking: run it in a thread. Reads with pread from offset 0, so the client's file
    offset does not matter and a descriptor not open for reading (O_WRONLY, O_PATH)
    fails here instead of being read with the daemon's rights.
    """
    limit = MAX_BYTES[kind]
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise BootFileError(f"{kind} {label}: bad file descriptor: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BootFileError(f"{kind} {label}: not a regular file")
    if st.st_size > limit:
        raise BootFileError(f"{kind} {label}: {st.st_size} bytes, more than the {limit} allowed")
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    size = 0
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        while True:
            try:
                chunk = os.pread(fd, 1 << 20, size)
            except OSError as e:
                raise BootFileError(
                    f"{kind} {label}: cannot read the passed file: {e.strerror or e}"
                ) from None
            if not chunk:
                break
            size += len(chunk)
            if size > limit:  # the file grew while we read it
                raise BootFileError(f"{kind} {label}: more than the {limit} bytes allowed")
            h.update(chunk)
            os.write(out, chunk)
        if size == 0:
            raise BootFileError(f"{kind} {label}: the file is empty")
        os.fsync(out)
    except BaseException:
        os.close(out)
        tmp.unlink(missing_ok=True)
        raise
    os.close(out)
    os.replace(tmp, dest)
    return size, h.hexdigest()


def vmdir_name(kind: str, boot_id: str) -> str:
    """The file name of a copied boot file in the VM's directory."""
    if kind not in KINDS or not _BOOT_ID.fullmatch(boot_id):
        raise BootFileError(f"bad boot file {kind!r} / boot id {boot_id!r}")
    return f"{kind}-{boot_id}.img"


def vmdir_file(value: object) -> str | None:
    """The file name if `value` is a ``vmdir:`` reference, else None; BootFileError if
    it is one but malformed (it would otherwise escape the VM directory)."""
    if not isinstance(value, str) or not value.startswith(VMDIR_PREFIX):
        return None
    name = value[len(VMDIR_PREFIX) :]
    if not _VMDIR_FILE.fullmatch(name):
        raise BootFileError(f"malformed boot file reference {value!r}")
    return name


def resolve_vmdir(spec: dict[str, Any], vm_dir: Path) -> dict[str, Any]:
    """`spec` with ``vmdir:`` kernel/initrd references made paths in this node's `vm_dir`."""
    out = dict(spec)
    for kind in KINDS:
        name = vmdir_file(out.get(kind))
        if name is not None:
            out[kind] = str(vm_dir / name)
    return out


def remove_stale(vm_dir: Path, keep_boot_id: str | None) -> None:
    """Delete copied boot files of other boots of this VM (it is not running here)."""
    try:
        entries = list(vm_dir.iterdir())
    except FileNotFoundError:
        return
    for f in entries:
        m = re.fullmatch(r"(?:kernel|initrd)-([0-9a-f]{32})\.img(?:\.part)?", f.name)
        if m and m.group(1) != keep_boot_id:
            f.unlink(missing_ok=True)


class PartialFile:
    """Receiving side of ``boot_file_put``: sequential chunks, checked at the end."""

    @staticmethod
    def put(
        vm_dir: Path, kind: str, boot_id: str, offset: int, data: bytes, size: int, sha256: str
    ) -> bool:
        """Append `data` at `offset` of the file being received; True when complete."""
        name = vmdir_name(kind, boot_id)
        limit = MAX_BYTES[kind]
        if not 0 < size <= limit:
            raise BootFileError(f"{kind}: size {size} out of range (1..{limit})")
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise BootFileError(f"{kind}: bad sha256 {sha256!r}")
        vm_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        part = vm_dir / (name + ".part")
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        if offset == 0:
            flags |= os.O_TRUNC
        fd = os.open(part, flags, 0o600)
        try:
            have = os.fstat(fd).st_size
            if offset != have:
                raise BootFileError(f"{kind}: chunk at offset {offset}, expected {have}")
            if offset + len(data) > size:
                raise BootFileError(f"{kind}: chunk past the announced size {size}")
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        if offset + len(data) < size:
            return False
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != sha256:
            part.unlink(missing_ok=True)
            raise BootFileError(f"{kind}: received file does not match its sha256")
        os.replace(part, vm_dir / name)
        return True


# --------------------------------------------------------------------------- client side


def open_boot_files(params: dict[str, Any]) -> list[int]:
    """Open the request's kernel/initrd paths with *this* process's rights.

    Sets ``kernel_fd``/``initrd_fd`` in `params` to indexes into the returned list of
    descriptors, which the caller sends with `send_request` and then closes. The paths
    stay in `params` as labels (and so an older daemon still gets a path).
    """
    fds: list[int] = []
    try:
        for kind in KINDS:
            path = params.get(kind)
            if not path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                raise BootFileError(f"{kind} {path} is not readable: {e.strerror or e}") from None
            fds.append(fd)
            params[f"{kind}_fd"] = len(fds) - 1
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def send_request(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one request line; `fds` ride on its first bytes (SCM_RIGHTS)."""
    if not fds:
        sock.sendall(data)
        return
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if sent < len(data):
        sock.sendall(data[sent:])
