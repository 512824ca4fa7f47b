"""Planning an incremental pass: the join of a source manifest with a target tree."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agents.extract import Extractor
from agents.incremental import order_key, parse_selection, plan, select
from agents.manifest import walk
from agents.tarparse import UnsafeLink
from agents.tarstream import generate

HOUR_AGO = time.time_ns() - 3600 * 10**9


def make_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    for path in [*root.rglob("*"), root]:
        os.utime(path, ns=(HOUR_AGO, HOUR_AGO), follow_symlinks=False)


def test_order_key_matches_walk_order(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a/b": b"", "a.b": b"", "a-": b"", "B": b"", "a/a/x": b""})
    paths = [e.path for e in walk(tmp_path)]
    assert paths == sorted(paths, key=order_key)


def test_plan_selects_changes_and_deletes_extras(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    same = {"keep.txt": b"same", "dir/keep2": b"same too"}
    make_tree(src, {**same, "changed.txt": b"new content", "new.txt": b"n"})
    make_tree(dst, {**same, "changed.txt": b"old", "extra.txt": b"x", "gone/deep/f": b"y"})
    selected = list(plan(walk(src), dst, window_start_ns=time.time_ns()))
    # Directories always (metadata is re-applied), changed and missing files; unchanged not.
    assert selected == [b".", b"changed.txt", b"dir", b"new.txt"]
    assert not (dst / "extra.txt").exists()
    assert not (dst / "gone").exists()
    assert (dst / "keep.txt").read_bytes() == b"same"


def test_plan_resends_files_inside_the_previous_window(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    make_tree(src, {"f": b"aaaa"})
    make_tree(dst, {"f": b"bbbb"})  # same size, same mtime: metadata cannot tell
    assert b"f" not in list(plan(walk(src), dst, window_start_ns=time.time_ns()))
    # If the previous pass started less than the margin after the file's mtime, it is re-sent.
    assert b"f" in list(plan(walk(src), dst, window_start_ns=HOUR_AGO + 10**9))
    # With no previous pass (a sync of an existing target), metadata decides, as rsync does.
    assert b"f" not in list(plan(walk(src), dst, window_start_ns=None))


def test_plan_keeps_hard_links_together(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    make_tree(src, {"a": b"newer"})
    os.link(src / "a", src / "b")
    make_tree(dst, {"a": b"old"})
    os.link(dst / "a", dst / "b")
    assert list(plan(walk(src), dst, window_start_ns=time.time_ns())) == [b".", b"a", b"b"]


def test_select_joins_in_order_and_skips_vanished(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": b"1", "b/c": b"2", "d": b"3"})
    chosen = [e.path for e in select(walk(tmp_path), [b"a", b"b/c", b"vanished", b"zz"])]
    assert chosen == [b".", b"a", b"b/c"]


def test_parse_selection_requires_manifest_order() -> None:
    body = b"\n".join(json.dumps(p).encode() for p in ["a", "b/c", "b.x"])
    assert parse_selection(body) == [b"a", b"b/c", b"b.x"]
    with pytest.raises(ValueError, match="order"):
        parse_selection(b'"b"\n"a"\n')
    with pytest.raises(ValueError, match="string"):
        parse_selection(b"5\n")


def test_incremental_hard_link_to_an_existing_file(tmp_path: Path) -> None:
    """A re-sent hard link whose first path is unchanged links to the file already there,
    and only when the extractor is told the pass is incremental."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    make_tree(src, {"a": b"content"})
    os.link(src / "a", src / "b")
    make_tree(dst, {"a": b"content"})
    entries = [e for e in walk(src) if e.path in (b".", b"b")]
    stream = b"".join(generate(src, entries))
    with Extractor(dst, tmp_path / "state1") as strict, pytest.raises(UnsafeLink):
        strict.feed(stream)
    with Extractor(dst, tmp_path / "state2", allow_existing_links=True) as ex:
        ex.feed(stream)
        ex.finish()
    assert os.stat(dst / "a").st_ino == os.stat(dst / "b").st_ino
