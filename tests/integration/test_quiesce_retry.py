"""A retried quiesced migration stops the source's containers again and reads the source while
they are stopped.

The first attempt fails in its final pass (the target agent is killed, then started again); its
containers are started again and keep writing. The target agent resumes the unfinished final
pull on its own when it comes back, now reading a running app. The retry must not take that
pull for its final pass: it stops the app a second time, copies the source as of that stop
(sending only what changed), reports the retry's own downtime, and starts the app again."""

from __future__ import annotations

import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest

from agents.manifest import EntryType, walk
from tests.coordinatorclient import API
from tests.images import busybox_image
from tests.quiesce import (
    events,
    fill,
    get,
    migrate,
    running,
    wait_stopped_in_final_pass,
)
from tests.testbed import AgentProcess, CoordinatorProcess
from tests.transfers import file_sha256, get_pull, mountpoint, wait_pull

pytestmark = pytest.mark.integration

RATE = 2 << 20  # the 16 MiB final pass takes about 8 s: the window in which the target dies
LOG = "app.log"


def run_logger(client: docker.DockerClient, volume: str, name: str) -> str:
    """A running app that appends to /data/app.log: `start` when it starts, a tick every
    0.2 s, `stop` when it is stopped. The log says what the volume held at each stop."""
    script = (
        f"trap 'echo stop >> /data/{LOG}; exit 0' TERM; "
        f"echo start >> /data/{LOG}; "
        f"i=0; while true; do i=$((i+1)); echo tick $i >> /data/{LOG}; sleep 0.2; done"
    )
    container = client.api.create_container(
        busybox_image(client),
        command=["/bin/sh", "-c", script],
        name=name,
        host_config=client.api.create_host_config(
            binds={volume: {"bind": "/data", "mode": "rw"}}, network_mode="none"
        ),
    )
    client.api.start(container["Id"])
    return str(container["Id"])


def tree(root: Path) -> dict[bytes, tuple[Any, ...]]:
    """Every entry's metadata (all a copy keeps) and every regular file's SHA-256."""
    entries = {}
    for e in walk(root):
        sha = None
        if e.type is EntryType.FILE:
            sha = file_sha256(root.as_posix().encode() + b"/" + e.path)
        entries[e.path] = (
            e.type,
            e.mode,
            e.uid,
            e.gid,
            e.size,
            e.mtime_ns,
            e.link_target,
            e.hardlink_of,
            e.xattrs,
            sha,
        )
    return entries


def assert_copied_as_of_second_stop(source: Path, target: Path) -> None:
    """The target is the source as it was when the app stopped the second time: the app's log
    ends with that stop, and nothing else changed since (the app only appends to its log)."""
    lines = (source / LOG).read_text().splitlines()
    stops = [n for n, line in enumerate(lines) if line == "stop"]
    assert len(stops) >= 2, lines
    as_of_second_stop = "\n".join(lines[: stops[1] + 1]) + "\n"
    assert (target / LOG).read_text() == as_of_second_stop
    src, dst = tree(source), tree(target)
    src.pop(LOG.encode())
    dst.pop(LOG.encode())
    assert src == dst


def fail_in_final_pass(
    api: API, agent_b: AgentProcess, docker_a: docker.DockerClient, mid: str, app: str
) -> None:
    """The target agent dies (SIGKILL) during the final pass and comes back once the attempt
    has failed; the app is running again by then, and the target resumes its pull."""
    wait_stopped_in_final_pass(api, docker_a, mid, [app])
    agent_b.kill()
    try:
        failed = api.wait(mid, seconds=120)
    finally:
        agent_b.start()
    assert failed["state"] == "failed", failed
    assert failed["error"]["code"] == "agent_unreachable", failed
    assert running(docker_a, app), "the app was left stopped after the failed attempt"


def change_source(root: Path) -> None:
    """What an operator (or the app) changes between the attempts."""
    (root / "db" / "small0").write_bytes(secrets.token_bytes(16 << 10))
    (root / "later").write_bytes(secrets.token_bytes(1 << 20))


