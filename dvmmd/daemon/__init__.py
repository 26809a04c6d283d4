"""dvmmd, the node daemon: one per node, asyncio.

node_daemon.py wires the parts: the peer network (peers.py over peer_protocol.py,
authenticated by dvmmd.security), membership and failure detection (membership.py),
the VMs (vms.py: the VMs this node owns, vm_owner.py, and its share of any VM,
node_share.py, each share one worker process, dvmmd.worker), durable state
(store.py, statelock.py), the local API (api.py), Prometheus metrics (metrics.py) and
systemd notification (sdnotify.py). ``dvmmd`` (pyproject's script) and ``python -m
dvmmd.daemon`` run `node_daemon.main`.
"""
