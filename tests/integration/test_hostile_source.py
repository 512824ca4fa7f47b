"""A real target agent refuses hostile streams from a fake source and writes nothing outside
the target volume.

The fake source is a small aiohttp server inside the test: it answers
`GET /v1/volumes/{name}/stream` with frames built by `agents.frames` (honest ones from
`FrameEncoder`, lying ones from `encode_frame`) around tar bytes built by hand below, because
no honest tool writes these archives. The target is the session's real `migrator-agent`
(`agent_b`) on its private engine; it is asked to `POST /v1/pulls` from the fake source.

For every attack: the pull ends `failed` with the expected code, a canary directory on the
volumes' filesystem (outside the volume) and the volume's own parent directory
(`volumes/<name>/`, next to `_data`, where the fake source drops a second canary once the
target has created the volume) are unchanged to the inode, link count, mtime and byte, no
`evil` exists outside `_data`, and the agent is healthy with no traceback in its log. A
positive control proves that the fake source is a valid peer, so the refusals mean something.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import struct
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
import zstandard
from aiohttp import web

from agents.frames import (
    MIN_CHUNK_SIZE,
    Codec,
    Compression,
    FrameEncoder,
    FrameKind,
    encode_frame,
    next_chunk_length,
)
from tests.agentclient import AgentHTTP
from tests.conftest import TEST_RETRY
from tests.testbed import AgentProcess, Engine

pytestmark = pytest.mark.integration

BLOCK = 512
END = bytes(2 * BLOCK)
MTIME = 1_700_000_000
CHUNK = MIN_CHUNK_SIZE
"""The fake source's chunk size: the smallest allowed, so a 100 KiB tar spans two frames."""
STREAM_ID = "fake-1"
FRAMES_CONTENT_TYPE = "application/vnd.volume-migrator.frames"
CANARY = b"canary: no byte of this file may ever change\n"
CANARY_MTIME_NS = 1_000_000_000_123_456_789
PERMANENT_WAIT_S = 30.0
TERMINAL = {"succeeded", "failed", "cancelled"}


# --- hand-made tar ------------------------------------------------------------------------


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def _num(value: int, width: int) -> bytes:
    """A ustar numeric field: zero-padded octal, NUL-terminated, `width` bytes in all."""
    return b"%0*o\0" % (width - 1, value)


def ustar(
    name: bytes,
    typeflag: bytes = b"0",
    *,
    size: int = 0,
    mode: int = 0o644,
    linkname: bytes = b"",
    dev: tuple[int, int] = (0, 0),
    checksum_delta: int = 0,
) -> bytes:
    """One POSIX ustar header block; `checksum_delta` != 0 stores a wrong checksum."""
    if len(name) > 100 or len(linkname) > 100:
        raise ValueError("name and linkname fields hold 100 bytes; use pax records")
    block = bytearray(BLOCK)
    for offset, value in (
        (0, name),
        (100, _num(mode, 8)),
        (108, _num(0, 8)),
        (116, _num(0, 8)),
        (124, _num(size, 12)),
        (136, _num(MTIME, 12)),
        (148, b" " * 8),  # the checksum is summed with its own field as spaces
        (156, typeflag),
        (157, linkname),
        (257, b"ustar\0"),
        (263, b"00"),
        (329, _num(dev[0], 8)),
        (337, _num(dev[1], 8)),
    ):
        block[offset : offset + len(value)] = value
    block[148:156] = b"%06o\0 " % (sum(block) + checksum_delta)
    return bytes(block)


