"""The tar generator: determinism, readability by tarfile and GNU tar, exact sizes and offsets,
resume from any offset, hashing and dirty files. Trees are built in tmp_path (tests run as
root: chown, mknod and setuid need it)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents import tarstream
from agents.manifest import Entry, EntryType, walk
from agents.tarstream import EntryReport, StreamProgress, entry_span, generate, stream_size

MTIME_NS = 1_700_000_000_123_456_789
NON_UTF8 = b"caf\xe9-latin1"
LONG_DIR = "d" * 60
LONG_NAME = "n" * 80  # with its directory: a 141-byte path, past ustar's 100


def _write(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)


def _make_sparse(path: Path, size: int, runs: list[tuple[int, bytes]]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in runs:
            f.seek(offset)
            f.write(data)


def _data(size: int, seed: int) -> bytes:
    return hashlib.shake_256(b"%d" % seed).digest(size)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every entry type, odd sizes, long and non-UTF-8 names, a hard link, a sparse file."""
    root = tmp_path / "vol"
    root.mkdir()
    _write(root / "a.txt", _data(1000, 1), 0o4755, (1000, 1001))
    os.setxattr(root / "a.txt", "user.blob", b"\x00\xff=\n")
    _write(root / "big-uid", _data(513, 2), 0o600, (3_000_000, 3_000_001))
    (root / "dir").mkdir(mode=0o755)
    os.chmod(root / "dir", 0o3777)  # setgid + sticky
    _write(root / "dir" / "b.bin", _data(5000, 3), 0o2640)
    os.link(root / "dir" / "b.bin", root / "dir" / "hard")
    (root / "dir" / LONG_DIR).mkdir()
    _write(root / "dir" / LONG_DIR / LONG_NAME, _data(77, 4))
    _write(root / os.fsdecode(NON_UTF8), _data(1, 5))
    _write(root / "ünï.txt", b"")
    _write(root / "whole-second", _data(512, 6))
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("x" * 150, root / "long-link")
    os.mkfifo(root / "fifo", 0o620)
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "blk", 0o660 | stat.S_IFBLK, os.makedev(7, 300))
    # Data at the start and in the middle, ending in a hole; 8 MiB keeps hashing the holes
    # cheap across the many resume offsets below.
    _make_sparse(root / "sparse", 8 << 20, [(0, _data(4096, 7)), (3 << 20, _data(5000, 8))])
    monkeypatch.chdir(root)  # AF_UNIX paths are limited to ~108 bytes: bind a relative one
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock")
    sock.close()
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.utime(path, ns=(MTIME_NS, MTIME_NS))
    os.utime(root / "whole-second", ns=(MTIME_NS, 1_600_000_000 * 10**9))
    os.utime(root / "big-uid", ns=(MTIME_NS, -1_500_000_000))
    os.chmod(root, 0o700)
    os.chown(root, 999, 999)
    return root


def _manifest(root: Path) -> list[Entry]:
    return list(walk(str(root)))


def _stream(root: Path, entries: list[Entry], start: int = 0, **kwargs: object) -> bytes:
    return b"".join(generate(root, iter(entries), start, **kwargs))  # type: ignore[arg-type]


def _reports(root: Path, entries: list[Entry], start: int = 0) -> tuple[bytes, list[EntryReport]]:
    reports: list[EntryReport] = []
    data = b"".join(generate(root, iter(entries), start, on_entry=reports.append))
    return data, reports


def _by_path(reports: list[EntryReport]) -> dict[bytes, EntryReport]:
    return {r.entry.path: r for r in reports}


def _open_tar(data: bytes) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:")


def _member_name(entry: Entry) -> str:
    return os.fsdecode(tarstream.tar_name(entry)).rstrip("/") or "."


# --- determinism and readers -------------------------------------------------------------------


def test_same_manifest_and_content_give_same_bytes(tree: Path) -> None:
    entries = _manifest(tree)
    assert _stream(tree, entries) == _stream(tree, entries, read_size=4096)


def test_sparse_file_is_in_the_manifest(tree: Path) -> None:
    (entry,) = [e for e in _manifest(tree) if e.path == b"sparse"]
    assert entry.data_segments == ((0, 4096), (3 << 20, 8192))


