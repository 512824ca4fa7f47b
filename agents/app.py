"""The agent's aiohttp application: factory, typed app state, middlewares, resources.

Every resource (the Docker client, background pulls) is opened and closed in one cleanup
context. The error middleware is the only place that renders problem+json; handlers raise.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from agents import pull_views, quiesce, source_views, views
from agents.appkeys import PULLS, SETTINGS, VOLUMES
from agents.docker_volumes import DockerVolumes
from agents.errors import (
    AgentError,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    Unauthorized,
    check_volume_name,
)
from agents.pulls import PullManager, RetryPolicy
from agents.settings import AgentSettings

log = logging.getLogger("migrator_agent")


# Routes that answer without the coordinator's bearer token: health for probes, and the
# stream, which carries its own transfer token.
PUBLIC_ROUTES = frozenset({"health", "stream", "stream-filtered"})
# Routes that also accept a transfer token for the volume they name.
TRANSFER_ROUTES = frozenset({"manifest"})
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
        return problem_response(AgentError("internal error; see the agent's log"))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route
    if route.name in PUBLIC_ROUTES:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if route.name in TRANSFER_ROUTES and scheme.lower() == "transfer":
        # A pulling target reads the source's manifest for an incremental pass.
        source_views.check_transfer_token(request, check_volume_name(request.match_info["name"]))
        return await handler(request)
    expected = request.app[SETTINGS].token
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("missing or invalid bearer token")
    return await handler(request)


def create_app(settings: AgentSettings, *, volumes: DockerVolumes | None = None) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=MAX_REQUEST_BYTES
    )
    app[SETTINGS] = settings

    async def resources(app: web.Application) -> AsyncIterator[None]:
        app[VOLUMES] = volumes or DockerVolumes(settings.docker_host)
        pulls = PullManager(
            settings.state_dir,
            app[VOLUMES],
            allow_devices=settings.allow_devices,
            retry=RetryPolicy(
                retries=settings.pull_retries, max_delay_s=settings.pull_retry_max_delay_s
            ),
        )
        app[PULLS] = pulls
        await pulls.open()  # resumes the pulls a previous run left running
        yield
        await pulls.close()
        app[VOLUMES].close()

    app.cleanup_ctx.append(resources)
    add_routes(app)
    return app


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/health", views.health, name="health")
    app.router.add_get("/v1/volumes", views.list_volumes)
    app.router.add_post("/v1/volumes", views.create_volume)
    app.router.add_get("/v1/volumes/{name}", views.get_volume)
    app.router.add_delete("/v1/volumes/{name}", views.delete_volume)
    app.router.add_get("/v1/volumes/{name}/containers", views.get_volume_containers)
    app.router.add_post("/v1/volumes/{name}/quiesce", quiesce.quiesce)
    app.router.add_post("/v1/volumes/{name}/unquiesce", quiesce.unquiesce)
    app.router.add_get("/v1/volumes/{name}/manifest", views.get_manifest, name="manifest")
    app.router.add_get("/v1/volumes/{name}/stream", source_views.get_stream, name="stream")
    app.router.add_post(
        "/v1/volumes/{name}/stream", source_views.get_stream, name="stream-filtered"
    )
    app.router.add_post("/v1/pulls", pull_views.create_pull)
    app.router.add_get("/v1/pulls", pull_views.list_pulls)
    app.router.add_get("/v1/pulls/{id}", pull_views.get_pull)
    app.router.add_delete("/v1/pulls/{id}", pull_views.delete_pull)
    app.router.add_post("/v1/pulls/{id}/verify", pull_views.verify_pull)
