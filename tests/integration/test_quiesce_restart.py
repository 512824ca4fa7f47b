"""A quiesced migration survives a crash of the coordinator: killed (SIGKILL) while the
source's containers are stopped, and started again, it resumes the same migration and starts
exactly the containers it stopped, once, whether the migration then fails, is cancelled or
succeeds. Containers that were not running before the migration are never started."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.conftest import coordinator_config
from tests.coordinatorclient import API
from tests.images import busybox_image, run_sleeper
from tests.testbed import AgentProcess, CoordinatorProcess
from tests.transfers import TERMINAL, assert_same_tree, wait_for

pytestmark = pytest.mark.integration

DATA = 16 << 20
RATE = 2 << 20  # the final pass takes about 8 s: the window in which the coordinator dies


def mountpoint(client: docker.DockerClient, name: str) -> Path:
    return Path(client.api.inspect_volume(name)["Mountpoint"])


def running(client: docker.DockerClient, container_id: str) -> bool:
    return bool(client.api.inspect_container(container_id)["State"]["Running"])


def status(client: docker.DockerClient, container_id: str) -> str:
    return str(client.api.inspect_container(container_id)["State"]["Status"])


def lifecycle(client: docker.DockerClient, container_id: str, since: float) -> list[str]:
    """The container's `start` and `stop` events since `since` (Unix seconds), in order."""
    # Nine decimals: the engine reads the part after the dot as nanoseconds.
    stream = client.api.events(
        since=f"{since:.9f}",
        until=f"{time.time():.9f}",
        filters={"type": "container", "container": container_id, "event": ["start", "stop"]},
        decode=True,
    )
    try:
        return [str(e["Action"]) for e in stream]
    finally:
        stream.close()


