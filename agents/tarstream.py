"""The tar stream: a deterministic POSIX pax archive generated from manifest entries.

Owns the byte layout of a volume stream (docs/tar-format.md is its specification): header
encoding, the GNU sparse 1.0 layout, the size and offset of every entry computed from the
manifest alone, regenerating the stream from any 512-byte-aligned offset, and reading and
hashing file content while streaming. Pure stdlib and blocking file I/O (callers run it in a
thread); no sockets, no event loop, no Docker. Must not import anything from `migrator`.

Use `entry_span` / `stream_size` to place entries without reading files, and `generate` to
produce the bytes; `generate` reports every entry it finished through `on_entry`.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import itertools
import os
import stat
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from agents.manifest import ROOT, Entry, EntryType
from agents.spool import SpoolReader

BLOCK_SIZE = 512
TRAILER = bytes(2 * BLOCK_SIZE)
"""The end-of-archive marker: two zero blocks."""

PATCH_KEY = b"VOLUMEMIGRATOR.patch"
"""Pax key of a patch (agents/delta.py): its value is the digest of the patched file's whole
content block by block (`blocks-blake3:...`); the sparse map's runs are the bytes that differ,
and the gaps keep the target's bytes."""
READ_SIZE = 1 << 20
"""Default read and yield size. Generating a cached 512 MiB file ran at 1.80/1.84/1.89/1.84
GB/s with 64 KiB/256 KiB/1 MiB/4 MiB reads (SHA-256 bound); 1 MiB is the fastest, is one
thread hop per MiB, and keeps memory at a few MiB."""

_ZEROS = bytes(1 << 20)  # fed to SHA-256 in slices for sparse holes, never copied
_NS = 1_000_000_000
_OCTAL7_MAX = 8**7 - 1  # mode, uid, gid, devmajor, devminor: 7 octal digits + NUL
_OCTAL11_MAX = 8**11 - 1  # size, mtime: 11 octal digits + NUL
_NAME_MAX = 100  # ustar name and linkname fields (the prefix field is never used)

_TYPEFLAGS = {
    EntryType.FILE: b"0",
    EntryType.SYMLINK: b"2",
    EntryType.CHAR: b"3",
    EntryType.BLOCK: b"4",
    EntryType.DIR: b"5",
    EntryType.FIFO: b"6",
}
_HARDLINK = b"1"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_PAX_HEADER = b"x"


class UnrepresentableEntryError(ValueError):
    """An entry the pax format cannot carry: an xattr name containing "=" (it ends a key)."""


@dataclass(frozen=True, slots=True)
class EntryReport:
    """What `generate` tells `on_entry` about one entry, once the entry's bytes are produced."""

    entry: Entry
    offset: int
    """Stream offset of the entry's first header byte."""
    sha256: str | None
    """Hex SHA-256 of the logical content (holes as zeros), for a regular file (not a hard
    link) whose data area started at or after `start_offset`; None otherwise."""
    dirty: bool
    """The file vanished, changed, or was not regular when read: its bytes in this stream are
    not a consistent copy and it must be sent again."""
    skipped: bool = False
    """A socket: it produced no bytes."""


@dataclass(slots=True)
class StreamProgress:
    """Counters `generate` updates in place (readable from another thread)."""

    entries: int = 0
    files: int = 0
    """Regular files finished, hard links included."""
    data_bytes: int = 0
    """File content bytes emitted (read, or zero-filled for a shrunken/vanished file)."""
    stream_bytes: int = 0
    """Stream bytes yielded so far."""
    dirty: int = 0
    skipped_sockets: int = 0


OnEntry = Callable[[EntryReport], None]


# --- layout: everything here depends on the entry only, never on file content ---------------


@dataclass(frozen=True, slots=True)
class _Layout:
    header: bytes
    """Optional pax extended header block(s), then the ustar header block."""
    sparse_map: bytes
    """GNU sparse 1.0 map padded to a block; empty for other entries."""
    runs: tuple[tuple[int, int], ...]
    """(file offset, length) ranges whose bytes follow the map in the data area."""
    data_size: int
    """Size of the data area (the ustar size field), before padding."""

    @property
    def span(self) -> int:
        return len(self.header) + _padded(self.data_size)


