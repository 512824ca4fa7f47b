"""Shared fixtures: private Docker engines and real agent processes (see tests/testbed.py).

Engines start once per test session. A missing `dockerd` is installed, or fails the run with the
command to run: integration tests never skip for want of Docker.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import uuid
from collections.abc import Iterator

import docker
import pytest

from agents.pulls import RetryPolicy
from tests.testbed import AgentProcess, CoordinatorProcess, Engine


def start_engine(name: str) -> Engine:
    engine = Engine(name)
    engine.stop()  # a leftover from an interrupted run
    shutil.rmtree(engine.base / "data", ignore_errors=True)
    return engine.start()


@pytest.fixture(scope="session")
def engine_a() -> Iterator[Engine]:
    engine = start_engine("a")
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def engine_b() -> Iterator[Engine]:
    engine = start_engine("b")
    yield engine
    engine.stop()


# Agents in tests give up on an unreachable peer within seconds, not minutes.
TEST_RETRY = RetryPolicy(retries=5, max_delay_s=1.0)
TEST_AGENT_ARGS = [
    "--pull-retries",
    str(TEST_RETRY.retries),
    "--pull-retry-max-delay",
    str(TEST_RETRY.max_delay_s),
]


def _agent(name: str, engine: Engine) -> Iterator[AgentProcess]:
    agent = AgentProcess(
        name=name, engine=engine, token=secrets.token_urlsafe(24), extra_args=TEST_AGENT_ARGS
    )
    shutil.rmtree(agent.dir, ignore_errors=True)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture(scope="session")
def agent_a(engine_a: Engine) -> Iterator[AgentProcess]:
    yield from _agent("a", engine_a)


@pytest.fixture(scope="session")
def agent_b(engine_b: Engine) -> Iterator[AgentProcess]:
    yield from _agent("b", engine_b)


@pytest.fixture
def docker_a(engine_a: Engine) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=engine_a.url, version="auto")
    yield client
    client.close()


@pytest.fixture
def docker_b(engine_b: Engine) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=engine_b.url, version="auto")
    yield client
    client.close()


@pytest.fixture
def volume_name() -> str:
    """A fresh volume name, so tests sharing the session's engines never collide."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def api_token() -> str:
    return secrets.token_urlsafe(24)


def coordinator_config(*agents: AgentProcess) -> str:
    return "".join(
        f'[agents.host-{a.name}]\nurl = "{a.url}"\ntoken = "{a.token}"\n\n' for a in agents
    )


@pytest.fixture(scope="session")
def coordinator(
    agent_a: AgentProcess, agent_b: AgentProcess, api_token: str
) -> Iterator[CoordinatorProcess]:
    """A real coordinator with agents host-a and host-b from its config file."""
    proc = CoordinatorProcess(
        name="main", token=api_token, config=coordinator_config(agent_a, agent_b)
    )
    shutil.rmtree(proc.dir, ignore_errors=True)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def containers(docker_a: docker.DockerClient) -> Iterator[list[str]]:
    """Ids of the containers a test makes on host A, removed afterwards."""
    made: list[str] = []
    yield made
    for cid in made:
        with contextlib.suppress(docker.errors.NotFound):
            docker_a.api.remove_container(cid, force=True)
