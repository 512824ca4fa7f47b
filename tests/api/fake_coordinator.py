"""A fake coordinator for CLI tests: a real aiohttp server on 127.0.0.1 in a background thread
(so the blocking CLI can run in the test's own thread), answering canned responses and
recording every request.

    fake.reply("POST", "/v1/migrations", 202, {...})
    fake.stream("/v1/migrations/ID/events", [("state", 1, {...}), ("progress", 2, {...})])

A path with several `reply`s answers them in turn and repeats the last; each `stream` call adds
one connection's worth of events (the last one repeats too). Unknown paths answer 404
problem+json.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SseEvent = tuple[str, int, Any]  # (event name, id, data)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class _Stream:
    connections: list[list[SseEvent]] = field(default_factory=list)
    hold: bool = False
    """After the last connection's events, keep the stream open until the client leaves."""


class FakeCoordinator:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.streamed = threading.Event()
        """Set once a stream has sent all its events (and is holding, with `hold=True`)."""
        self._replies: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)

    # -- scripting ------------------------------------------------------------------------

    def reply(self, method: str, path: str, status: int, body: Any = None) -> None:
        self._replies.setdefault((method, path), []).append((status, body))

    def stream(self, path: str, events: list[SseEvent], *, hold: bool = False) -> None:
        script = self._streams.setdefault(path, _Stream())
        script.connections.append(events)
        script.hold = hold

    def requests_to(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeCoordinator:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    def stop(self) -> None:
        self._stopping = True
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._sock.close()

    # -- serving --------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=dict(request.headers),
                body=json.loads(raw) if raw else None,
            )
        )
        if request.method == "GET" and request.path in self._streams:
            return await self._serve_stream(request, self._streams[request.path])
        replies = self._replies.get((request.method, request.path))
        if not replies:
            problem = {"status": 404, "code": "not_found", "title": "Not found", "detail": "no"}
            return web.json_response(problem, status=404, content_type="application/problem+json")
        status, body = replies.pop(0) if len(replies) > 1 else replies[0]
        kind = "application/problem+json" if status >= 400 else "application/json"
        if body is None:
            return web.Response(status=status)
        return web.json_response(body, status=status, content_type=kind)

    async def _serve_stream(self, request: web.Request, script: _Stream) -> web.StreamResponse:
        events = script.connections.pop(0) if len(script.connections) > 1 else script.connections[0]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": hello\n\n")
        for name, event_id, data in events:
            text = f"event: {name}\nid: {event_id}\ndata: {json.dumps(data)}\n\n"
            await response.write(text.encode())
        self.streamed.set()
        while script.hold and not self._stopping:
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.02)
        return response
