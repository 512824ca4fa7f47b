"""The agent's settings: one frozen dataclass, built from command-line values and an
injectable environment mapping. Nothing else in the agent reads the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:8421"


class SettingsError(ValueError):
    """The configuration is unusable; the message says why (exit code 2)."""


@dataclass(frozen=True)
class AgentSettings:
    host: str
    port: int
    tokens: tuple[str, ...]
    """Tokens from the token file. The first is the coordinator's, and the transfer-token key."""
    docker_host: str
    state_dir: Path
    allow_devices: bool = False
    pull_retries: int = 8
    pull_retry_max_delay_s: float = 30.0

    @property
    def token(self) -> str:
        return self.tokens[0]


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def read_token_file(path: str | Path) -> tuple[str, ...]:
    """One token per line; blank lines and `#` comments ignored. At least one token."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SettingsError(f"cannot read token file {path}: {e.strerror}") from e
    tokens = tuple(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
    if not tokens:
        raise SettingsError(f"token file {path} holds no token")
    return tokens


def load_settings(
    *,
    listen: str,
    token_file: str,
    docker_host: str | None,
    state_dir: str,
    allow_devices: bool = False,
    pull_retries: int = 8,
    pull_retry_max_delay_s: float = 30.0,
    environ: Mapping[str, str] | None = None,
) -> AgentSettings:
    env = os.environ if environ is None else environ
    host, port = parse_listen(listen)
    docker = docker_host or env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    return AgentSettings(
        host=host,
        port=port,
        tokens=read_token_file(token_file),
        docker_host=docker,
        state_dir=Path(state_dir),
        allow_devices=allow_devices,
        pull_retries=pull_retries,
        pull_retry_max_delay_s=pull_retry_max_delay_s,
    )
