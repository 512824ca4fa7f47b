"""The agent's volume API against real engines and a real agent process."""

from __future__ import annotations

import docker
import pytest

from tests.agentclient import AgentHTTP, assert_problem
from tests.testbed import AgentProcess

pytestmark = pytest.mark.integration

TMPFS_OPTS = {"type": "tmpfs", "device": "tmpfs", "o": "size=64m"}
LABELS = {"com.example.team": "data", "owner": "Zoë Øster — 数据", "empty": ""}


def test_health_reports_versions(agent_a: AgentProcess, docker_a: docker.DockerClient) -> None:
    body = AgentHTTP(agent_a, token="").get("/v1/health").json()
    assert body["status"] == "ok"
    assert body["version"]
    assert body["hostname"]
    assert body["docker_version"] == docker_a.version()["Version"]


def test_created_volume_comes_back_identical(
    agent_a: AgentProcess, docker_a: docker.DockerClient, volume_name: str
) -> None:
    http = AgentHTTP(agent_a)
    r = http.post(
        "/v1/volumes",
        json={"name": volume_name, "driver": "local", "driver_opts": TMPFS_OPTS, "labels": LABELS},
    )
    assert r.status_code == 201, r.text
    created = r.json()

    got = http.get(f"/v1/volumes/{volume_name}").json()
    assert got == created
    assert got["name"] == volume_name
    assert got["driver"] == "local"
    assert got["options"] == TMPFS_OPTS
    assert got["labels"] == LABELS
    assert got["scope"] == "local"
    assert got["readable"] is False
    assert "tmpfs" in got["unreadable_reason"]
    # And Docker itself agrees: the agent created exactly what it was given.
    raw = docker_a.api.inspect_volume(volume_name)
    assert raw["Options"] == TMPFS_OPTS
    assert raw["Labels"] == LABELS

    listed = {v["name"]: v for v in http.get("/v1/volumes").json()["volumes"]}
    assert listed[volume_name] == got


def test_in_use_by_lists_a_created_container(
    agent_a: AgentProcess, docker_a: docker.DockerClient, volume_name: str
) -> None:
    http = AgentHTTP(agent_a)
    assert (
        http.post("/v1/volumes", json={"name": volume_name, "driver_opts": TMPFS_OPTS}).status_code
        == 201
    )
    image = _empty_image(docker_a)
    container = docker_a.api.create_container(
        image,
        command=["/none"],
        name=f"{volume_name}-user",
        host_config=docker_a.api.create_host_config(
            binds={volume_name: {"bind": "/data", "mode": "rw"}}, network_mode="none"
        ),
    )
    try:
        users = http.get(f"/v1/volumes/{volume_name}").json()["in_use_by"]
        assert users == [
            {
                "id": container["Id"],
                "name": f"{volume_name}-user",
                "state": "created",
                "running": False,
            }
        ]
        assert http.get(f"/v1/volumes/{volume_name}/containers").json()["containers"] == users
    finally:
        docker_a.api.remove_container(container["Id"], force=True)


def test_manifest_of_tmpfs_volume_is_refused(agent_a: AgentProcess, volume_name: str) -> None:
    http = AgentHTTP(agent_a)
    assert (
        http.post("/v1/volumes", json={"name": volume_name, "driver_opts": TMPFS_OPTS}).status_code
        == 201
    )
    body = assert_problem(
        http.get(f"/v1/volumes/{volume_name}/manifest"), 409, "volume_not_readable"
    )
    assert "tmpfs" in body["detail"]


def test_plain_local_volume_is_readable(agent_a: AgentProcess, volume_name: str) -> None:
    http = AgentHTTP(agent_a)
    created = http.post("/v1/volumes", json={"name": volume_name}).json()
    assert created["readable"] is True
    assert created["unreadable_reason"] is None
    assert created["in_use_by"] == []


def test_create_existing_volume_is_409(agent_a: AgentProcess, volume_name: str) -> None:
    http = AgentHTTP(agent_a)
    assert (
        http.post("/v1/volumes", json={"name": volume_name, "labels": {"a": "1"}}).status_code
        == 201
    )
    assert_problem(
        http.post("/v1/volumes", json={"name": volume_name, "labels": {"a": "2"}}),
        409,
        "volume_exists",
    )
    # The existing volume was not touched.
    assert http.get(f"/v1/volumes/{volume_name}").json()["labels"] == {"a": "1"}


def test_unknown_driver_is_a_clear_error(agent_a: AgentProcess, volume_name: str) -> None:
    body = assert_problem(
        AgentHTTP(agent_a).post(
            "/v1/volumes", json={"name": volume_name, "driver": "nosuchdriver"}
        ),
        400,
        "driver_not_found",
    )
    assert "nosuchdriver" in body["detail"]


def _empty_image(client: docker.DockerClient) -> str:
    import io
    import tarfile

    buf = io.BytesIO()
    tarfile.open(fileobj=buf, mode="w").close()
    client.api.import_image_from_data(buf.getvalue(), repository="test/empty", tag="1")
    return "test/empty:1"


def test_description_from_one_engine_recreates_on_another(
    agent_a: AgentProcess, agent_b: AgentProcess, docker_b: docker.DockerClient, volume_name: str
) -> None:
    """What a migration does first: inspect on host A, create the same on host B."""
    a, b = AgentHTTP(agent_a), AgentHTTP(agent_b)
    assert (
        a.post(
            "/v1/volumes", json={"name": volume_name, "driver_opts": TMPFS_OPTS, "labels": LABELS}
        ).status_code
        == 201
    )
    source = a.get(f"/v1/volumes/{volume_name}").json()
    r = b.post(
        "/v1/volumes",
        json={
            "name": source["name"],
            "driver": source["driver"],
            "driver_opts": source["options"],
            "labels": source["labels"],
        },
    )
    assert r.status_code == 201, r.text
    target = b.get(f"/v1/volumes/{volume_name}").json()
    for key in ("name", "driver", "options", "labels", "scope"):
        assert target[key] == source[key], key
    assert target["mountpoint"] != source["mountpoint"]
    assert docker_b.api.inspect_volume(volume_name)["Labels"] == LABELS


def test_delete_volume_refuses_while_referenced(
    agent_a: AgentProcess, docker_a: docker.DockerClient, volume_name: str
) -> None:
    http = AgentHTTP(agent_a)
    assert http.post("/v1/volumes", json={"name": volume_name}).status_code == 201
    container = docker_a.api.create_container(
        _empty_image(docker_a),
        command=["/none"],
        host_config=docker_a.api.create_host_config(
            binds={volume_name: {"bind": "/data", "mode": "rw"}}, network_mode="none"
        ),
    )
    assert_problem(http.request("DELETE", f"/v1/volumes/{volume_name}"), 409, "volume_in_use")
    docker_a.api.remove_container(container["Id"])
    assert http.request("DELETE", f"/v1/volumes/{volume_name}").status_code == 204
    assert_problem(http.get(f"/v1/volumes/{volume_name}"), 404, "volume_not_found")


def test_manifest_summary_and_free_space(
    agent_a: AgentProcess, docker_a: docker.DockerClient, volume_name: str
) -> None:
    http = AgentHTTP(agent_a)
    created = http.post("/v1/volumes", json={"name": volume_name}).json()
    from pathlib import Path

    (Path(created["mountpoint"]) / "f").write_bytes(b"x" * 1000)
    assert (
        http.get(f"/v1/volumes/{volume_name}/manifest?summary=true").json()["totals"]["bytes"]
        == 1000
    )
    assert AgentHTTP(agent_a, token="").get("/v1/health").json()["volumes_free_bytes"] > 0
