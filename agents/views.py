"""HTTP handlers of the agent API (docs/agent-api.md): parse, call, answer. They raise the
agent's errors and never build error responses themselves."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

from aiohttp import web

import agents
from agents.appkeys import VOLUMES
from agents.docker_volumes import DockerVolumes
from agents.errors import InvalidRequest, VolumeNotReadable, check_volume_name
from agents.manifest import Entry, Totals, entry_to_json, walk
from agents.volumes import VolumeInfo, mountpoint_readable

# Manifest lines are produced in a worker thread in batches: 2,000 entries of ~300 bytes
# keeps each hop to the event loop near 0.6 MB while the per-batch overhead stays negligible.
MANIFEST_BATCH = 2000


def _volumes(request: web.Request) -> DockerVolumes:
    return request.app[VOLUMES]


def volume_json(info: VolumeInfo) -> dict[str, Any]:
    return info.to_json(readable=mountpoint_readable(info))


async def health(request: web.Request) -> web.Response:
    docker_version = None
    docker_error = None
    free = None
    try:
        docker_version = await asyncio.to_thread(_volumes(request).version)
        free = await asyncio.to_thread(_volumes(request).free_bytes)
    except Exception as e:  # health reports the engine's state, it never fails on it
        docker_error = str(e)
    return web.json_response(
        {
            "status": "ok",
            "version": agents.__version__,
            "hostname": socket.gethostname(),
            "docker_version": docker_version,
            "docker_error": docker_error,
            "volumes_free_bytes": free,
        }
    )


async def list_volumes(request: web.Request) -> web.Response:
    infos = await asyncio.to_thread(_volumes(request).list)
    return web.json_response({"volumes": [volume_json(i) for i in infos]})


async def get_volume(request: web.Request) -> web.Response:
    name = check_volume_name(request.match_info["name"])
    info = await asyncio.to_thread(_volumes(request).inspect, name)
    return web.json_response(volume_json(info))


async def get_volume_containers(request: web.Request) -> web.Response:
    name = check_volume_name(request.match_info["name"])
    info = await asyncio.to_thread(_volumes(request).inspect, name)
    return web.json_response({"containers": [c.to_json() for c in info.in_use_by]})


async def read_json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def _string_map(body: dict[str, Any], key: str) -> dict[str, str]:
    value = body.get(key) or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidRequest(f"{key!r} must be an object of strings")
    return value


def parse_create_volume(body: dict[str, Any]) -> tuple[str, str, dict[str, str], dict[str, str]]:
    unknown = set(body) - {"name", "driver", "driver_opts", "labels"}
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    name = body.get("name")
    if not isinstance(name, str):
        raise InvalidRequest("'name' is required and must be a string")
    driver = body.get("driver", "local")
    if not isinstance(driver, str) or not driver:
        raise InvalidRequest("'driver' must be a non-empty string")
    return (
        check_volume_name(name),
        driver,
        _string_map(body, "driver_opts"),
        _string_map(body, "labels"),
    )


async def create_volume(request: web.Request) -> web.Response:
    name, driver, opts, labels = parse_create_volume(await read_json_object(request))
    volumes = _volumes(request)
    await asyncio.to_thread(volumes.create, name, driver, opts, labels)
    info = await asyncio.to_thread(volumes.inspect, name)
    return web.json_response(volume_json(info), status=201)


async def readable_volume(request: web.Request, name: str) -> VolumeInfo:
    """Inspect `name` and refuse it when its data cannot be read at the mountpoint."""
    info = await asyncio.to_thread(_volumes(request).inspect, name)
    reason = info.unreadable_reason
    if reason is None and not mountpoint_readable(info):
        reason = f"the agent cannot read the mountpoint {info.mountpoint}"
    if reason is not None:
        raise VolumeNotReadable(f"volume {name!r}: {reason}", volume=name)
    return info


def _walk_totals(root: str) -> Totals:
    totals = Totals()
    for entry in walk(root):
        totals.add(entry)
    return totals


async def delete_volume(request: web.Request) -> web.Response:
    name = check_volume_name(request.match_info["name"])
    await asyncio.to_thread(_volumes(request).remove, name)
    return web.Response(status=204)


def _take(it: Iterator[Entry], n: int) -> list[Entry]:
    batch = []
    for entry in it:
        batch.append(entry)
        if len(batch) == n:
            break
    return batch


async def get_manifest(request: web.Request) -> web.StreamResponse:
    """The manifest as NDJSON: one entry per line in manifest order, then one `totals` line.

    Streamed from a worker thread in batches, so memory does not grow with the volume."""
    name = check_volume_name(request.match_info["name"])
    info = await readable_volume(request, name)
    if request.query.get("summary") in ("1", "true"):
        totals = await asyncio.to_thread(_walk_totals, info.mountpoint)
        return web.json_response({"totals": totals.to_json()})
    it = walk(info.mountpoint)
    first = await asyncio.to_thread(_take, it, MANIFEST_BATCH)  # fail before the 200 if we can
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    resp.force_close()  # HTTP/1.0 clients (pulling targets) read to the end of the connection
    await resp.prepare(request)
    totals = Totals()
    batch = first
    try:
        while batch:
            lines = []
            for entry in batch:
                totals.add(entry)
                lines.append(json.dumps(entry_to_json(entry), separators=(",", ":")))
            await resp.write(("\n".join(lines) + "\n").encode())
            batch = await asyncio.to_thread(_take, it, MANIFEST_BATCH)
    except OSError as e:
        # The 200 is already sent: the error becomes the last line, and no totals line
        # follows, so no client mistakes a truncated manifest for a complete one.
        problem = VolumeNotReadable(f"reading volume {name!r} failed: {e}").to_problem()
        await resp.write((json.dumps({"error": problem}) + "\n").encode())
        await resp.write_eof()
        return resp
    await resp.write((json.dumps({"totals": totals.to_json()}) + "\n").encode())
    await resp.write_eof()
    return resp
