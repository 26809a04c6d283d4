"""Loading dvmmd's TOML configuration into a `Config`, errors at file:line: key.

Every error names the file, the line (when the key is present in the file) and the
dotted key. The keys and their meaning: schema.py.
"""

from __future__ import annotations

import grp
import math
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dvmmd.config.schema import (
    DEFAULT_SOCKET,
    MAX_SECONDS,
    SCHEMA,
    TRANSPORTS,
    Config,
    ConfigError,
    parse_hostport,
    parse_memory,
)
from dvmmd.security.keys import DATA_PLANE_MODES
from dvmmd.vm.names import is_valid_name
from dvmmd.vm.sizes import SizeError


def _key_line(text: str, table: str, key: str | None) -> int | None:
    """Best-effort line number of ``[table] key = ...`` (or of ``[table]``) in the TOML text."""
    current = ""
    table_line: int | None = None
    for i, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        m = re.match(r"^\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]", line)
        if m and not line.startswith("[["):
            current = m.group(1).replace('"', "").replace("'", "")
            if current == table and table_line is None:
                table_line = i
            continue
        if key is None:
            continue
        km = re.match(r"^([A-Za-z0-9_\-\"'.]+)\s*=", line)
        if not km:
            continue
        k = km.group(1).replace('"', "").replace("'", "")
        if (current == table and k == key) or (current == "" and k == f"{table}.{key}"):
            return i
    return table_line


