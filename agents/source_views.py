"""The source side's HTTP handler: `GET /v1/volumes/{name}/stream` (docs/protocol.md §3).

Authorised by a transfer token, not the coordinator's bearer token. Parses, names the stream,
then pumps frames from the producer thread to the socket, applying the rate limit and telling
the compression policy how fast the link drains.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from agents.appkeys import SETTINGS
from agents.delta import Base
from agents.errors import (
    InvalidRequest,
    RequestTooLarge,
    StreamChanged,
    TransferTokenExpired,
    TransferTokenInvalid,
    check_volume_name,
)
from agents.frames import (
    DEFAULT_CHUNK_SIZE,
    Compression,
    FrameEncoder,
    check_chunk_size,
)
from agents.incremental import parse_selection_with_bases
from agents.source import FrameProducer, Snapshots
from agents.spool import SpoolDamaged
from agents.transfer_token import TokenExpired, TokenInvalid, verify_transfer_token
from agents.views import readable_volume

log = logging.getLogger("migrator_agent.source")

FRAMES_CONTENT_TYPE = "application/vnd.volume-migrator.frames"
# A selection lists changed paths only; 256 MiB is a million long paths.
MAX_SELECTION_BYTES = 256 << 20


def _int_param(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as e:
        raise InvalidRequest(f"{name} must be an integer, got {raw!r}") from e
    if value < 0:
        raise InvalidRequest(f"{name} must not be negative")
    return value


def check_transfer_token(request: web.Request, volume: str) -> str:
    """Verify the transfer token for `volume`; returns the transfer id."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "transfer":
        token = request.query.get("token", "")
    try:
        claims = verify_transfer_token(request.app[SETTINGS].token, token, volume=volume)
    except TokenExpired as e:
        raise TransferTokenExpired(str(e)) from e
    except TokenInvalid as e:
        raise TransferTokenInvalid(str(e)) from e
    return claims.transfer_id


async def read_selection(request: web.Request) -> tuple[list[bytes], dict[bytes, Base]] | None:
    """The body of a filtered stream (`POST`): paths in manifest order, one per line, some
    with the target's base for a block delta (see agents/incremental.py)."""
    if request.method != "POST":
        return None
    body = bytearray()
    while chunk := await request.content.read(1 << 20):
        body += chunk
        if len(body) > MAX_SELECTION_BYTES:
            raise RequestTooLarge(f"selection over {MAX_SELECTION_BYTES} bytes")
    try:
        return parse_selection_with_bases(bytes(body))
    except ValueError as e:
        raise InvalidRequest(f"invalid selection: {e}") from e


async def get_stream(request: web.Request) -> web.StreamResponse:
    name = check_volume_name(request.match_info["name"])
    transfer_id = check_transfer_token(request, name)
    selected = await read_selection(request)
    selection, bases = (None, None) if selected is None else selected
    offset = _int_param(request, "offset", 0) or 0
    stream_id = request.query.get("stream_id") or None
    try:
        chunk_size = check_chunk_size(_int_param(request, "chunk_size", DEFAULT_CHUNK_SIZE) or 0)
        compression = Compression(request.query.get("compression", "auto"))
    except ValueError as e:
        raise InvalidRequest(str(e)) from e
    max_rate = _int_param(request, "max_rate_bytes_per_s", None)
    if max_rate == 0:
        raise InvalidRequest("max_rate_bytes_per_s must be positive")
    if offset % 512:
        raise InvalidRequest(f"offset {offset} is not a multiple of 512")
    if offset and stream_id is None:
        raise InvalidRequest("offset > 0 needs the stream_id it belongs to")
    freeze = request.query.get("freeze", "0")
    if freeze not in ("0", "1"):
        raise InvalidRequest("freeze must be 0 or 1")

    info = await readable_volume(request, name)
    snapshots = Snapshots(request.app[SETTINGS].state_dir / "streams" / name)
    identity = None
    if stream_id is not None:
        identity = await asyncio.to_thread(snapshots.find, stream_id)
    if identity is None:
        identity = await asyncio.to_thread(
            snapshots.take, info.mountpoint, selection, bases, freeze=freeze == "1"
        )
        if stream_id is not None and stream_id != identity.stream_id:
            raise StreamChanged(
                f"volume {name!r} changed since stream {stream_id}",
                stream_id=identity.stream_id,
            )
    if offset > identity.total_size:
        raise InvalidRequest(f"offset {offset} is past the stream's end ({identity.total_size})")

    encoder = FrameEncoder(chunk_size=chunk_size, compression=compression)
    producer = FrameProducer(info.mountpoint, identity, offset, encoder)
    resp = web.StreamResponse(headers={"Content-Type": FRAMES_CONTENT_TYPE})
    # Targets ask with HTTP/1.0, so the body ends with the connection (see agents/pulls.py).
    resp.force_close()
    await resp.prepare(request)
    await resp.write(
        encoder.hello(
            stream_id=identity.stream_id,
            start_offset=offset,
            total_size=identity.total_size,
            extra={
                "volume": {"driver": info.driver, "options": info.options, "labels": info.labels},
                "totals": identity.totals.to_json(),
                "source_now_ns": time.time_ns(),
                "filtered": selection is not None,
                "frozen": identity.frozen,
            },
        )
    )
    log.info(
        "stream %s of %s from %d (%s, chunk %d)", transfer_id, name, offset, compression, chunk_size
    )
    producer.start()
    started = time.monotonic()
    sent = 0
    try:
        while True:
            frame = await asyncio.to_thread(producer.next_frame)
            if frame is None:
                break
            header, payload = frame
            t0 = time.monotonic()
            await resp.write(header)
            await resp.write(payload)
            size = len(header) + len(payload)
            sent += size
            if max_rate is not None:
                ahead = sent / max_rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            encoder.policy.observe_send(size, time.monotonic() - t0)
        if producer.error is not None:
            log.warning("stream of %s failed: %s", name, producer.error)
            if isinstance(producer.error, SpoolDamaged):
                await asyncio.to_thread(snapshots.unfreeze, identity.stream_id)
            await resp.write(
                encoder.error(
                    "source_read_failed",
                    f"reading {name!r} failed: {producer.error}",
                    producer.result.end_offset,
                )
            )
        else:
            await resp.write(encoder.trailer(producer.trailer(), producer.result.end_offset))
        await resp.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        log.info("stream %s of %s: the client went away", transfer_id, name)
        raise
    finally:
        producer.stop()
    return resp
