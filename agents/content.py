"""The content manifest of a pull, verification of a target volume against it, and a
disk-backed set of paths for the extractor.

Owns the agent's SQL (SQLite). `<pull dir>/content.db`: for every regular file the pull
wrote, the SHA-256 of its content as extracted. Those bytes were verified frame by frame
against the SHA-256 the source took while reading them, so this is the content as the source
read it; the last pass that wrote a path wins, and paths an incremental pass deleted are
dropped. Verification re-reads the whole target volume independently (never the source),
compares every file with its recorded digest, and computes the tree digest.

`PathIndex` is a set of paths on disk: the extractor looks up the regular files its stream
wrote there (its hard-link check), so its memory does not grow with the file count.

Blocking; callers run it off the event loop. Memory stays flat: the databases are indexed by
path and the volume is walked as a stream.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agents.delta import block_digest, blocks_digest, parse_blocks_digest
from agents.manifest import EntryType, decode_path, walk

if TYPE_CHECKING:  # the extractor imports this module: no import back at run time
    from agents.extract import FileDigest

MAX_MISMATCHES = 100
READ_SIZE = 1 << 20


class ContentDB:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, sha256 TEXT, size INTEGER)"
        )

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One explicit transaction. The connection is in autocommit mode, where `with conn:`
        opens none: every statement was its own commit and fdatasync (113 us a file, half of
        a 100k-small-file pull)."""
        self._db.execute("BEGIN")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def record(self, digests: Iterable[FileDigest]) -> None:
        """The digests of one frame's files, in one transaction."""
        rows = list(digests)  # a FileDigest is a (path, sha256, size) tuple
        if rows:
            with self._transaction() as db:
                db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", rows)

    def forget(self, path: bytes) -> None:
        """A path the target no longer has (deleted by an incremental pass), with its subtree."""
        with self._transaction() as db:
            db.execute("DELETE FROM files WHERE path = ?", (path,))
            # BLOB range: every path starting with "<path>/" ("/" + 1 is "0").
            db.execute("DELETE FROM files WHERE path >= ? AND path < ?", (path + b"/", path + b"0"))

    def rename(self, old: bytes, new: bytes) -> None:
        """A file the target renamed because the source did (its content is unchanged)."""
        with self._transaction() as db:
            db.execute("DELETE FROM files WHERE path = ?", (new,))
            db.execute("UPDATE files SET path = ? WHERE path = ?", (new, old))

    def lookup(self, path: bytes) -> tuple[str, int] | None:
        row = self._db.execute("SELECT sha256, size FROM files WHERE path = ?", (path,)).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM files").fetchone()[0])


