"""A pre-copied quiesced migration freezes its final pass: the source copies the final delta
aside when it names the stream, and the containers run again before that delta has crossed
to the target. The target still ends equal to the source as of the stop."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from pathlib import Path

import docker
import pytest
import requests

from agents import frames
from agents.transfer_token import default_expiry, mint_transfer_token
from tests.agentclient import AgentHTTP
from tests.coordinatorclient import API
from tests.images import busybox_image
from tests.quiesce import events, migrate, running
from tests.testbed import AgentProcess, CoordinatorProcess
from tests.transfers import mountpoint

pytestmark = pytest.mark.integration

TABLE = 4 << 20
# Rewrites the whole table in place, records its SHA-256 and counts the round, until stopped.
# A round runs in a subshell: `docker stop` signals the shell only, whose trap runs once the
# round is complete, so as of the stop the table and its recorded digest agree.
WRITER = (
    "trap 'exit 0' TERM; i=$(cat /data/seq); while true; do i=$((i+1)); "
    "(dd if=/dev/urandom of=/data/table bs=64k count=64 conv=notrunc 2>/dev/null; "
    "sha256sum /data/table > /data/table.sum; echo $i > /data/seq); sleep 0.2; done"
)


def test_frozen_final_pass_restarts_the_containers_before_the_delta_crossed(
    coordinator: CoordinatorProcess,
    api_token: str,
    agent_b: AgentProcess,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    volume_name: str,
) -> None:
    docker_a.api.create_volume(volume_name)
    root = mountpoint(docker_a, volume_name)
    (root / "table").write_bytes(secrets.token_bytes(TABLE))
    (root / "seq").write_text("0\n")
    container = docker_a.api.create_container(
        busybox_image(docker_a),
        command=["/bin/sh", "-c", WRITER],
        name=f"writer-{uuid.uuid4().hex[:6]}",
        host_config=docker_a.api.create_host_config(
            binds={volume_name: {"bind": "/data", "mode": "rw"}}, network_mode="none"
        ),
    )["Id"]
    docker_a.api.start(container)
    since = time.time()
    api = API(coordinator, api_token)
    # Slow enough that the final delta (the whole table, rewritten) takes ~2 s to cross.
    created = api.create(
        migrate(volume_name, quiesce="stop", precopy=True, max_rate_bytes_per_s=2 << 20)
    )
    done = api.wait(created["id"], seconds=180)
    assert done["state"] == "succeeded", done
    result = done["result"]
    assert result["consistency"] == "quiesced" and result["verified"] is True
    assert running(docker_a, container)

    # The final pull says the source was read when it named the stream ...
    final = AgentHTTP(agent_b).get(f"/v1/pulls/{created['id']}-final").json()
    assert final["state"] == "succeeded" and final["source_read"] is True
    assert final["passes"][-1]["bytes"] >= TABLE  # the table, all of it rewritten
    # The pre-copy passes kept the table's block digests: the final plan read nothing.
    assert (final["passes"][-1]["bases_kept"], final["passes"][-1]["bases_read"]) == (1, 0)
    # ... and the container ran again well before the pull had the delta.
    stop, start = events(docker_a, container, since)
    assert stop[0] == "stop" and start[0] == "start"
    assert start[1] < final["finished_at"] - 1.0, (start, final["finished_at"])
    assert result["downtime_s"] < result["passes"][-1]["duration_s"]

    # The target holds the volume as of the stop (a whole round: the table its digest
    # says), while the source has gone on writing since.
    target = mountpoint(docker_b, volume_name)
    recorded = (target / "table.sum").read_text().split()[0]
    assert hashlib.sha256((target / "table").read_bytes()).hexdigest() == recorded
    stopped_at = int((target / "seq").read_text())
    assert stopped_at > 0
    wait_for_round(root, stopped_at + 3)


def wait_for_round(root: Path, count: int) -> None:
    deadline = time.monotonic() + 30
    while int((root / "seq").read_text() or 0) < count:
        assert time.monotonic() < deadline, "the writer did not go on after the restart"
        time.sleep(0.1)


def test_a_damaged_frozen_copy_is_dropped_and_its_stream_no_longer_frozen(
    agent_a: AgentProcess, docker_a: docker.DockerClient, volume_name: str
) -> None:
    """After a crash of the source host the unsynced copy may be damaged: reading it fails the
    stream, and the copy is dropped, so the target's next attempt meets an unfrozen stream and
    fails its pull at once (the coordinator's retry stops the containers again)."""
    docker_a.api.create_volume(volume_name)
    (mountpoint(docker_a, volume_name) / "data").write_bytes(secrets.token_bytes(3 << 20))
    token = mint_transfer_token(
        agent_a.token, volume=volume_name, transfer_id="t", expires_at=default_expiry()
    )
    url = f"{agent_a.url}/v1/volumes/{volume_name}/stream"
    headers = {"Authorization": f"Transfer {token}"}

    def stream(**params: str) -> list[frames.Frame]:
        r = requests.get(url, params=params, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        decoder = frames.FrameDecoder()
        return decoder.feed(r.content)

    first = stream(freeze="1")
    hello = first[0].json or {}
    assert hello["frozen"] is True and first[-1].kind is frames.FrameKind.TRAILER
    streams = agent_a.state_dir / "streams" / volume_name
    spool = streams / f"{hello['stream_id']}.data"
    with open(spool, "r+b") as f:  # what a crash may leave of an unsynced file
        f.seek(1 << 20)
        f.write(bytes(4096))
    damaged = stream(offset="0", stream_id=hello["stream_id"])
    assert (damaged[0].json or {})["frozen"] is True
    assert damaged[-1].kind is frames.FrameKind.ERROR
    assert "damaged" in str((damaged[-1].json or {}).get("message"))
    again = stream(offset="0", stream_id=hello["stream_id"])
    assert (again[0].json or {})["frozen"] is False
    assert not spool.exists()
