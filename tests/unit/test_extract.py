"""The extractor: round trips from GNU tar and tarfile archives, arbitrary split points,
commit/resume anywhere, and refusal of hostile streams with nothing written outside the root.

Runs as root (chown, mknod). Archives come from GNU tar, Python's tarfile, or the small raw
header builder below (for streams no honest tool writes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents import extract as extract_module
from agents import manifest
from agents.extract import Extractor, FileDigest
from agents.tarparse import (
    BLOCK,
    BadCheckpoint,
    DeviceRefused,
    ExtractError,
    LimitExceeded,
    MalformedArchive,
    UnsafeEntry,
    UnsafeLink,
)

MTIME_NS = 1_700_000_000_123_456_789


# --- raw archive builder --------------------------------------------------------------------


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def header(
    name: bytes,
    flag: bytes = b"0",
    *,
    size: int = 0,
    mode: int = 0o644,
    link: bytes = b"",
    dev: tuple[int, int] = (0, 0),
    patch: dict[int, bytes] | None = None,
    checksum_delta: int = 0,
) -> bytes:
    b = bytearray(BLOCK)

    def put(offset: int, value: bytes) -> None:
        b[offset : offset + len(value)] = value

    put(0, name)
    put(100, b"%07o\0" % mode)
    put(108, b"%07o\0" % 0)
    put(116, b"%07o\0" % 0)
    put(124, b"%011o\0" % size)
    put(136, b"%011o\0" % 1_700_000_000)
    put(156, flag)
    put(157, link)
    put(257, b"ustar\x0000")
    put(329, b"%07o\0" % dev[0])
    put(337, b"%07o\0" % dev[1])
    for offset, value in (patch or {}).items():
        put(offset, value)
    put(148, b" " * 8)
    put(148, b"%06o\0 " % (sum(b) + checksum_delta))
    return bytes(b)


def record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + len(str(len(body)))
    n = len(body) + len(str(n))
    return b"%d" % n + body


def pax(*records: tuple[bytes, bytes]) -> bytes:
    data = b"".join(record(k, v) for k, v in records)
    return header(b"PaxHeader", b"x", size=len(data)) + pad(data)


def entry(name: bytes, flag: bytes = b"0", data: bytes = b"", **kw: Any) -> bytes:
    return header(name, flag, size=len(data), **kw) + pad(data)


def sparse_entry(name: bytes, realsize: int, runs: list[tuple[int, bytes]]) -> bytes:
    smap = b"%d\n" % len(runs) + b"".join(b"%d\n%d\n" % (o, len(d)) for o, d in runs)
    data = b"".join(d for _, d in runs)
    return pax(
        (b"GNU.sparse.major", b"1"),
        (b"GNU.sparse.minor", b"0"),
        (b"GNU.sparse.name", name),
        (b"GNU.sparse.realsize", b"%d" % realsize),
    ) + entry(b"GNUSparseFile.1/" + name, data=pad(smap) + data)


END = bytes(2 * BLOCK)
ROOT = entry(b"./", b"5", mode=0o755)


# --- running and comparing ----------------------------------------------------------------


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def extract(
    archive: bytes, root: Path, state: Path, *, split: int = 65536, allow_devices: bool = False
) -> tuple[dict[str, int], dict[bytes, FileDigest]]:
    root.mkdir(exist_ok=True)
    with Extractor(root, state, allow_devices=allow_devices) as ex:
        for piece in chunks(archive, split):
            ex.feed(piece)
        summary = ex.finish()
        return summary, {d.path: d for d in ex.drain_digests()}


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def snapshot(root: Path) -> list[tuple[Any, ...]]:
    """Every field that must survive, for every entry, from lstat (via the manifest walk)."""
    rows = []
    for e in manifest.walk(str(root)):
        full = root / os.fsdecode(e.path)
        content = file_sha(full) if e.type is manifest.EntryType.FILE else None
        mode = None if e.type is manifest.EntryType.SYMLINK else e.mode
        fields = (e.path, e.type, mode, e.uid, e.gid, e.size, e.mtime_ns, e.link_target)
        rows.append((*fields, e.hardlink_of, e.xattrs, e.rdev_major, e.rdev_minor, content))
    return rows


def gnu_tar(src: Path) -> bytes:
    return subprocess.run(
        [
            *("tar", "--format=pax", "--xattrs", "--xattrs-include=*", "--sparse"),
            *("--numeric-owner", "--sort=name", "-C", str(src), "-cf", "-", "."),
        ],
        check=True,
        capture_output=True,
    ).stdout


def set_times(path: Path, ns: int = MTIME_NS) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def make_tree(src: Path, *, sparse_size: int, device: bool) -> None:
    """Nested and empty dirs, odd owners and modes, links of every kind, a FIFO, a sparse file,
    xattrs, a non-UTF-8 name; the root owned by 999 with mode 0700."""
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "empty").mkdir(mode=0o750)
    private = src / "a" / "private"
    private.write_bytes(b"secret\n")
    os.chown(private, 999, 999)
    private.chmod(0o600)
    suid = src / "a" / "suid"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chown(suid, 1000, 1000)
    suid.chmod(0o4755)
    (src / "a" / "b" / "c" / "deep").write_bytes(b"deep")
    (src / "a" / "empty_file").write_bytes(b"")
    (src / "big").write_bytes(os.urandom(300_000))
    (src / "hard1").write_bytes(b"linked content")
    os.link(src / "hard1", src / "hard2")
    os.symlink("/etc/passwd", src / "abs_link")
    os.symlink("nope/missing", src / "dangling")
    os.mkfifo(src / "fifo", 0o640)
    (src / "fifo").chmod(0o640)
    xf = src / "xattr_file"
    xf.write_bytes(b"x")
    os.setxattr(xf, "user.comment", b"\xff\x00binary")
    (src / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    with open(src / "sparse", "wb") as f:
        f.truncate(sparse_size)
        f.seek(sparse_size // 2)
        f.write(os.urandom(4096))
        if sparse_size >= 16 << 20:
            f.seek(4 << 20)
            f.write(b"second run")
    if device:
        os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    for p in sorted(src.rglob("*"), key=lambda p: -len(p.parts)):
        set_times(p, MTIME_NS + len(p.parts))
    os.chown(src, 999, 999)
    src.chmod(0o700)
    os.setxattr(src, "user.root", b"rv")
    set_times(src)


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[Any], Path]:
    base = tmp_path_factory.mktemp("small")
    src = base / "src"
    src.mkdir()
    make_tree(src, sparse_size=20 << 20, device=False)
    archive = gnu_tar(src)
    return archive, snapshot(src), src


# --- round trips ------------------------------------------------------------------------------


def test_gnu_tar_round_trip_keeps_every_field(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src, sparse_size=1 << 30, device=True)
    archive = gnu_tar(src)
    summary, digests = extract(archive, tmp_path / "root", tmp_path / "state", allow_devices=True)

    root = tmp_path / "root"
    assert snapshot(root) == snapshot(src)
    st = os.lstat(root)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (999, 999, 0o700)
    assert os.lstat(root / "a" / "suid").st_mode & stat.S_ISUID
    assert os.lstat(root / "hard1").st_ino == os.lstat(root / "hard2").st_ino
    assert os.readlink(root / "abs_link") == "/etc/passwd"
    sparse = os.lstat(root / "sparse")
    assert sparse.st_size == 1 << 30
    assert sparse.st_blocks * 512 <= 64 << 10, "holes were written out"
    assert digests[b"sparse"].sha256 == file_sha(src / "sparse")
    assert digests[b"caf\xe9"].sha256 == file_sha(src / os.fsdecode(b"caf\xe9"))
    files = {e.path for e in manifest.walk(str(src)) if e.type is manifest.EntryType.FILE}
    assert set(digests) == files - {b"hard2"}
    assert summary["files_done"] == len(files) - 1
    assert summary["offset"] == len(archive)


def test_tarfile_round_trip(tmp_path: Path) -> None:
    ns = "1700000000.000000001"
    buf = io.BytesIO()

    def add(name: str, kind: bytes, data: bytes = b"", **attrs: Any) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.size = len(data)
        ti.mtime = 1_700_000_000
        ti.pax_headers = {"mtime": ns, **attrs.pop("pax", {})}
        for k, v in attrs.items():
            setattr(ti, k, v)
        tf.addfile(ti, io.BytesIO(data) if data else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        add("./", tarfile.DIRTYPE, mode=0o700, uid=999, gid=999)
        add("./d", tarfile.DIRTYPE, mode=0o1777)
        add("./d/f", tarfile.REGTYPE, b"hello", mode=0o2640, uid=5, gid=6)
        add("./x", tarfile.REGTYPE, b"v", pax={"SCHILY.xattr.user.bin": "\udcff\udcfe"})
        add("./caf\udce9", tarfile.REGTYPE, b"name")
        add("./hl", tarfile.LNKTYPE, linkname="./d/f")
        add("./sl", tarfile.SYMTYPE, linkname="../../etc/shadow")
        add("./p", tarfile.FIFOTYPE, mode=0o600)
    root = tmp_path / "root"
    _, digests = extract(buf.getvalue(), root, tmp_path / "state")

    want_ns = 1_700_000_000_000_000_001
    st = os.lstat(root)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (
        999,
        999,
        0o700,
        want_ns,
    )
    assert stat.S_IMODE(os.lstat(root / "d").st_mode) == 0o1777
    f = os.lstat(root / "d" / "f")
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode), f.st_mtime_ns) == (5, 6, 0o2640, want_ns)
    assert f.st_nlink == 2 and os.lstat(root / "hl").st_ino == f.st_ino
    assert os.getxattr(root / "x", "user.bin") == b"\xff\xfe"
    assert (root / os.fsdecode(b"caf\xe9")).read_bytes() == b"name"
    assert os.readlink(root / "sl") == "../../etc/shadow"
    assert os.lstat(root / "sl").st_mtime_ns == want_ns
    assert stat.S_ISFIFO(os.lstat(root / "p").st_mode)
    assert digests[b"d/f"] == FileDigest(b"d/f", hashlib.sha256(b"hello").hexdigest(), 5)


def test_raw_sparse_entry_keeps_holes_and_hashes_zeros(tmp_path: Path) -> None:
    runs = [(0, b"head"), (1 << 20, b"x" * 5000), (3 << 20, b"")]
    archive = ROOT + sparse_entry(b"sp", 3 << 20, runs) + END
    _, digests = extract(archive, tmp_path / "root", tmp_path / "state", split=7)
    logical = bytearray(3 << 20)
    logical[0:4] = b"head"
    logical[1 << 20 : (1 << 20) + 5000] = b"x" * 5000
    path = tmp_path / "root" / "sp"
    assert path.read_bytes() == logical
    assert os.lstat(path).st_blocks * 512 < 64 << 10
    assert digests[b"sp"].sha256 == hashlib.sha256(logical).hexdigest()


@pytest.mark.parametrize("split", [1, 7, 511, 513, 4097])
def test_any_split_gives_the_same_tree(
    tmp_path: Path, small_archive: tuple[bytes, list[Any], Path], split: int
) -> None:
    archive, expected, _ = small_archive
    extract(archive, tmp_path / "root", tmp_path / "state", split=split)
    assert snapshot(tmp_path / "root") == expected


# --- commit and resume ------------------------------------------------------------------------


def resume_offsets(archive: bytes) -> list[int]:
    """Cut points of every kind: inside a PAX header block and its data, inside a ustar header,
    inside the sparse map, inside file data, and on block boundaries."""
    cuts = set(range(0, len(archive), len(archive) // 37 | 1))
    sparse_hdr = archive.find(b"GNUSparseFile")
    assert sparse_hdr > 0
    pax_start = archive.rfind(b"PaxHeaders", 0, sparse_hdr) // BLOCK * BLOCK
    cuts |= {
        pax_start,
        pax_start + 100,
        pax_start + BLOCK + 40,
        sparse_hdr + 200,
        sparse_hdr + BLOCK + 3,
    }
    # The 20 MiB sparse file's map fits one block: its runs start two blocks after the header.
    cuts |= {sparse_hdr + 2 * BLOCK + 100, sparse_hdr + 2 * BLOCK + 4096 + 5}
    big = archive.find(b"./big\0")
    cuts |= {big + 3 * BLOCK + 12345, big + 2 * BLOCK, big + 300}
    return sorted(c for c in cuts if 0 < c < len(archive))


def test_resume_at_many_offsets_gives_identical_tree_and_hashes(
    tmp_path: Path, small_archive: tuple[bytes, list[Any], Path]
) -> None:
    archive, expected, src = small_archive
    reference = {
        e.path: file_sha(src / os.fsdecode(e.path))
        for e in manifest.walk(str(src))
        if e.type is manifest.EntryType.FILE and e.path != b"hard2"
    }
    kinds = set()
    for cut in resume_offsets(archive):
        root, state = tmp_path / f"root{cut}", tmp_path / f"state{cut}"
        root.mkdir()
        seen: dict[bytes, str] = {}

        def on_file(d: FileDigest, seen: dict[bytes, str] = seen) -> None:
            seen[d.path] = d.sha256

        first = Extractor(root, state, on_file=on_file)
        first.feed(archive[: cut // 2])
        first.feed(archive[cut // 2 : cut])
        checkpoint = json.loads(json.dumps(first.commit()))
        assert checkpoint["offset"] == cut
        entry_ = checkpoint["entry"]
        kinds.add(
            (checkpoint["phase"], bool(checkpoint["pending"]), bool(entry_ and entry_["runs"]))
        )
        if entry_ and len(entry_["runs"]) > 1 and checkpoint["data_done"]:
            kinds.add(("sparse-data", True, True))
        first.feed(archive[cut : cut + 3000])  # work after the commit is lost in the "crash"
        first.close()

        second = Extractor.resume(root, state, checkpoint, on_file=on_file)
        for piece in chunks(archive[checkpoint["offset"] :], 4096):
            second.feed(piece)
        second.finish()
        second.close()
        assert snapshot(root) == expected, f"cut at {cut}"
        assert seen == reference, f"cut at {cut}"
        shutil.rmtree(root)
        shutil.rmtree(state)
    # mid-header (pending bytes), mid-file data, mid-sparse-run, and between entries
    assert {("header", True, False), ("data", False, True), ("header", False, False)} <= kinds
    assert ("sparse-data", True, True) in kinds


def test_resume_chain_commits_every_few_kib(
    tmp_path: Path, small_archive: tuple[bytes, list[Any], Path]
) -> None:
    archive, expected, _ = small_archive
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    ex = Extractor(root, state)
    for i, piece in enumerate(chunks(archive, 3001)):
        ex.feed(piece)
        if i % 2:
            checkpoint = ex.commit()
            ex.close()
            ex = Extractor.resume(root, state, checkpoint)
    ex.finish()
    ex.close()
    assert snapshot(root) == expected


def test_progress_counters_move(tmp_path: Path) -> None:
    archive = ROOT + entry(b"./f", data=b"12345") + END
    root = tmp_path / "root"
    root.mkdir()
    with Extractor(root, tmp_path / "state") as ex:
        ex.feed(archive[: 2 * BLOCK + 3])
        assert ex.entries_done == 2 and ex.bytes_written == 3 and ex.files_done == 0
        ex.feed(archive[2 * BLOCK + 3 :])
        assert ex.files_done == 1 and ex.offset == len(archive)
        assert ex.finish()["files_done"] == 1


def test_finish_before_end_of_archive_is_malformed(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with Extractor(tmp_path / "root", tmp_path / "state") as ex:
        ex.feed(ROOT + entry(b"./f", data=b"1"))
        with pytest.raises(MalformedArchive):
            ex.finish()


def test_bad_checkpoints_are_refused(tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    with Extractor(root, state) as ex:
        ex.feed(ROOT + entry(b"d", b"5") + entry(b"f", data=b"abc" * 100)[:700])
        checkpoint = ex.commit()
    with pytest.raises(BadCheckpoint):
        Extractor.resume(root, state, {**checkpoint, "version": 99})
    with pytest.raises(BadCheckpoint):
        Extractor.resume(root, state, {**checkpoint, "dirs_log_bytes": 10**9})
    with pytest.raises(BadCheckpoint):
        Extractor.resume(root, state, {k: v for k, v in checkpoint.items() if k != "phase"})
    assert checkpoint["phase"] == "data" and checkpoint["entry"]["path"]
    (root / "f").unlink()
    with pytest.raises(BadCheckpoint):
        Extractor.resume(root, state, checkpoint)


# --- existing entries -------------------------------------------------------------------------


def test_existing_entries_are_replaced_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_bytes(b"keep")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside / "target", root / "f")  # a file arrives over a symlink
    os.symlink(outside, root / "d")  # a directory arrives over a symlink to a directory
    (root / "was_dir" / "sub").mkdir(parents=True)  # a file arrives over a directory tree
    (root / "was_file").write_bytes(b"old")  # a directory arrives over a file
    (root / "same").write_bytes(b"old content, longer")  # an incremental pass resends a file
    os.link(root / "same", root / "other_link")
    (root / "sym_over_file").write_bytes(b"old")
    os.symlink(outside, root / "fifo_over_symlink")
    (root / "link_over_dir" / "sub").mkdir(parents=True)
    os.symlink(outside / "target", root / "sym_over_symlink")
    archive = (
        ROOT
        + entry(b"./f", data=b"new")
        + entry(b"./d", b"5")
        + entry(b"./d/inner", data=b"inside")
        + entry(b"./was_dir", data=b"now a file")
        + entry(b"./was_file", b"5")
        + entry(b"./same", data=b"new")
        + entry(b"./sym_over_file", b"2", link=b"t1")
        + entry(b"./fifo_over_symlink", b"6")
        + entry(b"./link_over_dir", b"1", link=b"f")
        + entry(b"./sym_over_symlink", b"2", link=b"t2")
        + END
    )
    extract(archive, root, tmp_path / "state")
    assert (outside / "target").read_bytes() == b"keep"
    assert sorted(os.listdir(outside)) == ["target"]
    assert (root / "f").read_bytes() == b"new" and not (root / "f").is_symlink()
    assert (root / "d").is_dir() and not (root / "d").is_symlink()
    assert (root / "was_dir").read_bytes() == b"now a file"
    assert (root / "was_file").is_dir()
    assert (root / "same").read_bytes() == b"new"
    assert (root / "other_link").read_bytes() == b"old content, longer"
    assert os.readlink(root / "sym_over_file") == "t1"
    assert stat.S_ISFIFO(os.lstat(root / "fifo_over_symlink").st_mode)
    assert os.lstat(root / "link_over_dir").st_ino == os.lstat(root / "f").st_ino
    assert os.readlink(root / "sym_over_symlink") == "t2"


def test_new_entries_lose_what_their_directory_would_pass_on(tmp_path: Path) -> None:
    """A directory with a default ACL gives new files an access ACL: the stream's files must
    end with exactly the stream's xattrs (the fast path for new files skips the check only
    in directories that pass nothing on)."""
    root = tmp_path / "root"
    (root / "acl").mkdir(parents=True)
    none = 0xFFFFFFFF
    default_acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, uid)
        for tag, perm, uid in [
            (1, 7, none),
            (2, 7, 1234),
            (4, 5, none),
            (0x10, 7, none),
            (0x20, 5, none),
        ]
    )
    os.setxattr(root / "acl", "system.posix_acl_default", default_acl)
    probe = root / "acl" / "probe"
    probe.write_bytes(b"")
    assert "system.posix_acl_access" in os.listxattr(probe), "no ACL support here"
    probe.unlink()
    archive = (
        ROOT
        + entry(b"acl", b"5", mode=0o755)
        + entry(b"acl/f", data=b"x" * 600)
        + entry(b"acl/empty")
        + entry(b"acl/fifo", b"6")
        + pax((b"SCHILY.xattr.user.k", b"v"))
        + entry(b"acl/x", data=b"y")
        + entry(b"plain", data=b"z")
        + END
    )
    for split in (len(archive), 700):
        shutil.rmtree(tmp_path / "state", ignore_errors=True)
        extract(archive, root, tmp_path / "state", split=split)
        for name in ("f", "empty", "fifo"):
            assert os.listxattr(root / "acl" / name) == [], name
        assert os.listxattr(root / "acl" / "x") == ["user.k"]
        assert os.listxattr(root / "acl") == []
        assert os.listxattr(root / "plain") == []
        assert stat.S_IMODE(os.lstat(root / "acl" / "f").st_mode) == 0o644


# --- hostile streams ----------------------------------------------------------------------------


def outside_state(tmp_path: Path) -> list[tuple[str, int, int, bytes]]:
    """Everything in tmp_path except the root and state dirs: name, links, mtime, content."""
    rows = []
    for path in tmp_path.rglob("*"):
        rel = path.relative_to(tmp_path)
        if rel.parts[0] in ("root", "state"):
            continue
        st = os.lstat(path)
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        rows.append((str(rel), st.st_nlink, st.st_mtime_ns, data))
    return sorted(rows)


CANARY = b"@CANARY@"


def hostile_cases() -> list[tuple[str, Callable[[bytes], bytes], type[ExtractError], str]]:
    def sparse_lying(_: bytes) -> bytes:
        return ROOT + sparse_entry(b"sp", 100, [(50, b"y" * 100)]) + END

    def sparse_absurd(_: bytes) -> bytes:
        smap = pad(b"99999999\n0\n1\n")
        return (
            ROOT
            + pax(
                (b"GNU.sparse.major", b"1"),
                (b"GNU.sparse.minor", b"0"),
                (b"GNU.sparse.name", b"sp"),
                (b"GNU.sparse.realsize", b"1"),
            )
            + entry(b"GNUSparseFile/sp", data=smap)
            + END
        )

    def huge_pax(_: bytes) -> bytes:
        return ROOT + header(b"PaxHeader", b"x", size=1 << 30)  # no data follows: refused early

    return [
        ("absolute", lambda c: ROOT + entry(c, data=b"pwned") + END, UnsafeEntry, "unsafe_path"),
        (
            "dotdot",
            lambda c: ROOT + entry(b"../canary", data=b"x") + END,
            UnsafeEntry,
            "unsafe_path",
        ),
        (
            "inner_dotdot",
            lambda c: ROOT + entry(b"a", b"5") + entry(b"a/../../canary", data=b"x") + END,
            UnsafeEntry,
            "unsafe_path",
        ),
        (
            "symlink_parent",
            lambda c: (
                ROOT
                + entry(b"evil", b"2", link=os.path.dirname(c) + b"/outside")
                + entry(b"evil/new", data=b"pwned")
                + END
            ),
            UnsafeEntry,
            "unsafe_path",
        ),
        (
            "hardlink_abs",
            lambda c: ROOT + entry(b"h", b"1", link=c) + END,
            UnsafeEntry,
            "unsafe_path",
        ),
        (
            "hardlink_etc_passwd",
            lambda c: ROOT + entry(b"h", b"1", link=b"/etc/passwd") + END,
            UnsafeEntry,
            "unsafe_path",
        ),
        (
            "hardlink_dotdot",
            lambda c: ROOT + entry(b"h", b"1", link=b"../canary") + END,
            UnsafeEntry,
            "unsafe_path",
        ),
        (
            "hardlink_to_symlink",
            lambda c: ROOT + entry(b"s", b"2", link=c) + entry(b"h", b"1", link=b"s") + END,
            UnsafeLink,
            "unsafe_link",
        ),
        (
            "hardlink_to_later",
            lambda c: ROOT + entry(b"h", b"1", link=b"f") + entry(b"f", data=b"x") + END,
            UnsafeLink,
            "unsafe_link",
        ),
        (
            "device",
            lambda c: ROOT + entry(b"null", b"3", dev=(1, 3)) + END,
            DeviceRefused,
            "device_refused",
        ),
        ("huge_pax", huge_pax, LimitExceeded, "limit_exceeded"),
        ("sparse_beyond_realsize", sparse_lying, MalformedArchive, "malformed_tar"),
        ("sparse_absurd_count", sparse_absurd, LimitExceeded, "limit_exceeded"),
        (
            "bad_checksum",
            lambda c: ROOT + header(b"f", size=1, checksum_delta=1) + pad(b"x") + END,
            MalformedArchive,
            "malformed_tar",
        ),
        (
            "non_octal",
            lambda c: ROOT + entry(b"f", data=b"x", patch={100: b"0006x4\0"}) + END,
            MalformedArchive,
            "malformed_tar",
        ),
        (
            "nul_in_pax_path",
            lambda c: ROOT + pax((b"path", b"ok\0" + c)) + entry(b"f") + END,
            UnsafeEntry,
            "unsafe_path",
        ),
        ("empty_name", lambda c: ROOT + entry(b"") + END, UnsafeEntry, "unsafe_path"),
        (
            "global_header",
            lambda c: ROOT + header(b"g", b"g", size=0) + END,
            MalformedArchive,
            "malformed_tar",
        ),
        (
            "gnu_longname",
            lambda c: ROOT + entry(b"././@LongLink", b"L", data=c + b"\0") + END,
            MalformedArchive,
            "malformed_tar",
        ),
        (
            "root_is_a_file",
            lambda c: entry(b"./", data=b"x") + END,
            UnsafeEntry,
            "unsafe_path",
        ),
        (
            "size_lie_on_symlink",
            lambda c: ROOT + entry(b"s", b"2", data=b"hidden", link=b"t") + END,
            MalformedArchive,
            "malformed_tar",
        ),
        (
            "trailing_garbage",
            lambda c: ROOT + END + b"\1" * BLOCK,
            MalformedArchive,
            "malformed_tar",
        ),
    ]


@pytest.mark.parametrize(
    ("make", "error", "code"),
    [pytest.param(m, e, c, id=name) for name, m, e, c in hostile_cases()],
)
def test_hostile_stream_is_refused_and_nothing_escapes(
    tmp_path: Path,
    make: Callable[[bytes], bytes],
    error: type[ExtractError],
    code: str,
) -> None:
    canary = tmp_path / "canary"
    canary.write_bytes(CANARY)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_bytes(b"keep")
    before = outside_state(tmp_path)
    archive = make(os.fsencode(canary))
    with pytest.raises(error) as info:
        extract(archive, tmp_path / "root", tmp_path / "state", split=4096)
    assert info.value.code == code
    assert info.value.detail
    assert outside_state(tmp_path) == before
    assert canary.read_bytes() == CANARY


def test_error_names_the_entry_and_poisons_the_extractor(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with Extractor(tmp_path / "root", tmp_path / "state") as ex:
        with pytest.raises(UnsafeEntry, match=r"a/\.\./\.\./x"):
            ex.feed(ROOT + entry(b"a/../../x"))
        with pytest.raises(ExtractError):
            ex.feed(END)


def test_devices_are_created_when_allowed(tmp_path: Path) -> None:
    archive = ROOT + entry(b"null", b"3", mode=0o666, dev=(1, 3)) + END
    extract(archive, tmp_path / "root", tmp_path / "state", allow_devices=True)
    st = os.lstat(tmp_path / "root" / "null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666


# --- hard links and memory ------------------------------------------------------------------


@pytest.mark.parametrize("small_reads", [False, True])
def test_hard_links_need_a_file_of_this_stream_across_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_reads: bool
) -> None:
    """The files written are journaled on disk and looked up only when a hard link asks; a
    resume keeps those before its checkpoint and forgets those after it."""
    if small_reads:  # journal records across read boundaries; every lookup through the index
        monkeypatch.setattr(extract_module, "_READ_SIZE", 7)
        monkeypatch.setattr(extract_module, "_RECENT_BYTES", 0)
    root, state = tmp_path / "root", tmp_path / "state"
    (root / "d").mkdir(parents=True)
    (root / "d" / "old").write_bytes(b"in the volume before the stream")
    files = b"".join(entry(b"d/f%04d" % i, data=b"%d" % i) for i in range(3000))
    head = ROOT + entry(b"d", b"5") + files
    with Extractor(root, state) as ex:
        ex.feed(head + entry(b"h1", b"1", link=b"d/f0000"))
        ex.feed(entry(b"d/late", data=b"late") + entry(b"h2", b"1", link=b"d/f2999"))
        checkpoint = ex.commit()
        ex.feed(entry(b"d/after", data=b"after the checkpoint"))  # lost in the "crash"
    assert os.lstat(root / "h2").st_ino == os.lstat(root / "d" / "f2999").st_ino

    def resumed(tail: bytes) -> None:
        with Extractor.resume(root, state, checkpoint) as ex:
            ex.feed(tail + END)
            ex.finish()

    resumed(entry(b"h3", b"1", link=b"d/late") + entry(b"h4", b"1", link=b"d/f1234"))
    assert os.lstat(root / "h4").st_ino == os.lstat(root / "d" / "f1234").st_ino
    for target in (b"d/old", b"d/after", b"d/missing", b"d"):
        with pytest.raises(UnsafeLink):
            resumed(entry(b"h5", b"1", link=target))
    assert not (root / "h5").exists()
    # An incremental pass may link to what the volume already holds.
    with Extractor(root, tmp_path / "state2", allow_existing_links=True) as ex:
        ex.feed(ROOT + entry(b"h6", b"1", link=b"d/old") + END)
        ex.finish()
    assert (root / "h6").read_bytes() == b"in the volume before the stream"


def test_memory_does_not_grow_with_the_number_of_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extract_module, "_RECENT_BYTES", 32 << 10)
    root = tmp_path / "root"
    root.mkdir()
    names = [b"d%d/f%05d" % (i // 1000, i) for i in range(6000)]
    archive = ROOT + b"".join(
        pax((b"mtime", b"1700000000.%09d" % i))
        + entry(name)
        + (entry(b"%s.link" % name, b"1", link=names[i // 2]) if i % 100 == 99 else b"")
        for i, name in enumerate(names)
    )
    # A hard link to the very first file once all were written: the check still holds.
    archive += entry(b"link", b"1", link=names[0]) + END
    pieces = list(chunks(archive, 256 << 10))
    with Extractor(root, tmp_path / "state") as ex:
        tracemalloc.start()
        try:
            for i, piece in enumerate(pieces):
                ex.feed(piece)
                ex.drain_digests()
                if i == 1:
                    ex.commit()
                    early = tracemalloc.get_traced_memory()[0]
            ex.commit()
            late = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        ex.finish()
        assert ex.files_done == len(names)
    assert os.lstat(root / "link").st_nlink == 2
    assert os.lstat(root / "d5" / "f05999.link").st_ino == os.lstat(root / "d2" / "f02999").st_ino
    # ~1000 files per piece; a set of the files written would add ~90 bytes a file.
    assert late - early < 96 << 10, f"{late - early} bytes more after {len(names)} files"


def test_a_large_sparse_map_split_anywhere(tmp_path: Path) -> None:
    """The map is requested in as few steps as its line count allows, never past its end."""
    runs = [(i * 8192, b"%05d" % i) for i in range(3000)]
    archive = ROOT + sparse_entry(b"sp", 3000 * 8192, runs) + entry(b"after", data=b"a") + END
    expected = bytearray(3000 * 8192)
    for offset, data in runs:
        expected[offset : offset + len(data)] = data
    for split in (1000, 4099, len(archive)):
        root = tmp_path / f"root{split}"
        _, digests = extract(archive, root, tmp_path / f"state{split}", split=split)
        assert (root / "sp").read_bytes() == expected
        assert digests[b"sp"].sha256 == hashlib.sha256(expected).hexdigest()
        assert (root / "after").read_bytes() == b"a"


def test_owner_and_mode_are_exact_whether_or_not_a_new_file_needed_a_chown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new file is created with its permission bits, and chowned or chmodded only when it
    came out otherwise (another owner, a group from a setgid directory, bits the umask took,
    special bits): the result is exact either way, and the common file costs neither call."""
    src = tmp_path / "src"
    src.mkdir()
    cases = {
        "plain": (0o644, 0, 0),
        "open": (0o666, 0, 0),  # the umask takes 0o022 at creation
        "private": (0o600, 1234, 5678),
        "suid": (0o4755, 0, 0),
        "none": (0o000, 0, 0),
    }
    for name, (mode, uid, gid) in cases.items():
        path = src / name
        path.write_bytes(name.encode())
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    archive = gnu_tar(src)
    calls: list[str] = []
    real_fchown, real_fchmod = os.fchown, os.fchmod

    def fchown(fd: int, uid: int, gid: int) -> None:
        calls.append(f"chown {os.readlink(f'/proc/self/fd/{fd}')}")
        real_fchown(fd, uid, gid)

    def fchmod(fd: int, mode: int) -> None:
        calls.append(f"chmod {os.readlink(f'/proc/self/fd/{fd}')}")
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchown", fchown)
    monkeypatch.setattr(os, "fchmod", fchmod)

    def extract_with_umask(root: Path) -> None:
        old_umask = os.umask(0o022)
        try:
            extract(archive, root, root.with_name(root.name + "-state"))
        finally:
            os.umask(old_umask)
        assert snapshot(root) == snapshot(src)

    root = tmp_path / "root"
    root.mkdir()  # setgid: new files come with its group, and are chowned back
    os.chown(root, 0, 4321)
    os.chmod(root, 0o2755)
    extract_with_umask(root)
    for name, (mode, uid, gid) in cases.items():
        st = os.lstat(root / name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), name
    touched = set(calls)
    for name in cases:  # every file came with the root's group 4321: all chowned, chmodded
        assert {f"chown {root}/{name}", f"chmod {root}/{name}"} <= touched, name
    # Without the setgid root, only what differs is changed.
    calls.clear()
    again = tmp_path / "again"
    extract_with_umask(again)
    touched = set(calls)
    assert not [c for c in touched if c.endswith(("/plain", "/none"))], touched
    for name in ("open", "suid"):  # the umask took a bit; special bits come with chmod only
        assert f"chmod {again}/{name}" in touched and f"chown {again}/{name}" not in touched
    assert {f"chown {again}/private", f"chmod {again}/private"} <= touched