def test_tarfile_reads_every_member_exactly(tree: Path) -> None:
    entries = _manifest(tree)
    archive = _open_tar(_stream(tree, entries))
    members = archive.getmembers()
    by_name = {m.name: m for m in members}
    expected = [e for e in entries if e.type is not EntryType.SOCKET]
    assert [m.name for m in members] == [_member_name(e) for e in expected]
    kinds = {
        EntryType.DIR: tarfile.DIRTYPE,
        EntryType.FILE: tarfile.REGTYPE,
        EntryType.SYMLINK: tarfile.SYMTYPE,
        EntryType.FIFO: tarfile.FIFOTYPE,
        EntryType.CHAR: tarfile.CHRTYPE,
        EntryType.BLOCK: tarfile.BLKTYPE,
    }
    for entry in expected:
        member = by_name[_member_name(entry)]
        assert (member.mode, member.uid, member.gid) == (entry.mode, entry.uid, entry.gid)
        assert (member.uname, member.gname) == ("", "")
        if entry.hardlink_of is not None:
            assert member.type == tarfile.LNKTYPE
            assert member.linkname == os.fsdecode(entry.hardlink_of)
        else:
            assert member.type == kinds[entry.type]
        if entry.type is EntryType.SYMLINK:
            assert member.linkname == os.fsdecode(entry.link_target or b"")
        if entry.type in (EntryType.CHAR, EntryType.BLOCK):
            assert (member.devmajor, member.devminor) == (entry.rdev_major, entry.rdev_minor)
        if entry.mtime_ns % 10**9:
            seconds, nanos = divmod(abs(entry.mtime_ns), 10**9)
            sign = "-" if entry.mtime_ns < 0 else ""
            assert member.pax_headers["mtime"] == f"{sign}{seconds}.{nanos:09d}"
        else:
            assert "mtime" not in member.pax_headers
            assert member.mtime == entry.mtime_ns // 10**9
        xattrs = {
            k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
            for k, v in member.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        assert xattrs == dict(entry.xattrs)
        if entry.type is EntryType.FILE and entry.hardlink_of is None:
            extracted = archive.extractfile(member)
            assert extracted is not None
            assert extracted.read() == (tree / os.fsdecode(entry.path)).read_bytes()


def test_special_cases_are_encoded_as_documented(tree: Path) -> None:
    archive = _open_tar(_stream(tree, _manifest(tree)))
    by_name = {m.name: m for m in archive.getmembers()}
    assert archive.getmembers()[0].name == "."
    assert by_name["a.txt"].mode == 0o4755
    assert by_name["dir"].mode == 0o3777
    assert by_name["big-uid"].uid == 3_000_000
    assert by_name["big-uid"].pax_headers["uid"] == "3000000"
    assert by_name["big-uid"].pax_headers["mtime"] == "-1.500000000"
    assert by_name[os.fsdecode(NON_UTF8)].pax_headers["hdrcharset"] == "BINARY"
    assert "hdrcharset" not in by_name["ünï.txt"].pax_headers
    assert by_name["abs-link"].linkname == "/etc/passwd"
    assert by_name["long-link"].linkname == "x" * 150
    assert by_name["dir/hard"].linkname == "dir/b.bin"
    assert by_name["dir/hard"].size == 0
    sparse = by_name["sparse"]
    assert sparse.size == 8 << 20
    runs: object = sparse.sparse  # typeshed types it as bytes; it is a list of (offset, size)
    assert runs == [(0, 4096), (3 << 20, 8192), (8 << 20, 0)]
    assert "sock" not in by_name


# Warnings GNU tar 1.34 prints for a correct stream (exit status 0). It does not know
# `hdrcharset` (POSIX: BINARY means "raw bytes") and keeps the raw bytes, which is what BINARY
# asks for; it calls any pre-1970 mtime implausible (and prints -1.5 s as 23:59:59.5) but
# restores it exactly, as the mtime checks below show.
KNOWN_WARNINGS = (
    b"tar: Ignoring unknown extended header keyword 'hdrcharset'\n",
    b"tar: big-uid: implausibly old time stamp 1969-12-31 23:59:59.5\n",
)


def _gnu_tar(*args: str | Path, data: bytes) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(["tar", *map(str, args)], input=data, capture_output=True, check=False)
    for warning in KNOWN_WARNINGS:
        done.stderr = done.stderr.replace(warning, b"")
    return done


def test_gnu_tar_lists_and_extracts_everything(tree: Path, tmp_path: Path) -> None:
    entries = _manifest(tree)
    data = _stream(tree, entries)
    listing = _gnu_tar("-tvf", "-", data=data)
    assert (listing.returncode, listing.stderr) == (0, b"")
    assert b"caf\\351-latin1" in listing.stdout  # tar -t quotes unprintable bytes in octal
    dest = tmp_path / "out"
    dest.mkdir()
    flags = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "-p"]
    extracted = _gnu_tar("-xf", "-", "-C", dest, *flags, data=data)
    assert (extracted.returncode, extracted.stderr) == (0, b"")
    for entry in entries:
        if entry.type is EntryType.SOCKET:
            continue
        source = os.path.join(os.fsencode(tree), entry.path)
        target = os.path.join(os.fsencode(dest), entry.path)
        st_src, st_dst = os.lstat(source), os.lstat(target)
        assert stat.S_IFMT(st_dst.st_mode) == stat.S_IFMT(st_src.st_mode), entry.path
        assert (st_dst.st_uid, st_dst.st_gid) == (entry.uid, entry.gid), entry.path
        if entry.type is EntryType.FILE:
            assert Path(os.fsdecode(target)).read_bytes() == Path(os.fsdecode(source)).read_bytes()
            assert stat.S_IMODE(st_dst.st_mode) == entry.mode, entry.path
            assert st_dst.st_mtime_ns == entry.mtime_ns, entry.path
    assert os.stat(dest / "dir" / "hard").st_ino == os.stat(dest / "dir" / "b.bin").st_ino
    assert os.getxattr(dest / "a.txt", "user.blob") == b"\x00\xff=\n"
    assert os.lstat(dest / "sparse").st_blocks * 512 < 64 * 1024  # holes stayed holes


