"""Bases kept from one pass to the next (agents/delta.py, BaseCache): a kept base must equal
what describing the file would give, and must never be used once the file changed."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from agents import delta, tarstream
from agents.content import ContentDB
from agents.delta import MIN_BLOCK_SIZE, Base, BaseCache
from agents.extract import Extractor, FileDigest
from agents.incremental import Bases, _add_bases, plan_with_bases, selection_line
from agents.manifest import walk
from agents.source import Snapshots
from agents.tarparse import Header

PAGE = MIN_BLOCK_SIZE
VOLUME = "vol"


def _stream(root: Path, entries: list[object]) -> bytes:
    return b"".join(tarstream.generate(root, entries))  # type: ignore[arg-type]


def described(path: Path, block: int | None = None) -> Base:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return delta.describe(fd, size, block or delta.block_size_for(size))
    finally:
        os.close(fd)


def test_patched_base_equals_a_fresh_description(tmp_path: Path) -> None:
    old = secrets.token_bytes(3 << 20)
    path = tmp_path / "f"
    cases = [
        (old[:PAGE] + b"x" * PAGE + old[2 * PAGE :], ((PAGE, PAGE),)),  # one page rewritten
        (old + b"tail", ((len(old), 4),)),  # grown by a short block
        (old[: len(old) - 5], ()),  # shrunk: its last block cut short, no run
        (old[:100] + b"y" + old[101:], ((0, PAGE),)),
    ]
    for new, runs in cases:
        path.write_bytes(old)
        base = described(path, PAGE)
        path.write_bytes(new)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = delta.patched(fd, base, runs, len(new))
        finally:
            os.close(fd)
        assert got == described(path, PAGE), runs


def test_a_kept_base_is_used_only_while_the_file_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(secrets.token_bytes(2 << 20))
    base = described(path)
    cache = BaseCache()
    cache.put(VOLUME, b"f", os.stat(path), base)
    assert cache.get(VOLUME, b"f", os.stat(path), base.block_size) == base
    assert cache.get("other", b"f", os.stat(path), base.block_size) is None
    assert cache.get(VOLUME, b"f", os.stat(path), base.block_size * 2) is None
    with open(path, "r+b") as f:  # same size, mtime put back: the ctime still moved
        st = os.fstat(f.fileno())
        f.write(b"changed")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.get(VOLUME, b"f", os.stat(path), base.block_size) is None
    assert cache.last(VOLUME, b"f") == base


def test_the_cache_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(secrets.token_bytes(2 << 20))
    base = described(path)
    cache = BaseCache(max_bytes=len(base.digests) + 1)
    cache.put(VOLUME, b"a", os.stat(path), base)
    cache.put(VOLUME, b"b", os.stat(path), base)  # does not fit: not kept
    assert cache.last(VOLUME, b"a") == base and cache.last(VOLUME, b"b") is None
    cache.put(VOLUME, b"a", os.stat(path), base)  # replacing frees the old one first
    assert cache.last(VOLUME, b"a") == base
    cache.forget(VOLUME)
    cache.put(VOLUME, b"b", os.stat(path), base)
    assert cache.last(VOLUME, b"b") == base


def test_a_plan_takes_kept_bases_and_keeps_what_it_reads(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    data = secrets.token_bytes(2 << 20)
    for name in ("kept", "read"):
        (dst / name).write_bytes(data)
        (src / name).write_bytes(data[:-1] + b"!")
    cache = BaseCache()
    bogus = Base(delta.block_size_for(len(data)), bytes(len(described(dst / "kept").digests)))
    cache.put(VOLUME, b"kept", os.stat(dst / "kept"), bogus)  # recognisable when used
    bases = Bases(cache, VOLUME, keep=True)
    got = dict(plan_with_bases(walk(src), dst, window_start_ns=None, bases=bases))
    assert got[b"kept"] is bogus
    assert got[b"read"] == described(dst / "read")
    assert (bases.cached, bases.described) == (1, 1)
    assert cache.get(VOLUME, b"read", os.stat(dst / "read"), bogus.block_size) == got[b"read"]


def test_a_renamed_leftover_keeps_its_base(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    data = secrets.token_bytes(2 << 20)
    (dst / "A").write_bytes(data)
    os.utime(dst / "A", ns=(10**18, 10**18))
    (src / "X").write_bytes(data)  # A recycled as X
    os.utime(src / "X", ns=(10**18, 10**18))
    cache = BaseCache()
    base = described(dst / "A")
    cache.put(VOLUME, b"A", os.stat(dst / "A"), base)
    bases = Bases(cache, VOLUME)
    renamed: dict[bytes, Base] = {}
    list(plan_with_bases(walk(src), dst, window_start_ns=None, renamed=renamed, bases=bases))
    assert renamed == {b"X": base}
    assert (bases.cached, bases.described) == (1, 0)
    assert cache.last(VOLUME, b"A") is None
    assert cache.get(VOLUME, b"X", os.stat(dst / "X"), base.block_size) == base


def test_the_extractor_reports_large_files_with_their_patch(tmp_path: Path) -> None:
    """What a pull that keeps bases sees: each large file once written, patch runs included;
    the base it derives equals describing the result."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    old = secrets.token_bytes(2 << 20)
    new = bytearray(old)
    new[5 * PAGE] ^= 1
    (src / "big").write_bytes(new)
    (src / "whole").write_bytes(old)
    (src / "small").write_bytes(b"s")
    (dst / "big").write_bytes(old)
    old_base = described(dst / "big")
    identity = Snapshots(tmp_path / "snaps").take(
        src, [b".", b"big", b"small", b"whole"], {b"big": old_base}
    )
    seen: dict[bytes, Base] = {}

    def keep(h: Header, fd: int) -> None:
        size = os.fstat(fd).st_size
        if h.patch_digest is not None:
            seen[h.path] = delta.patched(fd, old_base, h.runs, size)
        else:
            seen[h.path] = delta.describe(fd, size, delta.block_size_for(size))

    with Extractor(dst, tmp_path / "state", allow_existing_links=True, on_large_file=keep) as ex:
        ex.feed(_stream(src, list(identity.entries())))
        ex.commit()
        ex.finish()
    assert sorted(seen) == [b"big", b"whole"]
    assert seen[b"big"] == described(dst / "big") and seen[b"whole"] == described(dst / "whole")


