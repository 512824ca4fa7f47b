"""HTTP handlers of the target side: `POST/GET/DELETE /v1/pulls` (docs/agent-api.md)."""

from __future__ import annotations

from aiohttp import web

from agents.appkeys import PULLS
from agents.pulls import parse_pull_request
from agents.views import read_json_object


async def create_pull(request: web.Request) -> web.Response:
    spec = parse_pull_request(await read_json_object(request))
    pull, started = await request.app[PULLS].start(spec)
    return web.json_response(pull.to_json(), status=202 if started else 200)


async def list_pulls(request: web.Request) -> web.Response:
    pulls = request.app[PULLS].pulls.values()
    return web.json_response({"pulls": [p.to_json() for p in pulls]})


async def get_pull(request: web.Request) -> web.Response:
    return web.json_response(request.app[PULLS].get(request.match_info["id"]).to_json())


async def delete_pull(request: web.Request) -> web.Response:
    """Cancel a pull; with `?discard=true` also remove its journal and the target volume,
    if this pull created it."""
    discard = request.query.get("discard", "false").lower() in ("1", "true", "yes")
    pull = await request.app[PULLS].cancel(request.match_info["id"], discard=discard)
    return web.json_response(pull.to_json(), status=200)


async def verify_pull(request: web.Request) -> web.Response:
    """Re-read the target volume and compare every file with the content the pull wrote."""
    return web.json_response(await request.app[PULLS].verify(request.match_info["id"]))