def test_gnu_tar_restores_a_1gib_sparse_file_as_sparse(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    _make_sparse(root / "huge", 1 << 30, [(512 << 20, _data(4096, 9))])
    entries = _manifest(root)
    reports: list[EntryReport] = []
    data = b"".join(generate(root, iter(entries), on_entry=reports.append))
    assert len(data) < 64 * 1024
    dest = tmp_path / "out"
    dest.mkdir()
    extracted = _gnu_tar("-xf", "-", "-C", dest, data=data)
    assert (extracted.returncode, extracted.stderr) == (0, b"")
    st = os.stat(dest / "huge")
    assert (st.st_size, st.st_blocks * 512 <= 64 * 1024) == (1 << 30, True)
    with (dest / "huge").open("rb") as f:
        f.seek(512 << 20)
        assert f.read(4096) == _data(4096, 9)
    expected = hashlib.sha256()
    with (root / "huge").open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            expected.update(block)
    assert _by_path(reports)[b"huge"].sha256 == expected.hexdigest()


# --- sizes, offsets, resume --------------------------------------------------------------------


def test_stream_size_and_offsets_come_from_the_manifest(tree: Path) -> None:
    entries = _manifest(tree)
    data, reports = _reports(tree, entries)
    assert stream_size(entries) == len(data)
    offset = 0
    spans = {}
    for entry in entries:
        spans[entry.path] = offset
        offset += entry_span(entry)
    assert {r.entry.path: r.offset for r in reports} == spans
    assert entry_span(next(e for e in entries if e.type is EntryType.SOCKET)) == 0


def _interesting_offsets(entries: list[Entry], total: int) -> Iterator[int]:
    """Entry starts, inside header runs, inside and at the edges of data, and near the end."""
    offset = 0
    for entry in entries:
        span = entry_span(entry)
        for k in (offset, offset + 512, offset + 1024, offset + span - 512, offset + span // 2):
            if offset <= k < offset + span:
                yield k - k % 512
        offset += span
    yield from (total - 1024, total - 512, total)


def test_generation_from_any_offset_is_the_tail_of_the_full_stream(tree: Path) -> None:
    entries = _manifest(tree)
    full = _stream(tree, entries)
    offsets = sorted(set(_interesting_offsets(entries, len(full))))
    assert len(offsets) > 40
    for k in offsets:
        assert _stream(tree, entries, k, read_size=4096) == full[k:], k
    for k in (0, 512 * 7, len(full) - 512):
        assert _stream(tree, entries, k) == full[k:], k


def test_entries_before_the_offset_are_never_read(tree: Path) -> None:
    entries = _manifest(tree)
    full = _stream(tree, entries)
    start = sum(entry_span(e) for e in entries if e.path <= b"a.txt")
    (tree / "a.txt").unlink()
    data, reports = _reports(tree, entries, start)
    assert data == full[start:]
    assert b"a.txt" not in _by_path(reports)
    assert not any(r.dirty for r in reports)


def test_a_straddling_file_is_read_from_the_resume_position(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = _manifest(tree)
    full = _stream(tree, entries)
    offset = 0
    for entry in entries:
        if entry.path == b"dir/b.bin":
            break
        offset += entry_span(entry)
    header_size = len(tarstream._layout(entry).header)
    start = offset + header_size + 4096
    positions: list[int] = []
    real_pread = os.pread

    def recording_pread(fd: int, length: int, position: int) -> bytes:
        positions.append(position)
        return real_pread(fd, length, position)

    monkeypatch.setattr(os, "pread", recording_pread)
    data, reports = _reports(tree, entries, start)
    assert data == full[start:]
    assert positions[0] == 4096
    report = _by_path(reports)[b"dir/b.bin"]
    assert (report.offset, report.sha256, report.dirty) == (offset, None, False)


@pytest.mark.parametrize("start", [-512, 100, 513])
def test_a_misaligned_offset_is_refused(tree: Path, start: int) -> None:
    with pytest.raises(ValueError, match="multiple of 512"):
        _stream(tree, _manifest(tree), start)


def test_an_offset_past_the_end_is_refused(tree: Path) -> None:
    entries = _manifest(tree)
    with pytest.raises(ValueError, match="past the stream's end"):
        _stream(tree, entries, stream_size(entries) + 512)


# --- hashes, progress, dirty files -------------------------------------------------------------


def test_hashes_are_of_the_logical_content(tree: Path) -> None:
    entries = _manifest(tree)
    _, reports = _reports(tree, entries)
    for report in reports:
        entry = report.entry
        if entry.type is EntryType.FILE and entry.hardlink_of is None:
            content = (tree / os.fsdecode(entry.path)).read_bytes()
            assert report.sha256 == hashlib.sha256(content).hexdigest(), entry.path
        else:
            assert report.sha256 is None
        assert not report.dirty
        assert report.skipped == (entry.type is EntryType.SOCKET)


def test_only_files_read_in_full_get_a_hash(tree: Path) -> None:
    entries = _manifest(tree)
    offset = 0
    for entry in entries:
        if entry.path == b"dir/b.bin":
            break
        offset += entry_span(entry)
    in_header = offset + 512
    _, reports = _reports(tree, entries, in_header)
    assert _by_path(reports)[b"dir/b.bin"].sha256 is not None
    in_data = offset + len(tarstream._layout(entry).header) + 512
    _, reports = _reports(tree, entries, in_data)
    assert _by_path(reports)[b"dir/b.bin"].sha256 is None
    assert _by_path(reports)[b"sparse"].sha256 is not None


def test_progress_counts_files_bytes_and_sockets(tree: Path) -> None:
    entries = _manifest(tree)
    progress = StreamProgress()
    data = b"".join(generate(tree, iter(entries), progress=progress))
    files = [e for e in entries if e.type is EntryType.FILE]
    assert progress.entries == len(entries)
    assert progress.files == len(files)
    assert progress.data_bytes == sum(e.data_size for e in files)
    assert progress.stream_bytes == len(data)
    assert (progress.dirty, progress.skipped_sockets) == (0, 1)


def _change(root: Path, how: str) -> None:
    path = root / "dir" / "b.bin"
    if how == "appended":
        with path.open("ab") as f:
            f.write(b"more")
    elif how == "truncated":
        os.truncate(path, 10)
    elif how == "rewritten":
        with path.open("r+b") as f:
            f.write(b"X")
    elif how == "deleted":
        path.unlink()
    elif how == "replaced by a fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "replaced by a symlink":
        path.unlink()
        os.symlink("a.txt", path)


@pytest.mark.parametrize(
    "how",
    [
        "appended",
        "truncated",
        "rewritten",
        "deleted",
        "replaced by a fifo",
        "replaced by a symlink",
    ],
)
def test_a_file_changed_after_the_manifest_is_dirty_and_the_size_stays_exact(
    tree: Path, how: str
) -> None:
    entries = _manifest(tree)
    full = _stream(tree, entries)
    _change(tree, how)
    data, reports = _reports(tree, entries)
    assert len(data) == len(full)
    dirty = {r.entry.path for r in reports if r.dirty}
    assert dirty == {b"dir/b.bin"}
    archive = _open_tar(data)
    member = archive.extractfile("dir/b.bin")
    assert member is not None
    content = member.read()
    assert len(content) == 5000
    if how in ("truncated", "deleted", "replaced by a fifo", "replaced by a symlink"):
        kept = 10 if how == "truncated" else 0
        assert content[kept:] == bytes(5000 - kept)
    expected = hashlib.sha256(content).hexdigest()
    assert _by_path(reports)[b"dir/b.bin"].sha256 == expected


def test_a_file_changed_after_the_manifest_is_dirty_when_resumed_past_its_data(
    tree: Path,
) -> None:
    entries = _manifest(tree)
    offset = 0
    for entry in entries:
        if entry.path == b"a.txt":
            break
        offset += entry_span(entry)
    in_padding = offset + entry_span(entry) - 512  # 1000 bytes: data ends inside this block
    _change(tree, "appended")
    os.truncate(tree / "a.txt", 3)
    _, reports = _reports(tree, entries, in_padding)
    assert _by_path(reports)[b"a.txt"].dirty


def test_a_parent_swapped_for_a_symlink_is_not_followed_out_of_the_root(
    tree: Path, tmp_path: Path
) -> None:
    entries = _manifest(tree)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.bin").write_bytes(b"S" * 5000)
    os.rename(tree / "dir", tmp_path / "moved")
    os.symlink(outside, tree / "dir")
    data, reports = _reports(tree, entries)
    assert b"SSSS" not in data
    assert {r.entry.path for r in reports if r.dirty} == {
        b"dir/b.bin",
        os.path.join(b"dir", LONG_DIR.encode(), LONG_NAME.encode()),
    }


def test_the_quick_span_of_a_plain_entry_is_the_exact_one() -> None:
    """`entry_span` takes a shortcut for entries whose only pax record can be the mtime; on
    every side of each condition of the shortcut it must give what the headers take."""
    import random

    from agents.delta import Patch

    rng = random.Random(7)
    names = [b"f", b"d/" * 49 + b"x", b"d/" * 50 + b"xy", b"caf\xc3\xa9", b"caf\xe9", b"a" * 100]
    links = [None, b"t", b"/" + b"t" * 99, b"/" + b"t" * 100, b"\xff"]
    entries = []
    for i in range(3000):
        kind = rng.choice([EntryType.FILE, EntryType.FILE, EntryType.DIR, EntryType.SYMLINK])
        size = (
            rng.choice([0, 1, 511, 512, 513, 4096, 8**11 - 1, 8**11])
            if kind is EntryType.FILE
            else 0
        )
        mtime = rng.choice(
            [0, 1_700_000_000 * 10**9, 1_700_000_000_123_456_789, -1_500_000_000, 8**11 * 10**9]
        )
        entry = Entry(
            path=rng.choice(names) + b"%d" % i,
            type=kind,
            mode=0o644,
            uid=rng.choice([0, 1000, 8**7 - 1, 8**7]),
            gid=rng.choice([0, 8**7]),
            size=size,
            mtime_ns=mtime,
            ctime_ns=mtime,
            ino=i,
            link_target=rng.choice(links) if kind is EntryType.SYMLINK else None,
            hardlink_of=b"first" if kind is EntryType.FILE and rng.random() < 0.1 else None,
            xattrs=(("user.k", b"v"),) if rng.random() < 0.1 else (),
            data_segments=((0, 1),)
            if kind is EntryType.FILE and size and rng.random() < 0.1
            else None,
            patch=Patch(((0, 1),), "blocks-blake3:8192:" + "0" * 64)
            if kind is EntryType.FILE and size and rng.random() < 0.05
            else None,
        )
        entries.append(entry)
    quick = [e for e in entries if tarstream._plain_ustar(e)]
    assert 100 < len(quick) < len(entries)  # both paths are taken
    for entry in entries:
        assert entry_span(entry) == tarstream._entry_span_exact(entry), entry
        layout = tarstream._layout(entry)
        assert entry_span(entry) == layout.span, entry