class PathIndex:
    """A throwaway set of paths on disk: memory stays flat whatever the count (SQLite's page
    cache is bounded). Not durable: the file is replaced on open and removed on close, and
    its owner rebuilds it from its own journal when needed, so one transaction stays open
    for its whole life (no commit per `add`). Keyed by the path itself: a tar stream lists a
    directory's files together, so inserts stay local in the B-tree (~1 us a path); a hashed
    key would scatter them over the whole table. SQLite errors are raised as OSError."""

    def __init__(self, path: str | bytes) -> None:
        self._path = os.fsencode(path)
        self._remove_files()
        with _as_oserror():
            self._db = sqlite3.connect(
                os.fsdecode(self._path), check_same_thread=False, isolation_level=None
            )
        try:
            with _as_oserror():
                self._db.execute("PRAGMA journal_mode=OFF")
                self._db.execute("PRAGMA synchronous=OFF")
                self._db.execute("CREATE TABLE paths (path BLOB PRIMARY KEY) WITHOUT ROWID")
                self._db.execute("BEGIN")
        except BaseException:
            self.close()
            raise

    def add(self, paths: Iterable[bytes]) -> None:
        with _as_oserror():
            self._db.executemany("INSERT OR IGNORE INTO paths VALUES (?)", ((p,) for p in paths))

    def __contains__(self, path: object) -> bool:
        with _as_oserror():
            row = self._db.execute("SELECT 1 FROM paths WHERE path = ?", (path,)).fetchone()
        return row is not None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()  # the open transaction is dropped with the file
        self._remove_files()

    def _remove_files(self) -> None:
        for suffix in (b"", b"-journal", b"-wal", b"-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path + suffix)


@contextlib.contextmanager
def _as_oserror() -> Iterator[None]:
    """SQLite errors as OSError (ENOSPC for a full disk, else EIO): the extractor's I/O error."""
    try:
        yield
    except sqlite3.Error as e:
        full = getattr(e, "sqlite_errorname", "") == "SQLITE_FULL"
        raise OSError(errno.ENOSPC if full else errno.EIO, f"path index: {e}") from e


def file_sha256(path: bytes, blocks: tuple[str, int] | None = None) -> tuple[str, str]:
    """The SHA-256 of a file's content, and the digest to compare with the recorded one: the
    same, or with `blocks` (algorithm, block size) its `blocks_digest`, computed in the same
    read."""
    h = hashlib.sha256()
    digests: list[bytes] = []
    algorithm, block = blocks if blocks is not None else ("", 0)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while chunk := os.read(fd, max(READ_SIZE, block)):
            h.update(chunk)
            if blocks is not None:
                view = memoryview(chunk)
                digests += [
                    block_digest(view[at : at + block], algorithm)
                    for at in range(0, len(view), block)
                ]
    finally:
        os.close(fd)
    whole = h.hexdigest()
    return whole, whole if blocks is None else blocks_digest(block, digests, algorithm)


@dataclass
class Verification:
    verified: bool = True
    files: int = 0
    total_bytes: int = 0
    digest: str = ""
    mismatches: list[str] = field(default_factory=list)
    mismatch_count: int = 0

    def mismatch(self, path: bytes, why: str) -> None:
        self.verified = False
        self.mismatch_count += 1
        if len(self.mismatches) < MAX_MISMATCHES:
            self.mismatches.append(f"{decode_path(path)}: {why}")

    def to_json(self) -> dict[str, object]:
        return {
            "verified": self.verified,
            "files": self.files,
            "bytes": self.total_bytes,
            "digest": self.digest,
            "mismatches": self.mismatches,
            "mismatch_count": self.mismatch_count,
        }


def verify_volume(root: str, db: ContentDB) -> Verification:
    """Re-read every file of the target and compare with the recorded content; compute the
    tree digest: SHA-256 over the canonical manifest (metadata and content hash of every entry
    in manifest order), so equal digests mean equal trees, whatever the chunk size was."""
    result = Verification()
    tree = hashlib.sha256(b"volume-migrator tree v1\n")
    root_b = os.fsencode(root)
    seen = 0
    for entry in walk(root_b):
        sha = None
        if entry.type is EntryType.FILE:
            full = root_b if entry.path == b"." else os.path.join(root_b, entry.path)
            expected = db.lookup(entry.path)
            # A patched file's recorded digest is block by block (agents/delta.py): check
            # that one, and still put the plain SHA-256 into the tree digest.
            blocks = None if expected is None else parse_blocks_digest(expected[0])
            sha, got = file_sha256(full, blocks)
            result.files += 1
            if entry.hardlink_of is None:
                result.total_bytes += entry.size
            if expected is None:
                if entry.hardlink_of is None or db.lookup(entry.hardlink_of) is None:
                    result.mismatch(entry.path, "not written by this migration")
            else:
                seen += 1
                if expected != (got, entry.size):
                    result.mismatch(entry.path, "content differs from what the source read")
        record = {
            "path": decode_path(entry.path),
            "type": entry.type.value,
            "mode": entry.mode,
            "uid": entry.uid,
            "gid": entry.gid,
            "size": entry.size,
            "mtime_ns": entry.mtime_ns,
            "link": None if entry.link_target is None else decode_path(entry.link_target),
            "hardlink_of": None if entry.hardlink_of is None else decode_path(entry.hardlink_of),
            "xattrs": [[k, v.hex()] for k, v in entry.xattrs],
            "sha256": sha,
        }
        tree.update(json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    recorded = db.count()
    if recorded > seen:
        result.verified = False
        result.mismatch_count += recorded - seen
        if len(result.mismatches) < MAX_MISMATCHES:
            result.mismatches.append(f"{recorded - seen} file(s) written by the migration are gone")
    result.digest = "sha256:" + tree.hexdigest()
    return result
