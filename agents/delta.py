"""Block deltas: an incremental pass sends only the blocks of a large file that differ.

A database rewrites a few pages of a large file all the time, so in a live copy the same large
files change in every pass, and re-sending them whole keeps every pass (and the final one,
during the downtime) as long as the first. Instead, when an incremental pass selects a large
regular file that the target already has, the target describes its copy: a block size and the
BLAKE3 of each block, cut to 16 bytes (a `Base`; BLAKE3 hashes 8 KiB blocks at 1.8x the speed
of SHA-256 here, and the comparison of a database's changed files is most of a quiesced final
pass, while its containers are stopped). The source reads its file, compares block
by block, and streams a *patch*: the runs of blocks that differ (a block past the end of the
target's copy always differs), the file's size, and the digest of its whole content block by
block (`blocks_digest`). The target writes the runs into its copy in place, truncates it to the
size, and records the source's digest as the file's, so verification checks the patched file
end to end against the bytes the source read.

Blocking (reads and hashing); run it off the event loop. Memory: one block at a time, plus the
digests (16 bytes a block, at most `MAX_BLOCKS` blocks a file).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

from blake3 import blake3

log = logging.getLogger("migrator_agent.delta")
T = TypeVar("T")

# Smaller files are sent whole: a few reads and a header cost more than the patch saves.
MIN_DELTA_SIZE = 1 << 20
MIN_BLOCK_SIZE = 8 << 10
"""A database page: the unit in which PostgreSQL (8 KiB) and most engines rewrite files."""
MAX_BLOCK_SIZE = 64 << 20
TARGET_BLOCKS = 1 << 17
"""Blocks a file is cut into at most, before the block size grows (2 MiB of digests): a
database file of up to 1 GiB (PostgreSQL's segment size) is compared page by page."""
MAX_BLOCKS = 1 << 20
"""The most digests a source accepts for one file (16 MiB of them)."""
DIGEST_SIZE = 16
BLOCK_HASH = "blake3-128"
"""How a base's digests are made; a base made another way (an agent of another version) is
not compared (`ForeignBase`): the file is sent whole."""
MAX_SOURCES_NOTED = 1 << 16
"""Large files whose source inode a BaseCache remembers (~150 bytes each: ~10 MB at most)."""
READ_SIZE = 1 << 20


class BaseError(ValueError):
    """A base that does not describe a file (in a request body: 400)."""


class ForeignBase(BaseError):
    """A base whose digests were made another way (an agent of another version): not
    comparable, so the file is sent whole instead."""


@dataclass(frozen=True, slots=True)
class Base:
    """The target's copy of one file, block by block."""

    block_size: int
    digests: bytes
    """BLAKE3 of each block (the last may be short), DIGEST_SIZE bytes, concatenated."""

    @property
    def blocks(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def digest(self, index: int) -> bytes:
        return self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": BLOCK_HASH,
            "block_size": self.block_size,
            "digests": base64.b64encode(self.digests).decode("ascii"),
        }

    @classmethod
    def from_json(cls, doc: object) -> Base:
        if not isinstance(doc, dict):
            raise BaseError("base: not an object")
        size, digests = doc.get("block_size"), doc.get("digests")
        if not isinstance(size, int) or isinstance(size, bool):
            raise BaseError("base: block_size must be an integer")
        if not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE:
            raise BaseError(f"base: block_size {size} outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
        if not isinstance(digests, str):
            raise BaseError("base: digests must be a base64 string")
        try:
            raw = base64.b64decode(digests, validate=True)
        except ValueError as e:
            raise BaseError(f"base: digests are not base64: {e}") from e
        if len(raw) % DIGEST_SIZE or len(raw) // DIGEST_SIZE > MAX_BLOCKS:
            raise BaseError(f"base: digests must be at most {MAX_BLOCKS} x {DIGEST_SIZE} bytes")
        if doc.get("hash") != BLOCK_HASH:  # checked last: a malformed base is still an error
            raise ForeignBase(f"base: hash {doc.get('hash')!r}, not {BLOCK_HASH!r}")
        return cls(size, raw)


@dataclass(frozen=True, slots=True)
class Patch:
    """What a stream carries for a file it patches (see the module docstring)."""

    runs: tuple[tuple[int, int], ...]
    """(offset, length) of the differing bytes, in order, within the file's size."""
    digest: str
    """Of the file's whole content as the source read it, block by block (`blocks_digest`)."""

    @property
    def data_size(self) -> int:
        return sum(length for _, length in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {"runs": [list(run) for run in self.runs], "digest": self.digest}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Patch:
        return cls(tuple((int(o), int(n)) for o, n in doc["runs"]), str(doc["digest"]))


def block_size_for(size: int) -> int:
    """The block size a file of `size` bytes is compared in: a page, or larger for a file of
    more than TARGET_BLOCKS pages (a power of two)."""
    block = MIN_BLOCK_SIZE
    while block < MAX_BLOCK_SIZE and block * TARGET_BLOCKS < size:
        block *= 2
    return block


def worth_a_patch(source_size: int, target_size: int) -> bool:
    return source_size >= MIN_DELTA_SIZE and target_size >= MIN_DELTA_SIZE


def _read_blocks(fd: int, start: int, end: int, block_size: int) -> Iterator[memoryview]:
    """Yield the blocks of bytes [start, end) (the last one short), reading about READ_SIZE at
    a time; stops early at the end of the file."""
    per_read = max(1, READ_SIZE // block_size) * block_size
    offset = start
    while offset < end:
        data = os.pread(fd, min(per_read, end - offset), offset)
        if not data:
            return
        view = memoryview(data)
        for at in range(0, len(view), block_size):
            yield view[at : at + block_size]
        offset += len(data)


def _digests(fd: int, start: int, end: int, block_size: int) -> bytes:
    return b"".join(blake3(b).digest(DIGEST_SIZE) for b in _read_blocks(fd, start, end, block_size))


def _halves(size: int, block_size: int) -> list[tuple[int, int]]:
    """Two block-aligned halves of [0, size)."""
    middle = (size // 2) // block_size * block_size
    return [(0, middle), (middle, size)] if middle else [(0, size)]


def _by_halves(fd: int, size: int, block_size: int, work: Callable[..., T], *args: Any) -> list[T]:
    """`work(fd, start, end, *args)` over the two halves of an open file: for a large file in
    two worker processes (`_workers`; in two threads of one process, the GIL taken back after
    every 8 KiB block made them slower than one thread), else here. The workers reopen the
    very file the fd is, not its path (which may have changed)."""
    parts = _halves(size, block_size)
    if len(parts) > 1 and size >= PROCESS_MIN_SIZE:
        path = f"/proc/{os.getpid()}/fd/{fd}"
        try:
            futures = [_workers().submit(_on_path, work, path, s, e, *args) for s, e in parts]
            return [future.result() for future in futures]
        except BrokenProcessPool as e:  # a worker died (or could not start): do it here
            log.warning("hashing workers failed, hashing in the agent: %s", e)
            _reset_workers()
    return [work(fd, start, end, *args) for start, end in parts]


def _on_path(work: Callable[..., T], path: str, start: int, end: int, *args: Any) -> T:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return work(fd, start, end, *args)
    finally:
        os.close(fd)


def describe(fd: int, size: int, block_size: int | None = None) -> Base:
    """The target side: the base of the first `size` bytes of an open file."""
    block = block_size or block_size_for(size)
    return Base(block, b"".join(_by_halves(fd, size, block, _digests, block)))


BLOCKS_DIGEST_RE = re.compile(r"blocks-(blake3|sha256):([0-9]{4,9}):([0-9a-f]{64})")
_BLOCK_HASHES: dict[str, Callable[..., Any]] = {"blake3": blake3, "sha256": hashlib.sha256}
"""A blocks digest's hash: BLAKE3 now; SHA-256 in patches of sources of earlier versions,
still verified (a target may meet one in a migration that spans an upgrade)."""


def blocks_digest(block_size: int, digests: Iterable[bytes], algorithm: str = "blake3") -> str:
    """A file's content digest block by block: the hash (BLAKE3; SHA-256 for the legacy form)
    of the full digest of each of its `block_size` blocks (the last one short), written
    `blocks-<algorithm>:<block size>:<hex>`.
    A collision-resistant digest of the whole content, computed from the block digests a
    comparison takes anyway, so a patch costs the source one hash of each byte instead of
    two."""
    whole = _BLOCK_HASHES[algorithm]()
    for digest in digests:
        whole.update(digest)
    return f"blocks-{algorithm}:{block_size}:{whole.hexdigest()}"


def block_digest(data: bytes | memoryview, algorithm: str = "blake3") -> bytes:
    """The full (32-byte) digest of one block, as `blocks_digest` takes them; a base keeps
    the first DIGEST_SIZE bytes of BLAKE3's."""
    digest: bytes = _BLOCK_HASHES[algorithm](data).digest()
    return digest


def parse_blocks_digest(value: str) -> tuple[str, int] | None:
    """The algorithm and block size of a `blocks_digest` value, or None if it is not one."""
    match = BLOCKS_DIGEST_RE.fullmatch(value)
    if match is None:
        return None
    block = int(match.group(2))
    return (match.group(1), block) if MIN_BLOCK_SIZE <= block <= MAX_BLOCK_SIZE else None


def diff(fd: int, size: int, base: Base) -> Patch:
    """The source side: read `size` bytes of an open file, compare them with `base`, and
    return the runs that differ and the file's `blocks_digest`. Bytes missing at the end (the
    file shrank since it was listed) are sent as zeros; the stream reports the file dirty.
    Both halves are compared at once (`_by_halves`)."""
    results = _by_halves(fd, size, base.block_size, _compare, base)
    runs: list[tuple[int, int]] = []
    for part_runs, _ in results:
        for offset, length in part_runs:
            _add_run(runs, offset, length)
    digests = b"".join(part for _, part in results)
    return Patch(tuple(runs), blocks_digest(base.block_size, [digests]))


PROCESS_MIN_SIZE = 4 << 20
_WORKERS: ProcessPoolExecutor | None = None
_WORKERS_LOCK = threading.Lock()


def _workers() -> ProcessPoolExecutor:
    """Two processes for comparisons, started on first use (spawned: this process has threads,
    a fork could copy a lock another thread holds) and kept for the agent's lifetime."""
    global _WORKERS
    with _WORKERS_LOCK:
        if _WORKERS is None:
            _WORKERS = ProcessPoolExecutor(
                2,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
        return _WORKERS


def _reset_workers() -> None:
    global _WORKERS
    with _WORKERS_LOCK:
        if _WORKERS is not None:
            _WORKERS.shutdown(wait=False, cancel_futures=True)
            _WORKERS = None


def _exit_with_parent(parent: int) -> None:
    """In a worker: end when the agent is gone (killed, it cannot tell its workers)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _compare(fd: int, start: int, end: int, base: Base) -> tuple[list[tuple[int, int]], bytes]:
    """Runs that differ from `base` in bytes [start, end), and the full digest of each block,
    concatenated."""
    hash_block = blake3
    block = base.block_size
    runs: list[tuple[int, int]] = []
    digests: list[bytes] = []
    append = digests.append
    theirs = base.digests  # one slice per block to compare: no call per block
    have = len(theirs)
    per_read = max(1, READ_SIZE // block) * block
    offset, short = start, False
    while offset < end:
        want = min(per_read, end - offset)
        data = b"" if short else os.pread(fd, want, offset)
        if len(data) < want:  # shorter than listed: the rest is sent, as zeros
            short = True
            data += bytes(want - len(data))
        view = memoryview(data)
        at16 = offset // block * DIGEST_SIZE
        for at in range(0, want, block):
            digest = hash_block(view[at : at + block]).digest()
            append(digest)
            if short or at16 >= have or digest[:DIGEST_SIZE] != theirs[at16 : at16 + DIGEST_SIZE]:
                _add_run(runs, offset + at, min(block, want - at))
            at16 += DIGEST_SIZE
        offset += want
    return runs, b"".join(digests)


def _add_run(runs: list[tuple[int, int]], offset: int, length: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == offset:
        runs[-1] = (runs[-1][0], runs[-1][1] + length)
    else:
        runs.append((offset, length))


def patched(fd: int, base: Base, runs: tuple[tuple[int, int], ...], size: int) -> Base:
    """The base of a file after a patch with `runs` was written over the copy `base`
    describes and the file was cut to `size`: only the blocks the runs touched are read again."""
    block = base.block_size
    count = -(-size // block)
    digests = bytearray(base.digests[: count * DIGEST_SIZE])
    if len(digests) < count * DIGEST_SIZE:  # grown: the new blocks are in the runs
        digests.extend(bytes(count * DIGEST_SIZE - len(digests)))
    if base.blocks > count or (base.blocks == count and size % block):
        touched = [(count - 1) * block]  # the (new) last block may have been cut short
    else:
        touched = []
    for offset, length in runs:
        touched.extend(range(offset // block * block, offset + length, block))
    for start in sorted(set(touched)):
        index = start // block
        if index >= count:
            continue
        data = _digests(fd, start, min(start + block, size), block)
        digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = data[:DIGEST_SIZE]
    return Base(block, bytes(digests))


SourceKey = tuple[int, int, int]
"""A source file as a manifest lists it: inode, size, mtime (nanoseconds)."""


def source_key(entry: Any) -> SourceKey:
    return (entry.ino, entry.size, entry.mtime_ns)


FileKey = tuple[int, int, int, int, int]
"""What must not have changed for a kept base to describe a file: device, inode, size, mtime
and ctime (nanoseconds). Any write, truncate, chmod, rename or new link changes the ctime."""


def file_key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class BaseCache:
    """Bases of the target's large files, kept from one pass into a volume to the next.

    In a pre-copy migration the same large files are patched in every pass, and the next pass
    would describe them again: reading and hashing every byte of them, ~1 s a GB, in the final
    pass during the downtime. A pass that keeps bases records each large file it writes (a
    patched one from its old base and the blocks the patch touched, a new one by reading it back
    while it is in the page cache); the next pass takes a base from here when the file's
    `FileKey` is unchanged, and describes it otherwise. Thread-safe; bounded in memory (a base
    is at most 2 MiB of digests per GiB, TARGET_BLOCKS x 16 bytes for larger files)."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._bases: dict[tuple[str, bytes], tuple[FileKey, Base]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._sources: dict[tuple[str, bytes], SourceKey] = {}
        """Which source file each large file's copy was planned against, as of the last plan
        of a pass that keeps bases (a renamed file is recognised by its inode)."""

    def note_source(self, volume: str, path: bytes, key: SourceKey) -> None:
        with self._lock:
            if len(self._sources) < MAX_SOURCES_NOTED or (volume, path) in self._sources:
                self._sources[(volume, path)] = key

    def source_of(self, volume: str, path: bytes) -> SourceKey | None:
        with self._lock:
            return self._sources.get((volume, path))

    def get(self, volume: str, path: bytes, st: os.stat_result, block_size: int) -> Base | None:
        with self._lock:
            kept = self._bases.get((volume, path))
        if kept is None or kept[0] != file_key(st) or kept[1].block_size != block_size:
            return None
        return kept[1]

    def last(self, volume: str, path: bytes) -> Base | None:
        """The base kept for a path, whatever happened to the file since."""
        with self._lock:
            kept = self._bases.get((volume, path))
        return None if kept is None else kept[1]

    def put(self, volume: str, path: bytes, st: os.stat_result, base: Base) -> None:
        with self._lock:
            self._drop((volume, path))
            if self._bytes + len(base.digests) > self.max_bytes:
                return
            self._bases[(volume, path)] = (file_key(st), base)
            self._bytes += len(base.digests)

    def moved(
        self, volume: str, old: bytes, new: bytes, before: os.stat_result, after: os.stat_result
    ) -> None:
        """`old` was renamed to `new`: its base follows if it still described the file."""
        with self._lock:
            kept = self._bases.get((volume, old))
            self._drop((volume, old))
            self._drop((volume, new))
            if kept is not None and kept[0] == file_key(before):
                self._bases[(volume, new)] = (file_key(after), kept[1])
                self._bytes += len(kept[1].digests)

    def forget(self, volume: str) -> None:
        with self._lock:
            for key in [k for k in self._bases if k[0] == volume]:
                self._drop(key)
            for key in [k for k in self._sources if k[0] == volume]:
                del self._sources[key]

    def _drop(self, key: tuple[str, bytes]) -> None:
        kept = self._bases.pop(key, None)
        if kept is not None:
            self._bytes -= len(kept[1].digests)
