"""Bad input and a failing engine give problem+json with stable codes, never a 500."""

from __future__ import annotations

import secrets

import pytest

from tests.agentclient import AgentHTTP, assert_problem
from tests.testbed import AgentProcess, Engine

pytestmark = pytest.mark.integration


def test_unknown_volume_is_404(agent_a: AgentProcess) -> None:
    http = AgentHTTP(agent_a)
    for path in ("/v1/volumes/nosuchvolume", "/v1/volumes/nosuchvolume/manifest"):
        body = assert_problem(http.get(path), 404, "volume_not_found")
        assert "nosuchvolume" in body["detail"]


@pytest.mark.parametrize("name", ["-leading-dash", "a", "has space", "x/y", "ünïcode", ".hidden"])
def test_invalid_volume_name_is_400(agent_a: AgentProcess, name: str) -> None:
    http = AgentHTTP(agent_a)
    assert_problem(http.post("/v1/volumes", json={"name": name}), 400, "invalid_request")
    if "/" not in name:
        assert_problem(http.get(f"/v1/volumes/{name}"), 400, "invalid_request")


@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_missing_or_invalid_token_is_401(agent_a: AgentProcess, token: str | None) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    http = AgentHTTP(agent_a, token="")
    for method, path in (
        ("GET", "/v1/volumes"),
        ("POST", "/v1/volumes"),
        ("GET", "/v1/volumes/x1/manifest"),
    ):
        assert_problem(http.request(method, path, headers=headers), 401, "unauthorized")


def test_health_needs_no_token(agent_a: AgentProcess) -> None:
    assert AgentHTTP(agent_a, token="").get("/v1/health").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"name": 5}',
        b'{"name": "okname", "labels": {"a": 1}}',
        b'{"name": "okname", "driver_opts": "size=1"}',
        b'{"name": "okname", "surprise": true}',
        b"\xff\xfe",
    ],
)
def test_malformed_create_is_400(agent_a: AgentProcess, body: bytes) -> None:
    r = AgentHTTP(agent_a).post(
        "/v1/volumes", data=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(r, 400, "invalid_request")


def test_oversized_body_is_413(agent_a: AgentProcess) -> None:
    r = AgentHTTP(agent_a).post("/v1/volumes", data=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert_problem(r, 413, "request_too_large")


def test_unknown_route_and_method(agent_a: AgentProcess) -> None:
    http = AgentHTTP(agent_a)
    assert_problem(http.get("/v1/nothing"), 404, "not_found")
    assert_problem(http.request("DELETE", "/v1/volumes"), 405, "method_not_allowed")


def test_engine_stopped_mid_test_is_503() -> None:
    engine = Engine("down").start()
    agent = AgentProcess(name="down", engine=engine, token=secrets.token_urlsafe(16)).start()
    try:
        http = AgentHTTP(agent)
        assert http.get("/v1/volumes").status_code == 200
        engine.stop()
        for method, path, kw in (
            ("GET", "/v1/volumes", {}),
            ("GET", "/v1/volumes/somevol", {}),
            ("GET", "/v1/volumes/somevol/manifest", {}),
            ("POST", "/v1/volumes", {"json": {"name": "somevol"}}),
        ):
            body = assert_problem(http.request(method, path, **kw), 503, "docker_unavailable")
            assert "unreachable" in body["detail"]
        health = AgentHTTP(agent, token="").get("/v1/health").json()
        assert health["status"] == "ok"
        assert health["docker_version"] is None
        assert health["docker_error"]
        # The engine comes back: so does the agent, without a restart.
        engine.start()
        assert http.get("/v1/volumes").status_code == 200
    finally:
        agent.stop()
        engine.stop()
    assert "Traceback" not in agent.log_tail(100_000)
