"""The manifest: what a volume holds, entry by entry, read with `lstat` only.

Owns walking a volume root and describing every entry exactly (type, all mode bits, owner,
size, nanosecond times, link target, hard links, xattrs, sparse map). Pure stdlib; no Docker,
no sockets, no event loop. Must not import anything from `migrator`.

Order: a depth-first walk whose children are sorted by their raw name bytes, the root first
(as path "."). That is the order of the paths sorted with "/" ranking below every other byte,
so it is total, stable and the same on every host. The walk never follows symlinks and never
descends into another filesystem (a mount point inside the volume is listed, its content not).

Memory: the walk is a generator. It holds the sorted names of the directories on the current
path only, and the first path of every hard-linked inode (nlink > 1) it has seen, so a volume
of a million files in a few directories does not build a million entry objects.
"""

from __future__ import annotations

import base64
import enum
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agents.delta import Patch

ROOT = b"."


class EntryType(enum.StrEnum):
    """The kind of a manifest entry; the values are the wire values."""

    DIR = "dir"
    """A directory (the volume root is one, at path ".")."""
    FILE = "file"
    """A regular file; a hard link to an earlier file carries `hardlink_of`."""
    SYMLINK = "symlink"
    """A symbolic link; its target is data, never followed."""
    FIFO = "fifo"
    """A named pipe."""
    SOCKET = "socket"
    """A unix socket: listed, never transferred (it cannot be recreated meaningfully)."""
    CHAR = "chardev"
    """A character device node."""
    BLOCK = "blockdev"
    """A block device node."""


