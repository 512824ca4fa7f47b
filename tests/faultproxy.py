"""A TCP proxy for fault injection between two agents: cut the connection after N bytes, flip a
byte in transit, or cut on demand; counts every byte it forwards from the upstream (source).

Runs its own event loop in a thread, so synchronous tests and real agent processes can use it.
Only listens on, and connects to, 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field


@dataclass
class Faults:
    cut_at: list[int] = field(default_factory=list)
    """Cumulative downstream byte counts at which to cut the connection (each once)."""
    flip_at: list[int] = field(default_factory=list)
    """Cumulative downstream byte positions whose byte is flipped in transit (each once)."""


class FaultProxy:
    def __init__(self, upstream_port: int, faults: Faults | None = None) -> None:
        self.upstream_port = upstream_port
        self.faults = faults or Faults()
        self.downstream_bytes = 0
        self.connections = 0
        self.cuts = 0
        self.flips = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_now(self) -> None:
        """Drop every open connection (as a network failure would)."""
        asyncio.run_coroutine_threadsafe(self._cut_all(), self._loop).result(10)

    async def _cut_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self.cuts += 1

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, up_w}
        try:
            await asyncio.gather(self._pipe_up(client_r, up_w), self._pipe_down(up_r, client_w))
        finally:
            for w in (client_w, up_w):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe_up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()

    async def _pipe_down(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                start = self.downstream_bytes
                end = start + len(data)
                cut = next((c for c in self.faults.cut_at if start < c <= end), None)
                if cut is not None:
                    self.faults.cut_at.remove(cut)
                    data = data[: cut - start]
                buf = bytearray(data)
                for pos in [p for p in self.faults.flip_at if start <= p < start + len(buf)]:
                    buf[pos - start] ^= 0xFF
                    self.faults.flip_at.remove(pos)
                    self.flips += 1
                w.write(bytes(buf))
                await w.drain()
                self.downstream_bytes += len(buf)
                if cut is not None:
                    # A clean close (FIN): everything forwarded so far reaches the target, so
                    # what it re-fetches measures its resume granularity alone. An abort (RST)
                    # would also discard what sits in kernel buffers — see cut_now().
                    self.cuts += 1
                    w.close()
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            if not w.is_closing():
                w.transport.abort()
