"""A small synchronous client for the agent API, for tests and benchmarks."""

from __future__ import annotations

import json
from typing import Any

import requests

from tests.testbed import AgentProcess


class AgentHTTP:
    def __init__(self, agent: AgentProcess, token: str | None = None) -> None:
        self.base = agent.url
        self.token = agent.token if token is None else token
        self.session = requests.Session()

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        return self.session.request(method, self.base + path, headers=headers, timeout=60, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def manifest(self, volume: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Entries and totals; asserts the stream ended with a totals line."""
        r = self.get(f"/v1/volumes/{volume}/manifest", stream=True)
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
        assert "totals" in lines[-1], lines[-1]
        return lines[:-1], lines[-1]["totals"]


def assert_problem(r: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["code"] == code, body
    assert body["title"] and body["detail"]
    return body
