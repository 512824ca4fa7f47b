"""The coordinator's aiohttp application: factory, typed state, middlewares, resources, serve().

Every resource (the store, the HTTP session to agents, the orchestrator's runners) is opened and
closed in one cleanup context. The error middleware is the only place that renders
problem+json; handlers raise.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from migrator import views
from migrator.errors import (
    MethodNotAllowed,
    MigratorError,
    NotFound,
    RequestTooLarge,
    Unauthorized,
)
from migrator.orchestrator import Orchestrator
from migrator.settings import CoordinatorSettings, SettingsError, load_settings
from migrator.state import ORCHESTRATOR, SETTINGS, STORE
from migrator.store import AgentRecord, Store

log = logging.getLogger("migrator")

PUBLIC_ROUTES = frozenset({"health", "openapi"})
# Migration requests are small JSON documents; 1 MiB leaves room and refuses the absurd.
MAX_REQUEST_BYTES = 1024 * 1024
# How often finished migrations past their retention are pruned.
PRUNE_EVERY_S = 3600

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_response(err: MigratorError) -> web.Response:
    return web.json_response(
        err.to_problem(), status=err.status, content_type="application/problem+json"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MigratorError as e:
        return problem_response(e)
    except web.HTTPRequestEntityTooLarge:
        return problem_response(RequestTooLarge("request body over 1 MiB"))
    except web.HTTPNotFound:
        return problem_response(NotFound(f"no route for {request.path}"))
    except web.HTTPMethodNotAllowed as e:
        allowed = ", ".join(sorted(e.allowed_methods))
        resp = problem_response(
            MethodNotAllowed(f"{request.method} not allowed on {request.path} (allowed: {allowed})")
        )
        resp.headers["Allow"] = allowed
        return resp
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return problem_response(MigratorError("internal error; see the coordinator's log"))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    tokens = request.app[SETTINGS].tokens
    if not tokens or request.match_info.route.name in PUBLIC_ROUTES:
        return await handler(request)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and any(
        hmac.compare_digest(given.encode(), t.encode()) for t in tokens
    )
    if not ok:
        raise Unauthorized("missing or invalid bearer token")
    return await handler(request)


def create_app(settings: CoordinatorSettings) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=MAX_REQUEST_BYTES
    )
    app[SETTINGS] = settings

    async def resources(app: web.Application) -> AsyncIterator[None]:
        store = Store(settings.db_path)
        await asyncio.to_thread(store.open)
        for agent in settings.agents:
            rec = AgentRecord(agent.name, agent.url, agent.token, agent.data_url, "config")
            await asyncio.to_thread(store.upsert_agent, rec)
        session = aiohttp.ClientSession()
        orchestrator = Orchestrator(store, settings, session)
        app[STORE] = store
        app[ORCHESTRATOR] = orchestrator
        await orchestrator.start()
        pruner = asyncio.get_running_loop().create_task(_prune_forever(app))
        yield
        pruner.cancel()
        await orchestrator.stop()
        await session.close()
        await asyncio.to_thread(store.close)

    app.cleanup_ctx.append(resources)
    views.add_routes(app)
    return app


async def _prune_forever(app: web.Application) -> None:
    older_than = app[SETTINGS].retention_days * 86400
    while True:
        try:
            pruned = await asyncio.to_thread(app[STORE].prune, older_than_s=older_than)
            if pruned:
                log.info("pruned %d finished migrations past retention", pruned)
        except Exception:
            log.exception("pruning migration history failed")
        await asyncio.sleep(PRUNE_EVERY_S)


def serve(
    *,
    listen: str,
    db: str,
    token_file: str | None,
    config: str | None,
    retention_days: float = 30.0,
    log_level: str = "info",
) -> int:
    """`migrator serve`: run the coordinator until SIGINT/SIGTERM. Returns the exit code."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings(
            listen=listen,
            db=db,
            token_file=token_file,
            config=config,
            retention_days=retention_days,
        )
    except SettingsError as e:
        print(f"migrator: {e}", file=sys.stderr)
        return 2
    log.info("listening on %s:%d, database %s", settings.host, settings.port, settings.db_path)
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None)
    return 0
