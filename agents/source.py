"""The source side of a transfer: naming a volume's stream and producing its frames.

Owns the stream identity (`stream_id`: a digest of the manifest, so any change of any entry's
change key or metadata names a different stream), the exact stream size, and the producer that
turns the tar generator's bytes into chunk-aligned, hashed, maybe-compressed frames in a worker
thread. Stateless: every request walks the volume again (lstat only), so a source agent that
was killed and restarted serves the same stream from the same offset.

Blocking (file I/O, hashing, compression): run everything here off the event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agents import tarstream
from agents.delta import Base, diff
from agents.frames import FrameEncoder, next_chunk_length
from agents.incremental import select
from agents.manifest import Entry, Totals, walk
from agents.records import SnapshotDamaged, entry_record, read_records, write_end, write_record
from agents.spool import SpoolWriter, sums_path
from agents.tarstream import VolumeFiles

log = logging.getLogger("migrator_agent.source")

STREAM_ID_PREFIX = "m1-"
STREAM_ID_RE = re.compile(r"m1-[0-9a-f]{32}")
# Snapshots kept for resumes: a few concurrent transfers' worth; the oldest go first.
SNAPSHOTS_KEPT = 32
# A few frames in flight between the producer thread and the socket: enough to keep both busy
# (hashing runs at ~1.8 GB/s, loopback at ~1.6 GB/s), bounded so memory stays 3 x chunk size.
QUEUE_FRAMES = 3
# Chunks between the producer thread (reading files, building headers) and the encoder thread
# (hashing, compressing): one being encoded, one waiting.
RAW_QUEUE_CHUNKS = 1
# Dirty paths are listed in the trailer up to this many; beyond it the trailer says so and the
# target treats the pass as changed as a whole.
MAX_DIRTY_LISTED = 10_000
# A frozen stream's data is copied while the source's containers are stopped: worth it for the
# small delta of a pre-copied final pass, not for a whole volume.
FREEZE_MAX_BYTES = 4 << 30
FROZEN_KEPT = 2
SNAPSHOT_SUFFIX = ".snap"


def entry_fingerprint(entry: Entry) -> bytes:
    """Canonical bytes of everything about an entry that a stream depends on (also the record
    a snapshot stores it as, agents/records.py)."""
    return entry_record(entry)


class StreamHasher:
    """Running digest of a manifest in walk order: the stream id, and the stream's size."""

    def __init__(self, selection: list[bytes] | None = None) -> None:
        self._sha = hashlib.sha256(b"volume-migrator manifest v2\n")
        if selection is not None:  # a filtered stream is another stream
            self._sha.update(b"selection %d\n" % len(selection))
            for path in selection:
                self._sha.update(path + b"\0")
        self.size = 0
        self.totals = Totals()

    def add(self, entry: Entry, fingerprint: bytes | None = None) -> None:
        self._sha.update(entry_fingerprint(entry) if fingerprint is None else fingerprint)
        self._sha.update(b"\n")
        self.size += tarstream.entry_span(entry)
        self.totals.add(entry)

    def track(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        for entry in entries:
            self.add(entry)
            yield entry

    @property
    def stream_id(self) -> str:
        return STREAM_ID_PREFIX + self._sha.hexdigest()[:32]

    @property
    def total_size(self) -> int:
        return self.size + len(tarstream.TRAILER)


@dataclass(frozen=True)
class StreamIdentity:
    stream_id: str
    total_size: int
    totals: Totals
    snapshot: Path | None = None
    """The manifest the stream is generated from (binary records, agents/records.py)."""
    spool: Path | None = None
    """A frozen stream's data (`Snapshots.take(freeze=True)`): the stream no longer reads the
    volume."""

    @property
    def frozen(self) -> bool:
        return self.spool is not None

    def entries(self) -> Iterator[Entry]:
        assert self.snapshot is not None
        return read_records(self.snapshot)


def stream_entries(
    root: str | bytes, selection: list[bytes] | None, bases: dict[bytes, Base] | None = None
) -> Iterator[Entry]:
    """The entries a stream carries: the whole walk, or only the selected paths; a selected
    file the target described block by block becomes a patch (agents/delta.py)."""
    entries = walk(root)
    if selection is None:
        return entries
    selected = select(entries, selection)
    return with_patches(root, selected, bases) if bases else selected


def with_patches(
    root: str | bytes, entries: Iterable[Entry], bases: dict[bytes, Base]
) -> Iterator[Entry]:
    """Read each file that has a base and compare it block by block: the entry then carries
    only the runs that differ. Reads happen while the stream is named, so its layout is fixed
    before any byte of it goes out (a file changed after this is reported dirty as usual)."""
    patches = sent = compared = 0
    with VolumeFiles(root) as files:
        for entry in entries:
            base = bases.get(entry.path)
            if base is None or not entry.single_file:
                yield entry
                continue
            fd = files.open(entry.path)
            if fd is None:  # gone since the walk: the stream reports it dirty
                yield entry
                continue
            try:
                patch = diff(fd, entry.size, base)
            finally:
                os.close(fd)
            patches += 1
            sent += patch.data_size
            compared += entry.size
            yield dataclasses.replace(entry, patch=patch)
    if patches:
        log.info(
            "%d block deltas: %d of %d bytes differ (%.0f%%)",
            patches,
            sent,
            compared,
            100 * sent / max(compared, 1),
        )


def identify(root: str | bytes, selection: list[bytes] | None = None) -> StreamIdentity:
    """Walk the volume once (lstat only) and name its stream."""
    hasher = StreamHasher(selection)
    for entry in stream_entries(root, selection):
        hasher.add(entry)
    return StreamIdentity(hasher.stream_id, hasher.total_size, hasher.totals)


class Snapshots:
    """The manifests streams were generated from, kept on disk by stream id.

    A live volume changes between any two walks. The stream's layout (every header, every
    size) therefore comes from one walk, written here as it is taken: the stream is generated
    from the snapshot, so the hello's total size is exact and a resume at any offset meets the
    same bytes, whatever changed since. A file that differs from its snapshot entry when read
    is padded or cut to the recorded size and reported dirty (the next pass sends it again).
    A cache, not transfer state: a lost snapshot only means a resume compares the current
    manifest with the stream id, as without one. Memory stays flat: entries go to and come
    from disk one record at a time.
    """

    def __init__(self, directory: Path, *, keep: int = SNAPSHOTS_KEPT) -> None:
        self.directory = directory
        self.keep = keep

    def path(self, stream_id: str) -> Path:
        return self.directory / f"{stream_id}{SNAPSHOT_SUFFIX}"

    def spool_path(self, stream_id: str) -> Path:
        return self.directory / f"{stream_id}.data"

    def frozen_path(self, stream_id: str) -> Path:
        """Written once the spool is complete: {"data_bytes": N} (not synced, see
        agents/spool.py)."""
        return self.directory / f"{stream_id}.frozen"

    def take(
        self,
        root: str | bytes,
        selection: list[bytes] | None,
        bases: dict[bytes, Base] | None = None,
        *,
        freeze: bool = False,
    ) -> StreamIdentity:
        """Walk the volume, write its manifest, name the stream; with `freeze`, also copy the
        data the stream carries (`_Freezer`), each file as soon as the walk has listed (and
        compared) it, while the walk goes on. Blocking."""
        self.directory.mkdir(parents=True, exist_ok=True)
        hasher = StreamHasher(selection)
        data_bytes = count = 0
        tmp = self.directory / f".walk-{os.getpid()}-{threading.get_ident()}.tmp"
        freezer = _Freezer(root, self.directory) if freeze else None
        try:
            with open(tmp, "wb") as f:
                for entry in stream_entries(root, selection, bases):
                    record = entry_fingerprint(entry)
                    hasher.add(entry, record)
                    write_record(f, record)
                    count += 1
                    if freezer is not None:  # only a frozen stream needs its data's size
                        size = tarstream.data_bytes(entry)
                        data_bytes += size
                        freezer.add(entry, size, data_bytes)
                write_end(f, count)
            final = self.path(hasher.stream_id)
            os.replace(tmp, final)
            self._prune()
            identity = StreamIdentity(hasher.stream_id, hasher.total_size, hasher.totals, final)
            if freezer is None:
                return identity
            return self._frozen(identity, freezer, data_bytes)
        finally:
            tmp.unlink(missing_ok=True)  # a walk that failed; gone once renamed
            if freezer is not None:
                freezer.abort()  # a no-op once `_frozen` kept its copy

    def _frozen(
        self, identity: StreamIdentity, freezer: _Freezer, data_bytes: int
    ) -> StreamIdentity:
        """The stream, frozen if its copy is whole: the volume is free again as soon as this
        returns, so the final pass of a quiesced migration restarts the source's containers
        then, not after the whole delta crossed the network. Not frozen (the stream reads the
        volume as usual) when the data is larger than FREEZE_MAX_BYTES or than half the free
        space here, or when a file changed while it was copied."""
        stream_id = identity.stream_id
        marker, spool = self.frozen_path(stream_id), self.spool_path(stream_id)
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        if not freezer.finish(stream_id, data_bytes):
            return identity
        freezer.keep_as(spool)
        # Not synced, as the copy is not: a marker a crash lost makes the stream unfrozen,
        # which its target refuses (one more attempt), never a stream of wrong bytes.
        marker.write_bytes(json.dumps({"data_bytes": data_bytes}).encode())
        self._prune_spools(keep=stream_id)
        log.info(
            "stream %s frozen: %d bytes of data copied in %.2f s",
            stream_id,
            data_bytes,
            freezer.elapsed,
        )
        return dataclasses.replace(identity, spool=spool)

    def find(self, stream_id: str) -> StreamIdentity | None:
        """The stream a resume names, from its snapshot, or None if it is not kept."""
        if not STREAM_ID_RE.fullmatch(stream_id):
            return None
        path = self.path(stream_id)
        try:
            os.utime(path)  # recently used: kept longest
        except FileNotFoundError:
            return None
        hasher = StreamHasher()
        try:
            for entry in read_records(path):
                hasher.size += tarstream.entry_span(entry)
                hasher.totals.add(entry)
        except SnapshotDamaged as e:
            log.warning("snapshot of stream %s not used: %s", stream_id, e)
            return None
        spool = self.spool_path(stream_id)
        try:
            marker = json.loads(self.frozen_path(stream_id).read_bytes())
            frozen = spool.stat().st_size == marker["data_bytes"]
        except (OSError, ValueError, KeyError, TypeError):
            frozen = False
        return StreamIdentity(
            stream_id, hasher.total_size, hasher.totals, path, spool if frozen else None
        )

    def _prune(self) -> None:
        for legacy in self.directory.glob("*.ndjson"):  # JSON-lines snapshots of old versions
            legacy.unlink(missing_ok=True)
        for temporary in self.directory.glob(".*-*-*.*"):  # a walk or copy of a process gone
            if temporary.name.split("-")[1] != str(os.getpid()):
                temporary.unlink(missing_ok=True)
        kept = sorted(self.directory.glob(f"*{SNAPSHOT_SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for old in kept[: max(0, len(kept) - self.keep)]:
            self.unfreeze(old.name.removesuffix(SNAPSHOT_SUFFIX))
            old.unlink(missing_ok=True)

    def unfreeze(self, stream_id: str) -> None:
        """Drop a frozen stream's copy (when it was found damaged: a resume of the stream then
        gets an unfrozen hello, which its target refuses at once instead of retrying a copy
        that cannot be read)."""
        spool = self.spool_path(stream_id)
        for path in (self.frozen_path(stream_id), spool, sums_path(spool)):
            path.unlink(missing_ok=True)

    def _prune_spools(self, keep: str) -> None:
        """Spools take disk space: only the newest FROZEN_KEPT are kept (an older frozen
        stream is then generated from the volume again, and reports what changed as dirty)."""
        markers = sorted(self.directory.glob("*.frozen"), key=lambda p: p.stat().st_mtime)
        for old in markers[: max(0, len(markers) - FROZEN_KEPT)]:
            stream_id = old.name.removesuffix(".frozen")
            if stream_id != keep:
                self.unfreeze(stream_id)


class _Freezer:
    """Copies a stream's file data to a spool in a thread of its own while the walk lists
    (and compares) the next entries: the entries go to it in stream order through a queue.
    Gives up (nothing kept) as soon as the data passes FREEZE_MAX_BYTES or half the space that
    was free when it started."""

    def __init__(self, root: str | bytes, directory: Path) -> None:
        self._limit = min(FREEZE_MAX_BYTES, shutil.disk_usage(directory).free // 2)
        self._path = directory / f".freeze-{os.getpid()}-{threading.get_ident()}.data"
        self._out = SpoolWriter(self._path)
        # Bounded: a walk far ahead of the copy waits instead of queueing a million entries.
        self._entries: queue.Queue[Entry | None] = queue.Queue(maxsize=4096)
        self._drained = False
        self._started = time.monotonic()
        self.elapsed = 0.0
        self._too_large = False
        self._discard = False  # too large, or the walk failed: entries are taken, not copied
        self._stopped = False
        self._kept = False
        self._dirty: list[bytes] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._copy, args=(root,), name="freeze")
        self._thread.start()

    def add(self, entry: Entry, size: int, data_bytes: int) -> None:
        """Copy `entry`'s `size` bytes of data next; `data_bytes` is the stream's data up to
        it, inclusive."""
        if self._stopped or self._error is not None:  # a failed copy is not fed on
            return
        if data_bytes > self._limit:
            self._too_large = self._discard = True
            self._stop()
        elif size:
            self._entries.put(entry)

    def finish(self, stream_id: str, data_bytes: int) -> bool:
        """Wait for the copy; True if it is whole (its bytes and digests written)."""
        self._stop()
        if self._error is not None:
            raise self._error
        if self._too_large:
            log.info(
                "stream %s not frozen: %d bytes of data, at most %d here",
                stream_id,
                data_bytes,
                self._limit,
            )
            return False
        self._out.close()
        if self._dirty or self._out.size != data_bytes:
            log.info(
                "stream %s not frozen: %d files changed while copied", stream_id, len(self._dirty)
            )
            return False
        self.elapsed = time.monotonic() - self._started
        return True

    def keep_as(self, path: Path) -> None:
        os.replace(sums_path(self._path), sums_path(path))
        os.replace(self._path, path)
        self._kept = True

    def abort(self) -> None:
        """Stop (copying no more of what is queued) and drop the copy unless it was kept."""
        self._discard = True
        self._stop()
        if not self._kept:
            self._out.abort()

    def _stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._entries.put(None)
        self._thread.join()

    def _queued(self) -> Iterator[Entry]:
        """The entries to copy, until the end mark; taken but not copied once discarding."""
        while (entry := self._entries.get()) is not None:
            if not self._discard:
                yield entry
        self._drained = True

    def _copy(self, root: str | bytes) -> None:
        try:
            self._dirty = tarstream.freeze(root, self._queued(), self._out)
        except BaseException as e:  # raised again by `finish`
            self._error = e
        finally:
            if not self._drained:  # the walk must never wait on a queue nobody takes from
                for _ in self._queued():
                    pass


@dataclass
class ProducerResult:
    """What the producer knows once the last data frame is out."""

    end_offset: int = 0
    dirty: list[str] = field(default_factory=list)
    dirty_count: int = 0
    files: int = 0
    changed: bool = False
    """Always false since streams are generated from their snapshot; kept on the wire for
    targets that read it (files that changed are in `dirty`)."""


_DONE = object()


class FrameProducer:
    """Generates the data frames of one response in two worker threads: a producer (reading
    files, building the tar stream, cutting it into chunks) and an encoder (hashing and maybe
    compressing each chunk into a frame).

    `frames()` is consumed from the event loop through `next_frame` (one thread hop per frame);
    `stop()` ends the producer early (the client went away).
    """

    def __init__(
        self,
        root: str,
        identity: StreamIdentity,
        start_offset: int,
        encoder: FrameEncoder,
    ) -> None:
        self.root = root
        self.identity = identity
        self.start_offset = start_offset
        self.encoder = encoder
        self.result = ProducerResult(end_offset=start_offset)
        self.progress = tarstream.StreamProgress()
        self.error: BaseException | None = None
        self._queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_FRAMES)
        self._raw: queue.Queue[object] = queue.Queue(maxsize=RAW_QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-producer", daemon=True)
        self._encoder = threading.Thread(target=self._encode, name="stream-encoder", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._encoder.start()

    def stop(self) -> None:
        self._stop.set()
        # Unblock a producer or an encoder waiting on a full queue...
        for q in (self._raw, self._queue):
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        # ...and an encoder waiting for a chunk the stopped producer will never put.
        with contextlib.suppress(queue.Full):
            self._raw.put_nowait(_DONE)

    def next_frame(self) -> tuple[bytes, bytes] | None:
        """Blocking: the next data frame as (header, payload), or None at the end (see
        `error`)."""
        item = self._queue.get()
        if item is _DONE:
            return None
        assert isinstance(item, tuple)
        return item

    def _put(self, item: object, into: queue.Queue[object] | None = None) -> bool:
        into = self._queue if into is None else into
        while not self._stop.is_set():
            try:
                into.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _on_entry(self, report: tarstream.EntryReport) -> None:
        if report.dirty:
            self.result.dirty_count += 1
            if len(self.result.dirty) < MAX_DIRTY_LISTED:
                self.result.dirty.append(report.entry.path.decode("utf-8", "surrogateescape"))

    def _run(self) -> None:
        """The producer thread: the stream's bytes, cut into chunks for the encoder."""
        try:
            self._produce()
        except BaseException as e:  # handed to the event loop, which sends an error frame
            self.error = e
        finally:
            self._put(_DONE, self._raw)

    def _encode(self) -> None:
        """The encoder thread: hashes (and maybe compresses) each chunk into a frame, in
        order, while the producer reads the next files; both release the GIL for most of it.
        A failure here ends the stream as the producer's would: the event loop sends an
        error frame and stops the producer."""
        try:
            while (item := self._raw.get()) is not _DONE and not self._stop.is_set():
                assert isinstance(item, tuple)
                raw, offset = item
                frame = self.encoder.data_parts(raw, offset)
                self.result.end_offset = offset + len(raw)
                del raw, item
                if not self._put(frame):
                    return  # stopped: nobody reads on
        except BaseException as e:
            self.error = e
        self._put(_DONE)

    def _produce(self) -> None:
        chunk = self.encoder.chunk_size
        offset = self.start_offset
        parts: list[memoryview] = []
        have = 0
        want = next_chunk_length(offset, chunk)
        pieces = tarstream.generate(
            self.root,
            self.identity.entries(),
            self.start_offset,
            on_entry=self._on_entry,
            progress=self.progress,
            hash_files=False,
            spool=self.identity.spool,
        )
        for piece in pieces:
            view = memoryview(piece)
            while view:
                take = min(len(view), want - have)
                parts.append(view[:take])
                have += take
                view = view[take:]
                if have == want:
                    if not self._emit(b"".join(parts), offset):  # the frame's only copy
                        return
                    offset += want
                    parts.clear()
                    have = 0
                    want = next_chunk_length(offset, chunk)
        if parts:
            if not self._emit(b"".join(parts), offset):
                return
            offset += have
        self.result.files = self.progress.files

    def _emit(self, raw: bytes, offset: int) -> bool:
        return self._put((raw, offset), self._raw)

    def trailer(self) -> dict[str, object]:
        r = self.result
        return {
            "frames_digest": self.encoder.digest.value(),
            "dirty": r.dirty,
            "dirty_count": r.dirty_count,
            "dirty_truncated": r.dirty_count > len(r.dirty),
            "changed": r.changed,
            "files": r.files,
            "stream_id": self.identity.stream_id,
        }