def _renamed_on_the_source(
    tmp_path: Path, *, touch: bool = False, copy: bool = False
) -> tuple[Path, Path, BaseCache]:
    """Source file A, copied to the target in an earlier pass, then renamed to X on the
    source (or, with `copy`, replaced by a copy at X; with `touch`, written since)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    data = secrets.token_bytes(2 << 20)
    old_ns = time.time_ns() - 3600 * 10**9
    (src / "A").write_bytes(data)
    os.utime(src / "A", ns=(old_ns, old_ns))
    (dst / "A").write_bytes(data)
    os.utime(dst / "A", ns=(old_ns, old_ns))
    os.chmod(dst / "A", os.stat(src / "A").st_mode)
    cache = BaseCache()
    st = os.stat(src / "A")
    cache.note_source(VOLUME, b"A", (st.st_ino, st.st_size, st.st_mtime_ns))
    if copy:
        (src / "X").write_bytes(data)
        os.utime(src / "X", ns=(old_ns, old_ns))
        os.unlink(src / "A")
    else:
        os.rename(src / "A", src / "X")
    if touch:
        os.utime(src / "X")  # written just now: inside the window
        os.utime(dst / "A", ns=(os.stat(src / "X").st_atime_ns, os.stat(src / "X").st_mtime_ns))
    return src, dst, cache


@pytest.mark.parametrize("case", ["renamed", "written since", "another file"])
def test_a_file_renamed_on_the_source_and_unchanged_is_only_renamed(
    tmp_path: Path, case: str
) -> None:
    src, dst, cache = _renamed_on_the_source(
        tmp_path, touch=case == "written since", copy=case == "another file"
    )
    renames: list[tuple[bytes, bytes]] = []
    renamed: dict[bytes, Base | None] = {}
    selected = dict(
        plan_with_bases(
            walk(src),
            dst,
            window_start_ns=time.time_ns() - 60 * 10**9,
            renamed=renamed,
            bases=Bases(cache, VOLUME),
            on_rename=lambda old, new: renames.append((old, new)),
        )
    )
    assert sorted(os.listdir(dst)) == ["X"]  # renamed on the target in every case
    assert b"X" in selected  # selected while joining; the caller drops it when renamed is None
    if case == "renamed":
        assert renamed == {b"X": None} and renames == [(b"A", b"X")]
    else:  # compared block by block, as any leftover taken over
        assert isinstance(renamed[b"X"], Base) and renames == []


def test_dropped_paths_leave_the_selection(tmp_path: Path) -> None:
    path = tmp_path / "selection"
    path.write_bytes(selection_line(b".", None) + selection_line(b"X", None))
    base = Base(PAGE, bytes(16))
    assert _add_bases(path, {b"X": None}) == 1
    assert path.read_bytes() == selection_line(b".", None)
    path.write_bytes(selection_line(b"Y", None))
    assert _add_bases(path, {b"Y": base}) == 0
    assert path.read_bytes() == selection_line(b"Y", base)


def test_the_content_manifest_follows_a_rename(tmp_path: Path) -> None:
    db = ContentDB(tmp_path / "content.db")
    db.record([FileDigest(b"A", "a" * 64, 5), FileDigest(b"X", "x" * 64, 7)])
    db.rename(b"A", b"X")
    assert db.lookup(b"X") == ("a" * 64, 5) and db.lookup(b"A") is None
    assert db.count() == 1
