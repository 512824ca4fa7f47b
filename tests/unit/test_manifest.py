"""The manifest walk on a local tree: pure, no Docker."""

from __future__ import annotations

import os
from pathlib import Path

from agents.manifest import Entry, EntryType, Totals, entry_from_json, entry_to_json, walk
from tests.fidelity import NON_UTF8, SPARSE_SIZE, build_fidelity_tree


def test_order_is_depth_first_by_raw_name_bytes(tmp_path: Path) -> None:
    for p in ("a.b", "a/b", "a/a", "B", "a-", "a0"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text(p)
    paths = [e.path for e in walk(tmp_path)]
    # "/" ranks below every other byte: a's children come before "a-", "a.b" and "a0".
    assert paths == [b".", b"B", b"a", b"a/a", b"a/b", b"a-", b"a.b", b"a0"]


def test_fidelity_tree_round_trips_through_json(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    build_fidelity_tree(root)
    entries = list(walk(root))
    by_path = {e.path: e for e in entries}
    assert by_path[b"."].mode == 0o700 and by_path[b"."].uid == 999
    assert by_path[b"hardlink"].hardlink_of == b"dir/original"
    assert by_path[b"sparse.img"].sparse and by_path[b"sparse.img"].size == SPARSE_SIZE
    assert by_path[b"sparse.img"].data_size < 1 << 20
    assert by_path[NON_UTF8].type is EntryType.FILE
    assert by_path[b"fifo"].type is EntryType.FIFO
    for entry in entries:
        assert entry_from_json(entry_to_json(entry)) == entry


def test_walk_does_not_follow_symlinked_dirs(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    root = tmp_path / "vol"
    root.mkdir()
    os.symlink(outside, root / "link")
    assert [e.path for e in walk(root)] == [b".", b"link"]


def test_totals_count_hardlinked_bytes_once(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"12345")
    os.link(tmp_path / "f", tmp_path / "g")
    os.mkfifo(tmp_path / "p")
    totals = Totals()
    for e in walk(tmp_path):
        totals.add(e)
    assert totals.to_json() == {
        "entries": 4,
        "files": 2,
        "dirs": 1,
        "bytes": 5,
        "data_bytes": 5,
        "skipped_sockets": 0,
    }


def test_change_key_sees_same_size_rewrite(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"aaaa")
    [_, before] = list(walk(tmp_path))
    os.utime(f, ns=(before.mtime_ns, before.mtime_ns))  # same size, same mtime...
    f.write_bytes(b"bbbb")
    os.utime(f, ns=(before.mtime_ns, before.mtime_ns))
    [_, after] = list(walk(tmp_path))
    assert isinstance(after, Entry)
    assert (after.size, after.mtime_ns) == (before.size, before.mtime_ns)
    assert after.change_key() != before.change_key()  # ...but ctime moved