def retry(api: API, mid: str) -> tuple[dict[str, Any], float]:
    """Retry the migration and wait for its end: the migration and the retry's duration."""
    started = time.monotonic()
    r = api.request("POST", f"/v1/migrations/{mid}/retry")
    assert r.status_code == 202, r.text
    done = api.wait(mid, seconds=120)
    return done, time.monotonic() - started


def assert_quiesced_again(
    done: dict[str, Any],
    took: float,
    docker_a: docker.DockerClient,
    app: str,
    since: float,
    log: str,
) -> None:
    assert done["state"] == "succeeded", (done, log)
    assert done["attempts"] == 2
    result = done["result"]
    assert result["consistency"] == "quiesced", result
    assert result["verified"] is True, result
    seen = events(docker_a, app, since)
    # Stopped for the first final pass, started when it failed, stopped again for the retry's
    # final pass, started when it was read.
    assert [action for action, _ in seen] == ["stop", "start", "stop", "start"], seen
    first_down = seen[1][1] - seen[0][1]
    second_down = seen[3][1] - seen[2][1]
    # The downtime is the retry's: from its stop (issued a moment before the engine's event)
    # to the start, not the first attempt's.
    assert second_down - 0.5 < result["downtime_s"] < second_down + 2, (result, seen)
    assert result["downtime_s"] < min(first_down, took), (result, seen, took)
    assert result["downtime_s"] < result["duration_s"]
    assert running(docker_a, app), f"the app was left stopped\n{log}"


def assert_sent_only_changes(done: dict[str, Any]) -> None:
    """The retry's final pass continued the content manifest of the pull before it: only what
    changed since was sent (a few small files), yet every file verified."""
    assert done["result"]["passes"][-1]["bytes"] < 4 << 20, done["result"]["passes"]


def test_retry_after_final_pass_failed_stops_the_app_again(
    coordinator: CoordinatorProcess,
    api_token: str,
    agent_b: AgentProcess,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    volume_name: str,
    containers: list[str],
) -> None:
    """The retry comes while the target agent is still finishing the failed attempt's final
    pull on its own (the app running)."""
    root = fill(docker_a, volume_name)
    app = run_logger(docker_a, volume_name, f"app-{uuid.uuid4().hex[:6]}")
    containers.append(app)
    since = time.time()
    api = API(coordinator, api_token)
    mid = api.create(migrate(volume_name, max_rate_bytes_per_s=RATE))["id"]
    fail_in_final_pass(api, agent_b, docker_a, mid, app)
    assert get_pull(agent_b, mid)["state"] == "running"  # resumed by the target on its own
    change_source(root)

    done, took = retry(api, mid)

    assert_quiesced_again(done, took, docker_a, app, since, coordinator.log_tail())
    assert_copied_as_of_second_stop(root, mountpoint(docker_b, volume_name))
    assert_sent_only_changes(done)


def test_retry_after_the_target_finished_the_final_pull_alone(
    coordinator: CoordinatorProcess,
    api_token: str,
    agent_b: AgentProcess,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    volume_name: str,
    containers: list[str],
) -> None:
    """The target agent finishes the failed attempt's final pull on its own, with the app
    running, and the source changes after that: the retry must not take that finished pull as
    its final pass, but read the source again while the app is stopped."""
    root = fill(docker_a, volume_name)
    app = run_logger(docker_a, volume_name, f"app-{uuid.uuid4().hex[:6]}")
    containers.append(app)
    since = time.time()
    api = API(coordinator, api_token)
    mid = api.create(migrate(volume_name, max_rate_bytes_per_s=RATE))["id"]
    fail_in_final_pass(api, agent_b, docker_a, mid, app)
    finished = wait_pull(agent_b, mid, timeout=60)
    assert finished["state"] == "succeeded", finished
    assert get(api, mid)["state"] == "failed"
    change_source(root)

    done, took = retry(api, mid)

    assert_quiesced_again(done, took, docker_a, app, since, coordinator.log_tail())
    assert_copied_as_of_second_stop(root, mountpoint(docker_b, volume_name))
    assert_sent_only_changes(done)
    # The pull the target finished alone was left as it was, not taken for the final pass.
    assert get_pull(agent_b, mid)["finished_at"] == finished["finished_at"]
