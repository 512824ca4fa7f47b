"""A quiesced migration survives a crash of the coordinator: killed (SIGKILL) while the
source's containers are stopped, and started again, it resumes the same migration and starts
exactly the containers it stopped, once, whether the migration then fails, is cancelled or
succeeds. Containers that were not running before the migration are never started."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator

import docker
import pytest

from tests.conftest import coordinator_config
from tests.coordinatorclient import API
from tests.images import busybox_image, run_sleeper
from tests.quiesce import (
    actions,
    fill,
    get,
    migrate,
    not_running_container,
    running,
    status,
    wait_stopped_in_final_pass,
)
from tests.testbed import AgentProcess, CoordinatorProcess
from tests.transfers import TERMINAL, assert_same_tree, mountpoint, wait_for

pytestmark = pytest.mark.integration

RATE = 2 << 20  # the final pass takes about 8 s: the window in which the coordinator dies


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
        assert actions(docker_a, c, since) == ["stop", "start"]
    # Containers that were not running before the migration are not started by it.
    assert status(docker_a, created_only) == "created"
    assert status(docker_a, exited) == "exited"
    assert actions(docker_a, created_only, since) == []
    assert actions(docker_a, exited, since) == []


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
    assert actions(docker_a, app, since) == ["stop", "start"]  # stopped once, started once
    restarts = [
        e
        for e in api.events(mid)
        if e["event"] == "log" and e["data"]["message"].startswith("restarted source containers")
    ]
    assert len(restarts) == 1, restarts
    assert status(docker_a, idle) == "exited"
    assert actions(docker_a, idle, since) == []
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
    assert actions(docker_a, app, since) == ["stop", "start"]
    assert_same_tree(root, mountpoint(docker_b, volume_name))
