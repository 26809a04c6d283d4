"""dvmmd configuration: the TOML file's keys and the frozen `Config` they become.

Every error names the file, the line (when the key is present in the file) and the
dotted key, e.g. ``/etc/dvmmd/dvmmd.toml:7: cluster.failure_timeout: must be greater
than 2 x cluster.heartbeat_interval (2 x 1.0), got 1.5``. Unknown keys are errors too
(a typo must not be silently ignored), and so are durations that are not finite and
positive (NaN, inf), beyond a day, or inconsistent (failure_timeout > 2 x
heartbeat_interval, heartbeat_interval < suspect_timeout <= failure_timeout).

Reloading: SIGHUP (``systemctl reload dvmmd``) re-reads the file; ``node.log_level``
takes effect at once, any other changed key is logged as needing a restart, and an
invalid file is logged and ignored (dvmmd.daemon.node_daemon).

Example::

    [node]
    name = "node1"
    listen = "10.0.0.1:7400"        # daemon-to-daemon port (authenticated)
    advertise = "10.0.0.1:7400"     # optional: the address peers dial (default: listen)
    state_dir = "/var/lib/dvmmd"
    vcpus = 2                       # what this node offers to VMs
    memory = "8G"

    [cluster]
    # Identity on the control plane: EITHER a [tls] section (real clusters, one
    # certificate per node: `dvmmctl cluster init` / `add-node`) OR a shared secret
    # (demo/tests: any holder of the secret can claim any node name).
    secret_file = "/etc/dvmmd/secret"
    data_plane = "encrypt"          # "encrypt" | "integrity" | "none": same on every node
    transport = "tcp"               # "tcp" | "shm" (nodes on one host only): same on every node
    peers = ["10.0.0.2:7400"]       # static peers ...
    seed = "10.0.0.2:7400"          # ... and/or one seed to join through
    heartbeat_interval = 1.0
    failure_timeout = 5.0           # no heartbeat for this long -> dead

    [tls]                           # instead of cluster.secret_file
    ca_file = "/etc/dvmmd/tls/ca.crt"
    cert_file = "/etc/dvmmd/tls/node1.crt"  # its name must be node.name
    key_file = "/etc/dvmmd/tls/node1.key"   # mode 0600

    [api]
    socket = "/run/dvmmd/dvmmd.sock"
    socket_mode = "0660"
    socket_group = "dvmm"           # optional
    remote = false                  # serve the API to authenticated clients on the peer port

    [metrics]
    listen = "127.0.0.1:9478"       # optional; absent = no metrics endpoint

    [worker]
    command = ["/usr/bin/python3", "-m", "dvmmd.worker"]   # default: this Python
    data_ports = "7500-7599"        # ports for the distributed-VM data path
    multi_node = "auto"             # true / false / "auto" (ask dvmmd._native)
    stop_grace = 10.0

    [vm]
    kernel = "/usr/share/dvmm/dvmm-guest"   # default kernel for `dvmmctl boot`
    images_dir = "/var/lib/dvmm-images"     # optional: files here (world-readable) may
                                            # be named by path by any API client
    snapshot_dir = "/shared/dvmm-snapshots" # periodic snapshots (`boot --snapshot-every`):
                                            # <this>/<vm>; default <state_dir>/snapshots.
                                            # Every node must see it (shared storage)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dvmmd.vm.names import is_valid_name as _is_valid_name
from dvmmd.vm.sizes import SizeError, parse_size

#: Data-plane transports (rust/src/cluster.rs ``TransportKind``): TCP between any
#: hosts, shared memory between nodes on one host (docs/transports.md).
TRANSPORTS = ("tcp", "shm")

DEFAULT_CONFIG_PATH = "/etc/dvmmd/dvmmd.toml"
DEFAULT_SOCKET = "/run/dvmmd/dvmmd.sock"

#: Upper bound for any duration in the config (one day): larger values are typos.
MAX_SECONDS = 86400.0


class ConfigError(Exception):
    """A configuration problem; `str()` is the full human-readable message."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.message = message
        where = ""
        if file is not None:
            where = file + (f":{line}" if line is not None else "") + ": "
        super().__init__(f"{where}{key + ': ' if key else ''}{message}")


def parse_memory(value: int | str) -> int:
    """A byte count from the config: an integer, or a string such as ``"8G"`` (dvmmd.vm.sizes)."""
    if isinstance(value, bool):
        raise SizeError("a size must be an integer or a string like '8G'")
    if isinstance(value, int):
        if value < 0:
            raise SizeError("a size must not be negative")
        return value
    return parse_size(value)


def parse_hostport(value: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port``; raises ValueError with a clear message."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]:")
    else:
        host, sep, rest = value.rpartition(":")
    if not sep or not host or not rest.isdigit():
        raise ValueError(f"expected host:port, got {value!r}")
    port = int(rest)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


def is_valid_name(name: str) -> bool:
    """Node and VM names: the one rule in names.py (1-63 of [A-Za-z0-9_.-], no '..')."""
    return _is_valid_name(name)


@dataclass(frozen=True)
class Config:
    path: str
    node_name: str
    listen: tuple[str, int]
    advertise: tuple[str, int]
    state_dir: Path
    vcpus: int
    memory: int
    secret_file: Path | None  # secret mode; None in certificate mode ([tls])
    tls_ca_file: Path | None
    tls_cert_file: Path | None
    tls_key_file: Path | None
    data_plane: str  # "encrypt" | "integrity" | "none"
    transport: str  # "tcp" | "shm" (the data plane's transport: docs/transports.md)
    peers: tuple[tuple[str, int], ...]
    seed: tuple[str, int] | None
    heartbeat_interval: float
    suspect_timeout: float
    failure_timeout: float
    api_socket: Path
    api_socket_mode: int
    api_socket_group: str | None
    api_remote: bool
    metrics_listen: tuple[str, int] | None
    worker_command: tuple[str, ...]
    data_ports: tuple[int, int]
    multi_node: str  # "auto" | "yes" | "no"
    stop_grace: float
    default_kernel: str | None
    #: Kernels/initrds any API client may name by path (dvmmd.vm.boot_files); None: none.
    images_dir: Path | None
    log_level: str
    #: Where VMs' periodic snapshots go (``<snapshot_dir>/<vm>``); None: the state
    #: directory's ``snapshots``. Every node of a VM writes there: shared storage.
    snapshot_dir: Path | None = None

    @property
    def snapshot_base(self) -> Path:
        """The directory holding each VM's periodic snapshot directory."""
        return self.snapshot_dir or self.state_dir / "snapshots"

    @property
    def advertise_str(self) -> str:
        return format_hostport(self.advertise)


def format_hostport(hp: tuple[str, int]) -> str:
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- schema ------------------------------------------------------------------

SCHEMA: dict[str, set[str]] = {
    "node": {"name", "listen", "advertise", "state_dir", "vcpus", "memory", "log_level"},
    "cluster": {
        "secret_file",
        "data_plane",
        "transport",
        "peers",
        "seed",
        "heartbeat_interval",
        "suspect_timeout",
        "failure_timeout",
    },
    "tls": {"ca_file", "cert_file", "key_file"},
    "api": {"socket", "socket_mode", "socket_group", "remote"},
    "metrics": {"listen"},
    "worker": {"command", "data_ports", "multi_node", "stop_grace"},
    "vm": {"kernel", "images_dir", "snapshot_dir"},
}
