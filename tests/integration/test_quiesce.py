"""Volumes that running containers use: refused, crash-consistent on request, or quiesced —
the containers stopped for the final pass and always started again."""

from __future__ import annotations

import os
import secrets
import time
import uuid
from pathlib import Path

import docker
import pytest

from tests.agentclient import assert_problem
from tests.coordinatorclient import API
from tests.images import busybox_image, run_sleeper
from tests.quiesce import running
from tests.testbed import AgentProcess, CoordinatorProcess
from tests.transfers import assert_same_tree, mountpoint, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def used_volume(docker_a: docker.DockerClient, volume_name: str) -> tuple[str, Path, str]:
    """A volume with data, used by a running container on host A."""
    docker_a.api.create_volume(volume_name)
    root = mountpoint(docker_a, volume_name)
    (root / "db").mkdir()
    for i in range(4):
        (root / "db" / f"t{i}").write_bytes(secrets.token_bytes(2 << 20))
    hour_ago = time.time_ns() - 3600 * 10**9  # data older than the migration, as usual
    for path in root.rglob("*"):
        os.utime(path, ns=(hour_ago, hour_ago))
    container = run_sleeper(docker_a, volume_name, f"{volume_name}-app")
    return volume_name, root, container


def migrate(volume: str, **options: object) -> dict[str, object]:
    return {
        "source": {"agent": "host-a", "volume": volume},
        "target": {"agent": "host-b"},
        "options": options,
    }


def test_running_container_blocks_without_quiesce(
    coordinator: CoordinatorProcess, api_token: str, used_volume: tuple[str, Path, str]
) -> None:
    volume, _, _ = used_volume
    r = API(coordinator, api_token).request("POST", "/v1/migrations", json=migrate(volume))
    body = assert_problem(r, 409, "volume_in_use")
    assert f"{volume}-app" in body["detail"]
    assert body["containers"] == [f"{volume}-app"]


def test_allow_in_use_is_crash_consistent(
    coordinator: CoordinatorProcess,
    api_token: str,
    docker_a: docker.DockerClient,
    used_volume: tuple[str, Path, str],
) -> None:
    volume, _, container = used_volume
    api = API(coordinator, api_token)
    done = api.wait(api.create(migrate(volume, allow_in_use=True))["id"])
    assert done["state"] == "succeeded", done
    assert done["result"]["consistency"] == "crash_consistent"
    assert any("crash-consistent" in w for w in done["result"]["warnings"])
    assert running(docker_a, container)  # never stopped


def test_quiesce_stops_for_the_copy_and_restarts(
    coordinator: CoordinatorProcess,
    api_token: str,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    used_volume: tuple[str, Path, str],
) -> None:
    volume, root, container = used_volume
    # A container that was stopped before must stay stopped.
    idle = docker_a.api.create_container(
        busybox_image(docker_a),
        command=["/bin/true"],
        host_config=docker_a.api.create_host_config(
            binds={volume: {"bind": "/data", "mode": "rw"}}, network_mode="none"
        ),
    )
    api = API(coordinator, api_token)
    plan = api.request(
        "POST", "/v1/migrations?dry_run=true", json=migrate(volume, quiesce="stop")
    ).json()["plan"]
    assert plan["containers_to_stop"] == [f"{volume}-app"]
    assert running(docker_a, container)  # the dry run changed nothing
    created = api.create(migrate(volume, quiesce="stop", max_rate_bytes_per_s=4 << 20))
    wait_for(lambda: not running(docker_a, container), what="the container to be stopped")
    done = api.wait(created["id"])
    assert done["state"] == "succeeded", done
    result = done["result"]
    assert result["consistency"] == "quiesced"
    assert result["verified"] is True
    assert 0 < result["downtime_s"] < result["duration_s"]
    assert running(docker_a, container)
    assert docker_a.api.inspect_container(idle["Id"])["State"]["Status"] == "created"
    assert_same_tree(root, mountpoint(docker_b, volume))


