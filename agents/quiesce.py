"""Quiescing a volume: stopping the running containers that use it, and starting exactly those
again. Handlers for `POST /v1/volumes/{name}/quiesce` and `/unquiesce`.

The agent keeps no memory of what it stopped: the coordinator records the answer of `quiesce`
durably and hands the same list to `unquiesce`, so containers that were stopped before are
never started, even across restarts of either process.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from agents.appkeys import VOLUMES
from agents.errors import AgentError, InvalidRequest, check_volume_name
from agents.views import read_json_object

log = logging.getLogger("migrator_agent.quiesce")
MAX_STOP_TIMEOUT_S = 3600


async def quiesce(request: web.Request) -> web.Response:
    """Stop every running container that uses the volume; answer which were stopped."""
    name = check_volume_name(request.match_info["name"])
    body = await read_json_object(request)
    timeout = body.get("timeout_s", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, int):
        raise InvalidRequest("timeout_s must be an integer")
    if not 0 <= timeout <= MAX_STOP_TIMEOUT_S:
        raise InvalidRequest(f"timeout_s must be between 0 and {MAX_STOP_TIMEOUT_S}")
    volumes = request.app[VOLUMES]
    info = await asyncio.to_thread(volumes.inspect, name)
    running = [c for c in info.in_use_by if c.running]
    # In parallel: the downtime is the slowest container's shutdown, not their sum.
    await asyncio.gather(
        *(asyncio.to_thread(volumes.stop_container, c.id, timeout) for c in running)
    )
    for c in running:
        log.info("stopped %s (%s) to quiesce %s", c.name, c.id[:12], name)
    return web.json_response({"stopped": [{"id": c.id, "name": c.name} for c in running]})


async def unquiesce(request: web.Request) -> web.Response:
    """Start the given containers again (those `quiesce` stopped). Containers that are gone or
    already running are reported, not errors; every start is attempted."""
    check_volume_name(request.match_info["name"])
    body = await read_json_object(request)
    ids = body.get("containers")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise InvalidRequest("containers must be a list of container ids")
    volumes = request.app[VOLUMES]
    started: list[str] = []
    skipped: list[dict[str, Any]] = []
    for container_id in ids:
        running = await asyncio.to_thread(volumes.container_running, container_id)
        if running is None:
            skipped.append({"id": container_id, "reason": "container no longer exists"})
            continue
        if running:
            skipped.append({"id": container_id, "reason": "already running"})
            continue
        try:
            await asyncio.to_thread(volumes.start_container, container_id)
        except AgentError as e:
            skipped.append({"id": container_id, "reason": e.detail})
            continue
        started.append(container_id)
    return web.json_response({"started": started, "skipped": skipped})
