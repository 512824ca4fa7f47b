"""The agent's aiohttp application: factory, typed app state, middlewares, resources.

Every resource (the Docker client, background pulls) is opened and closed in one cleanup
context. The error middleware is the only place that renders problem+json; handlers raise.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from agents import views
from agents.appkeys import SETTINGS, VOLUMES
from agents.docker_volumes import DockerVolumes
from agents.errors import AgentError, MethodNotAllowed, NotFound, RequestTooLarge, Unauthorized
from agents.settings import AgentSettings

log = logging.getLogger("migrator_agent")


# Routes that answer without the coordinator's bearer token: health for probes, and the
# stream, which carries its own transfer token.
PUBLIC_ROUTES = frozenset({"health", "stream"})
# Control requests are small JSON documents; 1 MiB is generous (aiohttp's default too).
MAX_REQUEST_BYTES = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_response(err: AgentError) -> web.Response:
    return web.json_response(
        err.to_problem(), status=err.status, content_type="application/problem+json"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AgentError as e:
        return problem_response(e)
    except web.HTTPRequestEntityTooLarge:
        return problem_response(RequestTooLarge("request body over 1 MiB"))
    except web.HTTPNotFound:
        return problem_response(NotFound(f"no route for {request.path}"))
    except web.HTTPMethodNotAllowed:
        return problem_response(MethodNotAllowed(f"{request.method} not allowed on {request.path}"))
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return problem_response(AgentError("internal error; see the agent's log"))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route
    if route.name in PUBLIC_ROUTES:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    expected = request.app[SETTINGS].token
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("missing or invalid bearer token")
    return await handler(request)


def create_app(settings: AgentSettings, *, volumes: DockerVolumes | None = None) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=MAX_REQUEST_BYTES
    )
    app[SETTINGS] = settings

    async def docker_ctx(app: web.Application) -> AsyncIterator[None]:
        app[VOLUMES] = volumes or DockerVolumes(settings.docker_host)
        yield
        app[VOLUMES].close()

    app.cleanup_ctx.append(docker_ctx)
    views.add_routes(app)
    return app
