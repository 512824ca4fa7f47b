"""HTTP handlers of the public API v1 (DESIGN section 4): parse, call, answer. They raise the
coordinator's errors and never build error responses themselves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

from aiohttp import web

from migrator import __version__, plan
from migrator.agent_client import AgentClient, AgentRefused, AgentUnreachable, probe
from migrator.errors import (
    AgentNotFound,
    AgentUnavailable,
    IdempotencyConflict,
    InvalidRequest,
    SourceBusy,
    TargetBusy,
    UnknownAgent,
    VolumeInUse,
)
from migrator.model import (
    AGENT_NAME_RE,
    AGENT_URL_RE,
    TERMINAL,
    Migration,
    MigrationRequest,
    State,
    new_id,
    parse_request,
)
from migrator.openapi import openapi_document
from migrator.orchestrator import Orchestrator
from migrator.state import ORCHESTRATOR, STORE
from migrator.store import AgentRecord, DuplicateKey, Store, TargetTaken

# Long polls and event streams wake at least this often to notice a client that went away.
KEEPALIVE_S = 15.0
MAX_WAIT_S = 300
TOKEN_RE = re.compile(r"[!-~]+")
MAX_EVENT_ID_DIGITS = 18  # fits SQLite's 64-bit INTEGER


def _store(request: web.Request) -> Store:
    return request.app[STORE]


def _orchestrator(request: web.Request) -> Orchestrator:
    return request.app[ORCHESTRATOR]


async def read_json(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from e


def _bool_query(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return False
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise InvalidRequest(f"{name} must be true or false")


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as e:
        raise InvalidRequest(f"{name} must be an integer") from e
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}")
    return value


# -- health, docs, metrics -------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(__version__))


async def metrics(request: web.Request) -> web.Response:
    counts = await asyncio.to_thread(_store(request).count_by_state)
    m = _orchestrator(request).metrics
    lines = [
        "# HELP migrator_migrations Migrations known to the coordinator, by state.",
        "# TYPE migrator_migrations gauge",
        *(f'migrator_migrations{{state="{s.value}"}} {counts.get(s.value, 0)}' for s in State),
        "# HELP migrator_bytes_transferred_total Bytes of source volumes migrated successfully.",
        "# TYPE migrator_bytes_transferred_total counter",
        f"migrator_bytes_transferred_total {m.bytes_transferred}",
        "# HELP migrator_migration_duration_seconds Duration of succeeded migrations.",
        "# TYPE migrator_migration_duration_seconds summary",
        f"migrator_migration_duration_seconds_sum {m.duration_sum_s:.3f}",
        f"migrator_migration_duration_seconds_count {m.succeeded}",
        "# HELP migrator_agent_retries_total Retried calls to unreachable agents.",
        "# TYPE migrator_agent_retries_total counter",
        f"migrator_agent_retries_total {m.retries}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


# -- agents ----------------------------------------------------------------------------------


def _agent_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not AGENT_NAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid agent name {name!r}")
    return name


async def _known_agent(request: web.Request, name: str) -> AgentRecord:
    rec = await asyncio.to_thread(_store(request).get_agent, name)
    if rec is None:
        raise UnknownAgent(f"no agent named {name!r}", agent=name)
    return rec


async def _agent_json(request: web.Request, rec: AgentRecord) -> dict[str, Any]:
    client = AgentClient(_orchestrator(request).session, rec.url, rec.token)
    healthy, docker_version, last_error = await probe(client)
    return {
        "name": rec.name,
        "url": rec.url,
        "data_url": rec.data_url,
        "healthy": healthy,
        "docker_version": docker_version,
        "last_error": last_error,
    }


async def list_agents(request: web.Request) -> web.Response:
    records = await asyncio.to_thread(_store(request).list_agents)
    agents = await asyncio.gather(*(_agent_json(request, r) for r in records))
    return web.json_response({"agents": list(agents)})


async def get_agent(request: web.Request) -> web.Response:
    rec = await _known_agent(request, _agent_name(request))
    return web.json_response(await _agent_json(request, rec))


async def put_agent(request: web.Request) -> web.Response:
    name = _agent_name(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be an object")
    unknown = set(body) - {"url", "token", "data_url"}
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    for key in ("url", "token"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise InvalidRequest(f"{key} is required and must be a non-empty string")
    data_url = body.get("data_url")
    if data_url is not None and not isinstance(data_url, str):
        raise InvalidRequest("data_url must be a string")
    for key, url in (("url", body["url"]), ("data_url", data_url)):
        if url is not None:
            check_agent_url(key, url)
    if not TOKEN_RE.fullmatch(body["token"]):
        raise InvalidRequest("token must be visible ASCII characters, without spaces")
    rec = AgentRecord(name, body["url"].rstrip("/"), body["token"], data_url, "api")
    created = await asyncio.to_thread(_store(request).upsert_agent, rec)
    return web.json_response(await _agent_json(request, rec), status=201 if created else 200)


def check_agent_url(key: str, url: str) -> None:
    """An agent address the HTTP client can use: http(s), a host, no credentials."""
    if not AGENT_URL_RE.fullmatch(url):
        raise InvalidRequest(
            f"{key} must be http(s)://HOST[:PORT][/PATH], without credentials (the agent's "
            "token is given separately)"
        )


async def delete_agent(request: web.Request) -> web.Response:
    name = _agent_name(request)
    if not await asyncio.to_thread(_store(request).delete_agent, name):
        raise UnknownAgent(f"no agent named {name!r}", agent=name)
    return web.Response(status=204)


async def agent_volumes(request: web.Request) -> web.Response:
    rec = await _known_agent(request, _agent_name(request))
    client = AgentClient(_orchestrator(request).session, rec.url, rec.token)
    try:
        volumes = await client.list_volumes()
    except AgentUnreachable as e:
        raise AgentUnavailable(f"agent {rec.name!r} is unreachable: {e}") from e
    except AgentRefused as e:
        raise AgentUnavailable(f"agent {rec.name!r} refused: {e.code}: {e.detail}") from e
    return web.json_response(
        {
            "volumes": [
                {
                    "name": v["name"],
                    "driver": v["driver"],
                    "options": v["options"],
                    "labels": v["labels"],
                    "in_use_by": [c["name"] for c in v["in_use_by"]],
                }
                for v in volumes
            ]
        }
    )


# -- migrations ------------------------------------------------------------------------------


async def _known_agent_for_body(request: web.Request, name: str) -> AgentRecord:
    rec = await asyncio.to_thread(_store(request).get_agent, name)
    if rec is None:
        raise AgentNotFound(f"no agent named {name!r}", agent=name)
    return rec


async def create_migration(request: web.Request) -> web.Response:
    req = parse_request(await read_json(request))
    store = _store(request)
    await _known_agent_for_body(request, req.source.agent)
    await _known_agent_for_body(request, req.target.agent)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= 255:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters")
    if _bool_query(request, "dry_run"):
        source, target = await _clients(request, req)
        return web.json_response({"plan": await plan.plan(req, source, target)})
    fingerprint = req.fingerprint()
    if key:
        existing = await _idempotent(store, key, fingerprint)
        if existing is not None:
            return _migration_response(existing, status=200)
    source, _ = await _clients(request, req)
    running = await plan.running_users(req, source) if req.options.quiesce == "none" else []
    if running and not req.options.allow_in_use:
        raise VolumeInUse(
            f"running containers use {req.source.volume!r}: {', '.join(running)} "
            "(stop them, use quiesce: stop, or allow_in_use: true)",
            containers=running,
        )
    other = await asyncio.to_thread(store.active_by_source, req.source.agent, req.source.volume)
    if other is not None and "stop" in (req.options.quiesce, other.request.options.quiesce):
        raise SourceBusy(
            f"migration {other.id} is already using source volume {req.source.volume!r}",
            migration=other.id,
        )
    m = Migration(id=new_id(), request=req)
    try:
        await asyncio.to_thread(
            store.insert_migration,
            m,
            idempotency_key=key,
            fingerprint=fingerprint if key else None,
        )
    except TargetTaken as e:
        raise TargetBusy(
            f"another active migration writes {req.target.agent}:{req.target.volume}",
            migration=e.migration_id,
        ) from e
    except DuplicateKey:
        existing = await _idempotent(store, key or "", fingerprint)
        assert existing is not None
        return _migration_response(existing, status=200)
    orchestrator = _orchestrator(request)
    await orchestrator.save(m)
    orchestrator.schedule(m)
    return _migration_response(m, status=202)


async def _idempotent(store: Store, key: str, fingerprint: str) -> Migration | None:
    found = await asyncio.to_thread(store.find_idempotent, key)
    if found is None:
        return None
    migration, stored = found
    if stored != fingerprint:
        raise IdempotencyConflict(
            f"Idempotency-Key {key!r} was used for a different request", migration=migration.id
        )
    return migration


def _migration_response(m: Migration, *, status: int) -> web.Response:
    return web.json_response(
        m.to_json(), status=status, headers={"Location": f"/v1/migrations/{m.id}"}
    )


async def _clients(request: web.Request, req: MigrationRequest) -> tuple[AgentClient, AgentClient]:
    session = _orchestrator(request).session
    source = await _known_agent_for_body(request, req.source.agent)
    target = await _known_agent_for_body(request, req.target.agent)
    return (
        AgentClient(session, source.url, source.token),
        AgentClient(session, target.url, target.token),
    )


async def list_migrations(request: web.Request) -> web.Response:
    state = request.query.get("state")
    if state is not None and state not in {s.value for s in State}:
        raise InvalidRequest(f"state must be one of {', '.join(s.value for s in State)}")
    limit = _int_query(request, "limit", 100, 1, 1000)
    found = await asyncio.to_thread(_store(request).list_migrations, state=state, limit=limit)
    return web.json_response({"migrations": [m.to_json() for m in found]})


async def get_migration(request: web.Request) -> web.Response:
    orchestrator = _orchestrator(request)
    wait = _int_query(request, "wait", 0, 0, MAX_WAIT_S)
    m = await orchestrator.wait_terminal(request.match_info["id"], seconds=wait)
    return web.json_response(m.to_json())


async def migration_events(request: web.Request) -> web.StreamResponse:
    orchestrator = _orchestrator(request)
    store = _store(request)
    migration_id = request.match_info["id"]
    await orchestrator.get(migration_id)  # 404 before the stream starts
    last = request.headers.get("Last-Event-ID", request.query.get("last_event_id", "0"))
    if not last.isascii() or not last.isdigit() or len(last) > MAX_EVENT_ID_DIGITS:
        raise InvalidRequest("Last-Event-ID must be an event id (digits)")
    after = int(last)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):  # the client went away; nothing to tell it
        await _pump_events(orchestrator, store, migration_id, after, resp)
    return resp


async def _pump_events(
    orchestrator: Orchestrator,
    store: Store,
    migration_id: str,
    after: int,
    resp: web.StreamResponse,
) -> None:
    drained = False
    while True:
        events = await asyncio.to_thread(store.events_after, migration_id, after)
        ended = False
        for event_id, kind, data in events:
            payload = json.dumps(data, separators=(",", ":"))
            await resp.write(f"id: {event_id}\nevent: {kind}\ndata: {payload}\n\n".encode())
            after = event_id
            if kind == "state" and data.get("state") in {s.value for s in TERMINAL}:
                ended = True
        if ended:
            break
        if not events:
            m = await orchestrator.get(migration_id)
            if m.state in TERMINAL:
                # The terminal row and its event are one commit, which may have landed
                # between our read of the events and of the row: read the events once more.
                if drained:
                    break
                drained = True
                continue
            await orchestrator.wait_event(seconds=KEEPALIVE_S)
            if not await asyncio.to_thread(store.events_after, migration_id, after, 1):
                await resp.write(b": keepalive\n\n")
    await resp.write_eof()


async def cancel_migration(request: web.Request) -> web.Response:
    m = await _orchestrator(request).cancel(request.match_info["id"])
    return web.json_response(m.to_json(), status=202)


async def retry_migration(request: web.Request) -> web.Response:
    m = await _orchestrator(request).retry(request.match_info["id"])
    return web.json_response(m.to_json(), status=202)


async def discard_migration(request: web.Request) -> web.Response:
    m = await _orchestrator(request).discard(request.match_info["id"])
    return web.json_response(m.to_json(), status=202)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/health", health, name="health")
    r.add_get("/openapi.json", openapi, name="openapi")
    r.add_get("/metrics", metrics)
    r.add_get("/v1/agents", list_agents)
    r.add_get("/v1/agents/{name}", get_agent)
    r.add_put("/v1/agents/{name}", put_agent)
    r.add_delete("/v1/agents/{name}", delete_agent)
    r.add_get("/v1/agents/{name}/volumes", agent_volumes)
    r.add_post("/v1/migrations", create_migration)
    r.add_get("/v1/migrations", list_migrations)
    r.add_get("/v1/migrations/{id}", get_migration)
    r.add_get("/v1/migrations/{id}/events", migration_events)
    r.add_post("/v1/migrations/{id}/cancel", cancel_migration)
    r.add_post("/v1/migrations/{id}/retry", retry_migration)
    r.add_post("/v1/migrations/{id}/discard", discard_migration)