_TYPES = {
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFREG: EntryType.FILE,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFSOCK: EntryType.SOCKET,
    stat.S_IFCHR: EntryType.CHAR,
    stat.S_IFBLK: EntryType.BLOCK,
}


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a volume, as `lstat` saw it. Paths are raw bytes relative to the root."""

    path: bytes
    type: EntryType
    mode: int
    """Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`)."""
    uid: int
    gid: int
    size: int
    """Apparent size of a regular file; 0 for every other type."""
    mtime_ns: int
    ctime_ns: int
    ino: int
    nlink: int = 1
    link_target: bytes | None = None
    hardlink_of: bytes | None = None
    """For the second and later paths of a hard-linked inode: the first path, in walk order."""
    xattrs: tuple[tuple[str, bytes], ...] = ()
    data_segments: tuple[tuple[int, int], ...] | None = None
    """For a sparse regular file: the (offset, length) runs that hold data; None if not sparse."""
    rdev_major: int = 0
    rdev_minor: int = 0
    patch: Patch | None = None
    """Only in the stream of an incremental pass, for a large file the target already has: the
    runs that differ from the target's copy (see agents/delta.py). Never set by `walk`."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def sparse(self) -> bool:
        return self.data_segments is not None

    @property
    def single_file(self) -> bool:
        """A regular file with one link and no recorded holes: its bytes are its content, and a
        block delta can stand for it (agents/delta.py)."""
        return (
            self.type is EntryType.FILE
            and self.hardlink_of is None
            and self.nlink == 1
            and self.data_segments is None
        )

    @property
    def data_size(self) -> int:
        """Bytes that carry data: the size, or only the data runs of a sparse file."""
        if self.type is not EntryType.FILE or self.hardlink_of is not None:
            return 0
        if self.patch is not None:
            return self.patch.data_size
        if self.data_segments is None:
            return self.size
        return sum(length for _, length in self.data_segments)

    def change_key(self) -> tuple[int, int, int, int]:
        """What decides "changed" (size, mtime_ns, ctime_ns, inode): mtime alone can repeat
        within one timestamp tick, ctime moves on every metadata or content change."""
        return (self.size, self.mtime_ns, self.ctime_ns, self.ino)


def decode_path(path: bytes) -> str:
    """Wire form of a path: UTF-8, with undecodable bytes as lone surrogates (surrogateescape)."""
    return path.decode("utf-8", "surrogateescape")


def encode_path(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def entry_to_json(entry: Entry) -> dict[str, Any]:
    """The JSON object of one entry (see docs/agent-api.md). Xattr values are base64."""
    doc: dict[str, Any] = {
        "path": decode_path(entry.path),
        "type": entry.type.value,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "ctime_ns": entry.ctime_ns,
        "ino": entry.ino,
        "nlink": entry.nlink,
        "link_target": None if entry.link_target is None else decode_path(entry.link_target),
        "hardlink_of": None if entry.hardlink_of is None else decode_path(entry.hardlink_of),
        "xattrs": {k: base64.b64encode(v).decode("ascii") for k, v in entry.xattrs},
        "sparse": entry.sparse,
        "data_segments": None
        if entry.data_segments is None
        else [list(seg) for seg in entry.data_segments],
    }
    if entry.type in (EntryType.CHAR, EntryType.BLOCK):
        doc["rdev"] = [entry.rdev_major, entry.rdev_minor]
    if entry.patch is not None:
        doc["patch"] = entry.patch.to_json()
    return doc


def entry_from_json(doc: dict[str, Any]) -> Entry:
    """Inverse of `entry_to_json`; raises KeyError/ValueError/TypeError on a malformed object.
    (Read back once per entry for every stream, so the common empty fields take no work.)"""
    segments = doc.get("data_segments")
    rdev = doc.get("rdev")
    xattrs = doc.get("xattrs")
    link_target = doc.get("link_target")
    hardlink_of = doc.get("hardlink_of")
    patch = doc.get("patch")
    return Entry(
        path=encode_path(doc["path"]),
        type=_TYPE_VALUES[doc["type"]],
        mode=int(doc["mode"]),
        uid=int(doc["uid"]),
        gid=int(doc["gid"]),
        size=int(doc["size"]),
        mtime_ns=int(doc["mtime_ns"]),
        ctime_ns=int(doc["ctime_ns"]),
        ino=int(doc["ino"]),
        nlink=int(doc.get("nlink", 1)),
        link_target=None if link_target is None else encode_path(link_target),
        hardlink_of=None if hardlink_of is None else encode_path(hardlink_of),
        xattrs=tuple(sorted((str(k), base64.b64decode(v)) for k, v in xattrs.items()))
        if xattrs
        else (),
        data_segments=None if segments is None else tuple((int(o), int(n)) for o, n in segments),
        rdev_major=int(rdev[0]) if rdev else 0,
        rdev_minor=int(rdev[1]) if rdev else 0,
        patch=None if patch is None else Patch.from_json(patch),
    )


_TYPE_VALUES = {t.value: t for t in EntryType}


@dataclass(slots=True)
class Totals:
    """Running totals of a walk: entries, regular files, and the bytes a copy has to move."""

    entries: int = 0
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    """Apparent size of the regular files, each hard-linked inode counted once."""
    data_bytes: int = 0
    """Bytes that hold data (sparse holes excluded)."""
    skipped_sockets: int = 0

    def add(self, entry: Entry) -> None:
        self.entries += 1
        if entry.type is EntryType.DIR:
            self.dirs += 1
        elif entry.type is EntryType.SOCKET:
            self.skipped_sockets += 1
        elif entry.type is EntryType.FILE:
            self.files += 1
            if entry.hardlink_of is None:
                self.bytes += entry.size
                self.data_bytes += entry.data_size

    def to_json(self) -> dict[str, int]:
        return {
            "entries": self.entries,
            "files": self.files,
            "dirs": self.dirs,
            "bytes": self.bytes,
            "data_bytes": self.data_bytes,
            "skipped_sockets": self.skipped_sockets,
        }


def read_xattrs(path: bytes | int) -> tuple[tuple[str, bytes], ...]:
    """All extended attributes of `path` (not followed if a symlink), sorted by name.

    Filesystems without xattr support, and attributes that vanish between list and get, give
    nothing rather than an error: the manifest describes what is there.
    """
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.ENOENT):
            return ()
        raise
    found = []
    for name in sorted(names):
        try:
            found.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT):
                raise
    return tuple(found)


def data_segments(fd: int, size: int) -> tuple[tuple[int, int], ...]:
    """The data runs of an open file, found with SEEK_DATA/SEEK_HOLE."""
    runs: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        runs.append((start, end - start))
        offset = end
    return tuple(runs)


def _sparse_map(path: bytes, st: os.stat_result) -> tuple[tuple[int, int], ...] | None:
    # A file is sparse when it allocates fewer blocks than its size needs. Small files can
    # allocate less through inline data; below one block, a sparse map buys nothing.
    if st.st_size <= 4096 or st.st_blocks * 512 >= st.st_size:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return data_segments(fd, st.st_size)
    finally:
        os.close(fd)


def describe(
    root: bytes,
    rel: bytes,
    st: os.stat_result,
    first_links: dict[tuple[int, int], bytes],
    full: bytes | None = None,
) -> Entry:
    """Build the entry for `rel` (relative to `root`; `full` is both joined, if known) from its
    `lstat` result."""
    if full is None:
        full = root if rel == ROOT else os.path.join(root, rel)
    kind = _TYPES.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        raise ValueError(f"unknown file type {stat.S_IFMT(st.st_mode):o} at {rel!r}")
    link_target = os.readlink(full) if kind is EntryType.SYMLINK else None
    hardlink_of = None
    segments = None
    size = 0
    if kind is EntryType.FILE:
        size = st.st_size
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            hardlink_of = first_links.get(key)
            if hardlink_of is None:
                first_links[key] = rel
        if hardlink_of is None:
            segments = _sparse_map(full, st)
    return Entry(
        path=rel,
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=size,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        ino=st.st_ino,
        nlink=st.st_nlink,
        link_target=link_target,
        hardlink_of=hardlink_of,
        xattrs=read_xattrs(full),
        data_segments=segments,
        rdev_major=os.major(st.st_rdev) if kind in (EntryType.CHAR, EntryType.BLOCK) else 0,
        rdev_minor=os.minor(st.st_rdev) if kind in (EntryType.CHAR, EntryType.BLOCK) else 0,
    )


def walk(root: str | bytes) -> Iterator[Entry]:
    """Yield every entry of the tree at `root` in manifest order, the root itself first.

    Entries that vanish between listing and `lstat` are skipped (the tree is live); a root
    that does not exist raises FileNotFoundError.
    """
    root_b = os.fsencode(root)
    root_st = os.lstat(root_b)
    if not stat.S_ISDIR(root_st.st_mode):
        raise NotADirectoryError(root_b.decode("utf-8", "replace"))
    first_links: dict[tuple[int, int], bytes] = {}
    yield describe(root_b, ROOT, root_st, first_links)
    yield from _walk_dir(root_b, b"", root_st.st_dev, first_links)


def _walk_dir(
    root: bytes, rel_dir: bytes, dev: int, first_links: dict[tuple[int, int], bytes]
) -> Iterator[Entry]:
    full_dir = os.path.join(root, rel_dir) if rel_dir else root
    try:
        names = sorted(os.listdir(full_dir))
    except FileNotFoundError:
        return
    # Joined by hand: os.path.join costs a microsecond, three times per entry.
    dir_prefix = full_dir if full_dir.endswith(b"/") else full_dir + b"/"
    rel_prefix = rel_dir + b"/" if rel_dir else b""
    for name in names:
        rel = rel_prefix + name
        full = dir_prefix + name
        try:
            st = os.lstat(full)
            entry = describe(root, rel, st, first_links, full)
        except FileNotFoundError:
            continue
        yield entry
        if entry.type is EntryType.DIR and st.st_dev == dev:
            yield from _walk_dir(root, rel, dev, first_links)
