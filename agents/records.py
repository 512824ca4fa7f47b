"""Manifest entries as compact binary records: how a source agent stores the snapshot that
names a stream, and reads it back every time the stream is generated or resumed.

A stream of 100,000 small files reads its 100,000 entries back once per attempt, in the
thread that also builds the tar stream; as JSON lines that took about twice as long as this.

A record is a little-endian u32 length and a marshal (format version 2) of the entry's fields
as a tuple; the file ends with a record of ("end", number of entries). Format 2 has no
back-references, so equal entries always give the same bytes: the record doubles as the
entry's fingerprint in the stream id (agents/source.py). The records are the agent's own
state: a file it did not write is never read as one.
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from agents.delta import Patch
from agents.manifest import Entry, EntryType

MARSHAL_VERSION = 2
_LENGTH = struct.Struct("<I")
_READ_SIZE = 1 << 20
_TYPES = {t.value: t for t in EntryType}


class SnapshotDamaged(ValueError):
    pass


def entry_record(entry: Entry) -> bytes:
    """The entry's fields, without the length prefix (see `write_record`)."""
    patch = entry.patch
    return marshal.dumps(
        (
            entry.path,
            entry.type.value,
            entry.mode,
            entry.uid,
            entry.gid,
            entry.size,
            entry.mtime_ns,
            entry.ctime_ns,
            entry.ino,
            entry.nlink,
            entry.link_target,
            entry.hardlink_of,
            entry.xattrs,
            entry.data_segments,
            entry.rdev_major,
            entry.rdev_minor,
            None if patch is None else (patch.runs, patch.digest),
        ),
        MARSHAL_VERSION,
    )


def write_record(out: BinaryIO, record: bytes) -> None:
    out.write(_LENGTH.pack(len(record)))
    out.write(record)


def write_end(out: BinaryIO, count: int) -> None:
    """The last record of a file: how many entries came before it. A file cut short (a crash
    of the host: snapshots are not synced) lacks it, and is refused rather than read as a
    shorter stream."""
    write_record(out, marshal.dumps(("end", count), MARSHAL_VERSION))


def entry_from_record(record: bytes | memoryview) -> Entry:
    try:
        (path, kind, mode, uid, gid, size, mtime, ctime, ino, nlink, link, hardlink, xattrs,
         segments, major, minor, patch) = marshal.loads(record)  # fmt: skip
        return Entry(
            path,
            _TYPES[kind],
            mode,
            uid,
            gid,
            size,
            mtime,
            ctime,
            ino,
            nlink,
            link,
            hardlink,
            xattrs,
            segments,
            major,
            minor,
            None if patch is None else Patch(*patch),
        )
    except (ValueError, EOFError, TypeError, KeyError) as e:
        raise SnapshotDamaged(f"a damaged snapshot record: {e}") from e


def read_records(path: Path) -> Iterator[Entry]:
    """The entries of a file of records, in order, reading a MiB at a time; SnapshotDamaged
    (after the entries read so far) unless the file ends with its end record."""
    count = 0
    ended = False
    with open(path, "rb") as f:
        rest = b""
        while block := f.read(_READ_SIZE):
            data = memoryview(rest + block) if rest else memoryview(block)
            pos, end = 0, len(data)
            while end - pos >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(data, pos)
                if end - pos - _LENGTH.size < length:
                    break
                pos += _LENGTH.size
                if ended:
                    raise SnapshotDamaged(f"{path.name} goes on after its end record")
                if data[pos : pos + len(_END_START)] == _END_START:
                    ended = _end_count(data[pos : pos + length]) == count
                    if not ended:
                        raise SnapshotDamaged(f"{path.name}: its end record does not count {count}")
                else:
                    yield entry_from_record(data[pos : pos + length])
                    count += 1
                pos += length
            rest = bytes(data[pos:])
    if rest or not ended:
        raise SnapshotDamaged(f"{path.name} is cut short")


def _end_count(record: bytes | memoryview) -> int | None:
    try:
        tag, count = marshal.loads(record)
    except (ValueError, EOFError, TypeError):
        return None
    return count if tag == "end" and isinstance(count, int) else None


# An end record is a 2-tuple, an entry's a 17-tuple: marshal starts each with the tuple's size.
_END_START = marshal.dumps(("end", 0), MARSHAL_VERSION)[:5]