def get(api: API, migration_id: str) -> dict[str, Any]:
    r = api.request("GET", f"/v1/migrations/{migration_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def migrate(volume: str, **options: object) -> dict[str, object]:
    return {
        "source": {"agent": "host-a", "volume": volume},
        "target": {"agent": "host-b"},
        "options": {"quiesce": "stop", **options},
    }


def fill(client: docker.DockerClient, volume: str) -> Path:
    """A volume holding 16 MiB of data older than the migration, as usual."""
    client.api.create_volume(volume)
    root = mountpoint(client, volume)
    (root / "db").mkdir()
    (root / "db" / "big").write_bytes(secrets.token_bytes(DATA - (64 << 10)))
    for i in range(4):
        (root / "db" / f"small{i}").write_bytes(secrets.token_bytes(16 << 10))
    hour_ago = time.time_ns() - 3600 * 10**9
    for path in [root, *root.rglob("*")]:
        os.utime(path, ns=(hour_ago, hour_ago))
    return root


def not_running_container(client: docker.DockerClient, volume: str, *, exited: bool) -> str:
    """A container that uses `volume` but is not running: created and never started, or
    started and exited."""
    container = client.api.create_container(
        busybox_image(client),
        command=["/bin/true"],
        host_config=client.api.create_host_config(
            binds={volume: {"bind": "/data", "mode": "rw"}}, network_mode="none"
        ),
    )
    cid = str(container["Id"])
    if exited:
        client.api.start(cid)
        assert client.api.wait(cid, timeout=30)["StatusCode"] == 0
    return cid


@pytest.fixture
def own_coordinator(
    agent_a: AgentProcess, agent_b: AgentProcess, api_token: str
) -> Iterator[CoordinatorProcess]:
    """A coordinator of this test's own, with its own database: the test kills it."""
    proc = CoordinatorProcess(
        name=f"qr-{uuid.uuid4().hex[:8]}",
        token=api_token,
        config=coordinator_config(agent_a, agent_b),
    )
    shutil.rmtree(proc.dir, ignore_errors=True)
    proc.start()
    yield proc
    proc.stop()
    shutil.rmtree(proc.dir, ignore_errors=True)


@pytest.fixture
def containers(docker_a: docker.DockerClient) -> Iterator[list[str]]:
    """Ids of the containers a test makes on host A, removed afterwards."""
    made: list[str] = []
    yield made
    for cid in made:
        with contextlib.suppress(docker.errors.NotFound):
            docker_a.api.remove_container(cid, force=True)


def wait_stopped_in_final_pass(
    api: API, docker_a: docker.DockerClient, migration_id: str, apps: list[str]
) -> None:
    """Until the source's containers are stopped and the (only, final) pass is under way."""

    def ready() -> bool:
        m = get(api, migration_id)
        assert m["state"] not in TERMINAL, m  # too late: the window was missed
        return (
            m["phase"] == "transferring"
            and m["progress"]["bytes_done"] >= 1 << 20
            and not any(running(docker_a, c) for c in apps)
        )

    wait_for(ready, timeout=30, what="the containers stopped and the final pass under way")


@pytest.mark.parametrize("ending", ["target_dies", "cancel"])
def test_coordinator_killed_while_quiesced_then_migration_fails_restarts_containers(
    ending: str,
    own_coordinator: CoordinatorProcess,
    api_token: str,
    agent_b: AgentProcess,
    docker_a: docker.DockerClient,
    volume_name: str,
    containers: list[str],
) -> None:
    fill(docker_a, volume_name)
    tag = uuid.uuid4().hex[:6]
    apps = [run_sleeper(docker_a, volume_name, f"app{i}-{tag}") for i in range(2)]
    created_only = not_running_container(docker_a, volume_name, exited=False)
    exited = not_running_container(docker_a, volume_name, exited=True)
    containers += [*apps, created_only, exited]
    since = time.time()
    api = API(own_coordinator, api_token)
    mid = api.create(migrate(volume_name, max_rate_bytes_per_s=RATE))["id"]
    wait_stopped_in_final_pass(api, docker_a, mid, apps)

    own_coordinator.kill()
    assert not any(running(docker_a, c) for c in apps)  # nobody restarted them
    try:
        if ending == "target_dies":
            agent_b.kill()  # and it does not come back before the migration ends
        own_coordinator.start()
        api = API(own_coordinator, api_token)
        resumed = get(api, mid)
        assert resumed["state"] == "running", resumed
        if ending == "cancel":
            r = api.request("POST", f"/v1/migrations/{mid}/cancel")
            assert r.status_code == 202, r.text
        done = api.wait(mid, seconds=50)
    finally:
        if ending == "target_dies":
            agent_b.start()

    log = own_coordinator.log_tail()
    if ending == "target_dies":
        assert done["state"] == "failed", (done, log)
        assert done["error"]["code"] == "agent_unreachable", done
    else:
        assert done["state"] == "cancelled", (done, log)
    assert done["id"] == mid and done["attempts"] == 1
    assert done["result"]["target_complete"] is False
    for c in apps:
        assert running(docker_a, c), f"source container {c[:12]} was left stopped\n{log}"
        assert lifecycle(docker_a, c, since) == ["stop", "start"]
    # Containers that were not running before the migration are not started by it.
    assert status(docker_a, created_only) == "created"
    assert status(docker_a, exited) == "exited"
    assert lifecycle(docker_a, created_only, since) == []
    assert lifecycle(docker_a, exited, since) == []


def test_coordinator_killed_while_quiesced_then_migration_succeeds(
    own_coordinator: CoordinatorProcess,
    api_token: str,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    volume_name: str,
    containers: list[str],
) -> None:
    root = fill(docker_a, volume_name)
    app = run_sleeper(docker_a, volume_name, f"app-{uuid.uuid4().hex[:6]}")
    idle = not_running_container(docker_a, volume_name, exited=True)
    containers += [app, idle]
    since = time.time()
    api = API(own_coordinator, api_token)
    mid = api.create(migrate(volume_name, max_rate_bytes_per_s=RATE))["id"]
    wait_stopped_in_final_pass(api, docker_a, mid, [app])

    own_coordinator.kill()
    down = time.monotonic()
    assert not running(docker_a, app)
    own_coordinator.start()
    outage = time.monotonic() - down
    api = API(own_coordinator, api_token)
    done = api.wait(mid, seconds=50)

    assert done["state"] == "succeeded", (done, own_coordinator.log_tail())
    assert done["id"] == mid and done["attempts"] == 1
    result = done["result"]
    assert result["consistency"] == "quiesced"
    assert result["verified"] is True
    # The downtime counts from the stop before the crash, not from the resumed run.
    assert outage < result["downtime_s"] < result["duration_s"], (outage, result)
    assert running(docker_a, app)
    assert lifecycle(docker_a, app, since) == ["stop", "start"]  # stopped once, started once
    restarts = [
        e
        for e in api.events(mid)
        if e["event"] == "log" and e["data"]["message"].startswith("restarted source containers")
    ]
    assert len(restarts) == 1, restarts
    assert status(docker_a, idle) == "exited"
    assert lifecycle(docker_a, idle, since) == []
    assert_same_tree(root, mountpoint(docker_b, volume_name))


def test_coordinator_killed_while_stopping_the_containers(
    own_coordinator: CoordinatorProcess,
    api_token: str,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    volume_name: str,
    containers: list[str],
) -> None:
    """The crash comes while the agent is stopping the containers (a slow stop: the app
    ignores SIGTERM), and the coordinator comes back once they are stopped: it must still
    know they were running, copy a quiesced volume and start them again."""
    root = fill(docker_a, volume_name)
    slow = docker_a.api.create_container(
        busybox_image(docker_a),
        # PID 1 without a handler: SIGTERM is ignored, `docker stop` waits its timeout.
        command=["/bin/sh", "-c", "while true; do sleep 1; done"],
        name=f"slow-{uuid.uuid4().hex[:6]}",
        host_config=docker_a.api.create_host_config(
            binds={volume_name: {"bind": "/data", "mode": "rw"}}, network_mode="none"
        ),
    )
    app = str(slow["Id"])
    containers.append(app)
    docker_a.api.start(app)
    since = time.time()
    api = API(own_coordinator, api_token)
    mid = api.create(migrate(volume_name, stop_timeout_s=4))["id"]

    def quiescing() -> bool:
        m = get(api, mid)
        assert m["state"] not in TERMINAL, m
        return m["phase"] == "quiescing"

    wait_for(quiescing, timeout=20, what="the quiescing phase")
    assert running(docker_a, app)  # still stopping: the window is open
    own_coordinator.kill()
    # The agent finishes the stop on its own; the coordinator is down all the while.
    wait_for(lambda: not running(docker_a, app), timeout=20, what="the container to stop")
    own_coordinator.start()
    done = API(own_coordinator, api_token).wait(mid, seconds=50)

    assert done["state"] == "succeeded", (done, own_coordinator.log_tail())
    assert done["result"]["consistency"] == "quiesced", done["result"]
    assert done["result"]["verified"] is True
    assert running(docker_a, app), f"the container was left stopped\n{own_coordinator.log_tail()}"
    assert lifecycle(docker_a, app, since) == ["stop", "start"]
    assert_same_tree(root, mountpoint(docker_b, volume_name))