def pax_record(key: bytes, value: bytes) -> bytes:
    """`"<len> key=value\\n"`, where <len> counts the whole record, its own digits included."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body)
    while len(body) + len(b"%d" % length) != length:
        length = len(body) + len(b"%d" % length)
    return b"%d" % length + body


def pax_header(body: bytes, *, declared_size: int | None = None) -> bytes:
    """A typeflag 'x' extended header carrying `body` (its size field may lie)."""
    size = len(body) if declared_size is None else declared_size
    return ustar(b"PaxHeaders/entry", b"x", size=size) + _pad(body)


def member(
    name: bytes,
    typeflag: bytes = b"0",
    data: bytes = b"",
    *,
    linkname: bytes = b"",
    records: tuple[tuple[bytes, bytes], ...] = (),
    **kw: Any,
) -> bytes:
    """A whole entry: an 'x' header if needed (long names go there), ustar header, data."""
    extra = list(records)
    if len(name) > 100:
        extra.append((b"path", name))
        name = name[:100]
    if len(linkname) > 100:
        extra.append((b"linkpath", linkname))
        linkname = linkname[:100]
    head = pax_header(b"".join(pax_record(k, v) for k, v in extra)) if extra else b""
    return head + ustar(name, typeflag, size=len(data), linkname=linkname, **kw) + _pad(data)


ROOT = member(b"./", b"5", mode=0o755)


def sparse_member(name: bytes, realsize: int, runs: list[tuple[int, bytes]]) -> bytes:
    """A GNU sparse 1.0 entry: the map (count, offset/length pairs) padded, then the runs."""
    smap = b"%d\n" % len(runs) + b"".join(b"%d\n%d\n" % (off, len(d)) for off, d in runs)
    records = (
        (b"GNU.sparse.major", b"1"),
        (b"GNU.sparse.minor", b"0"),
        (b"GNU.sparse.name", name),
        (b"GNU.sparse.realsize", b"%d" % realsize),
    )
    area = _pad(smap) + b"".join(d for _, d in runs)
    head = pax_header(b"".join(pax_record(k, v) for k, v in records))
    return head + ustar(b"GNUSparseFile.0/" + name, size=len(area)) + _pad(area)


# --- hostile frames -----------------------------------------------------------------------

Lie = Callable[[bytes, int], bytes | None]
"""Given a data frame's raw bytes and offset: the bytes to send instead, or None (honest)."""


def zstd_declaring(payload: bytes) -> Lie:
    """Data frames with codec zstd whose payload is `payload`, whatever raw_length says."""

    def lie(raw: bytes, offset: int) -> bytes:
        sha = hashlib.sha256(raw).digest()
        return encode_frame(FrameKind.DATA, Codec.ZSTD, offset, len(raw), sha, payload)

    return lie


def zstd_real_1mib() -> bytes:
    """A genuine zstd frame of 1 MiB of zeros (about 50 bytes): declares 1 MiB."""
    return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(1 << 20))


def zstd_forged_1tib() -> bytes:
    """A zstd frame header declaring 1 TiB of content, then one RLE block: decompressing it
    without checking the declared size first would try to allocate 1 TiB."""
    magic = b"\x28\xb5\x2f\xfd"
    descriptor = 0b1110_0000  # 8-byte content size, single segment, no checksum, no dict
    last_rle_block_of_one = (1 << 3 | 0b01 << 1 | 1).to_bytes(3, "little") + b"\0"
    return magic + bytes([descriptor]) + struct.pack("<Q", 1 << 40) + last_rle_block_of_one


