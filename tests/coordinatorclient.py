"""A small synchronous client of the public API, for tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import requests

from tests.testbed import CoordinatorProcess


class API:
    def __init__(self, coordinator: CoordinatorProcess, token: str | None) -> None:
        self.base = coordinator.url
        self.token = token
        self.session = requests.Session()

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        kw.setdefault("timeout", 120)
        return self.session.request(method, self.base + path, headers=headers, **kw)

    def create(self, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        r = self.request("POST", "/v1/migrations", json=body, **kw)
        assert r.status_code == 202, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def wait(self, migration_id: str, seconds: int = 120) -> dict[str, Any]:
        r = self.request("GET", f"/v1/migrations/{migration_id}?wait={seconds}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def events(self, migration_id: str, last_id: int | None = None) -> Iterator[dict[str, Any]]:
        """Server-sent events until the stream ends: {"id", "event", "data"} each."""
        headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
        r = self.request(
            "GET", f"/v1/migrations/{migration_id}/events", headers=headers, stream=True
        )
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/event-stream")
        event: dict[str, Any] = {}
        for raw in r.iter_lines(decode_unicode=True):
            if raw == "":
                if "data" in event:
                    yield event
                event = {}
            elif raw.startswith(":"):
                continue
            else:
                field, _, value = raw.partition(": ")
                event[field] = json.loads(value) if field == "data" else value