def entry_span(entry: Entry) -> int:
    """Bytes this entry occupies in the stream (headers + padded data); 0 for a socket.
    Computed without building the header blocks (a stream's size is summed over every entry
    before its first byte goes out): for the common entry, one whose only pax record can be
    its nanosecond mtime (a short one), from its fields alone; else from the records' length."""
    if entry.type is EntryType.SOCKET:
        return 0
    if _plain_ustar(entry):
        seconds, nanos = divmod(entry.mtime_ns, _NS)
        pax = BLOCK_SIZE * 2 if nanos or not 0 <= seconds <= _OCTAL11_MAX else 0
        return BLOCK_SIZE + pax + _padded(entry.size if _has_data(entry) else 0)
    return _entry_span_exact(entry)


def _plain_ustar(entry: Entry) -> bool:
    """Whether ustar holds everything about `entry` but maybe its mtime: then its pax records
    are at most one "mtime" record, far shorter than a block."""
    name, link = tar_name(entry), _link_name(entry)
    return (
        entry.data_segments is None
        and entry.patch is None
        and not entry.xattrs
        and len(name) <= _NAME_MAX
        and name.isascii()
        and len(link) <= _NAME_MAX
        and link.isascii()
        and entry.uid <= _OCTAL7_MAX
        and entry.gid <= _OCTAL7_MAX
        and entry.rdev_major <= _OCTAL7_MAX
        and entry.rdev_minor <= _OCTAL7_MAX
        and entry.size <= _OCTAL11_MAX
    )


def _entry_span_exact(entry: Entry) -> int:
    sparse_map, runs = _data_layout(entry)
    data_size = len(sparse_map) + sum(length for _, length in runs)
    records = _pax_records(entry, tar_name(entry), _link_name(entry), data_size)
    header = BLOCK_SIZE + (BLOCK_SIZE + _padded(len(records)) if records else 0)
    return header + _padded(data_size)


def data_bytes(entry: Entry) -> int:
    """File bytes a stream carries for this entry (its runs; no headers, map or padding)."""
    return sum(length for _, length in _data_layout(entry)[1])


def stream_size(entries: Iterable[Entry]) -> int:
    """Exact length of the stream for `entries`, trailer included, without reading any file."""
    return sum(entry_span(entry) for entry in entries) + len(TRAILER)


def tar_name(entry: Entry) -> bytes:
    """The member name: "./" for the root, a trailing "/" for directories, else the path."""
    if entry.path == ROOT:
        return b"./"
    if entry.type is EntryType.DIR:
        return entry.path + b"/"
    return entry.path