def test_precopy_then_short_final_pass(
    coordinator: CoordinatorProcess,
    api_token: str,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    used_volume: tuple[str, Path, str],
) -> None:
    volume, root, container = used_volume
    api = API(coordinator, api_token)
    done = api.wait(api.create(migrate(volume, quiesce="stop", precopy=True))["id"])
    assert done["state"] == "succeeded", done
    passes = done["result"]["passes"]
    assert len(passes) >= 2, passes
    # The final pass, with the container stopped, only re-reads what could have changed.
    assert passes[-1]["bytes"] < passes[0]["bytes"]
    assert done["result"]["verified"] is True
    assert running(docker_a, container)
    assert_same_tree(root, mountpoint(docker_b, volume))


def test_failure_in_the_final_pass_restarts_the_containers(
    coordinator: CoordinatorProcess,
    api_token: str,
    agent_b: AgentProcess,
    docker_a: docker.DockerClient,
    volume_name: str,
) -> None:
    docker_a.api.create_volume(volume_name)
    (mountpoint(docker_a, volume_name) / "big").write_bytes(secrets.token_bytes(16 << 20))
    container = run_sleeper(docker_a, volume_name, f"app-{uuid.uuid4().hex[:6]}")
    api = API(coordinator, api_token)
    created = api.create(migrate(volume_name, quiesce="stop", max_rate_bytes_per_s=2 << 20))
    wait_for(lambda: not running(docker_a, container), what="the container to be stopped")
    wait_for(
        lambda: (
            api.request("GET", f"/v1/migrations/{created['id']}").json()["progress"]["bytes_done"]
            > 1 << 20
        ),
        what="the final pass to be under way",
    )
    agent_b.kill()  # the target dies and does not come back
    try:
        started = time.monotonic()
        done = api.wait(created["id"], seconds=180)
        assert done["state"] == "failed", done
        assert done["error"]["code"] == "agent_unreachable"
        assert running(docker_a, container), "the source container was left stopped"
        assert time.monotonic() - started < 150
    finally:
        agent_b.start()


def test_compose_project_moves_together(
    coordinator: CoordinatorProcess,
    api_token: str,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
) -> None:
    """A compose project of two volumes (db + uploads) in one call and one quiesce window,
    names, labels and contents kept, both verified."""
    project = f"shop{uuid.uuid4().hex[:6]}"
    names = [f"{project}_db", f"{project}_uploads"]
    for name in names:
        labels = {"com.docker.compose.project": project, "com.docker.compose.volume": name}
        docker_a.api.create_volume(name, labels=labels)
        root = mountpoint(docker_a, name)
        (root / "data").write_bytes(secrets.token_bytes(1 << 20))
    app = run_sleeper(docker_a, names[0], f"{project}-db")
    api = API(coordinator, api_token)
    body = {
        "source": {"agent": "host-a", "compose_project": project},
        "target": {"agent": "host-b"},
        "options": {"quiesce": "stop"},
    }
    plan = api.request("POST", "/v1/migrations?dry_run=true", json=body).json()["plan"]
    assert [v["name"] for v in plan["volumes"]] == names
    assert plan["containers_to_stop"] == [f"{project}-db"]
    done = api.wait(api.create(body)["id"])
    assert done["state"] == "succeeded", done
    assert done["source"] == {"agent": "host-a", "compose_project": project}
    per_volume = done["result"]["volumes"]
    assert [v["volume"] for v in per_volume] == names
    assert all(v["verified"] for v in per_volume)
    assert done["result"]["consistency"] == "quiesced"
    assert running(docker_a, app)
    for name in names:
        assert docker_b.api.inspect_volume(name)["Labels"]["com.docker.compose.project"] == project
        assert_same_tree(mountpoint(docker_a, name), mountpoint(docker_b, name))


def test_explicit_volume_list_refuses_target_volume(
    coordinator: CoordinatorProcess, api_token: str
) -> None:
    r = API(coordinator, api_token).request(
        "POST",
        "/v1/migrations",
        json={
            "source": {"agent": "host-a", "volumes": ["aa", "bb"]},
            "target": {"agent": "host-b", "volume": "cc"},
        },
    )
    assert_problem(r, 400, "invalid_request")
