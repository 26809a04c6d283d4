"""dvmmd's configuration: the schema (schema.py) and loading it from TOML (load.py).

``from dvmmd.config import Config, load_config`` is the way in: this package re-exports
what the daemon, the CLI and the tests use.
"""

from dvmmd.config.load import load_config, parse_config
from dvmmd.config.schema import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_SOCKET,
    TRANSPORTS,
    Config,
    ConfigError,
    format_hostport,
    is_valid_name,
    parse_hostport,
    parse_memory,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_SOCKET",
    "TRANSPORTS",
    "Config",
    "ConfigError",
    "format_hostport",
    "is_valid_name",
    "load_config",
    "parse_config",
    "parse_hostport",
    "parse_memory",
]