class _Reader:
    """Typed access to the parsed TOML with errors that point at file:line: key."""

    def __init__(self, path: str, text: str, data: Mapping[str, Any]) -> None:
        self.path = path
        self.text = text
        self.data = data

    def error(self, table: str, key: str | None, message: str) -> ConfigError:
        return ConfigError(
            message,
            file=self.path,
            line=_key_line(self.text, table, key),
            key=f"{table}.{key}" if key else f"[{table}]",
        )

    def table(self, name: str) -> Mapping[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, None, "must be a table")
        return value

    def get(
        self,
        table: str,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = None,
        required: bool = False,
    ) -> Any:
        t = self.table(table)
        if key not in t:
            if required:
                raise ConfigError(
                    "missing required key",
                    file=self.path,
                    line=_key_line(self.text, table, None),
                    key=f"{table}.{key}",
                )
            return default
        value = t[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(table, key, f"must be {names}, got {type(value).__name__} {value!r}")
        return value


def _mem_total() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError on any problem."""
    p = str(path)
    try:
        text = Path(p).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", file=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file: {e}", file=p) from None
    return parse_config(text, p)


def parse_config(text: str, path: str = "<config>") -> Config:
    """Validate TOML text into a Config; raises ConfigError naming file, line and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError(
            f"invalid TOML: {msg}", file=path, line=int(m.group(1)) if m else None
        ) from None
    r = _Reader(path, text, data)
    for table, value in data.items():
        if table not in SCHEMA:
            raise ConfigError(
                f"unknown table (known: {', '.join(sorted(SCHEMA))})",
                file=path,
                line=_key_line(text, table, None),
                key=f"[{table}]",
            )
        if not isinstance(value, dict):
            raise r.error(table, None, "must be a table")
        for key in value:
            if key not in SCHEMA[table]:
                raise r.error(
                    table, key, "unknown key (known: " + ", ".join(sorted(SCHEMA[table])) + ")"
                )

    def hostport(table: str, key: str, value: str) -> tuple[str, int]:
        try:
            return parse_hostport(value)
        except ValueError as e:
            raise r.error(table, key, str(e)) from None

    def positive(table: str, key: str, value: float) -> float:
        # A duration: NaN would make every comparison false (a node never declared
        # dead), inf or a huge value overflows the event loop's timers.
        if not math.isfinite(value) or value <= 0:
            raise r.error(table, key, f"must be a finite positive number, got {value}")
        if value > MAX_SECONDS:
            raise r.error(table, key, f"must be at most {MAX_SECONDS} seconds, got {value}")
        return float(value)

    name = r.get("node", "name", str, required=True)
    if not is_valid_name(name):
        raise r.error(
            "node",
            "name",
            f"invalid node name {name!r} (1-63 of A-Z a-z 0-9 _ . -, starting alphanumeric)",
        )
    listen = hostport("node", "listen", r.get("node", "listen", str, required=True))
    adv_s = r.get("node", "advertise", str)
    advertise = hostport("node", "advertise", adv_s) if adv_s else listen
    if advertise[0] in ("0.0.0.0", "::", ""):
        raise r.error(
            "node",
            "advertise" if adv_s else "listen",
            "a wildcard address cannot be dialled by peers; set node.advertise",
        )
    state_dir = Path(r.get("node", "state_dir", str, required=True))
    if not state_dir.is_absolute():
        raise r.error("node", "state_dir", "must be an absolute path")
    vcpus = r.get("node", "vcpus", int, default=os.cpu_count() or 1)
    if vcpus < 0 or vcpus > 4096:
        raise r.error("node", "vcpus", f"must be between 0 and 4096, got {vcpus}")
    mem_raw = r.get("node", "memory", (int, str), default=_mem_total() * 3 // 4)
    try:
        memory = parse_memory(mem_raw)
    except SizeError as e:
        raise r.error("node", "memory", str(e)) from None
    log_level = r.get("node", "log_level", str, default="info").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise r.error("node", "log_level", "must be one of debug, info, warning, error")

    secret_s = r.get("cluster", "secret_file", str)
    tls_files: dict[str, Path | None] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        v = r.get("tls", key, str)
        if v is not None and not Path(v).is_absolute():
            raise r.error("tls", key, f"must be an absolute path, got {v!r}")
        tls_files[key] = Path(v) if v is not None else None
    if "tls" in data:
        missing = [k for k, v in tls_files.items() if v is None]
        if missing:
            raise r.error("tls", None, f"needs ca_file, cert_file and key_file; missing {missing}")
        if secret_s is not None:
            raise r.error(
                "cluster",
                "secret_file",
                "set either cluster.secret_file (shared secret) or [tls] (certificates), not both",
            )
    elif secret_s is None:
        raise r.error(
            "cluster",
            None,
            "no identity: set [tls] ca_file/cert_file/key_file (`dvmmctl cluster init`) "
            "or cluster.secret_file",
        )
    secret_file = Path(secret_s) if secret_s is not None else None
    data_plane = r.get("cluster", "data_plane", str, default="encrypt")
    if data_plane not in DATA_PLANE_MODES:
        raise r.error(
            "cluster",
            "data_plane",
            f"must be one of {', '.join(DATA_PLANE_MODES)}, got {data_plane!r}",
        )
    transport = r.get("cluster", "transport", str, default="tcp")
    if transport not in TRANSPORTS:
        raise r.error(
            "cluster",
            "transport",
            f"must be one of {', '.join(TRANSPORTS)}, got {transport!r}",
        )
    peers_raw = r.get("cluster", "peers", list, default=[])
    peers: list[tuple[str, int]] = []
    for item in peers_raw:
        if not isinstance(item, str):
            raise r.error("cluster", "peers", f"entries must be 'host:port' strings, got {item!r}")
        peers.append(hostport("cluster", "peers", item))
    seed_s = r.get("cluster", "seed", str)
    seed = hostport("cluster", "seed", seed_s) if seed_s else None
    hb = positive(
        "cluster", "heartbeat_interval", r.get("cluster", "heartbeat_interval", float, default=1.0)
    )
    timeout = positive(
        "cluster", "failure_timeout", r.get("cluster", "failure_timeout", float, default=5.0)
    )
    if timeout <= 2 * hb:
        # One late heartbeat must not be enough to declare a live node dead.
        raise r.error(
            "cluster",
            "failure_timeout",
            f"must be greater than 2 x cluster.heartbeat_interval (2 x {hb}), got {timeout}",
        )
    suspect = positive(
        "cluster",
        "suspect_timeout",
        r.get("cluster", "suspect_timeout", float, default=max(min(2 * hb, timeout), timeout / 2)),
    )
    if suspect > timeout:
        raise r.error("cluster", "suspect_timeout", "must not exceed cluster.failure_timeout")
    if suspect <= hb:
        raise r.error(
            "cluster",
            "suspect_timeout",
            f"must be greater than cluster.heartbeat_interval ({hb}), got {suspect}",
        )

    api_socket = Path(r.get("api", "socket", str, default=DEFAULT_SOCKET))
    mode_raw = r.get("api", "socket_mode", (str, int), default="0660")
    try:
        mode = int(mode_raw, 8) if isinstance(mode_raw, str) else mode_raw
    except ValueError:
        raise r.error(
            "api", "socket_mode", f"expected an octal mode like '0660', got {mode_raw!r}"
        ) from None
    if mode & ~0o777 or mode & 0o007:
        raise r.error(
            "api",
            "socket_mode",
            f"{oct(mode)} is not allowed: the API socket must "
            "not be accessible to others (use 0600 or 0660)",
        )
    if mode & 0o600 != 0o600:
        raise r.error(
            "api", "socket_mode", f"{oct(mode)} is not allowed: the owner needs read-write (0600)"
        )
    group = r.get("api", "socket_group", str)
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise r.error("api", "socket_group", f"no group named {group!r} on this host") from None
    remote = r.get("api", "remote", bool, default=False)

    ml = r.get("metrics", "listen", str)
    metrics = hostport("metrics", "listen", ml) if ml else None

    cmd_raw = r.get("worker", "command", list, default=[sys.executable, "-m", "dvmmd.worker"])
    if not cmd_raw or not all(isinstance(c, str) and c for c in cmd_raw):
        raise r.error("worker", "command", "must be a non-empty list of strings")
    ports_s = r.get("worker", "data_ports", str, default="7500-7599")
    pm = re.match(r"^\s*(\d+)\s*-\s*(\d+)\s*$", ports_s)
    if not pm or not 0 < int(pm.group(1)) <= int(pm.group(2)) < 65536:
        raise r.error(
            "worker", "data_ports", f"expected a port range like '7500-7599', got {ports_s!r}"
        )
    if int(pm.group(1)) <= listen[1] <= int(pm.group(2)):
        raise r.error(
            "worker", "data_ports", f"{ports_s!r} contains node.listen's port {listen[1]}"
        )
    multi_raw = r.get("worker", "multi_node", (bool, str), default="auto")
    if isinstance(multi_raw, bool):
        multi = "yes" if multi_raw else "no"
    elif multi_raw == "auto":
        multi = "auto"
    else:
        raise r.error("worker", "multi_node", 'must be true, false or "auto"')
    grace = positive("worker", "stop_grace", r.get("worker", "stop_grace", float, default=10.0))
    kernel = r.get("vm", "kernel", str)
    images_raw = r.get("vm", "images_dir", str)
    images_dir = Path(images_raw) if images_raw else None
    if images_dir is not None and not images_dir.is_absolute():
        raise r.error("vm", "images_dir", f"must be an absolute path, got {images_raw!r}")
    snap_raw = r.get("vm", "snapshot_dir", str)
    snapshot_dir = Path(snap_raw) if snap_raw else None
    if snapshot_dir is not None and not snapshot_dir.is_absolute():
        raise r.error("vm", "snapshot_dir", f"must be an absolute path, got {snap_raw!r}")

    return Config(
        path=path,
        node_name=name,
        listen=listen,
        advertise=advertise,
        state_dir=state_dir,
        vcpus=vcpus,
        memory=memory,
        secret_file=secret_file,
        tls_ca_file=tls_files["ca_file"],
        tls_cert_file=tls_files["cert_file"],
        tls_key_file=tls_files["key_file"],
        data_plane=data_plane,
        transport=transport,
        peers=tuple(peers),
        seed=seed,
        heartbeat_interval=hb,
        suspect_timeout=suspect,
        failure_timeout=timeout,
        api_socket=api_socket,
        api_socket_mode=mode,
        api_socket_group=group,
        api_remote=remote,
        metrics_listen=metrics,
        worker_command=tuple(cmd_raw),
        data_ports=(int(pm.group(1)), int(pm.group(2))),
        multi_node=multi,
        stop_grace=grace,
        default_kernel=kernel,
        images_dir=images_dir,
        log_level=log_level,
        snapshot_dir=snapshot_dir,
    )
