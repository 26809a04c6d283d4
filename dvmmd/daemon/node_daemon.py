"""dvmmd, the node daemon (one per node): start-up, signals, reload, shutdown.

    dvmmd [--config /etc/dvmmd/dvmmd.toml] [--check-config]

Wires the parts together on one asyncio loop: the durable store (store.py), this
node's TLS identity (dvmmd.security.tls: certificate files, or a certificate issued at
start-up under the CA the cluster secret stands for), membership and failure detection
(membership.py), the mutually authenticated peer network (peers.py), VM lifecycle
(vms.py: vm_owner.py and node_share.py), the local API (api.py), metrics (metrics.py)
and systemd notification (sdnotify.py).

Signals: SIGTERM/SIGINT stop the daemon cleanly (workers stopped, peers told).
SIGHUP re-reads the config file and applies what can change at run time, which is
``node.log_level``; any other changed key is logged as needing a restart, and an
invalid file is logged and ignored (the daemon keeps its configuration).

Exit status: 0 after a clean stop (SIGTERM/SIGINT), 2 for a configuration error,
1 when it cannot start (secret, state directory in use by another dvmmd, a port or
socket in use).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from dvmmd import __version__
from dvmmd.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from dvmmd.daemon.api import ApiHandler, ApiServer
from dvmmd.daemon.membership import Membership
from dvmmd.daemon.metrics import Families, add_worker_stats, registry_of
from dvmmd.daemon.metrics import serve as serve_metrics
from dvmmd.daemon.peers import PeerNetwork
from dvmmd.daemon.sdnotify import notify, watchdog_interval
from dvmmd.daemon.statelock import StateDirBusy, StateLock
from dvmmd.daemon.store import ACTIVE_STATES, VM_STATES, Store, StoreError
from dvmmd.daemon.vms import VmManager
from dvmmd.security.auth import Peer
from dvmmd.security.tls import IdentityError, load_identity

log = logging.getLogger("dvmmd")


class StartupError(Exception):
    pass


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self.state_lock = StateLock(cfg.state_dir)

    def local_info(self) -> dict[str, Any]:
        used_v, used_m = self.vmm.used()
        return {
            "vcpus": self.cfg.vcpus,
            "memory": self.cfg.memory,
            "used_vcpus": used_v,
            "used_memory": used_m,
            "vms": sum(1 for s in self.vmm.shares.values() if s.active),
            "started_at": self.started_at,
            "version": __version__,
            "data_plane": self.cfg.data_plane,
        }

    async def _rpc(self, method: str, params: dict[str, Any], peer: Peer) -> Any:
        return await self.vmm.handle_rpc(method, params)

    async def _remote_api(self, method: str, params: dict[str, Any], peer: Peer) -> Any:
        return await self.api_handler.remote(method, params, peer)

    def _setup(self) -> None:
        cfg = self.cfg
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            # First, before any VM state is read or changed: one daemon per directory.
            self.state_lock.acquire()
        except StateDirBusy as e:
            raise StartupError(str(e)) from None
        except OSError as e:
            raise StartupError(f"state directory {cfg.state_dir}: {e}") from None
        try:
            self.store = Store(cfg.state_dir / "dvmmd.db")
        except (OSError, StoreError) as e:
            raise StartupError(f"state directory {cfg.state_dir}: {e}") from None
        try:
            self.identity = load_identity(
                cfg.node_name,
                secret_file=cfg.secret_file,
                ca_file=cfg.tls_ca_file,
                cert_file=cfg.tls_cert_file,
                key_file=cfg.tls_key_file,
            )
        except IdentityError as e:
            raise StartupError(str(e)) from None
        self.incarnation = self.store.bump_incarnation()
        self.membership = Membership(
            cfg.node_name,
            cfg.advertise_str,
            self.incarnation,
            suspect_timeout=cfg.suspect_timeout,
            failure_timeout=cfg.failure_timeout,
            local_info=self.local_info,
        )
        self.network = PeerNetwork(
            cfg,
            self.identity,
            self.membership,
            self._rpc,
            self._remote_api if cfg.api_remote else None,
        )
        self.vmm = VmManager(cfg, self.store, self.membership, self.network.call)
        self.api_handler = ApiHandler(
            cfg.node_name, self.incarnation, self.membership, self.network, self.vmm, __version__
        )
        self.api = ApiServer(
            cfg.api_socket, cfg.api_socket_mode, cfg.api_socket_group, self.api_handler
        )

    def collect_metrics(self, f: Families) -> None:
        """Every metric family of this daemon, at scrape time (metrics.py)."""
        node = self.cfg.node_name
        for m in self.membership.view():
            labels = {"node": m["name"]}
            for st in ("alive", "suspect", "dead", "left"):
                f.gauge(
                    "dvmm_node_state",
                    "1 for the state the member is in",
                    1 if m["state"] == st else 0,
                    {**labels, "state": st},
                )
            f.gauge("dvmm_node_vcpus", "vCPUs the node offers", m["vcpus"], labels)
            f.gauge("dvmm_node_memory_bytes", "memory the node offers", m["memory"], labels)
            f.gauge("dvmm_node_used_vcpus", "vCPUs used by VMs", m["used_vcpus"], labels)
            f.gauge("dvmm_node_used_memory_bytes", "memory homed by VMs", m["used_memory"], labels)
            f.gauge(
                "dvmm_node_last_heartbeat_age_seconds",
                "seconds since the last heartbeat",
                m["last_heard_s"],
                labels,
            )
        states: dict[str, int] = {}
        for rec in self.store.list_vms():
            states[rec.state] = states.get(rec.state, 0) + 1
            f.gauge(
                "dvmm_vm_info", "VMs owned by this node", 1, {"vm": rec.name, "state": rec.state}
            )
            f.gauge(
                "dvmm_vm_vcpus", "vCPUs of the VM", rec.request.get("vcpus", 0), {"vm": rec.name}
            )
        for st in VM_STATES:
            f.gauge(
                "dvmm_vms", "VMs owned by this node, by state", states.get(st, 0), {"state": st}
            )
        for sh in self.vmm.shares.values():
            add_worker_stats(f, self.vmm.live_stats(sh), {"vm": sh.rec.vm, "node": node})
        c = self.network.counters
        f.counter("dvmmd_auth_failures", "peer authentication failures", c.auth_failures)
        f.counter("dvmmd_protocol_errors", "peer protocol errors", c.protocol_errors)
        f.counter("dvmmd_peer_connections", "accepted peer connections", c.connections_accepted)
        f.counter("dvmmd_rpcs_served", "peer RPCs served", c.rpcs_served)
        f.counter(
            "dvmmd_peer_connections_shed",
            "peer connections closed unheard: too many unauthenticated ones pending",
            c.connections_shed,
        )
        f.counter("dvmmd_api_requests", "local API requests", self.api_handler.requests)
        f.gauge("dvmmd_incarnation", "daemon incarnation", self.incarnation)

    async def run(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        # SIGHUP's default action would kill the daemon without stopping its workers.
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._setup()
        self.vmm.startup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        metrics_server = None
        try:
            try:
                await self.network.start()
            except OSError as e:
                raise StartupError(
                    f"cannot listen on {cfg.listen[0]}:{cfg.listen[1]} "
                    f"(node.listen): {e.strerror or e}"
                ) from None
            try:
                await self.api.start()
            except OSError as e:
                raise StartupError(f"API socket {cfg.api_socket}: {e}") from None
            if cfg.metrics_listen:
                try:
                    metrics_server = await serve_metrics(
                        *cfg.metrics_listen, registry_of(self.collect_metrics)
                    )
                except OSError as e:
                    raise StartupError(
                        f"cannot serve metrics on {cfg.metrics_listen}: {e.strerror or e}"
                    ) from None
            log.info(
                "dvmmd %s: node %s (incarnation %d) listening on %s (%s; VM data plane: %s), "
                "API %s%s",
                __version__,
                cfg.node_name,
                self.incarnation,
                cfg.advertise_str,
                self.identity.describe(),
                cfg.data_plane,
                cfg.api_socket,
                f", metrics {cfg.metrics_listen[0]}:{cfg.metrics_listen[1]}"
                if cfg.metrics_listen
                else "",
            )
            notify(f"READY=1\nSTATUS=node {cfg.node_name} serving")
            await self._main_loop()
        finally:
            notify("STOPPING=1")
            log.info("shutting down")
            await self.vmm.shutdown()
            await self.network.close(leave=True)
            await self.api.close()
            if metrics_server is not None:
                metrics_server.close()
            self.store.close()
            self.state_lock.release()
        return 0

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply node.log_level, report the rest.

        Only the log level can change under a running daemon: the node's name,
        addresses, secret, state directory, ports and resources are what peers and
        running VMs were set up with, so a change there is logged as needing a
        restart. An invalid file is logged and ignored: the daemon keeps running with
        the configuration it has.
        """
        try:
            new = load_config(self.cfg.path)
        except ConfigError as e:
            log.error("SIGHUP: configuration not reloaded: %s", e)
            return
        old = self.cfg
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(getattr(logging, new.log_level, logging.INFO))
            log.warning("SIGHUP: log level %s -> %s", old.log_level, new.log_level)
        self.cfg = dataclasses.replace(old, log_level=new.log_level)
        changed = [
            f.name
            for f in dataclasses.fields(Config)
            if f.name != "log_level" and getattr(new, f.name) != getattr(old, f.name)
        ]
        if changed:
            log.warning(
                "SIGHUP: %s changed in %s; restart dvmmd to apply (not reloadable)",
                ", ".join(changed),
                old.path,
            )
        else:
            log.info("SIGHUP: configuration reloaded from %s", old.path)

    async def _main_loop(self) -> None:
        tick = max(0.05, min(self.cfg.heartbeat_interval / 4, 0.5))
        wd = watchdog_interval()
        last_wd = 0.0
        last_status = ""
        while not self.stopping.is_set():
            self.membership.check()
            now = time.monotonic()
            if wd is not None and now - last_wd >= wd:
                alive = sum(1 for m in self.membership.members.values() if m.state == "alive")
                active = sum(1 for r in self.store.list_vms() if r.state in ACTIVE_STATES)
                status = f"{alive} node(s) alive, {active} VM(s) active"
                notify("WATCHDOG=1" + (f"\nSTATUS={status}" if status != last_status else ""))
                last_status, last_wd = status, now
            try:
                await asyncio.wait_for(self.stopping.wait(), tick)
            except TimeoutError:
                pass


def _setup_logging(level: str) -> None:
    under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if under_systemd
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format=fmt, stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dvmmd", description="dvmm node daemon")
    p.add_argument(
        "--config",
        default=os.environ.get("DVMMD_CONFIG", DEFAULT_CONFIG_PATH),
        help=f"configuration file (default: $DVMMD_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    p.add_argument("--version", action="version", version=f"dvmmd {__version__}")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"dvmmd: config error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(
            f"dvmmd: {args.config}: OK (node {cfg.node_name}, {cfg.vcpus} vCPUs, "
            f"{cfg.memory} bytes)"
        )
        return 0
    _setup_logging(cfg.log_level)
    try:
        return asyncio.run(Daemon(cfg).run())
    except StartupError as e:
        log.error("cannot start: %s", e)
        return 1
    except KeyboardInterrupt:
        return 0