def flip_a_byte_after_first_chunk(raw: bytes, offset: int) -> bytes | None:
    """The first frame is honest (committed); every later one has a flipped payload byte."""
    if offset < CHUNK:
        return None
    damaged = bytearray(raw)
    damaged[len(damaged) // 2] ^= 0x01
    sha = hashlib.sha256(raw).digest()
    return encode_frame(FrameKind.DATA, Codec.NONE, offset, len(raw), sha, bytes(damaged))


# --- the fake source ----------------------------------------------------------------------


def dir_state(path: Path, *, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Each child of `path` (not recursive): type, mode, inode, links, size, mtime, bytes.
    Children named in `skip` are recorded by name only."""
    out: dict[str, Any] = {}
    for child in sorted(path.iterdir()):
        if child.name in skip:
            out[child.name] = "present"
            continue
        st = child.lstat()
        content: bytes | str | None = None
        if stat.S_ISREG(st.st_mode):
            content = child.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(child)
        out[child.name] = (st.st_mode, st.st_ino, st.st_nlink, st.st_size, st.st_mtime_ns, content)
    return out


def plant_canary(path: Path) -> None:
    path.write_bytes(CANARY)
    os.utime(path, ns=(CANARY_MTIME_NS, CANARY_MTIME_NS))


@dataclass
class FakeSource:
    """Serves one tar stream as frames, from any offset the target asks for (as a real source
    does on resume). `lie` replaces data frames. Once the target has created the volume (after
    the hello), a canary is planted in `volume_parent`, next to `_data`, before any data."""

    tar: bytes
    volume_parent: Path
    files: int = 0
    lie: Lie | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    parent_before: dict[str, Any] | None = None
    """State of `volume_parent` right after the canary was planted (None: never planted)."""

    async def stream(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append(query)
        offset = int(query.get("offset", "0"))
        if offset % BLOCK or offset > len(self.tar):
            return _problem(400, "invalid_request", f"bad offset {offset}")
        if offset and query.get("stream_id") != STREAM_ID:
            return _problem(409, "stream_changed", "unknown stream_id", stream_id=STREAM_ID)
        resp = web.StreamResponse(status=200, headers={"Content-Type": FRAMES_CONTENT_TYPE})
        await resp.prepare(request)
        encoder = FrameEncoder(chunk_size=CHUNK, compression=Compression.NONE)
        try:
            volume = {"driver": "local", "options": {}, "labels": {}}
            hello = encoder.hello(
                stream_id=STREAM_ID,
                start_offset=offset,
                total_size=len(self.tar),
                extra={"volume": volume},
            )
            await resp.write(hello)
            await self._plant_parent_canary(request)
            pos = offset
            while pos < len(self.tar):
                raw = self.tar[pos : pos + next_chunk_length(pos, CHUNK)]
                lying = self.lie(raw, pos) if self.lie is not None else None
                await resp.write(encoder.data(raw, pos) if lying is None else lying)
                pos += len(raw)
            trailer = {
                "frames_digest": encoder.digest.value(),
                "dirty": [],
                "changed": False,
                "files": self.files,
                "stream_id": STREAM_ID,
            }
            await resp.write(encoder.trailer(trailer, pos))
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the target hung up after refusing a frame: what a refusal looks like
        return resp

    async def _plant_parent_canary(self, request: web.Request) -> None:
        if self.parent_before is not None:
            return
        deadline = asyncio.get_running_loop().time() + 20
        while not (self.volume_parent / "_data").is_dir():
            gone = request.transport is None or request.transport.is_closing()
            if gone or asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.02)
        plant_canary(self.volume_parent / "canary")
        self.parent_before = dir_state(self.volume_parent, skip=frozenset({"_data"}))


def _problem(status: int, code: str, detail: str, **extra: Any) -> web.Response:
    doc = {"type": "about:blank", "title": code, "status": status, "code": code, "detail": detail}
    return web.json_response(
        {**doc, **extra}, status=status, content_type="application/problem+json"
    )


@contextlib.asynccontextmanager
async def serving(source: FakeSource) -> AsyncIterator[str]:
    """Run `source` on 127.0.0.1 (random port) for the block; yields its base URL."""
    app = web.Application()
    app.router.add_get("/v1/volumes/{name}/stream", source.stream)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


# --- the target ---------------------------------------------------------------------------


@dataclass
class Target:
    """The real target agent and the volume a test pulls into."""

    agent: AgentProcess
    http: AgentHTTP
    docker: docker.DockerClient
    volume: str
    parent: Path
    """`volumes/<name>/`, the parent of the volume's mountpoint `_data`."""
    pull_ids: list[str] = field(default_factory=list)

    async def pull(self, source_url: str, wait_s: float) -> dict[str, Any]:
        """POST a pull from `source_url`, then poll until it is terminal (at most `wait_s`)."""
        pull_id = f"hostile-{uuid.uuid4().hex[:16]}"
        body = {
            "id": pull_id,
            "volume": self.volume,
            "source": {"url": source_url, "volume": "srcvol", "token": "anything"},
            "options": {"compression": "none"},
        }
        r = await asyncio.to_thread(self.http.post, "/v1/pulls", json=body)
        assert r.status_code == 202, (r.status_code, r.text)
        self.pull_ids.append(pull_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            r = await asyncio.to_thread(self.http.get, f"/v1/pulls/{pull_id}")
            assert r.status_code == 200, (r.status_code, r.text)
            pull: dict[str, Any] = r.json()
            if pull["state"] in TERMINAL:
                return pull
            if loop.time() > deadline:
                pytest.fail(f"pull still {pull['state']!r} after {wait_s:.0f}s: {pull}")
            await asyncio.sleep(0.1)

    def assert_mountpoint(self) -> None:
        """The volume lives where the parent-directory checks look."""
        mountpoint = self.docker.volumes.get(self.volume).attrs["Mountpoint"]
        assert os.path.realpath(mountpoint) == os.path.realpath(self.parent / "_data")

    async def assert_healthy_since(self, log_offset: int) -> None:
        assert self.agent.proc is not None and self.agent.proc.poll() is None, "agent exited"
        r = await asyncio.to_thread(self.http.get, "/v1/health")
        assert r.status_code == 200, (r.status_code, r.text)
        log = log_since(self.agent, log_offset)
        assert "Traceback" not in log, f"the agent logged a traceback for this case:\n{log}"


def log_size(agent: AgentProcess) -> int:
    with contextlib.suppress(FileNotFoundError):
        return (agent.dir / "agent.log").stat().st_size
    return 0


def log_since(agent: AgentProcess, offset: int) -> str:
    """What the agent logged after `offset`: this case's lines only."""
    with open(agent.dir / "agent.log", "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


@pytest.fixture
def target(
    agent_b: AgentProcess, engine_b: Engine, docker_b: docker.DockerClient, volume_name: str
) -> Iterator[Target]:
    http = AgentHTTP(agent_b)
    t = Target(agent_b, http, docker_b, volume_name, engine_b.volumes_dir / volume_name)
    try:
        yield t
    finally:
        with contextlib.suppress(FileNotFoundError):
            (t.parent / "canary").unlink()
        for pull_id in t.pull_ids:  # cancels a pull left running by a failed test
            with contextlib.suppress(requests.RequestException):
                http.request("DELETE", f"/v1/pulls/{pull_id}", params={"discard": "true"})
        with contextlib.suppress(docker.errors.NotFound):
            docker_b.volumes.get(volume_name).remove(force=True)
        http.session.close()


@dataclass(frozen=True)
class Outside:
    """A directory outside the volume, on the volumes' filesystem (so a hard link into it
    would not fail with EXDEV and hide an escape), holding one canary file."""

    dir: Path
    canary: Path


@pytest.fixture
def outside(engine_b: Engine) -> Iterator[Outside]:
    assert not os.path.lexists("/evil"), "/evil exists before the test: remove the leftover"
    base = Path(tempfile.mkdtemp(prefix="hostile-canary-", dir=engine_b.base))
    try:
        assert base.stat().st_dev == engine_b.volumes_dir.stat().st_dev
        plant_canary(base / "canary")
        yield Outside(base, base / "canary")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def assert_nothing_escaped(
    outside: Outside, outside_before: dict[str, Any], target: Target, source: FakeSource
) -> None:
    assert dir_state(outside.dir) == outside_before, "the canary directory changed"
    assert outside.canary.read_bytes() == CANARY
    assert outside.canary.stat().st_mtime_ns == CANARY_MTIME_NS
    assert source.parent_before is not None, (
        "the target never created the volume after the hello: no canary next to _data"
    )
    assert dir_state(target.parent, skip=frozenset({"_data"})) == source.parent_before, (
        "the volume's parent directory changed"
    )
    for path in (
        Path("/evil"),
        outside.dir / "evil",
        target.parent / "evil",
        target.parent.parent / "evil",
    ):
        assert not os.path.lexists(path), f"{path} was written outside the volume"


def retry_budget_s() -> float:
    """How long the runner backs off before giving up on a transfer that makes no progress."""
    return TEST_RETRY.budget_s()


# --- attacks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    tar: Callable[[Outside], bytes]
    codes: frozenset[str]
    """Acceptable `error.code`s: exactly one for tar-level attacks."""
    lie: Lie | None = None
    retried: bool = False
    """Damage in transit: the target must reconnect (from its committed offset) and give up."""


def _tar(*members: bytes) -> Callable[[Outside], bytes]:
    return lambda _: ROOT + b"".join(members) + END


def _benign_small() -> bytes:
    return ROOT + member(b"f.txt", data=b"fine\n") + END


def _benign_two_frames() -> bytes:
    blob = bytes(range(256)) * 400  # 100 KiB: the tar spans two 64 KiB frames
    return ROOT + member(b"blob.bin", data=blob) + END


ATTACKS = [
    pytest.param(
        Attack(_tar(member(b"/evil", data=b"pwned\n")), frozenset({"unsafe_path"})),
        id="absolute_path",
    ),
    pytest.param(
        Attack(
            lambda o: ROOT + member(os.fsencode(o.canary), data=b"pwned\n") + END,
            frozenset({"unsafe_path"}),
        ),
        id="absolute_path_onto_canary",
    ),
    pytest.param(
        Attack(_tar(member(b"../evil", data=b"pwned\n")), frozenset({"unsafe_path"})),
        id="dotdot",
    ),
    pytest.param(
        Attack(
            _tar(member(b"a/", b"5", mode=0o755), member(b"a/../../evil", data=b"pwned\n")),
            frozenset({"unsafe_path"}),
        ),
        id="inner_dotdot",
    ),
    pytest.param(
        Attack(
            lambda o: (
                ROOT
                + member(b"link", b"2", linkname=os.fsencode(o.dir))
                + member(b"link/evil", data=b"pwned\n")
                + END
            ),
            frozenset({"unsafe_path"}),
        ),
        id="symlink_then_write_through_it",
    ),
    pytest.param(
        Attack(
            lambda o: (
                ROOT
                + member(b"link", b"2", linkname=os.fsencode(o.dir))
                + member(b"hl", b"1", linkname=b"link/canary")
                + END
            ),
            frozenset({"unsafe_link"}),
        ),
        id="hardlink_through_symlink",
    ),
    pytest.param(
        Attack(
            lambda o: ROOT + member(b"hl", b"1", linkname=os.fsencode(o.canary)) + END,
            frozenset({"unsafe_path"}),
        ),
        id="hardlink_absolute_to_canary",
    ),
    pytest.param(
        Attack(_tar(member(b"hl", b"1", linkname=b"../canary")), frozenset({"unsafe_path"})),
        id="hardlink_dotdot_to_parent_canary",
    ),
    pytest.param(
        Attack(_tar(member(b"null", b"3", mode=0o666, dev=(1, 3))), frozenset({"device_refused"})),
        id="char_device",
    ),
    pytest.param(
        Attack(_tar(member(b"disk", b"4", mode=0o666, dev=(7, 0))), frozenset({"device_refused"})),
        id="block_device",
    ),
    pytest.param(
        # The 'x' header's size field says 1 GiB and nothing follows: refused on the header.
        Attack(_tar(ustar(b"PaxHeaders/huge", b"x", size=1 << 30)), frozenset({"limit_exceeded"})),
        id="pax_header_declares_1gib",
    ),
    pytest.param(
        # A small 'x' header whose one record claims to be 1 GiB long.
        Attack(
            _tar(pax_header(b"1073741824 path=evil\n"), member(b"f", data=b"x")),
            frozenset({"malformed_tar"}),
        ),
        id="pax_record_declares_1gib",
    ),
    pytest.param(
        Attack(
            _tar(member(b"f", data=b"x", records=((b"path", b"../evil"),))),
            frozenset({"unsafe_path"}),
        ),
        id="pax_path_dotdot",
    ),
    pytest.param(
        # One 512-byte run at 1 TiB in a file whose real size is 1 KiB.
        Attack(
            _tar(sparse_member(b"sparse", 1024, [(1 << 40, b"s" * BLOCK)])),
            frozenset({"malformed_tar"}),
        ),
        id="sparse_run_beyond_realsize",
    ),
    pytest.param(
        Attack(
            _tar(sparse_member(b"../evil", 1024, [(0, b"s" * BLOCK)])),
            frozenset({"unsafe_path"}),
        ),
        id="sparse_name_dotdot",
    ),
    pytest.param(
        Attack(
            _tar(ustar(b"evil", size=6, checksum_delta=1) + _pad(b"pwned\n")),
            frozenset({"malformed_tar"}),
        ),
        id="bad_header_checksum",
    ),
    pytest.param(
        Attack(
            lambda _: _benign_small(),
            frozenset({"size_mismatch", "frame_too_large", "protocol_violation"}),
            lie=zstd_declaring(zstd_real_1mib()),
        ),
        id="zstd_declares_1mib_over_raw_length",
    ),
    pytest.param(
        Attack(
            lambda _: _benign_small(),
            frozenset({"size_mismatch", "frame_too_large", "protocol_violation"}),
            lie=zstd_declaring(zstd_forged_1tib()),
        ),
        id="zstd_declares_1tib",
    ),
    pytest.param(
        Attack(
            lambda _: _benign_two_frames(),
            frozenset({"transfer_failed", "checksum_mismatch"}),
            lie=flip_a_byte_after_first_chunk,
            retried=True,
        ),
        id="sha256_mismatch_every_attempt",
        marks=pytest.mark.timeout(120),
    ),
]


@pytest.mark.parametrize("attack", ATTACKS)
async def test_target_refuses_hostile_source(
    attack: Attack, target: Target, outside: Outside
) -> None:
    outside_before = dir_state(outside.dir)
    log_offset = log_size(target.agent)
    source = FakeSource(attack.tar(outside), target.parent, lie=attack.lie)
    wait_s = retry_budget_s() + PERMANENT_WAIT_S if attack.retried else PERMANENT_WAIT_S

    async with serving(source) as url:
        pull = await target.pull(url, wait_s)

    assert pull["state"] == "failed", pull
    assert pull["error"] is not None and pull["error"]["code"] in attack.codes, pull["error"]
    if attack.retried:
        # Reconnected, each time from a committed frame end at or before the bad frame (never
        # past it), naming the stream it resumes. Whether the honest first frame was committed
        # depends on whether it arrived in the same read as the bad one.
        assert len(source.requests) > 1, source.requests
        for query in source.requests[1:]:
            assert query.get("offset") in ("0", str(CHUNK)), source.requests
            assert query.get("stream_id") == STREAM_ID, source.requests
    else:
        assert len(source.requests) == 1, f"a permanent refusal was retried: {source.requests}"
    target.assert_mountpoint()
    assert_nothing_escaped(outside, outside_before, target, source)
    await target.assert_healthy_since(log_offset)


async def test_benign_stream_from_fake_source_succeeds(target: Target, outside: Outside) -> None:
    """The positive control: the same fake source with an honest tar is a valid peer."""
    content = b"hello from the fake source\n"
    tar = (
        ROOT
        + member(b"docs/", b"5", mode=0o755)
        + member(b"docs/hello.txt", data=content, mode=0o640)
        + END
    )
    outside_before = dir_state(outside.dir)
    log_offset = log_size(target.agent)
    source = FakeSource(tar, target.parent, files=1)

    async with serving(source) as url:
        pull = await target.pull(url, PERMANENT_WAIT_S)

    assert pull["state"] == "succeeded" and pull["error"] is None, pull
    assert len(source.requests) == 1, source.requests
    target.assert_mountpoint()
    path = target.parent / "_data" / "docs" / "hello.txt"
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == MTIME * 1_000_000_000
    assert path.read_bytes() == content
    assert_nothing_escaped(outside, outside_before, target, source)
    await target.assert_healthy_since(log_offset)