def _padded(size: int) -> int:
    return -(-size // BLOCK_SIZE) * BLOCK_SIZE


def _has_data(entry: Entry) -> bool:
    return entry.type is EntryType.FILE and entry.hardlink_of is None


def _is_sparse(entry: Entry) -> bool:
    """Written in the sparse format: a sparse file, or a patch (its runs are the map's)."""
    return _has_data(entry) and (entry.data_segments is not None or entry.patch is not None)


def _layout(entry: Entry) -> _Layout:
    if entry.type is EntryType.SOCKET:
        return _Layout(b"", b"", (), 0)
    sparse_map, runs = _data_layout(entry)
    data_size = len(sparse_map) + sum(length for _, length in runs)
    return _Layout(_headers(entry, data_size), sparse_map, runs, data_size)


def _data_layout(entry: Entry) -> tuple[bytes, tuple[tuple[int, int], ...]]:
    """The sparse map (empty unless sparse or a patch) and the runs of the data area."""
    if not _has_data(entry):
        return b"", ()
    if entry.patch is not None:
        return _sparse_map(entry.size, entry.patch.runs), entry.patch.runs
    if entry.data_segments is not None:
        return _sparse_map(entry.size, entry.data_segments), entry.data_segments
    return b"", ((0, entry.size),) if entry.size else ()


def _sparse_map(size: int, runs: tuple[tuple[int, int], ...]) -> bytes:
    # GNU tar truncates the file at the offset of a zero-length run, so a final (size, 0) run
    # makes it restore a trailing hole; tarfile truncates to the real size on its own.
    pairs = (*runs, (size, 0))
    numbers = [len(pairs)] + [n for pair in pairs for n in pair]
    text = b"".join(b"%d\n" % n for n in numbers)
    return text + bytes(_padded(len(text)) - len(text))


def _link_name(entry: Entry) -> bytes:
    if entry.hardlink_of is not None:
        return entry.hardlink_of
    return entry.link_target or b""


def _headers(entry: Entry, data_size: int) -> bytes:
    name = tar_name(entry)
    link = _link_name(entry)
    records = _pax_records(entry, name, link, data_size)
    ustar_name = _sparse_placeholder(name) if _is_sparse(entry) else name[:_NAME_MAX]
    ustar = _ustar_block(ustar_name, entry, link[:_NAME_MAX], data_size)
    if not records:
        return ustar
    return _pax_block(name, records) + ustar


def _sparse_placeholder(name: bytes) -> bytes:
    # GNU's own placeholder carries a pid; a fixed "0" keeps the stream deterministic.
    return (b"GNUSparseFile.0/" + os.path.basename(name))[:_NAME_MAX]


def _needs_pax_name(name: bytes) -> bool:
    return len(name) > _NAME_MAX or not name.isascii()


def _is_utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _pax_records(entry: Entry, name: bytes, link: bytes, data_size: int) -> bytes:
    """The pax records of one entry, in a fixed order; empty when ustar says it all."""
    names: list[tuple[bytes, bytes]] = []
    if _is_sparse(entry):
        names += [
            (b"GNU.sparse.major", b"1"),
            (b"GNU.sparse.minor", b"0"),
            (b"GNU.sparse.name", name),
            (b"GNU.sparse.realsize", b"%d" % entry.size),
        ]
        if entry.patch is not None:
            names.append((PATCH_KEY, entry.patch.digest.encode("ascii")))
    elif _needs_pax_name(name):
        names.append((b"path", name))
    if _needs_pax_name(link):
        names.append((b"linkpath", link))
    records = [(b"hdrcharset", b"BINARY")] if not all(_is_utf8(v) for _, v in names) else []
    records += names
    records += _pax_numbers(entry, data_size)
    records += _pax_xattrs(entry)
    return b"".join(_pax_record(key, value) for key, value in records)


def _pax_numbers(entry: Entry, data_size: int) -> list[tuple[bytes, bytes]]:
    records = []
    seconds, nanos = divmod(entry.mtime_ns, _NS)
    if nanos or not 0 <= seconds <= _OCTAL11_MAX:
        records.append((b"mtime", _pax_time(entry.mtime_ns)))
    for key, value, limit in (
        (b"uid", entry.uid, _OCTAL7_MAX),
        (b"gid", entry.gid, _OCTAL7_MAX),
        (b"size", data_size, _OCTAL11_MAX),
        (b"SCHILY.devmajor", entry.rdev_major, _OCTAL7_MAX),
        (b"SCHILY.devminor", entry.rdev_minor, _OCTAL7_MAX),
    ):
        if value > limit:
            records.append((key, b"%d" % value))
    return records


def _pax_time(mtime_ns: int) -> bytes:
    # The sign applies to the whole value: -1.5 s is "-1.500000000", not "-2.500000000".
    seconds, nanos = divmod(abs(mtime_ns), _NS)
    return b"%s%d.%09d" % (b"-" if mtime_ns < 0 else b"", seconds, nanos)


def _pax_xattrs(entry: Entry) -> list[tuple[bytes, bytes]]:
    records = []
    for name, value in entry.xattrs:
        key = b"SCHILY.xattr." + name.encode("utf-8", "surrogateescape")
        if b"=" in key:
            raise UnrepresentableEntryError(f"xattr name {name!r} of {entry.path!r} contains '='")
        records.append((key, value))
    return records


def _pax_record(key: bytes, value: bytes) -> bytes:
    """One "<length> <key>=<value>\\n" record; the length counts its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    digits = len(str(len(body)))
    while len(str(len(body) + digits)) != digits:
        digits += 1
    return b"%d" % (len(body) + digits) + body


def _pax_block(name: bytes, records: bytes) -> bytes:
    pax_name = (b"PaxHeaders/" + os.path.basename(name.rstrip(b"/")))[:_NAME_MAX]
    header = _header_block(pax_name, 0o644, 0, 0, len(records), 0, _PAX_HEADER)
    return header + records + bytes(_padded(len(records)) - len(records))


def _ustar_block(name: bytes, entry: Entry, link: bytes, data_size: int) -> bytes:
    typeflag = _HARDLINK if entry.hardlink_of is not None else _TYPEFLAGS[entry.type]
    return _header_block(
        name,
        entry.mode,
        entry.uid,
        entry.gid,
        data_size,
        entry.mtime_ns // _NS,
        typeflag,
        link,
        entry.rdev_major,
        entry.rdev_minor,
    )


def _header_block(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    link: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
) -> bytes:
    """One ustar header block. A number too big for its field is written as 0: the pax record
    emitted for it overrides the field. uname, gname and prefix stay empty."""
    owner = _OWNER_FIELDS.get((mode, uid, gid))
    if owner is None:
        owner = _octal(mode & 0o7777, 8) + _octal(uid, 8) + _octal(gid, 8)
        if len(_OWNER_FIELDS) < 4096:  # a volume has few distinct modes and owners
            _OWNER_FIELDS[(mode, uid, gid)] = owner
    devices = (
        _NO_DEVICE if not devmajor and not devminor else _octal(devmajor, 8) + _octal(devminor, 8)
    )
    block = bytearray(
        b"".join(
            (
                name.ljust(100, b"\0"),
                owner,
                _octal(size, 12),
                _octal(mtime, 12),
                b" " * 8,  # the checksum counts its own field as spaces
                typeflag,
                link.ljust(100, b"\0"),
                b"ustar\x0000",
                bytes(64),  # uname, gname
                devices,
                bytes(167),  # prefix, padding
            )
        )
    )
    block[148:156] = b"%06o\x00 " % _byte_sum(block)
    return bytes(block)


_OWNER_FIELDS: dict[tuple[int, int, int], bytes] = {}
"""The mode, uid and gid fields of header blocks already made (formatting them is a third of
the Python a small file costs the source)."""
_NO_DEVICE = b"%07o\x00" % 0 * 2


def _byte_sum(block: bytearray) -> int:
    """Sum of a 512-byte block's bytes, in C: adler32's low half is 1 + the sum mod 65521, and
    each half block sums to at most 256 x 255 = 65280, below the modulus."""
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def _octal(value: int, width: int) -> bytes:
    if not 0 <= value < 8 ** (width - 1):
        value = 0
    return b"%0*o\x00" % (width - 1, value)


# --- generation ------------------------------------------------------------------------------


def generate(
    root: str | bytes | os.PathLike[str],
    entries: Iterable[Entry],
    start_offset: int = 0,
    *,
    read_size: int = READ_SIZE,
    on_entry: OnEntry | None = None,
    progress: StreamProgress | None = None,
    hash_files: bool = True,
    spool: str | os.PathLike[str] | None = None,
) -> Iterator[bytes]:
    """Yield the stream of `entries` (files read under `root`) from byte `start_offset` on.

    `start_offset` must be a multiple of 512 and at most the stream size. Entries that end
    before it are skipped by arithmetic; a file whose data straddles it is read from the right
    position. Chunks are coalesced to about `read_size` bytes. `on_entry` is called once per
    entry that produced bytes in this call (and per socket at or after `start_offset`), after
    its last byte was generated and before any byte of the next entry; `progress` is updated
    in place. Vanished or changed files never raise (they are reported dirty); I/O errors do.
    With `hash_files`, each file read from its start is reported with the SHA-256 of its
    content; a transfer leaves it off (the target hashes what it writes, and every frame is
    hashed already: a third SHA-256 of every byte cost a core-second per 2 GB).
    With `spool` (a file `freeze` wrote for the same entries), file data comes from it instead
    of the volume, and no entry is dirty.
    """
    if start_offset < 0 or start_offset % BLOCK_SIZE:
        raise ValueError(f"start_offset {start_offset} is not a non-negative multiple of 512")
    if read_size < BLOCK_SIZE:
        raise ValueError(f"read_size {read_size} is below {BLOCK_SIZE}")
    counters = progress if progress is not None else StreamProgress()
    reader = None if spool is None else SpoolReader(spool)
    try:
        for chunk in _generate(
            os.fsencode(root),
            entries,
            start_offset,
            read_size,
            on_entry,
            counters,
            hash_files,
            reader,
        ):
            counters.stream_bytes += len(chunk)
            yield chunk
    finally:
        if reader is not None:
            reader.close()


def _generate(
    root: bytes,
    entries: Iterable[Entry],
    start_offset: int,
    read_size: int,
    on_entry: OnEntry | None,
    progress: StreamProgress,
    hash_files: bool,
    spool: SpoolReader | None = None,
) -> Iterator[bytes]:
    chunker = _Chunker(read_size)
    parents = _ParentDirs(root)
    try:
        offset = 0
        spooled = 0  # where the next entry's data starts in the spool
        for entry in entries:
            layout = _layout(entry)
            end = offset + layout.span
            # A socket (span 0) belongs to the call whose start is at or before it.
            if end > start_offset or (layout.span == 0 and offset >= start_offset):
                skip = max(0, start_offset - offset)
                file: _FileSource | _SpoolSource = (
                    _FileSource(parents, entry, read_size)
                    if spool is None
                    else _SpoolSource(spool, spooled, layout.runs, read_size)
                )
                report = yield from _emit_entry(
                    entry, layout, offset, skip, file, chunker, progress, hash_files
                )
                _count(progress, report)
                if on_entry is not None:
                    on_entry(report)
            offset = end
            spooled += layout.data_size - len(layout.sparse_map)
        if start_offset > offset + len(TRAILER):
            raise ValueError(f"start_offset {start_offset} is past the stream's end")
        yield from chunker.push(TRAILER[max(0, start_offset - offset) :])
        yield from chunker.flush()
    finally:
        parents.close()


def _count(progress: StreamProgress, report: EntryReport) -> None:
    progress.entries += 1
    progress.files += report.entry.type is EntryType.FILE
    progress.dirty += report.dirty
    progress.skipped_sockets += report.skipped


def _emit_entry(
    entry: Entry,
    layout: _Layout,
    offset: int,
    skip: int,
    file: _FileSource | _SpoolSource,
    chunker: _Chunker,
    progress: StreamProgress,
    hash_files: bool = True,
) -> Generator[bytes, None, EntryReport]:
    """Emit the entry's bytes from `skip` bytes into its span."""
    header = layout.header
    if skip < len(header):
        yield from chunker.push(header[skip:])
    if not _has_data(entry):
        return EntryReport(entry, offset, None, False, skipped=entry.type is EntryType.SOCKET)
    data_skip = max(0, skip - len(header))
    # A patch carries part of the file: its digest (of the whole) was taken when it was made.
    hashed = hash_files and data_skip == 0 and entry.patch is None
    hasher = hashlib.sha256() if hashed else None
    if data_skip < len(layout.sparse_map):
        yield from chunker.push(layout.sparse_map[data_skip:])
    run_skip = max(0, data_skip - len(layout.sparse_map))
    try:
        for chunk in _emit_runs(entry, layout, run_skip, file, hasher):
            progress.data_bytes += len(chunk)
            yield from chunker.push(chunk)
    finally:
        file.close()
    dirty = file.short or file.changed_since(entry)
    padding = _padded(layout.data_size) - layout.data_size
    yield from chunker.push(bytes(padding - max(0, data_skip - layout.data_size)))
    return EntryReport(entry, offset, None if hasher is None else hasher.hexdigest(), dirty)


def _emit_runs(
    entry: Entry,
    layout: _Layout,
    run_skip: int,
    file: _FileSource | _SpoolSource,
    hasher: hashlib._Hash | None,
) -> Iterator[bytes]:
    """Yield the data runs from `run_skip` bytes in; hash holes as zeros when hashing."""
    position = 0  # logical file position, for hashing holes
    for run_offset, run_length in layout.runs:
        if run_skip >= run_length:
            run_skip -= run_length
            continue
        if hasher is not None:
            _hash_zeros(hasher, run_offset - position)
        for chunk in file.read(run_offset + run_skip, run_length - run_skip):
            if hasher is not None:
                hasher.update(chunk)
            yield chunk
        run_skip = 0
        position = run_offset + run_length
    if hasher is not None:
        _hash_zeros(hasher, entry.size - position)


def _hash_zeros(hasher: hashlib._Hash, count: int) -> None:
    zeros = memoryview(_ZEROS)
    while count > 0:
        step = min(count, len(zeros))
        hasher.update(zeros[:step])
        count -= step


class _FileSource:
    """Reads a manifest file under the root; opened lazily, so a resume that starts past the
    file's data (in its padding) never opens it. Missing bytes come back as zeros."""

    def __init__(self, parents: _ParentDirs, entry: Entry, read_size: int) -> None:
        self._parents = parents
        self._dir, self._name = os.path.split(entry.path)
        self._read_size = read_size
        self._fd: int | None = None
        self._opened = False
        self.short = False
        """Fewer bytes than declared were there (or the file could not be opened as one)."""

    def read(self, offset: int, length: int) -> Iterator[bytes]:
        fd = self._open()
        end = offset + length
        while offset < end:
            want = min(self._read_size, end - offset)
            data = b"" if fd is None or self.short else os.pread(fd, want, offset)
            if not data:
                self.short = True
                data = bytes(want)
            offset += len(data)
            yield data

    def changed_since(self, entry: Entry) -> bool:
        """Re-`lstat` the path: gone, or a different change key, means changed."""
        dir_fd = self._parents.open(self._dir)
        if dir_fd is None:
            return True
        try:
            st = os.stat(self._name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != entry.change_key()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int | None:
        if not self._opened:
            self._opened = True
            dir_fd = self._parents.open(self._dir)
            self._fd = None if dir_fd is None else _open_regular(dir_fd, self._name)
            self.short = self._fd is None
        return self._fd


class _SpoolSource:
    """Reads an entry's data from a frozen stream's spool, where its runs lie back to back
    from `start` on."""

    short = False

    def __init__(
        self, spool: SpoolReader, start: int, runs: tuple[tuple[int, int], ...], read_size: int
    ) -> None:
        self._spool = spool
        self._read_size = read_size
        self._run_offsets = [run_offset for run_offset, _ in runs]  # in order
        self._spooled_at = list(itertools.accumulate((n for _, n in runs[:-1]), initial=start))

    def read(self, offset: int, length: int) -> Iterator[bytes]:
        """`offset` lies in a run, and `length` does not go past its end."""
        run = bisect.bisect_right(self._run_offsets, offset) - 1
        at = self._spooled_at[run] + offset - self._run_offsets[run]
        end = at + length
        while at < end:
            data = self._spool.pread(min(self._read_size, end - at), at)
            at += len(data)
            yield data

    def changed_since(self, entry: Entry) -> bool:
        return False  # read while the volume held still: `freeze` saw it unchanged

    def close(self) -> None:
        pass


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


def freeze(root: str | bytes, entries: Iterable[Entry], out: _Writable) -> list[bytes]:
    """Copy the data a stream of `entries` carries (each file's runs, back to back, in order)
    from the volume to `out`, so the stream can be generated later without reading the volume
    again (`generate(spool=...)`). Returns the paths of files that changed or were short while
    they were copied (their copy is not consistent)."""
    dirty: list[bytes] = []
    parents = _ParentDirs(os.fsencode(root))
    try:
        for entry in entries:
            if not _has_data(entry):
                continue
            _, runs = _data_layout(entry)
            file = _FileSource(parents, entry, READ_SIZE)
            try:
                for run_offset, length in runs:
                    for chunk in file.read(run_offset, length):
                        out.write(chunk)
            finally:
                file.close()
            if file.short or file.changed_since(entry):
                dirty.append(entry.path)
    finally:
        parents.close()
    return dirty


class VolumeFiles:
    """Opens regular files under a root for reading as the stream does: every parent one
    component at a time with O_NOFOLLOW, never a symlink, a FIFO or a device. Use as a context
    manager; files are best asked for in manifest order (the last directory stays open)."""

    def __init__(self, root: str | bytes) -> None:
        self._parents = _ParentDirs(os.fsencode(root))

    def open(self, path: bytes) -> int | None:
        """A read descriptor of regular file `path` (the caller closes it), or None when it is
        gone or not a regular file."""
        directory, name = os.path.split(path)
        dir_fd = self._parents.open(directory)
        return None if dir_fd is None else _open_regular(dir_fd, name)

    def directory(self, path: bytes) -> int | None:
        """A descriptor of directory `path` (b"" for the root) of its own (the caller closes
        it), reached as parents are; None when it is gone or not a directory all the way."""
        fd = self._parents.open(path)
        return None if fd is None else os.dup(fd)

    def close(self) -> None:
        self._parents.close()

    def __enter__(self) -> VolumeFiles:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class _ParentDirs:
    """Opens the directory of each file one component at a time with O_NOFOLLOW, so a parent
    swapped for a symlink by a container writing the live volume cannot lead a read outside
    the root. The last directory stays open: manifest order keeps a directory's files together.
    """

    def __init__(self, root: bytes) -> None:
        self._root_fd = os.open(root, _DIR_FLAGS)
        self._path = b""
        self._fd: int | None = self._root_fd

    def open(self, path: bytes) -> int | None:
        """A descriptor of directory `path` (relative, b"" for the root); None if it is gone
        or any component is no longer a directory."""
        if path != self._path:
            self._release()
            self._path = path
            self._fd = self._walk(path)
        return self._fd

    def close(self) -> None:
        self._release()
        os.close(self._root_fd)

    def _walk(self, path: bytes) -> int | None:
        fd = self._root_fd
        for name in path.split(b"/") if path else ():
            try:
                child = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                child = None
            except OSError as e:
                if e.errno != errno.ELOOP:  # ELOOP: now a symlink
                    raise
                child = None
            if fd != self._root_fd:
                os.close(fd)
            if child is None:
                return None
            fd = child
        return fd

    def _release(self) -> None:
        if self._fd is not None and self._fd != self._root_fd:
            os.close(self._fd)
        self._fd = None


def _open_regular(dir_fd: int, name: bytes) -> int | None:
    """Open `path` for reading, never following a symlink and never blocking on a FIFO;
    None when it is gone or no longer a regular file (the caller marks it dirty)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(name, flags | os.O_NOATIME, dir_fd=dir_fd)
        except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
            fd = os.open(name, flags, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # now a symlink, or a socket
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


class _Chunker:
    """Coalesces small pieces (headers, padding) into chunks of about `size` bytes, so a
    consumer that hops threads per chunk does not pay one hop per 512-byte header."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._buffer = bytearray()

    def push(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        if not self._buffer and len(data) >= self._size:
            yield data
            return
        self._buffer += data
        if len(self._buffer) >= self._size:
            yield from self.flush()

    def flush(self) -> Iterator[bytes]:
        if self._buffer:
            yield bytes(self._buffer)
            self._buffer.clear()
