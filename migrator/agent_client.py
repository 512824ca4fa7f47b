"""The coordinator's only door to agents: HTTP calls with the agent's bearer token, and the
mapping of every failure to two exceptions (unreachable: retry later; refused: the agent's own
problem code). Coordinator code never builds agent URLs elsewhere."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

# Control calls are small; an agent that takes longer than this is treated as unreachable.
CALL_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)
# Verification re-reads a whole volume: no total limit, but the agent must keep answering.
VERIFY_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=3600)


class AgentUnreachable(Exception):
    """The agent did not answer (connection refused, timeout, 5xx)."""


class AgentRefused(Exception):
    """The agent answered with a problem (4xx)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class AgentClient:
    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.token = token

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        limits: aiohttp.ClientTimeout = CALL_TIMEOUT,
    ) -> Any:
        try:
            async with self.session.request(
                method,
                self.url + path,
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=limits,
            ) as resp:
                raw = await resp.read()
                if resp.status >= 500:
                    raise AgentUnreachable(f"{method} {path}: agent answered {resp.status}")
                doc = json.loads(raw) if raw else None
                if resp.status >= 400:
                    problem = doc if isinstance(doc, dict) else {}
                    raise AgentRefused(
                        resp.status,
                        str(problem.get("code") or f"http_{resp.status}"),
                        str(problem.get("detail") or resp.reason),
                    )
                return doc
        except (aiohttp.ClientError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
            raise AgentUnreachable(f"{method} {path}: {type(e).__name__}: {e}") from e
        except (ValueError, UnicodeError) as e:
            # aiohttp refuses some addresses and headers outright (control characters,
            # credentials in the URL, over-long host labels): that agent cannot be reached.
            raise AgentUnreachable(f"{method} {path}: unusable agent address: {e}") from e

    async def health(self) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call("GET", "/v1/health")
        return doc

    async def list_volumes(self) -> list[dict[str, Any]]:
        doc = await self._call("GET", "/v1/volumes")
        return list(doc["volumes"])

    async def inspect_volume(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call("GET", f"/v1/volumes/{name}")
        return doc

    async def volume_totals(self, name: str) -> dict[str, Any]:
        doc = await self._call("GET", f"/v1/volumes/{name}/manifest?summary=true")
        return dict(doc["totals"])

    async def delete_volume(self, name: str) -> None:
        await self._call("DELETE", f"/v1/volumes/{name}")

    async def quiesce(self, volume: str, timeout_s: int) -> list[dict[str, str]]:
        """Stop the running containers that use `volume`; returns those it stopped."""
        doc = await self._call(
            "POST",
            f"/v1/volumes/{volume}/quiesce",
            body={"timeout_s": timeout_s},
            limits=aiohttp.ClientTimeout(total=timeout_s + 60, sock_connect=10),
        )
        return list(doc["stopped"])

    async def unquiesce(self, volume: str, container_ids: list[str]) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call(
            "POST",
            f"/v1/volumes/{volume}/unquiesce",
            body={"containers": container_ids},
            limits=aiohttp.ClientTimeout(total=300, sock_connect=10),
        )
        return doc

    async def create_pull(self, body: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call("POST", "/v1/pulls", body=body)
        return doc

    async def list_pulls(self) -> list[dict[str, Any]]:
        doc = await self._call("GET", "/v1/pulls")
        return list(doc["pulls"])

    async def get_pull(self, pull_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call("GET", f"/v1/pulls/{pull_id}")
        return doc

    async def delete_pull(self, pull_id: str, *, discard: bool = False) -> dict[str, Any] | None:
        suffix = "?discard=true" if discard else ""
        doc: dict[str, Any] | None = await self._call("DELETE", f"/v1/pulls/{pull_id}{suffix}")
        return doc

    async def verify_pull(self, pull_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call(
            "POST", f"/v1/pulls/{pull_id}/verify", limits=VERIFY_TIMEOUT
        )
        return doc


async def probe(client: AgentClient) -> tuple[bool, str | None, str | None]:
    """(healthy, docker_version, last_error) of an agent, within a few seconds."""
    try:
        health = await asyncio.wait_for(client.health(), timeout=5)
    except (AgentUnreachable, AgentRefused, TimeoutError) as e:
        return False, None, str(e)
    if health.get("docker_error"):
        return False, None, f"docker: {health['docker_error']}"
    try:  # health needs no token: ask something that does, to catch a wrong one
        await asyncio.wait_for(client.list_pulls(), timeout=5)
    except AgentRefused as e:
        return False, health.get("docker_version"), f"the agent refused our token: {e.code}"
    except (AgentUnreachable, TimeoutError) as e:
        return False, None, str(e)
    return True, health.get("docker_version"), None
