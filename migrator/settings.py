"""The coordinator's settings: one frozen dataclass built from flags, the token file and the
config file (TOML). Nothing else in the coordinator reads files or the environment for them."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One way to read --listen and token files for both services (the coordinator may use the
# agent's pure modules; the agent never imports the coordinator).
from agents.settings import SettingsError as SettingsError
from agents.settings import parse_listen, read_token_file

DEFAULT_LISTEN = "127.0.0.1:8420"


@dataclass(frozen=True)
class ConfiguredAgent:
    name: str
    url: str
    token: str
    data_url: str | None = None


@dataclass(frozen=True)
class CoordinatorSettings:
    host: str
    port: int
    db_path: Path
    tokens: tuple[str, ...] = ()
    """API client tokens; empty means no auth (allowed on loopback only)."""
    agents: tuple[ConfiguredAgent, ...] = ()
    retention_days: float = 30.0
    agent_retries: int = 6
    """Attempts at an unreachable agent before a migration fails with agent_unreachable."""
    agent_retry_max_delay_s: float = 30.0
    poll_interval_s: float = 0.5


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_config(path: str | Path) -> tuple[ConfiguredAgent, ...]:
    """`[agents.NAME]` tables with `url`, `token` and optional `data_url`."""
    try:
        doc: dict[str, Any] = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise SettingsError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config file {path} is not valid TOML: {e}") from e
    unknown = set(doc) - {"agents"}
    if unknown:
        raise SettingsError(f"config file {path}: unknown section(s) {', '.join(sorted(unknown))}")
    agents = []
    for name, table in (doc.get("agents") or {}).items():
        if not isinstance(table, dict) or not isinstance(table.get("url"), str):
            raise SettingsError(f"config file {path}: [agents.{name}] needs url and token")
        if not isinstance(table.get("token"), str):
            raise SettingsError(f"config file {path}: [agents.{name}] needs url and token")
        extra = set(table) - {"url", "token", "data_url"}
        if extra:
            raise SettingsError(f"config file {path}: [agents.{name}] unknown {sorted(extra)}")
        agents.append(ConfiguredAgent(name, table["url"], table["token"], table.get("data_url")))
    return tuple(agents)


def load_settings(
    *,
    listen: str,
    db: str,
    token_file: str | None,
    config: str | None,
    retention_days: float = 30.0,
) -> CoordinatorSettings:
    host, port = parse_listen(listen)
    tokens = read_token_file(token_file) if token_file else ()
    if not tokens and not is_loopback(host):
        raise SettingsError(
            f"refusing to listen on {host} without a token file: anyone on the network could "
            "move volumes (give --token-file, or listen on 127.0.0.1)"
        )
    return CoordinatorSettings(
        host=host,
        port=port,
        db_path=Path(db),
        tokens=tokens,
        agents=read_config(config) if config else (),
        retention_days=retention_days,
    )
