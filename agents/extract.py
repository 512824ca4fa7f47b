"""Extract the verified PAX tar stream straight into a volume directory, resumable mid-entry.

Owns feeding the tar stream incrementally (any split points) to the parser
(`agents.tarparse`, which also defines the errors below) and applying each entry to the
target root with exact metadata. Stdlib only (SQLite through `agents.content`), blocking I/O
(callers run it in a thread); no asyncio, Docker or sockets; must not import `migrator`. It
does not use `tarfile`: its extraction filters drop ownership and rewrite modes, and it cannot
resume mid-file.

Accepted stream (what `agents/tarstream.py` writes; anything else is refused):

* POSIX ustar headers (magic "ustar\\0", version "00"), each optionally preceded by one or more
  'x' extended headers; data padded to 512; two zero blocks; only zero bytes after them.
* PAX keys used: path, linkpath, size, uid, gid, mtime ("sec[.frac]", nanoseconds kept),
  SCHILY.xattr.<name> (raw value), GNU.sparse.major=1/minor=0/name/realsize (sparse 1.0: the
  data area starts with the decimal map, padded to 512, then the data runs). Names are raw
  bytes whatever hdrcharset says. Other keys are ignored but count against `max_pax_bytes`.
* Types '0' (and NUL) file, '1' hard link, '2' symlink, '3'/'4' device, '5' dir, '6' FIFO.
  Refused: 'g' global headers, GNU 'L'/'K' long names, old GNU sparse ('S', sparse 0.x),
  base-256 numbers. The generator never writes them, and each would be one more parser path
  that hostile bytes could reach.

Safety: every name is checked (no absolute path, no "", "." or ".." component, no NUL) and
reached by walking from a root directory fd with O_NOFOLLOW|O_DIRECTORY, one component at a
time; an existing symlink is never followed (it is replaced). Entries are created exclusively
(O_EXCL) and only what is in the way is looked at and removed, so a fresh volume costs no
`stat` per entry. A hard link must name an earlier regular file of this stream. Devices need
`allow_devices`. Errors are typed (tree below) and carry the entry's name; after one, the
extractor refuses more input (resume from a checkpoint).

    AgentError (agents.errors)
    └── ExtractError              422 extract_failed
        ├── MalformedArchive      422 malformed_tar
        ├── UnsafeEntry           422 unsafe_path
        │   ├── UnsafeLink        422 unsafe_link
        │   └── DeviceRefused     422 device_refused
        ├── LimitExceeded         422 limit_exceeded
        ├── BadCheckpoint         422 bad_checkpoint
        └── WriteFailed           500 write_failed

Resume: `commit()` makes what was written durable and returns a JSON checkpoint; the stream is
re-sent from its "offset" (= bytes fed so far). Unparsed header bytes travel in the checkpoint;
an entry in progress is reopened without truncation and its hash re-read from disk. Directory
metadata (applied by `finish()`, after the children) and the paths of the regular files (for
hard-link checks) live in append-only journals in `state_dir`, cut back to their committed
length on resume. The files journal is looked up through an index on disk, built only when a
hard link asks: memory does not grow with the number of entries.

Speed (small files are mostly headers): a header sequence is parsed straight from the fed
buffer, each block once, with numeric fields memoized; a plain file whose data is in the same
buffer is created, written and closed in one step (open, pwrite, fchown, fchmod, utime,
close: what GNU tar does); xattrs are only listed when the entry was not created here or its
directory could have passed some on.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

from agents.content import PathIndex
from agents.delta import MIN_DELTA_SIZE
from agents.manifest import EntryType
from agents.tarparse import (
    BLOCK,
    BadCheckpoint,
    DeviceRefused,
    ExtractError,
    Header,
    Limits,
    MalformedArchive,
    UnsafeEntry,
    UnsafeLink,
    WriteFailed,
    b64,
    clean_path,
    is_plain,
    padded,
    parse_entry,
    parse_headers,
    unb64,
)

CHECKPOINT_VERSION = 4  # 3: patches carry a blocks digest; 4: of BLAKE3 block digests
_ZEROS = bytes(1 << 20)  # holes are hashed from this buffer, 1 MiB per update call
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRS_LOG = b"extract-dirs.jsonl"
_FILES_LOG = b"extract-paths.bin"  # the regular files written: (4-byte length, path) records
_FILES_INDEX = b"extract-paths.db"  # a lookup index over it, built when a hard link asks
_READ_SIZE = 1 << 20
CONCURRENT_HASH_MIN = 256 << 10  # data chunks at least this large are hashed while written
WRITEBACK_PIECE = 1 << 20  # ... in pieces, each sent to the disk right away (_start_writeback)
_RECENT_BYTES = 4 << 20  # memory for the paths kept for hard links to recent files
_RECENT_OVERHEAD = 100  # bytes a set entry costs besides its path
# Stream phases; compared by identity (a restored phase is mapped back through _PHASES).
_HEADER, _DATA, _PAD, _END = "header", "data", "pad", "end"
_PHASES = {p: p for p in (_HEADER, _DATA, _PAD, _END)}

DEFAULT_LIMITS = Limits()

StrPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]


class FileDigest(NamedTuple):
    """SHA-256 of a regular file's logical content (holes read as zeros), as written.

    A named tuple (one per file, so cheap to make), in the content manifest's column order."""

    path: bytes
    sha256: str
    size: int


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Known:
    """The digest of a patched file: given by the source, not computed from the runs."""

    def __init__(self, hexdigest: str) -> None:
        self._hexdigest = hexdigest

    def update(self, _data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hexdigest


def _journal_paths(fd: int, start: int, end: int) -> Iterator[bytes]:
    """The paths in bytes [start, end) of a files journal, read a block at a time."""
    buf = b""
    while start < end:
        chunk = os.pread(fd, min(end - start, _READ_SIZE), start)
        if not chunk:
            raise OSError(errno.EIO, "the files journal is shorter than written")
        start += len(chunk)
        buf += chunk
        pos = 0
        while len(buf) - pos >= 4:
            stop = pos + 4 + int.from_bytes(buf[pos : pos + 4], "little")
            if stop > len(buf):
                break
            yield buf[pos + 4 : stop]
            pos = stop
        buf = buf[pos:]
    if buf:
        raise OSError(errno.EIO, "the files journal ends inside a record")


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2


def _syncfs(fd: int) -> None:
    # One syncfs per commit flushes every file closed since the last one in a single journal
    # commit; an fsync per small file would cost a journal commit each.
    if _LIBC.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Asks the kernel to start writing a range to disk now, without waiting for it: the
    commit's fsync then waits for the last piece only, not for the whole frame, and the disk
    works while the rest of the frame is written. A hint; failures are ignored."""
    _LIBC.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _proc_path(dir_fd: int, name: bytes) -> bytes:
    # Names an entry through the pinned directory fd: nothing before `name` is resolved again.
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def _set_xattrs(
    target: int | bytes, xattrs: tuple[tuple[str, bytes], ...], *, fresh: bool = False
) -> None:
    """Make the xattrs exactly these (never following a symlink). Stale names outside the
    "security." namespace are removed; labels there belong to the target host's policy.
    `fresh`: the entry was just created where nothing can be inherited (see `_inherits`), so
    it has none to remove."""
    wanted = dict(xattrs)
    follow = isinstance(target, int)  # an fd is the entry itself; Python refuses False there
    if not fresh:
        try:
            present = os.listxattr(target, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP) or wanted:
                raise
            present = []
        for name in present:
            if name not in wanted and not name.startswith("security."):
                os.removexattr(target, name, follow_symlinks=follow)
    for name, value in xattrs:
        os.setxattr(target, name, value, follow_symlinks=follow)


def _inherits(dir_fd: int) -> bool:
    """Whether entries created in this directory may get xattrs from it: a default ACL, or
    any other name outside "security." (btrfs properties, NFSv4 ACLs...). Without one, a new
    entry starts with no xattrs beyond the host's security labels."""
    try:
        names = os.listxattr(dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return any(not name.startswith("security.") for name in names)


def _apply_meta_fd(fd: int, h: Header, *, fresh: bool = False, created: bool = False) -> None:
    """Owner, mode, xattrs and mtime of `h` on an open entry. `created`: a file this
    extraction just created with `h`'s permission bits, whose owner and mode are very often
    right already (the agent's own, as root: 0:0; the mode unless the umask or special bits
    differ): a file of 4 KiB costs six system calls, and a chown or chmod that changes nothing
    still rewrites the inode."""
    st = os.fstat(fd) if created else None
    chown = st is None or (st.st_uid, st.st_gid) != (h.uid, h.gid)
    if chown:
        os.fchown(fd, h.uid, h.gid)
    if chown or st is None or stat.S_IMODE(st.st_mode) != h.mode:
        os.fchmod(fd, h.mode)  # after chown: chown clears setuid/setgid
    if h.xattrs or not fresh:
        _set_xattrs(fd, h.xattrs, fresh=fresh)  # after chown: chown drops security.capability
    os.utime(fd, ns=(h.mtime_ns, h.mtime_ns))


def _remove_tree(dir_fd: int, name: bytes) -> None:
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for child in map(os.fsencode, os.listdir(fd)):
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _remove_tree(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


class Extractor:
    """Writes one tar stream into `root`. Not thread-safe, except that the progress counters
    (`offset`, `bytes_written`, `files_done`, `entries_done`) may be read from any thread.

    Digests of finished regular files go to `on_file`, or are queued for `drain_digests()`.
    After a resume, files finished after the checkpoint are reported again: keep the last
    digest per path. Hard links are not reported (their content is the first path's).
    `on_large_file(header, fd)` sees each regular file of MIN_DELTA_SIZE or more once it is
    written and its metadata applied, before it is closed (the pull keeps its base from it).
    Memory does not grow with the number of entries: the paths of the regular files written
    (for the hard-link check) are kept on disk in `state_dir`.

    Entries are created with O_EXCL first: in a fresh volume nothing is in the way, and only
    when something is (an incremental pass, a resume, a re-sent path) is it looked at and
    removed, never followed.
    """

    def __init__(
        self,
        root: StrPath,
        state_dir: StrPath,
        *,
        allow_devices: bool = False,
        allow_existing_links: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        on_file: Callable[[FileDigest], None] | None = None,
        on_large_file: Callable[[Header, int], None] | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> None:
        """Start a fresh extraction, or continue one from `checkpoint` (see `resume`).

        `allow_existing_links`: an incremental pass re-sends a hard link without its unchanged
        first path, so its target may be a regular file already in the volume (still reached
        only through the volume, never outside it)."""
        self.allow_devices = allow_devices
        self.allow_existing_links = allow_existing_links
        self.limits = limits
        self._on_file = on_file
        self._on_large_file = on_large_file
        self._digests: list[FileDigest] = []
        self.offset = 0
        self.bytes_written = 0
        self.files_done = 0
        self.entries_done = 0
        self._buf = bytearray()
        self._need = BLOCK
        self._zero_blocks = 0
        self._phase = _HEADER
        self._entry: Header | None = None
        self._fd: int | None = None
        self._created = False
        """The open file was created empty by this object (not reopened after a resume)."""
        self._fresh = False
        """... and in a directory that passes no xattrs on (see `_inherits`)."""
        self._hasher: _Hasher = hashlib.sha256()
        self._pool: ThreadPoolExecutor | None = None
        self._data_size = 0
        self._data_done = 0
        self._hash_pos = 0
        self._run = 0
        self._run_off = 0
        self._pad_left = 0
        self._failed: ExtractError | None = None
        self._parent: tuple[bytes, int] | None = None
        self._parent_inherits = True
        self._parent_creator: tuple[int, int] | None = None
        self._index: PathIndex | None = None
        self._indexed = 0  # bytes of the files journal in the index
        self._journal_fd = -1  # for reading the files journal back into the index
        self._recent: set[bytes] | None = None
        """Paths journaled since the first hard link (and link targets found in the index), up
        to `_RECENT_BYTES` (then restarted): a link to a recent file is answered from memory."""
        self._recent_bytes = 0
        state = os.fsencode(state_dir)
        os.makedirs(state, mode=0o700, exist_ok=True)
        self._index_path = os.path.join(state, _FILES_INDEX)
        self._root_fd = os.open(os.fsencode(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs_log = open(os.path.join(state, _DIRS_LOG), "ab")  # noqa: SIM115 - closed by close()
        self._files_log = open(os.path.join(state, _FILES_LOG), "ab")  # noqa: SIM115
        self._state_on_volume_fs = (
            os.fstat(self._files_log.fileno()).st_dev == os.fstat(self._root_fd).st_dev
        )
        try:
            if checkpoint is None:
                for log in (self._dirs_log, self._files_log):
                    log.truncate(0)
                    log.seek(0, os.SEEK_END)  # truncate() leaves tell() where it was
            else:
                self._restore(checkpoint)
        except BaseException:
            self.close()
            raise

    @classmethod
    def resume(
        cls,
        root: StrPath,
        state_dir: StrPath,
        checkpoint: Mapping[str, Any],
        *,
        allow_devices: bool = False,
        allow_existing_links: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        on_file: Callable[[FileDigest], None] | None = None,
        on_large_file: Callable[[Header, int], None] | None = None,
    ) -> Extractor:
        """Continue from a `commit()` checkpoint; feed the stream from checkpoint["offset"]."""
        return cls(
            root,
            state_dir,
            allow_devices=allow_devices,
            allow_existing_links=allow_existing_links,
            limits=limits,
            on_file=on_file,
            on_large_file=on_large_file,
            checkpoint=checkpoint,
        )

    # -- public operations ----------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next contiguous bytes of the stream, writing entries as they complete."""
        if self._failed is not None:
            raise ExtractError(f"extractor stopped after an error: {self._failed.detail}")
        try:
            self._feed(data if type(data) is bytes else bytes(data))
        except ExtractError as e:
            self._failed = e
            raise
        except OSError as e:
            path = None if self._entry is None else self._entry.path
            self._failed = WriteFailed(
                f"{e.strerror or e} ({errno.errorcode.get(e.errno or 0)})", path
            )
            raise self._failed from e

    def commit(self) -> dict[str, Any]:
        """Make everything written so far durable and return the checkpoint to resume from."""
        checkpoint = self.checkpoint()
        self.sync()
        return checkpoint

    def sync(self) -> None:
        """Make everything written so far durable: the volume's data and this extractor's
        journals, and whatever else the caller wrote under the state directory. One syncfs of
        the file system when the state directory is on the volume's (an fsync of each file
        would cost a journal commit each, every frame), else one of each."""
        if self._failed is not None:
            raise ExtractError(f"extractor stopped after an error: {self._failed.detail}")
        for log in (self._dirs_log, self._files_log):
            log.flush()
        _syncfs(self._root_fd)
        if not self._state_on_volume_fs:
            _syncfs(self._files_log.fileno())

    def checkpoint(self) -> dict[str, Any]:
        """Where to resume from once what was written so far is durable (see `sync`)."""
        if self._failed is not None:
            raise ExtractError(f"extractor stopped after an error: {self._failed.detail}")
        return {
            "version": CHECKPOINT_VERSION,
            "offset": self.offset,
            "pending": b64(bytes(self._buf)),
            "zero_blocks": self._zero_blocks,
            "phase": self._phase,
            "entry": None if self._entry is None else self._entry.to_json(),
            "data_done": self._data_done,
            "hash_pos": self._hash_pos,
            "pad_left": self._pad_left,
            "dirs_log_bytes": self._dirs_log.tell(),
            "files_log_bytes": self._files_log.tell(),
            "progress": self.progress(),
        }

    def finish(self) -> dict[str, int]:
        """After the end-of-archive blocks: apply directory metadata, sync, return a summary."""
        if self._failed is not None:
            raise ExtractError(f"extractor stopped after an error: {self._failed.detail}")
        if self._phase != _END:
            raise MalformedArchive(f"stream ended at offset {self.offset} before end-of-archive")
        self._dirs_log.flush()
        dirs = 0
        try:
            with open(self._dirs_log.name, "rb") as log:
                # Journal order (parents first) is fine: setting a child's mode, owner or
                # times never changes its parent's mtime; only adding entries does.
                for line in log:
                    self._apply_dir(Header.from_json(json.loads(line)))
                    dirs += 1
            _syncfs(self._root_fd)
        except OSError as e:
            raise WriteFailed(f"applying directory metadata: {e}") from e
        return {**self.progress(), "dirs": dirs}

    def progress(self) -> dict[str, int]:
        return {
            "offset": self.offset,
            "bytes_written": self.bytes_written,
            "files_done": self.files_done,
            "entries_done": self.entries_done,
        }

    def drain_digests(self) -> list[FileDigest]:
        out, self._digests = self._digests, []
        return out

    def close(self) -> None:
        """Release file descriptors; uncommitted work is simply redone after a resume."""
        try:
            for fd in (self._fd, self._parent[1] if self._parent else None, self._root_fd):
                if fd is not None and fd >= 0:
                    os.close(fd)
        finally:
            self._fd, self._parent, self._root_fd = None, None, -1
            self._dirs_log.close()
            self._files_log.close()
            if self._journal_fd >= 0:
                os.close(self._journal_fd)
                self._journal_fd = -1
            if self._index is not None:
                self._index.close()
                self._index = None
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stream state machine -------------------------------------------------------------

    def _feed(self, buf: bytes) -> None:
        mv = memoryview(buf)
        pos, end = 0, len(buf)
        limits = self.limits
        while pos < end:
            phase = self._phase
            if phase is _HEADER:
                if self._buf:
                    # A header sequence split across calls: gather exactly what it needs.
                    n = min(end - pos, self._need - len(self._buf))
                    self._buf += mv[pos : pos + n]
                    pos += n
                    self.offset += n
                    if len(self._buf) < self._need:
                        return
                    parsed = parse_entry(bytes(self._buf), limits)
                    if isinstance(parsed, int):
                        self._need = parsed
                        continue
                    consumed, header = parsed
                    assert consumed == len(self._buf), "parser consumed a partial buffer"
                    self._buf.clear()
                    self._need = BLOCK
                    self._header(header, consumed)
                    continue
                parsed = parse_headers(buf, pos, end, limits)
                if isinstance(parsed, int):
                    self._buf += mv[pos:end]
                    self._need = parsed
                    self.offset += end - pos
                    return
                after, header = parsed
                self.offset += after - pos
                consumed, pos = after - pos, after
                if (
                    header is not None
                    and header.type is EntryType.FILE
                    and is_plain(header)
                    and end - pos >= padded(header.size)
                    and not self._zero_blocks
                ):
                    # The common case: a whole plain file in this buffer, written in one go.
                    pos = self._whole_file(header, mv, pos)
                else:
                    self._header(header, consumed)
            elif phase is _DATA:
                n = min(end - pos, self._data_size - self._data_done)
                self._write(mv[pos : pos + n])
                pos += n
                self.offset += n
                if self._data_done == self._data_size:
                    self._phase = _PAD
                    if not self._pad_left:
                        self._complete_file()
            elif phase is _PAD:
                n = min(end - pos, self._pad_left)
                self._pad_left -= n
                pos += n
                self.offset += n
                if not self._pad_left:
                    self._complete_file()
            else:
                if buf.count(0, pos, end) != end - pos:
                    raise MalformedArchive(f"data after end-of-archive at offset {self.offset}")
                self.offset += end - pos
                return

    def _header(self, header: Header | None, consumed: int) -> None:
        if header is None:
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self._phase = _END
            return
        if self._zero_blocks:
            raise MalformedArchive(f"lone zero block before offset {self.offset - consumed}")
        self._start_entry(header)

    # -- entries ----------------------------------------------------------------------------

    def _whole_file(self, h: Header, mv: memoryview, pos: int) -> int:
        """Create, write and complete a plain file whose data (at `pos`) is all in `mv`;
        returns the position after its padding."""
        self._entry = h
        self.entries_done += 1
        fd = self._fd = self._create(h)
        size = h.size
        if size:
            data = mv[pos : pos + size]
            done = os.pwrite(fd, data, 0)
            while done < size:
                done += os.pwrite(fd, data[done:], done)
            self._hasher = hashlib.sha256(data)
            self.bytes_written += size
        else:
            self._hasher = hashlib.sha256()
        end = pos + padded(size)
        self.offset += end - pos
        self._close_file(h, fd, truncate=False)
        return end

    def _start_entry(self, h: Header) -> None:
        self._entry = h
        self.entries_done += 1
        if h.type is EntryType.DIR:
            if h.path != b".":
                d, name = self._parent_of(h.path)
                try:
                    os.mkdir(name, 0o700, dir_fd=d)
                except FileExistsError:
                    if not self._clear(d, name, keep_dir=True):
                        os.mkdir(name, 0o700, dir_fd=d)
            line = json.dumps(h.to_json(), separators=(",", ":")).encode() + b"\n"
            self._dirs_log.write(line)
        elif h.hardlink_of is not None:
            self._link(h)
        elif h.type is EntryType.FILE:
            if h.patch_digest is not None and not is_plain(h):
                self._fd = self._open_patched(h)
                self._hasher = _Known(h.patch_digest)
            else:
                self._fd = self._create(h)
                self._hasher = hashlib.sha256()
            self._data_size = h.data_size
            self._data_done = self._hash_pos = self._run = self._run_off = 0
            self._pad_left = padded(self._data_size) - self._data_size
            self._phase = _DATA if self._data_size else _PAD
            if not self._data_size and not self._pad_left:
                self._complete_file()
            return
        else:
            self._make_special(h)
        self._entry = None

    def _create(self, h: Header) -> int:
        """A new, empty regular file at `h.path`, replacing what is there (not following it).
        Created with `h`'s permission bits (as the umask leaves them; see `_apply_meta_fd`)
        when it is created with `h`'s owner and group too; else private to this process until
        it is chowned, so no interim group ever has the access meant for the final one."""
        d, name = self._parent_of(h.path)
        mode = h.mode & 0o777 if self._parent_creator == (h.uid, h.gid) else 0o600
        try:
            fd = os.open(name, _CREATE_FLAGS, mode, dir_fd=d)
        except FileExistsError:
            self._clear(d, name, keep_dir=False)
            fd = os.open(name, _CREATE_FLAGS, mode, dir_fd=d)
        self._created = True
        self._fresh = not self._parent_inherits
        return fd

    def _open_patched(self, h: Header) -> int:
        """The target's own copy of a file a patch applies to: a regular file with one link,
        opened for writing in place, never followed."""
        d, name = self._parent_of(h.path)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=d)
        except FileNotFoundError as e:
            raise UnsafeEntry("a patch for a file the target does not have", h.path) from e
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise
            raise UnsafeEntry("a patch for something that is not a regular file", h.path) from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise UnsafeEntry("a patch for something that is not a single-link file", h.path)
        self._created = self._fresh = False
        return fd

    def _write(self, mv: memoryview) -> None:
        assert self._entry is not None and self._fd is not None
        runs = self._entry.runs
        while mv:
            while self._run_off >= runs[self._run][1]:
                self._run, self._run_off = self._run + 1, 0
            offset, length = runs[self._run]
            self._hash_zeros(offset)
            n = min(len(mv), length - self._run_off)
            chunk = mv[:n]
            # A large chunk is hashed in a helper thread while it is written (both release the
            # GIL: the writer is the slowest stage of a pull), and its pieces go to the disk
            # while the next ones are written.
            hashing = (
                self._hash_pool().submit(self._hasher.update, chunk)
                if n >= CONCURRENT_HASH_MIN
                else None
            )
            try:
                at, done = offset + self._run_off, 0
                while done < n:
                    piece = chunk[done : done + WRITEBACK_PIECE]
                    written = os.pwrite(self._fd, piece, at + done)
                    if hashing is not None:
                        _start_writeback(self._fd, at + done, written)
                    done += written
            finally:
                if hashing is not None:
                    hashing.result()
                else:
                    self._hasher.update(chunk)
            self._run_off += n
            self._hash_pos += n
            self._data_done += n
            self.bytes_written += n
            mv = mv[n:]

    def _hash_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-hash")
        return self._pool

    def _hash_zeros(self, upto: int) -> None:
        while self._hash_pos < upto:
            n = min(upto - self._hash_pos, len(_ZEROS))
            self._hasher.update(_ZEROS[:n])
            self._hash_pos += n

    def _complete_file(self) -> None:
        h, fd = self._entry, self._fd
        assert h is not None and fd is not None
        self._hash_zeros(h.size)
        # A plain file created here holds exactly its bytes; a sparse one gets its trailing
        # hole only from the truncate, and a reopened one is truncated to be sure.
        self._close_file(h, fd, truncate=not (self._created and is_plain(h)))
        self._data_size = self._data_done = self._hash_pos = self._run = self._run_off = 0
        self._pad_left = 0
        self._phase = _HEADER

    def _close_file(self, h: Header, fd: int, *, truncate: bool) -> None:
        if truncate:
            os.ftruncate(fd, h.size)
        _apply_meta_fd(fd, h, fresh=self._fresh, created=self._created)
        if self._on_large_file is not None and h.size >= MIN_DELTA_SIZE:
            self._on_large_file(h, fd)
        self._fd = None
        os.close(fd)
        path = h.path
        self._files_log.write(len(path).to_bytes(4, "little") + path)
        if self._recent is not None:
            self._remember(path)
        digest = FileDigest(h.path, self._hasher.hexdigest(), h.size)
        if self._on_file is not None:
            self._on_file(digest)
        else:
            self._digests.append(digest)
        self.files_done += 1
        self._entry = None

    def _link(self, h: Header) -> None:
        target = h.hardlink_of
        assert target is not None
        if target == b"." or target == h.path:
            raise UnsafeLink(f"hard link target {target!r} is not an earlier file", h.path)
        if not self.allow_existing_links and not self._written(target):
            raise UnsafeLink(f"hard link target {target!r} is not an earlier file", h.path)
        parts = target.split(b"/")
        src = self._walk(parts[:-1], create=False, path=target)
        try:
            st = os.stat(parts[-1], dir_fd=src, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeLink(f"hard link target {target!r} is no longer a file", h.path)
            d, name = self._parent_of(h.path)
            try:
                os.link(parts[-1], name, src_dir_fd=src, dst_dir_fd=d, follow_symlinks=False)
            except FileExistsError:
                self._clear(d, name, keep_dir=False)
                os.link(parts[-1], name, src_dir_fd=src, dst_dir_fd=d, follow_symlinks=False)
        finally:
            os.close(src)

    def _make_special(self, h: Header) -> None:
        if h.type in (EntryType.CHAR, EntryType.BLOCK) and not self.allow_devices:
            raise DeviceRefused("device nodes are not allowed for this transfer", h.path)
        d, name = self._parent_of(h.path)
        try:
            self._mknod(h, d, name)
        except FileExistsError:
            self._clear(d, name, keep_dir=False)
            self._mknod(h, d, name)
        os.chown(name, h.uid, h.gid, dir_fd=d, follow_symlinks=False)
        if h.type is not EntryType.SYMLINK:  # Linux has no symlink modes
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
            try:
                os.chmod(b"/proc/self/fd/%d" % fd, h.mode)
            finally:
                os.close(fd)
        fresh = not self._parent_inherits
        if h.xattrs or not fresh:
            _set_xattrs(_proc_path(d, name), h.xattrs, fresh=fresh)
        os.utime(name, ns=(h.mtime_ns, h.mtime_ns), dir_fd=d, follow_symlinks=False)

    @staticmethod
    def _mknod(h: Header, d: int, name: bytes) -> None:
        if h.type is EntryType.SYMLINK:
            assert h.link_target is not None
            os.symlink(h.link_target, name, dir_fd=d)
        elif h.type is EntryType.FIFO:
            os.mkfifo(name, 0o600, dir_fd=d)
        else:
            kind = stat.S_IFCHR if h.type is EntryType.CHAR else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(*h.rdev), dir_fd=d)

    def _apply_dir(self, h: Header) -> None:
        if h.path == b".":
            _apply_meta_fd(self._root_fd, h)
            return
        try:
            fd = self._walk(h.path.split(b"/"), create=False, path=h.path)
        except (UnsafeEntry, FileNotFoundError):
            return  # replaced later in the stream by a non-directory: that entry won
        try:
            _apply_meta_fd(fd, h)
        finally:
            os.close(fd)

    def _written(self, path: bytes) -> bool:
        """Whether this stream wrote a regular file at `path`: in the files journal, looked up
        through the recent paths, else an index on disk brought up to date first. Only hard
        links ask, so a stream without any never builds either."""
        if self._recent is None:
            self._recent = set()
        elif path in self._recent:
            return True
        self._files_log.flush()
        end = self._files_log.tell()
        if self._index is None:
            self._index, self._indexed = PathIndex(self._index_path), 0
            self._journal_fd = os.open(self._files_log.name, os.O_RDONLY | os.O_CLOEXEC)
        if self._indexed < end:
            self._index.add(_journal_paths(self._journal_fd, self._indexed, end))
            self._indexed = end
        if path not in self._index:
            return False
        self._remember(path)  # more links to it are likely: the next ones are answered here
        return True

    def _remember(self, path: bytes) -> None:
        assert self._recent is not None
        self._recent.add(path)
        self._recent_bytes += len(path) + _RECENT_OVERHEAD
        if self._recent_bytes > _RECENT_BYTES:
            self._recent.clear()
            self._recent_bytes = 0

    # -- safe paths -------------------------------------------------------------------------

    def _walk(self, parts: list[bytes], *, create: bool, path: bytes) -> int:
        """An fd (owned by the caller) of the directory `parts` below the root, reached one
        component at a time without following symlinks; missing ones made if `create`."""
        fd = os.dup(self._root_fd)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeEntry(
                            f"parent {part!r} is a symlink or not a directory", path
                        ) from e
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent_of(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the parent directory, last component); the fd is cached, do not close it."""
        parent, _, name = path.rpartition(b"/")
        cached = self._parent
        if cached is not None and cached[0] == parent:
            return cached[1], name
        self._drop_parent()
        fd = self._walk(parent.split(b"/") if parent else [], create=True, path=path)
        self._parent = (parent, fd)
        try:
            self._parent_inherits = _inherits(fd)
            st = os.fstat(fd)
        except BaseException:
            self._drop_parent()
            raise
        # Who owns a file created here until it is chowned: this process, and its group or,
        # in a setgid directory, the directory's.
        group = st.st_gid if st.st_mode & stat.S_ISGID else os.getegid()
        self._parent_creator = (os.geteuid(), group)
        return fd, name

    def _drop_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None
            self._parent_inherits = True
            self._parent_creator = None

    def _clear(self, dir_fd: int, name: bytes, *, keep_dir: bool) -> bool:
        """Remove what is at `name` (never following it); True if it is a directory kept."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            # `dir_fd` is the cached parent, never inside the removed tree: the cache stays.
            _remove_tree(dir_fd, name)
        else:
            os.unlink(name, dir_fd=dir_fd)
        return False

    # -- resume -----------------------------------------------------------------------------

    def _restore(self, cp: Mapping[str, Any]) -> None:
        try:
            if cp["version"] != CHECKPOINT_VERSION:
                raise BadCheckpoint(f"checkpoint version {cp['version']!r} is not supported")
            self.offset = int(cp["offset"])
            self._buf = bytearray(unb64(cp["pending"]))
            self._zero_blocks = int(cp["zero_blocks"])
            phase = str(cp["phase"])
            self._entry = None if cp["entry"] is None else Header.from_json(cp["entry"])
            self._data_done = int(cp["data_done"])
            self._hash_pos = int(cp["hash_pos"])
            self._pad_left = int(cp["pad_left"])
            dirs_len, files_len = int(cp["dirs_log_bytes"]), int(cp["files_log_bytes"])
            prog = cp["progress"]
            self.bytes_written = int(prog["bytes_written"])
            self.files_done = int(prog["files_done"])
            self.entries_done = int(prog["entries_done"])
        except (KeyError, ValueError, TypeError) as e:
            raise BadCheckpoint(f"malformed checkpoint: {e!r}") from e
        if self._entry is not None:
            try:
                safe = clean_path(self._entry.path, self.limits) == self._entry.path
            except ExtractError:
                safe = False
            if not safe:
                raise BadCheckpoint("checkpoint entry has an unsafe path", self._entry.path)
        self._phase = _PHASES.get(phase, "")
        if not self._phase or (self._phase in (_DATA, _PAD) and self._entry is None):
            raise BadCheckpoint(f"inconsistent checkpoint phase {phase!r}")
        if self._entry is not None:
            self._data_size = self._entry.data_size
            if self._data_done > self._data_size or self._hash_pos > self._entry.size:
                raise BadCheckpoint("checkpoint position is past the entry's data")
        for log, length in ((self._dirs_log, dirs_len), (self._files_log, files_len)):
            if os.fstat(log.fileno()).st_size < length:
                raise BadCheckpoint(f"journal {log.name!r} is shorter than its checkpoint")
            log.truncate(length)
            log.seek(0, os.SEEK_END)
        if self._buf:
            self._need = len(self._buf)
            self._parse_pending()
        if self._entry is not None:
            self._reopen(self._entry)

    def _parse_pending(self) -> None:
        parsed = parse_entry(bytes(self._buf), self.limits)
        if isinstance(parsed, int):
            self._need = parsed
        else:
            raise BadCheckpoint("checkpoint holds a complete, unapplied header")

    def _reopen(self, h: Header) -> None:
        """Reopen the file in progress without truncating and re-hash its written prefix."""
        d, name = self._parent_of(h.path)
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=d)
        except FileNotFoundError as e:
            raise BadCheckpoint("the file in progress vanished from the volume", h.path) from e
        self._fd = fd
        self._created = self._fresh = False
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadCheckpoint("the entry in progress is no longer a regular file", h.path)
        if h.patch_digest is not None and not is_plain(h):
            self._hasher = _Known(h.patch_digest)
        else:
            self._rehash(fd)
        run, left = 0, self._data_done
        while run < len(h.runs) and left >= h.runs[run][1]:
            left -= h.runs[run][1]
            run += 1
        self._run, self._run_off = run, left  # run == len(runs) once all data is written

    def _rehash(self, fd: int) -> None:
        self._hasher = hashlib.sha256()
        done = 0
        while done < self._hash_pos:
            chunk = os.pread(fd, min(self._hash_pos - done, 1 << 20), done)
            if not chunk:  # a trailing hole not yet truncated: zeros
                self._hasher.update(_ZEROS[: min(self._hash_pos - done, len(_ZEROS))])
                done += min(self._hash_pos - done, len(_ZEROS))
                continue
            self._hasher.update(chunk)
            done += len(chunk)
