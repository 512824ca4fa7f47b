"""Snapshot records: every field of every kind of entry comes back, equal entries give equal
bytes (the stream id depends on it), and a damaged file is refused, not half read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agents import records
from agents.delta import Patch
from agents.manifest import Entry, EntryType, walk
from agents.records import SnapshotDamaged, entry_from_record, entry_record, read_records
from agents.source import Snapshots


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    root = tmp_path / "vol"
    (root / "dir" / "empty").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"x" * 5000)
    os.setxattr(root / "dir" / "file", "user.note", b"\x00\xffvalue")
    os.link(root / "dir" / "file", root / "hard")
    os.symlink("/etc/passwd", root / "abs-link")
    os.mkfifo(root / "fifo")
    (root / "caf\xe9".encode("latin-1").decode("utf-8", "surrogateescape")).write_bytes(b"")
    fd = os.open(root / "sparse", os.O_WRONLY | os.O_CREAT, 0o600)
    os.pwrite(fd, b"data", 1 << 20)
    os.close(fd)
    return root


def test_every_entry_comes_back_whole(volume: Path, tmp_path: Path) -> None:
    entries = list(walk(volume))
    assert {e.type for e in entries} >= {EntryType.DIR, EntryType.FILE, EntryType.SYMLINK}
    patched = Entry(
        b"db/table", EntryType.FILE, 0o600, 70, 70, 1 << 20, 1, 2, 3,
        patch=Patch(((0, 8192), (65536, 16384)), "blocks-blake3:8192:" + "ab" * 32),
    )  # fmt: skip
    device = Entry(b"dev", EntryType.CHAR, 0o600, 0, 0, 0, 1, 2, 4, rdev_major=1, rdev_minor=3)
    entries += [patched, device]
    path = tmp_path / "snap"
    with open(path, "wb") as f:
        for entry in entries:
            records.write_record(f, entry_record(entry))
        records.write_end(f, len(entries))
    back = list(read_records(path))
    assert back == entries
    assert [e.patch for e in back] == [e.patch for e in entries]  # compare=... keeps it, too
    assert any(e.xattrs for e in back) and any(e.hardlink_of for e in back)
    assert any(e.data_segments for e in back)


def test_equal_entries_give_equal_bytes_whatever_objects_hold_them() -> None:
    """Marshal format 2 has no back-references: the same value twice (mtime and ctime here)
    is written twice, so the bytes depend on the values, never on object identity."""
    stamp = 1_700_000_000_123_456_789
    same = Entry(b"f", EntryType.FILE, 0o644, 0, 0, 1, stamp, stamp, 9)
    copies = Entry(b"f", EntryType.FILE, 0o644, 0, 0, 1, int(str(stamp)), int(str(stamp)), 9)
    assert same.mtime_ns is same.ctime_ns and copies.mtime_ns is not copies.ctime_ns
    assert entry_record(same) == entry_record(copies)
    assert entry_from_record(entry_record(same)) == same


def test_a_damaged_snapshot_is_refused(volume: Path, tmp_path: Path) -> None:
    snapshots = Snapshots(tmp_path / "snapshots")
    identity = snapshots.take(volume, None)
    assert snapshots.find(identity.stream_id) is not None
    data = identity.snapshot.read_bytes()
    identity.snapshot.write_bytes(data[:-3])  # cut inside the last record
    with pytest.raises(SnapshotDamaged):
        list(read_records(identity.snapshot))
    assert snapshots.find(identity.stream_id) is None
    identity.snapshot.write_bytes(data[:4] + b"\xff" * (len(data) - 4))  # garbage inside
    with pytest.raises(SnapshotDamaged):
        list(read_records(identity.snapshot))
    # Cut at a record boundary (a crash: snapshots are not synced), or empty: not a shorter
    # stream under the same id, but no snapshot.
    first = 4 + int.from_bytes(data[:4], "little")
    for cut in (data[:first], b""):
        identity.snapshot.write_bytes(cut)
        with pytest.raises(SnapshotDamaged):
            list(read_records(identity.snapshot))
        assert snapshots.find(identity.stream_id) is None
    identity.snapshot.write_bytes(data)
    assert snapshots.find(identity.stream_id) is not None
