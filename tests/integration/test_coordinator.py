"""The public API end to end: a real coordinator process, two real agents on two real engines."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.agentclient import AgentHTTP, assert_problem
from tests.conftest import coordinator_config
from tests.coordinatorclient import API
from tests.fidelity import build_fidelity_tree
from tests.testbed import AgentProcess, CoordinatorProcess, free_port
from tests.transfers import assert_same_tree, mountpoint, wait_for

pytestmark = pytest.mark.integration

LABELS = {"app": "db", "com.example.owner": "ops — Ünïcode"}


def body(volume: str, target: str | None = None, **options: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "source": {"agent": "host-a", "volume": volume},
        "target": {"agent": "host-b"},
        "options": options,
    }
    if target is not None:
        doc["target"]["volume"] = target
    return doc


@pytest.fixture
def source(docker_a: docker.DockerClient, volume_name: str) -> Path:
    docker_a.api.create_volume(volume_name, labels=LABELS)
    root = mountpoint(docker_a, volume_name)
    build_fidelity_tree(root)
    (root / "data.bin").write_bytes(secrets.token_bytes(3 << 20))
    return root


def test_migration_end_to_end_through_the_public_api(
    coordinator: CoordinatorProcess,
    api_token: str,
    docker_b: docker.DockerClient,
    source: Path,
    volume_name: str,
) -> None:
    api = API(coordinator, api_token)
    r = api.request("POST", "/v1/migrations", json=body(volume_name))
    assert r.status_code == 202, r.text
    created = r.json()
    assert r.headers["Location"] == f"/v1/migrations/{created['id']}"
    assert created["state"] in ("queued", "running")
    assert created["target"]["volume"] == volume_name  # defaults to the source's name
    assert created["options"]["verify"] == "checksum"

    events = list(api.events(created["id"]))
    done = api.wait(created["id"])
    assert done["state"] == "succeeded", done
    result = done["result"]
    assert result["verified"] is True
    assert result["digest"].startswith("sha256:")
    assert result["target_complete"] is True
    assert result["mismatches"] == []
    assert result["consistency"] == "idle"
    assert result["files"] == 9  # the fidelity set and data.bin, the hard link included
    assert result["bytes"] >= 3 << 20
    assert done["progress"]["bytes_done"] == done["progress"]["bytes_total"]
    for key in ("created_at", "started_at", "finished_at"):
        assert done[key].endswith("Z")

    assert_same_tree(source, mountpoint(docker_b, volume_name))
    target_info = docker_b.api.inspect_volume(volume_name)
    assert target_info["Labels"] == LABELS
    assert target_info["Driver"] == "local"
    assert (target_info["Options"] or {}) == {}

    kinds = [e["event"] for e in events]
    assert "state" in kinds
    assert "log" in kinds
    assert events[-1]["event"] == "state"
    assert events[-1]["data"]["state"] == "succeeded"
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)
    # Last-Event-ID resumes after the given event, and the stream ends at the terminal state.
    rest = list(api.events(created["id"], last_id=ids[-2]))
    assert [int(e["id"]) for e in rest] == ids[-1:]

    listed = api.request("GET", "/v1/migrations?state=succeeded").json()["migrations"]
    assert created["id"] in [m["id"] for m in listed]


def test_cli_migrate_wait_exits_zero(
    coordinator: CoordinatorProcess,
    api_token: str,
    docker_b: docker.DockerClient,
    source: Path,
    volume_name: str,
) -> None:
    env = dict(os.environ, MIGRATOR_URL=coordinator.url, MIGRATOR_TOKEN=api_token)
    target = volume_name + "-cli"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "migrator"),
            "migrate",
            f"host-a:{volume_name}",
            f"host-b:{target}",
            "--wait",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    import json

    doc = json.loads(done.stdout)
    assert doc["state"] == "succeeded"
    assert doc["result"]["verified"] is True
    assert_same_tree(source, mountpoint(docker_b, target))


def test_coordinator_killed_mid_transfer_resumes_the_same_migration(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    api_token: str,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    volume_name: str,
) -> None:
    docker_a.api.create_volume(volume_name)
    root = mountpoint(docker_a, volume_name)
    (root / "big.bin").write_bytes(secrets.token_bytes(24 << 20))
    proc = CoordinatorProcess(
        name="restart", token=api_token, config=coordinator_config(agent_a, agent_b)
    )
    shutil.rmtree(proc.dir, ignore_errors=True)
    proc.start()
    try:
        api = API(proc, api_token)
        created = api.create(body(volume_name, max_rate_bytes_per_s=8 << 20))
        wait_for(
            lambda: (
                api.request("GET", f"/v1/migrations/{created['id']}").json()["progress"][
                    "bytes_done"
                ]
                > 6 << 20
            ),
            what="a quarter of the transfer",
        )
        proc.kill()
        time.sleep(1)
        proc.start()
        done = API(proc, api_token).wait(created["id"])
        assert done["state"] == "succeeded", (done, proc.log_tail())
        assert done["result"]["verified"] is True
        assert done["id"] == created["id"]
        assert_same_tree(root, mountpoint(docker_b, volume_name))
        # One pull, never restarted: the agent kept pulling while the coordinator was down.
        pull = AgentHTTP(agent_b).get(f"/v1/pulls/{created['id']}").json()
        assert pull["attempts"] == 1
        assert pull["raw_bytes_received"] <= pull["progress"]["bytes_total"] + (8 << 20)
        names = [v["Name"] for v in docker_b.api.volumes()["Volumes"] or []]
        assert names.count(volume_name) == 1
    finally:
        proc.stop()


def test_unreachable_agent_fails_with_agent_unreachable(
    agent_b: AgentProcess, api_token: str, volume_name: str
) -> None:
    ghost = AgentProcess.__new__(AgentProcess)
    ghost.name, ghost.token, ghost.port = "ghost", "x", free_port()
    config = (
        f'[agents.host-ghost]\nurl = "http://127.0.0.1:{ghost.port}"\ntoken = "x"\n\n'
        + coordinator_config(agent_b)
    )
    proc = CoordinatorProcess(name="ghost", token=api_token, config=config)
    shutil.rmtree(proc.dir, ignore_errors=True)
    proc.start()
    try:
        api = API(proc, api_token)
        started = time.monotonic()
        created = api.create(
            {
                "source": {"agent": "host-ghost", "volume": volume_name},
                "target": {"agent": "host-b"},
            }
        )
        done = api.wait(created["id"], seconds=120)
        assert done["state"] == "failed"
        assert done["error"]["code"] == "agent_unreachable"
        assert time.monotonic() - started < 90  # bounded retries, never a hang
        agents = {a["name"]: a for a in api.request("GET", "/v1/agents").json()["agents"]}
        assert agents["host-ghost"]["healthy"] is False
        assert agents["host-ghost"]["last_error"]
        assert agents["host-b"]["healthy"] is True
    finally:
        proc.stop()


def test_existing_target_fails_fast_and_untouched(
    coordinator: CoordinatorProcess,
    api_token: str,
    docker_b: docker.DockerClient,
    source: Path,
    volume_name: str,
) -> None:
    docker_b.api.create_volume(volume_name, labels={"mine": "yes"})
    (mountpoint(docker_b, volume_name) / "precious").write_text("keep\n")
    api = API(coordinator, api_token)
    started = time.monotonic()
    done = api.wait(api.create(body(volume_name))["id"])
    assert done["state"] == "failed"
    assert done["error"]["code"] == "target_exists"
    assert time.monotonic() - started < 10
    assert (mountpoint(docker_b, volume_name) / "precious").read_text() == "keep\n"
    assert sorted(os.listdir(mountpoint(docker_b, volume_name))) == ["precious"]
    assert docker_b.api.inspect_volume(volume_name)["Labels"] == {"mine": "yes"}


def test_second_active_migration_to_the_same_target_is_409(
    coordinator: CoordinatorProcess,
    api_token: str,
    docker_a: docker.DockerClient,
    volume_name: str,
) -> None:
    docker_a.api.create_volume(volume_name)
    (mountpoint(docker_a, volume_name) / "big").write_bytes(secrets.token_bytes(8 << 20))
    api = API(coordinator, api_token)
    first = api.create(body(volume_name, max_rate_bytes_per_s=4 << 20))
    r = api.request("POST", "/v1/migrations", json=body(volume_name))
    assert_problem(r, 409, "target_busy")
    cancelled = api.request("POST", f"/v1/migrations/{first['id']}/cancel")
    assert cancelled.status_code == 202
    done = api.wait(first["id"])
    assert done["state"] == "cancelled"
    assert done["result"]["target_complete"] is False
    # Discard removes the partial target volume this migration created.
    assert api.request("POST", f"/v1/migrations/{first['id']}/discard").status_code == 202


def test_idempotency_key(
    coordinator: CoordinatorProcess, api_token: str, source: Path, volume_name: str
) -> None:
    api = API(coordinator, api_token)
    key = {"Idempotency-Key": f"ci-{volume_name}"}
    first = api.request("POST", "/v1/migrations", json=body(volume_name), headers=key)
    assert first.status_code == 202
    again = api.request("POST", "/v1/migrations", json=body(volume_name), headers=key)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = api.request(
        "POST", "/v1/migrations", json=body(volume_name, compression="none"), headers=key
    )
    assert_problem(other, 409, "idempotency_conflict")
    assert api.wait(first.json()["id"])["state"] == "succeeded"


@pytest.mark.parametrize(
    ("payload", "code", "status"),
    [
        (b"{not json", "invalid_request", 400),
        (b"[]", "invalid_request", 400),
        (b'{"source": {"agent": "host-a", "volume": "v1"}}', "invalid_request", 400),
        (
            b'{"source": {"agent": "host-a", "volume": "v1"}, "target": {"agent": "host-b"},'
            b' "surprise": 1}',
            "invalid_request",
            400,
        ),
        (
            b'{"source": {"agent": "host-a", "volume": "v1"}, "target": {"agent": "host-b"},'
            b' "options": {"compression": "lzma"}}',
            "invalid_request",
            400,
        ),
        (
            b'{"source": {"agent": "host-a", "volume": "v1"}, "target": {"agent": "host-b"},'
            b' "options": {"precopy": "yes"}}',
            "invalid_request",
            400,
        ),
        (
            b'{"source": {"agent": "host-a", "volume": "-bad"}, "target": {"agent": "host-b"}}',
            "invalid_request",
            400,
        ),
        (
            b'{"source": {"agent": "host-a", "volume": 7}, "target": {"agent": "host-b"}}',
            "invalid_request",
            400,
        ),
        (
            b'{"source": {"agent": "nowhere", "volume": "v1"}, "target": {"agent": "host-b"}}',
            "agent_not_found",
            400,
        ),
        (
            b'{"source": {"agent": "host-a", "volume": "v1"}, "target": {"agent": "host-b"},'
            b' "options": {"delete_source": true}}',
            "invalid_request",
            400,
        ),
    ],
)
def test_bad_requests_are_problem_json(
    coordinator: CoordinatorProcess, api_token: str, payload: bytes, code: str, status: int
) -> None:
    r = API(coordinator, api_token).request(
        "POST", "/v1/migrations", data=payload, headers={"Content-Type": "application/json"}
    )
    assert_problem(r, status, code)


def test_auth_size_and_unknowns(coordinator: CoordinatorProcess, api_token: str) -> None:
    anon = API(coordinator, None)
    assert anon.request("GET", "/v1/health").status_code == 200
    assert_problem(anon.request("GET", "/v1/migrations"), 401, "unauthorized")
    wrong = API(coordinator, "wrong")
    assert_problem(wrong.request("GET", "/v1/agents"), 401, "unauthorized")
    api = API(coordinator, api_token)
    assert_problem(
        api.request("POST", "/v1/migrations", data=b" " * (8 << 20)), 413, "request_too_large"
    )
    assert_problem(api.request("GET", "/v1/migrations/mig_nope"), 404, "migration_not_found")
    assert_problem(api.request("GET", "/v1/agents/nope/volumes"), 404, "agent_not_found")
    assert_problem(api.request("DELETE", "/v1/agents/nope"), 404, "agent_not_found")
    metrics = api.request("GET", "/metrics").text
    assert 'migrator_migrations{state="succeeded"}' in metrics
    spec = api.request("GET", "/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert "Traceback" not in coordinator.log_tail(200_000)


def test_agents_and_volumes(
    coordinator: CoordinatorProcess,
    api_token: str,
    agent_a: AgentProcess,
    source: Path,
    volume_name: str,
) -> None:
    api = API(coordinator, api_token)
    agents = {a["name"]: a for a in api.request("GET", "/v1/agents").json()["agents"]}
    assert agents["host-a"]["healthy"] is True
    assert agents["host-a"]["docker_version"]
    volumes = api.request("GET", "/v1/agents/host-a/volumes").json()["volumes"]
    mine = next(v for v in volumes if v["name"] == volume_name)
    assert mine["labels"] == LABELS
    assert mine["in_use_by"] == []
    r = api.request("PUT", "/v1/agents/extra", json={"url": agent_a.url, "token": agent_a.token})
    assert r.status_code == 201
    r = api.request("PUT", "/v1/agents/extra", json={"url": agent_a.url, "token": agent_a.token})
    assert r.status_code == 200
    assert_problem(api.request("PUT", "/v1/agents/extra", json={"url": 5}), 400, "invalid_request")
    assert api.request("DELETE", "/v1/agents/extra").status_code == 204


def test_cancel_then_retry_resumes_and_data_url_carries_the_data(
    coordinator: CoordinatorProcess,
    api_token: str,
    agent_a: AgentProcess,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    volume_name: str,
) -> None:
    """An agent registered with a data_url is reached there by the other agent (the proxy sees
    the stream); a cancelled migration resumes on retry from the target's journal."""
    from tests.faultproxy import FaultProxy

    docker_a.api.create_volume(volume_name)
    root = mountpoint(docker_a, volume_name)
    (root / "big.bin").write_bytes(secrets.token_bytes(16 << 20))
    api = API(coordinator, api_token)
    with FaultProxy(agent_a.port) as proxy:
        name = f"a-data-{volume_name}"
        r = api.request(
            "PUT",
            f"/v1/agents/{name}",
            json={"url": agent_a.url, "token": agent_a.token, "data_url": proxy.url},
        )
        assert r.status_code == 201, r.text
        created = api.create(
            {
                "source": {"agent": name, "volume": volume_name},
                "target": {"agent": "host-b"},
                "options": {"max_rate_bytes_per_s": 8 << 20},
            }
        )
        wait_for(
            lambda: (
                api.request("GET", f"/v1/migrations/{created['id']}").json()["progress"][
                    "bytes_done"
                ]
                > 2 << 20
            ),
            what="some progress",
        )
        assert api.request("POST", f"/v1/migrations/{created['id']}/cancel").status_code == 202
        cancelled = api.wait(created["id"])
        assert cancelled["state"] == "cancelled"
        assert cancelled["result"]["target_complete"] is False
        retried = api.request("POST", f"/v1/migrations/{created['id']}/retry")
        assert retried.status_code == 202
        assert retried.json()["attempts"] == 2
        done = api.wait(created["id"])
        assert done["state"] == "succeeded", done
        assert done["result"]["verified"] is True
        assert proxy.connections >= 2  # the data went through data_url, both attempts
        # Resumed, not restarted: far less than two copies of the stream crossed the proxy.
        assert proxy.downstream_bytes < 2 * (16 << 20)
    assert_same_tree(root, mountpoint(docker_b, volume_name))
    assert api.request("DELETE", f"/v1/agents/{name}").status_code == 204
