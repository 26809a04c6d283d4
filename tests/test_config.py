"""dvmmd configuration: valid files load, bad ones fail naming file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvmmd.config import DEFAULT_SOCKET, ConfigError, load_config, parse_config

GOOD = """\
[node]
name = "n1"
listen = "127.0.0.1:7400"
state_dir = "/var/lib/dvmmd"
vcpus = 2
memory = "1G"

[cluster]
secret_file = "/etc/dvmmd/secret"
peers = ["127.0.0.2:7400"]
heartbeat_interval = 0.5
failure_timeout = 3

[metrics]
listen = "127.0.0.1:9478"
"""


def err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "/etc/dvmmd/dvmmd.toml")
    return ei.value


def test_good_config() -> None:
    c = parse_config(GOOD, "x.toml")
    assert c.node_name == "n1"
    assert c.listen == ("127.0.0.1", 7400) == c.advertise
    assert c.memory == 1 << 30 and c.vcpus == 2
    assert c.peers == (("127.0.0.2", 7400),)
    assert c.failure_timeout == 3.0 and c.heartbeat_interval == 0.5
    assert 0.5 < c.suspect_timeout <= 3.0
    assert c.metrics_listen == ("127.0.0.1", 9478)
    assert c.api_socket == Path(DEFAULT_SOCKET) and c.api_socket_mode == 0o660
    assert c.multi_node == "auto" and c.data_ports == (7500, 7599)


def test_missing_required_key_names_it() -> None:
    e = err(GOOD.replace('name = "n1"\n', ""))
    assert e.key == "node.name" and "missing" in str(e)
    assert str(e).startswith("/etc/dvmmd/dvmmd.toml:1: node.name")


def test_wrong_type_names_key_and_line() -> None:
    e = err(GOOD.replace("vcpus = 2", 'vcpus = "two"'))
    assert e.line == 5 and e.key == "node.vcpus"
    assert "must be int" in str(e)


def test_bad_size() -> None:
    e = err(GOOD.replace('memory = "1G"', 'memory = "lots"'))
    assert e.key == "node.memory" and e.line == 6


def test_toml_syntax_error_has_line() -> None:
    e = err(GOOD.replace("vcpus = 2", "vcpus = = 2"))
    assert e.line == 5 and "invalid TOML" in str(e)


def test_unknown_key_and_table() -> None:
    e = err(GOOD + "\n[cluster2]\nx = 1\n")
    assert e.key == "[cluster2]"
    e = err(GOOD.replace("vcpus = 2", "vcpus = 2\nvcpu = 3"))
    assert e.key == "node.vcpu" and e.line == 6 and "unknown key" in str(e)


def test_bad_addresses_and_timeouts() -> None:
    assert err(GOOD.replace('"127.0.0.2:7400"', '"nohost"')).key == "cluster.peers"
    assert err(GOOD.replace("127.0.0.1:7400", "0.0.0.0:7400")).key == "node.listen"
    e = err(GOOD.replace("failure_timeout = 3", "failure_timeout = 0.2"))
    assert e.key == "cluster.failure_timeout" and "heartbeat_interval" in str(e)
    assert err(GOOD.replace("failure_timeout = 3", "failure_timeout = -1")).line == 12


def test_socket_mode_must_not_be_world_accessible() -> None:
    e = err(GOOD + '\n[api]\nsocket_mode = "0666"\n')
    assert e.key == "api.socket_mode"


def test_relative_state_dir_rejected() -> None:
    assert err(GOOD.replace("/var/lib/dvmmd", "state")).key == "node.state_dir"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "systemd" / "dvmmd.toml.example"
    c = load_config(example)
    assert c.api_socket == Path("/run/dvmmd/dvmmd.sock") and c.metrics_listen is not None


# --------------------------------------------------------------------------- identity, data plane

TLS = """
[tls]
ca_file = "/etc/dvmmd/tls/ca.crt"
cert_file = "/etc/dvmmd/tls/n1.crt"
key_file = "/etc/dvmmd/tls/n1.key"
"""


def test_identity_secret_or_certificates() -> None:
    c = parse_config(GOOD, "x.toml")
    assert c.secret_file == Path("/etc/dvmmd/secret") and c.tls_cert_file is None
    c = parse_config(GOOD.replace('secret_file = "/etc/dvmmd/secret"\n', "") + TLS, "x.toml")
    assert c.secret_file is None
    assert (c.tls_ca_file, c.tls_cert_file, c.tls_key_file) == (
        Path("/etc/dvmmd/tls/ca.crt"),
        Path("/etc/dvmmd/tls/n1.crt"),
        Path("/etc/dvmmd/tls/n1.key"),
    )
    e = err(GOOD + TLS)
    assert e.key == "cluster.secret_file" and "not both" in str(e)
    e = err(GOOD.replace('secret_file = "/etc/dvmmd/secret"\n', ""))
    assert e.key == "[cluster]" and "no identity: set [tls]" in str(e)
    no_key = TLS.replace('key_file = "/etc/dvmmd/tls/n1.key"\n', "")
    e = err(GOOD.replace('secret_file = "/etc/dvmmd/secret"\n', "") + no_key)
    assert e.key == "[tls]" and "missing ['key_file']" in str(e)
    e = err(
        GOOD.replace('secret_file = "/etc/dvmmd/secret"\n', "") + TLS.replace("/etc/", "etc/", 1)
    )
    assert e.key == "tls.ca_file" and "absolute path" in str(e)


def test_transport_setting() -> None:
    assert parse_config(GOOD, "x.toml").transport == "tcp"
    for t in ("tcp", "shm"):
        text = GOOD.replace("[cluster]\n", f'[cluster]\ntransport = "{t}"\n')
        assert parse_config(text, "x.toml").transport == t
    e = err(GOOD.replace("[cluster]\n", '[cluster]\ntransport = "rdma"\n'))
    assert e.key == "cluster.transport" and e.line == 9
    assert "must be one of tcp, shm, got 'rdma'" in str(e)


def test_data_plane_setting() -> None:
    assert parse_config(GOOD, "x.toml").data_plane == "encrypt"
    for mode in ("encrypt", "integrity", "none"):
        text = GOOD.replace("[cluster]\n", f'[cluster]\ndata_plane = "{mode}"\n')
        assert parse_config(text, "x.toml").data_plane == mode
    e = err(GOOD.replace("[cluster]\n", '[cluster]\ndata_plane = "off"\n'))
    assert e.key == "cluster.data_plane" and e.line == 9
    assert "must be one of encrypt, integrity, none, got 'off'" in str(e)


def test_vm_snapshot_dir() -> None:
    """Where periodic snapshots go: <state_dir>/snapshots unless vm.snapshot_dir says."""
    assert parse_config(GOOD).snapshot_base == Path("/var/lib/dvmmd/snapshots")
    c = parse_config(GOOD + '\n[vm]\nsnapshot_dir = "/shared/snaps"\n')
    assert c.snapshot_base == Path("/shared/snaps")
    e = err(GOOD + '\n[vm]\nsnapshot_dir = "snaps"\n')
    assert "vm.snapshot_dir: must be an absolute path, got 'snaps'" in str(e), str(e)
