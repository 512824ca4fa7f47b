"""Helpers of the quiesce tests: containers that use a volume, their start/stop events as the
engine saw them, and migration requests and waits through the coordinator's API."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import docker

from tests.coordinatorclient import API
from tests.images import busybox_image
from tests.transfers import TERMINAL, mountpoint, wait_for

DATA = 16 << 20
"""What `fill` puts in a volume."""


def running(client: docker.DockerClient, container_id: str) -> bool:
    return bool(client.api.inspect_container(container_id)["State"]["Running"])


def status(client: docker.DockerClient, container_id: str) -> str:
    return str(client.api.inspect_container(container_id)["State"]["Status"])


def events(client: docker.DockerClient, container_id: str, since: float) -> list[tuple[str, float]]:
    """The container's `start` and `stop` events since `since` (Unix seconds), in order, each
    with its time."""
    # Nine decimals: the engine reads the part after the dot as nanoseconds.
    stream = client.api.events(
        since=f"{since:.9f}",
        until=f"{time.time():.9f}",
        filters={"type": "container", "container": container_id, "event": ["start", "stop"]},
        decode=True,
    )
    try:
        return [(str(e["Action"]), int(e["timeNano"]) / 1e9) for e in stream]
    finally:
        stream.close()


def actions(client: docker.DockerClient, container_id: str, since: float) -> list[str]:
    """`events` without the times."""
    return [action for action, _ in events(client, container_id, since)]


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
