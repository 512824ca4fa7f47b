"""The target side of a transfer: pulls, their durable journal, and the runner that resumes.

Owns `POST/GET/DELETE /v1/pulls` state. A pull connects to the source's stream, verifies every
frame (`agents.frames`) before its bytes reach the extractor (`agents.extract`), and after each
data frame makes the volume durable and journals the committed offset atomically in
`<state-dir>/pulls/<id>/`. Any interruption — a cut connection, a corrupt frame, a killed
agent on either side — resumes from that offset, so at most one frame is sent twice.

State on disk, per pull (never inside the volume):
    pull.json      the request and the pull's state (atomic replace)
    journal.json   stream id, chunk size, committed offset, extractor checkpoint (atomic replace)
    digests.bin    32-byte SHA-256 of each committed frame, in order (append; cut to the journal)
    extract/       the extractor's own journals (directory metadata, files seen)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from agents import frames
from agents.content import ContentDB, verify_volume
from agents.delta import BaseCache, block_size_for, describe, patched
from agents.docker_volumes import DockerVolumes
from agents.errors import AgentError, Conflict, InvalidRequest, PullNotFound, check_volume_name
from agents.extract import Extractor
from agents.incremental import Bases, PlanError, plan_incremental_pass
from agents.tarparse import ExtractError, Header, WriteFailed
from agents.volumes import shared_storage_reason, unreadable_reason

log = logging.getLogger("migrator_agent.pulls")

PULL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class RetryPolicy:
    """Reconnects after transient failures. The default, 0.5 s doubling to 30 s for 8 tries
    without progress, gives an unreachable source about 90 s before the pull fails."""

    retries: int = 8
    base_s: float = 0.5
    max_delay_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        return float(min(self.max_delay_s, self.base_s * 2 ** (attempt - 1)))

    def budget_s(self) -> float:
        """The longest a pull waits in total before giving up, without progress."""
        return sum(self.delay(n) for n in range(1, self.retries + 1))


# Incremental passes after the first one while the source keeps changing under us.
MAX_PASSES = 6
# Verified frames waiting for the writer: the reader keeps receiving while frames are written,
# and memory stays a few chunks (queued + being written + being read).
PIPELINE_FRAMES = 2
# aiohttp's receive buffer (high water at twice this): fewer pauses of the socket per frame.
READ_BUFSIZE = 4 << 20
# A source that sends nothing for this long is treated as a cut connection.
SOCK_READ_TIMEOUT_S = 120


class PullState:
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class PullFailed(Exception):
    """A permanent failure: the pull ends `failed` with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Retryable(Exception):
    """A transient failure: reconnect from the committed offset after a backoff."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SourceChanged(Exception):
    """The source's manifest no longer yields the journaled stream: run an incremental pass."""


@dataclass
class PullSpec:
    """What `POST /v1/pulls` asks for."""

    id: str
    volume: str
    source_url: str
    source_volume: str
    token: str
    compression: str = "auto"
    max_rate_bytes_per_s: int | None = None
    chunk_size: int = frames.DEFAULT_CHUNK_SIZE
    if_target_exists: str = "fail"
    driver: str | None = None
    driver_opts: dict[str, str] | None = None
    labels: dict[str, str] | None = None
    continues: str | None = None
    """An earlier pull into the same volume whose content manifest this one extends (the
    passes of a pre-copied migration are separate pulls)."""
    window_start_ns: int | None = None
    """Source clock at the start of the earliest pass whose copy this pull refreshes: files
    with a later mtime are re-sent even when their metadata matches."""
    accept_dirty: bool = False
    """Finish after a pass even if files changed while they were read (a pre-copy pass, or a
    crash-consistent copy of a volume in use): the next pass, if any, sends them again.
    Without it the pull runs incremental passes until the source holds still."""
    freeze: bool = False
    """Ask the source to freeze each pass's stream (copy its data aside when naming it, see
    docs/protocol.md): the final pass of a quiesced migration, whose containers may run again
    once the pull reports `source_read`."""
    keep_bases: bool = False
    """Another pass into this volume follows (pre-copy): keep the block digests of the large
    files written, so that pass need not read them again (agents/delta.py, BaseCache)."""

    def public(self) -> dict[str, Any]:
        return {
            "url": self.source_url,
            "volume": self.source_volume,
        }


