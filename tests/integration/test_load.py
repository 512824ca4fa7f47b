"""Load: many small migrations submitted at once through the public API all succeed.

50 source volumes on engine A, 50 `POST /v1/migrations` from 50 threads at the same moment, then
a long poll on each; every migration must succeed, verified, with the target's files
byte-for-byte equal to the source's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from tests.testbed import AgentProcess, CoordinatorProcess

pytestmark = pytest.mark.integration

MIGRATIONS = 50
# The long poll gives up in time to report which migrations are stuck, and why, before
# pytest-timeout (120 s) kills the test; on 2 cores all 50 finish in a few seconds.
WAIT_S = 75


def small_tree(root: Path, seed: int) -> None:
    """A few small files: text, random bytes in a subdirectory, an empty file."""
    (root / "readme.txt").write_text(f"volume {seed}\n" * (1 + seed % 7))
    (root / "sub").mkdir()
    (root / "sub" / "data.bin").write_bytes(secrets.token_bytes(512 + 97 * seed))
    (root / "sub" / "empty").write_bytes(b"")


def read_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root, by relative path (directories implied)."""
    files: dict[str, bytes] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


class Sessions:
    """One requests.Session per thread (a Session is not safe to share), all closed at the end."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"}
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._all.append(session)
        kw.setdefault("timeout", WAIT_S + 30)
        return session.request(method, self.base + path, headers=self.headers, **kw)

    def close(self) -> None:
        for session in self._all:
            session.close()


@pytest.fixture
def sources(
    docker_a: docker.DockerClient, docker_b: docker.DockerClient
) -> Iterator[dict[str, dict[str, bytes]]]:
    """MIGRATIONS fresh volumes on engine A, each with its expected files; removed afterwards
    from both engines (the targets keep the sources' names)."""
    prefix = f"load{uuid.uuid4().hex[:8]}"
    made: dict[str, dict[str, bytes]] = {}
    try:
        for i in range(MIGRATIONS):
            name = f"{prefix}-{i:02d}"
            docker_a.api.create_volume(name)
            root = Path(docker_a.api.inspect_volume(name)["Mountpoint"])
            small_tree(root, i)
            made[name] = read_tree(root)
        yield made
    finally:
        for name in made:
            for client in (docker_a, docker_b):
                with contextlib.suppress(docker.errors.APIError):
                    client.api.remove_volume(name, force=True)


def test_fifty_concurrent_migrations_all_succeed(
    coordinator: CoordinatorProcess,
    api_token: str,
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    sources: dict[str, dict[str, bytes]],
) -> None:
    api = Sessions(coordinator.url, api_token)
    names = sorted(sources)
    barrier = threading.Barrier(MIGRATIONS)

    def submit(volume: str) -> requests.Response:
        barrier.wait(timeout=30)  # every POST leaves at the same moment
        return api.request(
            "POST",
            "/v1/migrations",
            json={
                "source": {"agent": "host-a", "volume": volume},
                "target": {"agent": "host-b"},
            },
        )

    def wait(migration_id: str) -> dict[str, Any]:
        r = api.request("GET", f"/v1/migrations/{migration_id}?wait={WAIT_S}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(MIGRATIONS) as pool:
            responses = list(pool.map(submit, names))
            submitted = time.monotonic() - started
            refused = {
                volume: (r.status_code, r.text)
                for volume, r in zip(names, responses, strict=True)
                if r.status_code != 202
            }
            assert not refused, f"{len(refused)} POST(s) not accepted: {refused}"
            ids = {volume: r.json()["id"] for volume, r in zip(names, responses, strict=True)}
            assert len(set(ids.values())) == MIGRATIONS
            done = dict(zip(names, pool.map(wait, [ids[v] for v in names]), strict=True))
        elapsed = time.monotonic() - started
    finally:
        api.close()

    not_ok = {
        volume: {
            "id": doc["id"],
            "state": doc["state"],
            "phase": doc["phase"],
            "error": doc["error"],
        }
        for volume, doc in done.items()
        if doc["state"] != "succeeded" or not (doc["result"] or {}).get("verified")
    }
    assert not not_ok, (
        f"{len(not_ok)}/{MIGRATIONS} migrations did not succeed verified within {WAIT_S}s "
        f"(submitted in {submitted:.1f}s, waited {elapsed:.1f}s): {not_ok}\n"
        f"--- coordinator log ---\n{coordinator.log_tail()}\n"
        f"--- agent b log ---\n{agent_b.log_tail()}\n"
        f"--- agent a log ---\n{agent_a.log_tail()}"
    )
    for volume, doc in done.items():
        result = doc["result"]
        assert doc["target"] == {"agent": "host-b", "volume": volume}
        assert result["verified"] is True
        assert result["target_complete"] is True
        assert result["mismatches"] == []
        assert result["files"] == len(sources[volume])
        target = Path(docker_b.api.inspect_volume(volume)["Mountpoint"])
        assert read_tree(target) == sources[volume], volume