_OPTION_TYPES: dict[str, Any] = {
    "compression": str,
    "max_rate_bytes_per_s": (int, type(None)),
    "chunk_size": int,
    "if_target_exists": str,
    "driver": (str, type(None)),
    "driver_opts": (dict, type(None)),
    "labels": (dict, type(None)),
    "continues": (str, type(None)),
    "window_start_ns": (int, type(None)),
    "accept_dirty": bool,
    "keep_bases": bool,
    "freeze": bool,
}


def parse_pull_request(body: dict[str, Any]) -> PullSpec:
    """Validate a `POST /v1/pulls` body; raises InvalidRequest naming the first problem."""
    unknown = set(body) - {"id", "volume", "source", "options"}
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    pull_id = body.get("id")
    if not isinstance(pull_id, str) or not PULL_ID_RE.fullmatch(pull_id):
        raise InvalidRequest("'id' must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    volume = body.get("volume")
    if not isinstance(volume, str):
        raise InvalidRequest("'volume' is required")
    source = body.get("source")
    if not isinstance(source, dict) or set(source) - {"url", "volume", "token"}:
        raise InvalidRequest("'source' must be an object with url, volume and token")
    for key in ("url", "volume", "token"):
        if not isinstance(source.get(key), str) or not source[key]:
            raise InvalidRequest(f"'source.{key}' is required")
    if not source["url"].startswith(("http://", "https://")):
        raise InvalidRequest("'source.url' must be an http(s) URL")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'options' must be an object")
    for key, value in options.items():
        kinds = _OPTION_TYPES.get(key)
        if kinds is None:
            raise InvalidRequest(f"unknown option {key!r}")
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
            raise InvalidRequest(f"option {key!r} has the wrong type")
    spec = PullSpec(
        id=pull_id,
        volume=check_volume_name(volume),
        source_url=source["url"].rstrip("/"),
        source_volume=check_volume_name(source["volume"]),
        token=source["token"],
        **options,
    )
    if spec.compression not in ("auto", "zstd", "none"):
        raise InvalidRequest("option 'compression' must be auto, zstd or none")
    if spec.if_target_exists not in ("fail", "sync"):
        raise InvalidRequest("option 'if_target_exists' must be fail or sync")
    if spec.max_rate_bytes_per_s is not None and spec.max_rate_bytes_per_s <= 0:
        raise InvalidRequest("option 'max_rate_bytes_per_s' must be positive")
    try:
        frames.check_chunk_size(spec.chunk_size)
    except ValueError as e:
        raise InvalidRequest(str(e)) from e
    for key in ("driver_opts", "labels"):
        value = getattr(spec, key)
        if value is not None and not all(isinstance(v, str) for v in value.values()):
            raise InvalidRequest(f"option {key!r} must map strings to strings")
    return spec


@dataclass
class Journal:
    """Where the current pass stands; rewritten atomically after every committed frame."""

    pass_no: int = 1
    incremental: bool = False
    stream_id: str | None = None
    chunk_size: int | None = None
    total_size: int | None = None
    offset: int = 0
    frames: int = 0
    checkpoint: dict[str, Any] | None = None
    source_now_ns: int | None = None
    """The source's clock at the start of this pass (from the hello): the next incremental pass
    re-sends every file whose mtime is not safely before it."""
    previous_pass_start_ns: int | None = None
    frozen: bool = False
    """The source froze this pass's stream: it no longer reads its volume for it."""
    bases_kept: int = 0
    """Block deltas whose base came from the last pass (BaseCache) ..."""
    bases_read: int = 0
    """... and those the plan had to read the file for."""


@dataclass
class Progress:
    bytes_total: int = 0
    bytes_done: int = 0
    files_total: int = 0
    files_done: int = 0
    rate_bytes_per_s: float = 0.0


@dataclass
class Pull:
    spec: PullSpec
    dir: Path
    state: str = PullState.RUNNING
    phase: str = "connecting"
    error: dict[str, str] | None = None
    result: dict[str, Any] | None = None
    attempts: int = 1
    reconnects: int = 0
    created_volume: bool = False
    raw_bytes_received: int = 0
    """Raw stream bytes received in verified data frames, re-sent ones included."""
    passes: list[dict[str, Any]] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    journal: Journal = field(default_factory=Journal)
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    extractor: Extractor | None = field(default=None, repr=False)
    content_db: ContentDB | None = field(default=None, repr=False)
    cancel_requested: bool = False
    verification: dict[str, Any] | None = None

    @property
    def content(self) -> ContentDB:
        """The pull's content manifest (opened on first use; blocking)."""
        if self.content_db is None:
            self.content_db = ContentDB(self.dir / "content.db")
        return self.content_db

    def to_json(self) -> dict[str, Any]:
        j = self.journal
        return {
            "id": self.spec.id,
            "volume": self.spec.volume,
            "source": self.spec.public(),
            "state": self.state,
            "phase": self.phase if self.state == PullState.RUNNING else None,
            "progress": asdict(self.progress),
            "committed_offset": j.offset,
            "stream_id": j.stream_id,
            "pass": j.pass_no,
            "pass_started_ns": j.source_now_ns,
            "source_read": j.frozen,
            "incremental": j.incremental,
            "attempts": self.attempts,
            "reconnects": self.reconnects,
            "raw_bytes_received": self.raw_bytes_received,
            "created_volume": self.created_volume,
            "passes": self.passes,
            "error": self.error,
            "result": self.result,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }

    # -- persistence ----------------------------------------------------------------------

    def save(self) -> None:
        doc = {
            "spec": asdict(self.spec),
            "state": self.state,
            "error": self.error,
            "result": self.result,
            "attempts": self.attempts,
            "reconnects": self.reconnects,
            "created_volume": self.created_volume,
            "raw_bytes_received": self.raw_bytes_received,
            "passes": self.passes,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }
        write_atomic(self.dir / "pull.json", doc)

    def save_journal(self) -> None:
        write_atomic(self.dir / "journal.json", asdict(self.journal))

    def stage_journal(self, journal: Journal) -> Path:
        """`journal` written next to the journal's place, not synced and not in place yet (the
        per-frame commit syncs it with the volume's data, then renames it)."""
        staged = self.dir / "journal.json.tmp"
        with open(staged, "wb") as f:
            f.write(json.dumps(asdict(journal), separators=(",", ":")).encode())
        return staged

    @classmethod
    def load(cls, pull_dir: Path) -> Pull:
        doc = json.loads((pull_dir / "pull.json").read_text())
        pull = cls(spec=PullSpec(**doc["spec"]), dir=pull_dir)
        for key in (
            "state",
            "error",
            "result",
            "attempts",
            "reconnects",
            "created_volume",
            "raw_bytes_received",
            "passes",
            "created_at",
            "finished_at",
        ):
            setattr(pull, key, doc[key])
        journal_file = pull_dir / "journal.json"
        if journal_file.exists():
            pull.journal = Journal(**json.loads(journal_file.read_text()))
        return pull


def write_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Replace `path` with `doc` as JSON: write a temporary file, fsync it, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(doc, separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _problem(body: bytes) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        doc = json.loads(body)
        if isinstance(doc, dict):
            return doc
    return {}


class PullManager:
    """All pulls of this agent: starts, resumes after a restart, cancels, discards."""

    def __init__(
        self,
        state_dir: Path,
        volumes: DockerVolumes,
        *,
        allow_devices: bool,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        self.root = state_dir / "pulls"
        self.retry = retry
        self.volumes = volumes
        self.allow_devices = allow_devices
        self.bases = BaseCache()
        """Block digests of large target files, from one pass into a volume to the next."""
        self.pulls: dict[str, Pull] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # HTTP/1.0: the source's body then ends with the connection instead of chunked
        # encoding. A cut connection is a plain end of body, so every byte that arrived is
        # handed over and the frame layer (no trailer) detects the truncation; with chunked
        # encoding the client discards its buffered bytes on a cut — measured here: 4 MB
        # re-fetched after a cut instead of at most one 1 MiB frame.
        self._session = aiohttp.ClientSession(
            version=aiohttp.HttpVersion10,
            read_bufsize=READ_BUFSIZE,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=10, sock_read=SOCK_READ_TIMEOUT_S
            ),
        )
        for pull_dir in sorted(self.root.iterdir()):
            if not (pull_dir / "pull.json").exists():
                continue
            try:
                pull = Pull.load(pull_dir)
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.error("cannot load pull journal %s: %s", pull_dir, e)
                continue
            self.pulls[pull.spec.id] = pull
            if pull.state == PullState.RUNNING:
                log.info(
                    "resuming pull %s after a restart at offset %d",
                    pull.spec.id,
                    pull.journal.offset,
                )
                self._spawn(pull)

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        for task in list(self.tasks.values()):
            with contextlib.suppress(BaseException):
                await task
        for pull in self.pulls.values():
            _close_extractor(pull)
        if self._session is not None:
            await self._session.close()

    def get(self, pull_id: str) -> Pull:
        pull = self.pulls.get(pull_id)
        if pull is None:
            raise PullNotFound(f"no pull {pull_id!r}", pull=pull_id)
        return pull

    async def start(self, spec: PullSpec) -> tuple[Pull, bool]:
        """Start a pull, or resume the one with this id. Returns (pull, started_now)."""
        existing = self.pulls.get(spec.id)
        if existing is not None:
            if (
                existing.spec.volume != spec.volume
                or existing.spec.source_volume != spec.source_volume
            ):
                raise Conflict(f"pull {spec.id!r} exists for other volumes", pull=spec.id)
            if existing.state in (PullState.RUNNING, PullState.SUCCEEDED):
                return existing, False
            # A retry: the coordinator may hand a fresh token, rate or url.
            existing.spec = spec
            existing.state = PullState.RUNNING
            existing.error = None
            existing.attempts += 1
            existing.cancel_requested = False
            existing.finished_at = None
            await asyncio.to_thread(existing.save)
            self._spawn(existing)
            return existing, True
        for other in self.pulls.values():
            if other.spec.volume == spec.volume and other.state == PullState.RUNNING:
                raise Conflict(
                    f"volume {spec.volume!r} is being written by pull {other.spec.id!r}",
                    pull=other.spec.id,
                )
        pull = Pull(spec=spec, dir=self.root / spec.id)
        pull.journal.source_now_ns = spec.window_start_ns
        pull.dir.mkdir(parents=True, exist_ok=True)
        if spec.continues is not None:
            earlier = self.get(spec.continues)
            if earlier.spec.volume != spec.volume:
                raise Conflict(f"pull {spec.continues!r} wrote another volume")
            await asyncio.to_thread(
                shutil.copyfile, earlier.dir / "content.db", pull.dir / "content.db"
            )
        await asyncio.to_thread(pull.save)
        self.pulls[spec.id] = pull
        self._spawn(pull)
        return pull, True

    async def cancel(self, pull_id: str, *, discard: bool) -> Pull:
        pull = self.get(pull_id)
        task = self.tasks.get(pull_id)
        if task is not None:
            pull.cancel_requested = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if discard:
            self.bases.forget(pull.spec.volume)  # what was kept describes files going away
            if pull.created_volume:
                with contextlib.suppress(AgentError):
                    await asyncio.to_thread(self.volumes.remove, pull.spec.volume)
            await asyncio.to_thread(shutil.rmtree, pull.dir, True)
            del self.pulls[pull_id]
        return pull

    async def verify(self, pull_id: str) -> dict[str, Any]:
        """Re-read the target volume of a finished pull and compare it with what was written."""
        pull = self.get(pull_id)
        if pull.state != PullState.SUCCEEDED:
            raise Conflict(f"pull {pull_id!r} is {pull.state}; only a finished pull is verified")
        mountpoint = await self._target_mountpoint(pull)

        def run() -> dict[str, Any]:
            db = ContentDB(pull.dir / "content.db")
            try:
                return verify_volume(mountpoint, db).to_json()
            finally:
                db.close()

        pull.verification = await asyncio.to_thread(run)
        return pull.verification

    def _spawn(self, pull: Pull) -> None:
        task = asyncio.get_running_loop().create_task(self._run(pull), name=f"pull-{pull.spec.id}")
        self.tasks[pull.spec.id] = task
        pull_id = pull.spec.id

        def forget(_task: asyncio.Task[None]) -> None:
            if self.tasks.get(pull_id) is _task:
                del self.tasks[pull_id]

        task.add_done_callback(forget)

    # -- the runner -----------------------------------------------------------------------

    async def _run(self, pull: Pull) -> None:
        try:
            await self._transfer(pull)
            pull.state = PullState.SUCCEEDED
        except asyncio.CancelledError:
            if not pull.cancel_requested:  # the agent is shutting down: resume on restart
                _close_extractor(pull)
                raise
            pull.state = PullState.CANCELLED
            pull.error = {"code": "cancelled", "message": "the pull was cancelled"}
        except PullFailed as e:
            log.warning("pull %s failed: %s: %s", pull.spec.id, e.code, e.message)
            pull.state = PullState.FAILED
            pull.error = {"code": e.code, "message": e.message}
        except Exception as e:
            log.exception("pull %s failed unexpectedly", pull.spec.id)
            pull.state = PullState.FAILED
            pull.error = {"code": "internal_error", "message": f"{type(e).__name__}: {e}"}
        pull.finished_at = time.time()
        _close_extractor(pull)
        await asyncio.to_thread(pull.save)

    async def _transfer(self, pull: Pull) -> None:
        j = pull.journal
        replan: str | None = None
        fresh = j.pass_no == 1 and j.stream_id is None and not pull.created_volume
        if fresh and await asyncio.to_thread(self.volumes.exists, pull.spec.volume):
            if pull.spec.if_target_exists == "fail":
                raise PullFailed(
                    "target_exists", f"target volume {pull.spec.volume!r} already exists"
                )
            replan = "the target exists: syncing it"
        retries = 0
        while True:
            offset_before = pull.journal.offset
            try:
                if replan is not None:
                    await self._next_pass(pull, reason=replan)
                    replan = None
                trailer = await self._connect_once(pull)
            except Retryable as e:
                if pull.journal.offset > offset_before:
                    retries = 0  # progress was made: the budget is for a stuck transfer
                retries += 1
                if retries > self.retry.retries:
                    raise PullFailed(
                        e.code, f"{e.message} (gave up after {self.retry.retries} retries)"
                    ) from e
                delay = self.retry.delay(retries)
                log.info(
                    "pull %s: %s; reconnecting from %d in %.1fs",
                    pull.spec.id,
                    e.message,
                    pull.journal.offset,
                    delay,
                )
                pull.reconnects += 1
                pull.phase = "reconnecting"
                await asyncio.sleep(delay)
                continue
            except SourceChanged:
                replan = "the source changed between attempts"
                continue
            unsettled = trailer.get("changed") or trailer.get("dirty_count")
            if unsettled and not pull.spec.accept_dirty:
                replan = "files changed while they were read"
                continue
            pull.result = {
                "stream_id": pull.journal.stream_id,
                "transfer_digest": pull.passes[-1]["transfer_digest"] if pull.passes else None,
                "bytes": sum(p["bytes"] for p in pull.passes),
                "files": trailer.get("files"),
                "passes": len(pull.passes),
            }
            return

    async def _next_pass(self, pull: Pull, *, reason: str) -> None:
        if pull.journal.frozen:
            # Reported as read: the source's containers may be running again, and another
            # pass would copy a live volume.
            raise PullFailed(
                "transfer_failed", f"the frozen pass cannot be followed by another ({reason})"
            )
        if pull.journal.pass_no >= MAX_PASSES:
            raise PullFailed(
                "source_unstable",
                f"the source kept changing for {MAX_PASSES} passes; quiesce it and retry",
            )
        log.info("pull %s: incremental pass %d: %s", pull.spec.id, pull.journal.pass_no + 1, reason)
        _close_extractor(pull)
        previous = pull.journal
        pull.phase = "planning"
        mountpoint = await self._target_mountpoint(pull)
        manifest_url = f"{pull.spec.source_url}/v1/volumes/{pull.spec.source_volume}/manifest"
        try:
            selected = await plan_incremental_pass(
                self._http(),
                manifest_url,
                pull.spec.token,
                mountpoint,
                pull.dir / "selection",
                window_start_ns=previous.source_now_ns,
                on_delete=pull.content.forget,
                on_rename=pull.content.rename,
                bases=(bases := Bases(self.bases, pull.spec.volume, keep=pull.spec.keep_bases)),
            )
        except PlanError as e:
            if e.code == "transfer_failed":
                raise Retryable(e.code, e.message) from e
            raise PullFailed(e.code, e.message) from e
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
            raise Retryable("transfer_failed", f"fetching the source manifest: {e}") from e
        log.info("pull %s: pass %d re-sends %d paths", pull.spec.id, previous.pass_no + 1, selected)
        pull.journal = Journal(
            pass_no=previous.pass_no + 1,
            incremental=True,
            previous_pass_start_ns=previous.source_now_ns,
            bases_kept=bases.cached,
            bases_read=bases.described,
        )
        await asyncio.to_thread(self._reset_pass_files, pull)

    def _reset_pass_files(self, pull: Pull) -> None:
        with contextlib.suppress(FileNotFoundError):
            (pull.dir / "digests.bin").unlink()
        shutil.rmtree(pull.dir / "extract", ignore_errors=True)
        pull.save_journal()

    def _http(self) -> aiohttp.ClientSession:
        assert self._session is not None, "PullManager.open() was not awaited"
        return self._session

    async def _target_mountpoint(self, pull: Pull) -> str:
        info = await asyncio.to_thread(self.volumes.inspect, pull.spec.volume)
        reason = unreadable_reason(info.driver, info.options)
        if reason is not None:
            raise PullFailed("volume_not_readable", f"target volume {info.name!r}: {reason}")
        return info.mountpoint

    async def _connect_once(self, pull: Pull) -> dict[str, Any]:
        spec, j = pull.spec, pull.journal
        params: dict[str, str] = {
            "offset": str(j.offset),
            "chunk_size": str(j.chunk_size or spec.chunk_size),
            "compression": spec.compression,
        }
        if j.stream_id is not None:
            params["stream_id"] = j.stream_id
        if spec.max_rate_bytes_per_s is not None:
            params["max_rate_bytes_per_s"] = str(spec.max_rate_bytes_per_s)
        if spec.freeze:
            params["freeze"] = "1"
        url = f"{spec.source_url}/v1/volumes/{spec.source_volume}/stream"
        headers = {"Authorization": f"Transfer {spec.token}"}
        pull.phase = "connecting"
        try:
            if j.incremental:
                selection = await asyncio.to_thread((pull.dir / "selection").read_bytes)
                request = self._http().post(url, params=params, headers=headers, data=selection)
            else:
                request = self._http().get(url, params=params, headers=headers)
            async with request as resp:
                if resp.status != 200:
                    await self._refused(resp)
                return await self._consume(pull, resp)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
            code = "agent_unreachable" if pull.raw_bytes_received == 0 else "transfer_failed"
            raise Retryable(
                code, f"connection to the source failed: {type(e).__name__}: {e}"
            ) from e

    async def _refused(self, resp: aiohttp.ClientResponse) -> None:
        problem = _problem(await resp.read())
        code = str(problem.get("code") or f"http_{resp.status}")
        detail = str(problem.get("detail") or resp.reason)
        if code == "stream_changed":
            raise SourceChanged(detail)
        if resp.status >= 500:
            raise Retryable(
                "source_unavailable" if resp.status == 503 else "transfer_failed",
                f"source answered {resp.status}: {detail}",
            )
        if code == "volume_not_found":
            code = "source_volume_not_found"
        raise PullFailed(code, f"source refused the stream: {detail}")

    async def _consume(self, pull: Pull, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        """Read, verify and apply one response's frames, as a pipeline: this task reads and
        verifies frame N+1 while a writer task applies frame N in a worker thread. Frames
        verified before a failure are still applied and committed before it is raised."""
        handed: asyncio.Queue[frames.Frame | None] = asyncio.Queue(maxsize=PIPELINE_FRAMES)
        writer = asyncio.create_task(self._write_frames(pull, handed))
        try:
            return await self._read_frames(pull, resp, handed, writer)
        except Exception:
            await _end_writer(handed, writer)  # its own failure, if any, is the one raised
            raise
        finally:
            if not writer.done():
                writer.cancel()
            await asyncio.wait({writer})
            if not writer.cancelled():
                writer.exception()  # retrieved: raised above or superseded

    async def _read_frames(
        self,
        pull: Pull,
        resp: aiohttp.ClientResponse,
        handed: asyncio.Queue[frames.Frame | None],
        writer: asyncio.Task[None],
    ) -> dict[str, Any]:
        j = pull.journal
        decoder = frames.FrameDecoder(expect_offset=j.offset, expect_stream_id=j.stream_id)
        body = resp.content
        while True:
            try:
                head_bytes = await body.readexactly(frames.HEADER_SIZE)
                with _frame_errors():
                    head = decoder.read_header(head_bytes)
                payload = await body.readexactly(head.payload_length)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise Retryable("transfer_failed", "the stream ended inside a frame") from e
                with _frame_errors():
                    decoder.finish()
                raise Retryable("transfer_failed", "stream ended without a trailer") from e
            with _frame_errors():
                if head.kind is frames.FrameKind.DATA:  # up to 8 MiB to hash, maybe inflate
                    frame = await asyncio.to_thread(decoder.read_frame, head, payload)
                else:
                    frame = decoder.read_frame(head, payload)
            del payload
            if frame.kind is frames.FrameKind.DATA:
                await _hand_over(handed, frame, writer)
            elif frame.kind is frames.FrameKind.HELLO:
                await self._on_hello(pull, frame.json or {})
            elif frame.kind is frames.FrameKind.TRAILER:
                await _end_writer(handed, writer)
                await self._finish_pass(pull, frame.json or {})
                return frame.json or {}
            else:
                await _end_writer(handed, writer)
                err = frame.json or {}
                raise Retryable(
                    str(err.get("code", "transfer_failed")),
                    f"the source failed mid-stream: {err.get('message')}",
                )

    async def _write_frames(self, pull: Pull, handed: asyncio.Queue[frames.Frame | None]) -> None:
        j = pull.journal
        started = time.monotonic()
        done_at_start = j.offset
        while (frame := await handed.get()) is not None:
            applying = asyncio.ensure_future(asyncio.to_thread(self._apply, pull, frame))
            try:
                await asyncio.shield(applying)
            except asyncio.CancelledError:
                # The frame is being written in a thread: let it end before anyone closes the
                # extractor under it.
                await asyncio.wait({applying})
                raise
            elapsed = max(time.monotonic() - started, 1e-6)
            pull.progress.rate_bytes_per_s = (j.offset - done_at_start) / elapsed

    async def _on_hello(self, pull: Pull, hello: dict[str, Any]) -> None:
        j = pull.journal
        first = j.stream_id is None
        if first:
            j.stream_id = str(hello["stream_id"])
            j.chunk_size = int(hello["chunk_size"])
            j.total_size = hello.get("total_size")
            now = hello.get("source_now_ns")
            j.source_now_ns = int(now) if isinstance(now, int) else None
            j.frozen = hello.get("frozen") is True
        elif j.frozen and hello.get("frozen") is not True:
            # Its containers may be running again: the volume is no longer what was frozen.
            raise PullFailed(
                "transfer_failed", "the source no longer has the frozen copy of this pass"
            )
        if j.pass_no == 1 and first:
            await self._ensure_volume(pull, hello.get("volume") or {})
        mountpoint = await self._target_mountpoint(pull)
        totals = hello.get("totals") or {}
        pull.progress.bytes_total = int(j.total_size or 0)
        pull.progress.files_total = int(totals.get("files") or 0)
        pull.phase = "transferring"
        if pull.extractor is None or pull.extractor.offset != j.offset:
            _close_extractor(pull)
            pull.extractor = await asyncio.to_thread(self._open_extractor, pull, mountpoint)
        if first:
            await asyncio.to_thread(pull.save_journal)

    def _open_extractor(self, pull: Pull, mountpoint: str) -> Extractor:
        j = pull.journal
        state = pull.dir / "extract"
        digests = pull.dir / "digests.bin"
        if j.checkpoint is None:
            with contextlib.suppress(FileNotFoundError):
                digests.unlink()
            return Extractor(
                mountpoint,
                state,
                allow_devices=self.allow_devices,
                allow_existing_links=j.incremental,
                on_large_file=self._base_keeper(pull),
            )
        # Frames past the journal were never committed: drop their digests.
        with open(digests, "ab") as f:
            f.truncate(j.frames * 32)
        return Extractor.resume(
            mountpoint,
            state,
            j.checkpoint,
            allow_devices=self.allow_devices,
            allow_existing_links=j.incremental,
            on_large_file=self._base_keeper(pull),
        )

    def _base_keeper(self, pull: Pull) -> Callable[[Header, int], None] | None:
        """With `keep_bases`: what the extractor calls for each large file it has written, to
        keep the file's base for the next pass. A patched file's base is the one its patch
        was made against with the blocks the patch touched read again; any other file is
        read back whole (it is still in the page cache)."""
        if not pull.spec.keep_bases:
            return None
        volume, cache = pull.spec.volume, self.bases

        def keep(h: Header, fd: int) -> None:
            try:
                st = os.fstat(fd)
                if st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
                    return
                block = block_size_for(st.st_size)
                old = cache.last(volume, h.path) if h.patch_digest is not None else None
                if old is not None and old.block_size == block:
                    base = patched(fd, old, h.runs, st.st_size)
                else:
                    base = describe(fd, st.st_size, block)
                cache.put(volume, h.path, st, base)
            except OSError as e:  # only a shortcut: the next pass reads the file instead
                log.debug("not keeping the base of %r: %s", h.path, e)

        return keep

    async def _ensure_volume(self, pull: Pull, source: dict[str, Any]) -> None:
        spec = pull.spec
        if pull.created_volume or await asyncio.to_thread(self.volumes.exists, spec.volume):
            return
        driver = spec.driver or str(source.get("driver") or "local")
        options = (
            dict(source.get("options") or {}) if spec.driver_opts is None else spec.driver_opts
        )
        if spec.driver is None and spec.driver_opts is None:
            reason = shared_storage_reason(driver, options)
            if reason is not None:
                raise PullFailed(
                    "shared_storage",
                    f"source volume options point at shared storage ({reason}); give the "
                    "target its own driver/driver_opts",
                )
        labels = dict(source.get("labels") or {}) if spec.labels is None else spec.labels
        try:
            await asyncio.to_thread(self.volumes.create, spec.volume, driver, options, labels)
        except AgentError as e:
            raise PullFailed(e.code, f"creating target volume {spec.volume!r}: {e.detail}") from e
        pull.created_volume = True
        await asyncio.to_thread(pull.save)

    def _apply(self, pull: Pull, frame: frames.Frame) -> None:
        """Blocking: extract one verified frame, make it durable, journal the new offset."""
        extractor = pull.extractor
        assert extractor is not None
        j = pull.journal
        try:
            extractor.feed(frame.raw)
            # Digests before the commit: after a crash, files finished past the journaled
            # checkpoint are reported again, so no digest can be lost between the two.
            pull.content.record(extractor.drain_digests())
            checkpoint = extractor.checkpoint()
            # The frame's digest and the new journal are written first, and one sync makes
            # them durable with the volume's data; the journal's rename comes after it, so it
            # never names data that is not on disk (if the rename itself is lost in a crash,
            # the pull resumes from the frame before: digests.bin is cut to the journal).
            with open(pull.dir / "digests.bin", "ab") as f:
                f.write(frame.sha256)
            after = replace(j, offset=frame.end_offset, frames=j.frames + 1, checkpoint=checkpoint)
            staged = pull.stage_journal(after)
            extractor.sync()
            os.replace(staged, pull.dir / "journal.json")
            j.offset, j.frames, j.checkpoint = after.offset, after.frames, after.checkpoint
        except WriteFailed as e:
            if isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC:
                raise PullFailed("target_no_space", f"the target volume is full: {e.detail}") from e
            raise PullFailed(e.code, e.detail) from e
        except ExtractError as e:
            raise PullFailed(e.code, f"refused by the target: {e.detail}") from e
        pull.raw_bytes_received += len(frame.raw)
        pull.progress.bytes_done = j.offset
        pull.progress.files_done = int(checkpoint.get("progress", {}).get("files_done", 0))

    async def _finish_pass(self, pull: Pull, trailer: dict[str, Any]) -> None:
        extractor = pull.extractor
        assert extractor is not None
        pull.phase = "finishing"
        try:
            summary = await asyncio.to_thread(extractor.finish)
        except ExtractError as e:
            raise PullFailed(e.code, e.detail) from e
        digest = await asyncio.to_thread(_composite_from_file, pull.dir / "digests.bin")
        pull.passes.append(
            {
                "pass": pull.journal.pass_no,
                "incremental": pull.journal.incremental,
                "bytes": pull.journal.offset,
                "files": summary.get("files_done"),
                "transfer_digest": digest,
                "dirty": trailer.get("dirty_count", 0),
                "changed": bool(trailer.get("changed")),
                "bases_kept": pull.journal.bases_kept,
                "bases_read": pull.journal.bases_read,
            }
        )
        _close_extractor(pull)
        await asyncio.to_thread(pull.save)


@contextlib.contextmanager
def _frame_errors() -> Iterator[None]:
    """Damage in transit (checksum, header CRC, truncation) is retried from the committed
    offset; anything else the decoder refuses is a protocol violation and final."""
    try:
        yield
    except frames.FrameError as e:
        if e.retryable:
            raise Retryable("transfer_failed", f"frame rejected: {e}") from e
        raise PullFailed(e.code, f"protocol violation from the source: {e}") from e


async def _hand_over(
    handed: asyncio.Queue[frames.Frame | None],
    frame: frames.Frame | None,
    writer: asyncio.Task[None],
) -> None:
    """Queue `frame` for the writer, waiting for room; raise the writer's error if it ended."""
    put = asyncio.ensure_future(handed.put(frame))
    await asyncio.wait({put, writer}, return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
        writer.result()
        raise RuntimeError("the frame writer ended early")


async def _end_writer(
    handed: asyncio.Queue[frames.Frame | None], writer: asyncio.Task[None]
) -> None:
    """Let the writer apply every frame already handed over, then end; raise its error."""
    if not writer.done():
        await _hand_over(handed, None, writer)
        await asyncio.wait({writer})
    writer.result()


def _composite_from_file(path: Path) -> str:
    data = path.read_bytes() if path.exists() else b""
    return frames.composite_digest(data[i : i + 32] for i in range(0, len(data), 32))


def _close_extractor(pull: Pull) -> None:
    if pull.extractor is not None:
        with contextlib.suppress(Exception):
            pull.extractor.close()
        pull.extractor = None
    if pull.content_db is not None:
        pull.content_db.close()
        pull.content_db = None
