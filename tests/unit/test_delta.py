"""Block deltas: the target's base, the source's patch, their wire forms, and a patch applied
by the extractor to the target's copy."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from pathlib import Path

import pytest
from blake3 import blake3

from agents import delta, tarstream
from agents.delta import BLOCK_HASH, DIGEST_SIZE, MIN_BLOCK_SIZE, Base, BaseError, Patch
from agents.extract import Extractor
from agents.incremental import parse_selection_with_bases, plan_with_bases, selection_line
from agents.manifest import entry_from_json, entry_to_json, walk
from agents.source import Snapshots
from agents.tarparse import UnsafeEntry

PAGE = MIN_BLOCK_SIZE


def base_of(data: bytes, tmp_path: Path, block: int = PAGE) -> Base:
    path = tmp_path / "base.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return delta.describe(fd, len(data), block)
    finally:
        os.close(fd)


def patch_of(new: bytes, base: Base, tmp_path: Path) -> Patch:
    path = tmp_path / "new.bin"
    path.write_bytes(new)
    fd = os.open(path, os.O_RDONLY)
    try:
        return delta.diff(fd, len(new), base)
    finally:
        os.close(fd)


def blocks_of(data: bytes | bytearray, block: int = PAGE) -> str:
    """What a patch's digest must be: computed here independently of agents/delta.py's loop."""
    hashes = [blake3(data[at : at + block]).digest() for at in range(0, len(data), block)]
    return f"blocks-blake3:{block}:{blake3(b''.join(hashes)).hexdigest()}"


def apply(old: bytes, new_size: int, runs: tuple[tuple[int, int], ...], new: bytes) -> bytes:
    out = bytearray(old[:new_size].ljust(new_size, b"\0"))
    for offset, length in runs:
        out[offset : offset + length] = new[offset : offset + length]
    return bytes(out)


def test_identical_file_has_no_runs(tmp_path: Path) -> None:
    data = secrets.token_bytes(40 * PAGE + 100)
    patch = patch_of(data, base_of(data, tmp_path), tmp_path)
    assert patch.runs == ()
    assert patch.digest == blocks_of(data)


def test_changed_pages_become_runs_and_neighbours_merge(tmp_path: Path) -> None:
    old = secrets.token_bytes(64 * PAGE)
    new = bytearray(old)
    for page in (3, 10, 11, 12, 40):
        new[page * PAGE + 17] ^= 0xFF
    patch = patch_of(bytes(new), base_of(old, tmp_path), tmp_path)
    assert patch.runs == ((3 * PAGE, PAGE), (10 * PAGE, 3 * PAGE), (40 * PAGE, PAGE))
    assert apply(old, len(new), patch.runs, bytes(new)) == new


def test_grown_and_shrunk_files(tmp_path: Path) -> None:
    old = secrets.token_bytes(10 * PAGE + 300)
    grown = old + secrets.token_bytes(3 * PAGE)
    patch = patch_of(grown, base_of(old, tmp_path), tmp_path)
    # The old short last page differs from the new full one; everything after it is new.
    assert patch.runs == ((10 * PAGE, len(grown) - 10 * PAGE),)
    assert apply(old, len(grown), patch.runs, grown) == grown

    shrunk = old[: 4 * PAGE + 5]
    patch = patch_of(shrunk, base_of(old, tmp_path), tmp_path)
    assert patch.runs == ((4 * PAGE, 5),)
    assert apply(old, len(shrunk), patch.runs, shrunk) == shrunk


def test_block_size_grows_with_the_file() -> None:
    assert delta.block_size_for(1 << 20) == PAGE
    assert delta.block_size_for(944 << 20) == PAGE
    assert delta.block_size_for(3 << 30) == 32 << 10
    assert delta.block_size_for(1 << 40) == 8 << 20
    assert delta.block_size_for(1 << 44) == delta.MAX_BLOCK_SIZE
    for size in (1 << 20, 5 << 30, 100 << 30):
        assert -(-size // delta.block_size_for(size)) <= delta.TARGET_BLOCKS


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"hash": BLOCK_HASH, "block_size": 100, "digests": ""},
        {"hash": BLOCK_HASH, "block_size": True, "digests": ""},
        {"hash": BLOCK_HASH, "block_size": PAGE, "digests": "!!!"},
        {
            "hash": BLOCK_HASH,
            "block_size": PAGE,
            "digests": base64.b64encode(b"x" * (DIGEST_SIZE + 1)).decode(),
        },
        {"hash": BLOCK_HASH, "block_size": PAGE},
        {"block_size": PAGE, "digests": ""},  # made by an agent of an older version
        {"hash": "sha256-128", "block_size": PAGE, "digests": ""},
    ],
)
def test_bad_bases_are_refused(doc: object) -> None:
    with pytest.raises(BaseError):
        Base.from_json(doc)


def test_selection_lines_round_trip_with_bases(tmp_path: Path) -> None:
    base = base_of(secrets.token_bytes(3 * PAGE), tmp_path)
    body = selection_line(b".", None) + selection_line(b"db/big", base)
    body += selection_line(b"db/\xffraw", None)
    paths, bases = parse_selection_with_bases(body)
    assert paths == [b".", b"db/big", b"db/\xffraw"]
    assert bases == {b"db/big": base}
    with pytest.raises(ValueError, match="line 1"):
        parse_selection_with_bases(b'{"path": "x", "base": {"block_size": 1, "digests": ""}}\n')


def test_plan_describes_large_files_the_target_has(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    big = secrets.token_bytes(2 << 20)
    (src / "big").write_bytes(big[:-1] + b"!")
    (dst / "big").write_bytes(big)
    (src / "small").write_bytes(b"new")
    (dst / "small").write_bytes(b"old")
    (src / "new-big").write_bytes(big)  # not on the target: sent whole
    got = dict(plan_with_bases(walk(src), dst, window_start_ns=None))
    assert set(got) == {b".", b"big", b"small", b"new-big"}
    assert got[b"small"] is None and got[b"new-big"] is None
    assert got[b"big"] == base_of(big, tmp_path, delta.block_size_for(len(big)))


def test_snapshot_of_a_selection_with_bases_carries_patches(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    old = secrets.token_bytes(2 << 20)
    new = bytearray(old)
    new[5 * PAGE] ^= 1
    (root / "big").write_bytes(new)
    base = base_of(old, tmp_path)
    identity = Snapshots(tmp_path / "snaps").take(root, [b".", b"big"], {b"big": base})
    entries = list(identity.entries())
    patched = next(e for e in entries if e.path == b"big")
    assert patched.patch == Patch(((5 * PAGE, PAGE),), blocks_of(new))
    assert entry_from_json(entry_to_json(patched)) == patched
    # The stream carries the run, not the file: a header, a map, one page and padding.
    assert identity.total_size < 4 * PAGE
    # Another base is another stream.
    other = Snapshots(tmp_path / "snaps").take(
        root, [b".", b"big"], {b"big": base_of(new, tmp_path)}
    )
    assert other.stream_id != identity.stream_id


def _stream(root: Path, entries: list[object]) -> bytes:
    return b"".join(tarstream.generate(root, entries))  # type: ignore[arg-type]


def test_extractor_applies_a_patch_in_place(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    old = secrets.token_bytes(2 << 20)
    new = bytearray(old)
    new[7 * PAGE + 3] ^= 1
    new += b"tail"
    (src / "big").write_bytes(new)
    (dst / "big").write_bytes(old)
    identity = Snapshots(tmp_path / "snaps").take(
        src, [b".", b"big"], {b"big": base_of(old, tmp_path)}
    )
    body = _stream(src, list(identity.entries()))
    assert len(body) < 64 << 10
    with Extractor(dst, tmp_path / "state", allow_existing_links=True) as ex:
        ex.feed(body)
        ex.commit()
        ex.finish()
        digests = {d.path: d for d in ex.drain_digests()}
    assert (dst / "big").read_bytes() == bytes(new)
    assert digests[b"big"].sha256 == blocks_of(bytes(new))
    st_src, st_dst = os.stat(src / "big"), os.stat(dst / "big")
    assert (st_dst.st_mtime_ns, st_dst.st_mode) == (st_src.st_mtime_ns, st_src.st_mode)


def test_a_patch_needs_the_targets_copy(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    data = secrets.token_bytes(2 << 20)
    (src / "big").write_bytes(data)
    identity = Snapshots(tmp_path / "snaps").take(
        src, [b".", b"big"], {b"big": base_of(data[::-1], tmp_path)}
    )
    body = _stream(src, list(identity.entries()))
    os.symlink("/etc/passwd", dst / "big")  # not a regular file: never written through
    with (
        Extractor(dst, tmp_path / "state", allow_existing_links=True) as ex,
        pytest.raises(UnsafeEntry),
    ):
        ex.feed(body)
    assert os.readlink(dst / "big") == "/etc/passwd"
    json.dumps(entry_to_json(next(iter(identity.entries()))))


def test_a_patch_resumes_from_a_checkpoint_mid_run(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    old = secrets.token_bytes(4 << 20)
    new = bytearray(old)
    for page in range(0, 512, 3):
        new[page * PAGE : page * PAGE + 100] = secrets.token_bytes(100)
    (src / "big").write_bytes(new)
    (dst / "big").write_bytes(old)
    identity = Snapshots(tmp_path / "snaps").take(
        src, [b".", b"big"], {b"big": base_of(old, tmp_path)}
    )
    body = _stream(src, list(identity.entries()))
    cut = len(body) // 2 // 512 * 512 + 100  # inside a run, not on a block boundary
    ex = Extractor(dst, tmp_path / "state", allow_existing_links=True)
    ex.feed(body[:cut])
    checkpoint = ex.commit()
    ex.close()
    with Extractor.resume(dst, tmp_path / "state", checkpoint, allow_existing_links=True) as ex:
        ex.feed(body[checkpoint["offset"] :])
        ex.commit()
        ex.finish()
        digests = {d.path: d for d in ex.drain_digests()}
    assert (dst / "big").read_bytes() == bytes(new)
    assert digests[b"big"].sha256 == blocks_of(bytes(new))


def test_a_renamed_large_file_is_renamed_on_the_target_and_patched(tmp_path: Path) -> None:
    """As PostgreSQL recycles WAL segments: old names vanish, new names appear with the old
    content (same size and mtime), one of them then partly rewritten."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for root in (src, dst):
        (root / "wal").mkdir(parents=True)
    seg = {name: secrets.token_bytes(2 << 20) for name in ("A", "B", "C")}
    for name, data in seg.items():
        (dst / "wal" / name).write_bytes(data)
        os.utime(dst / "wal" / name, ns=(10**18, 10**18 + ord(name)))
    (src / "wal" / "B").write_bytes(seg["B"])
    (src / "wal" / "X").write_bytes(seg["A"])  # A recycled as X, untouched since
    os.utime(src / "wal" / "X", ns=(10**18, 10**18 + ord("A")))
    rewritten = secrets.token_bytes(PAGE) + seg["C"][PAGE:]  # C recycled as Y, then written
    (src / "wal" / "Y").write_bytes(rewritten)
    (src / "wal" / "Z").write_bytes(secrets.token_bytes(3 << 20))  # new, no leftover fits
    os.utime(src / "wal" / "B", ns=(10**18, 10**18 + ord("B")))
    forgotten: list[bytes] = []
    renamed: dict[bytes, Base] = {}
    selected = list(
        plan_with_bases(
            walk(src), dst, window_start_ns=None, on_delete=forgotten.append, renamed=renamed
        )
    )
    assert [p for p, _ in selected] == [b".", b"wal", b"wal/X", b"wal/Y", b"wal/Z"]
    assert sorted(renamed) == [b"wal/X", b"wal/Y"]
    assert sorted(forgotten) == [b"wal/A", b"wal/C"]
    assert sorted(os.listdir(dst / "wal")) == ["B", "X", "Y"]
    # The source then sends what differs: nothing of X, one page of Y, all of Z.
    paths = [p for p, _ in selected]
    identity = Snapshots(tmp_path / "snaps").take(src, paths, renamed)
    patches = {e.path: e.patch for e in identity.entries() if e.patch is not None}
    assert patches[b"wal/X"] is not None and patches[b"wal/X"].runs == ()
    assert patches[b"wal/Y"] is not None and patches[b"wal/Y"].runs == ((0, PAGE),)
    body = _stream(src, list(identity.entries()))
    assert len(body) < (3 << 20) + (64 << 10)
    with Extractor(dst, tmp_path / "state", allow_existing_links=True) as ex:
        ex.feed(body)
        ex.commit()
        ex.finish()
    for name in ("B", "X", "Y", "Z"):
        assert (dst / "wal" / name).read_bytes() == (src / "wal" / name).read_bytes(), name
        assert os.stat(dst / "wal" / name).st_mtime_ns == os.stat(src / "wal" / name).st_mtime_ns


def test_leftovers_nobody_takes_are_deleted(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (dst / "old").mkdir(parents=True)
    (dst / "old" / "big").write_bytes(secrets.token_bytes(2 << 20))
    (dst / "gone").write_bytes(secrets.token_bytes(2 << 20))
    (src / "newdir").mkdir()  # a new file in a directory the target lacks: not renamed into
    (src / "newdir" / "big").write_bytes(secrets.token_bytes(2 << 20))
    renamed: dict[bytes, Base] = {}
    selected = [
        p for p, _ in plan_with_bases(walk(src), dst, window_start_ns=None, renamed=renamed)
    ]
    assert selected == [b".", b"newdir", b"newdir/big"]
    assert renamed == {}
    assert os.listdir(dst) == []


def test_a_large_file_is_compared_in_worker_processes_with_the_same_result(
    tmp_path: Path,
) -> None:
    size = delta.PROCESS_MIN_SIZE + 3 * PAGE + 10
    old = secrets.token_bytes(size)
    new = bytearray(old)
    for at in (0, PAGE + 1, size // 2 - 1, size // 2, size - 5):  # both halves, the seam
        new[at] ^= 0xFF
    base = base_of(old, tmp_path)
    path = tmp_path / "new.bin"
    path.write_bytes(new)
    fd = os.open(path, os.O_RDONLY)
    try:
        in_workers = delta.diff(fd, size, base)
        in_process = delta._compare(fd, 0, size, base)
    finally:
        os.close(fd)
    assert in_workers.runs == tuple(in_process[0])
    # The target's side goes the same way: its description equals one taken here, in order.
    fd = os.open(path, os.O_RDONLY)
    try:
        assert delta.describe(fd, size, PAGE).digests == delta._digests(fd, 0, size, PAGE)
    finally:
        os.close(fd)
    assert in_workers.digest == blocks_of(bytes(new))
    assert apply(old, size, in_workers.runs, bytes(new)) == bytes(new)


def test_broken_workers_fall_back_to_comparing_in_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken:
        def submit(self, *args: object) -> object:
            raise delta.BrokenProcessPool("a worker died")

    monkeypatch.setattr(delta, "_workers", lambda: Broken())
    size = delta.PROCESS_MIN_SIZE + PAGE
    old = secrets.token_bytes(size)
    new = old[:-1] + b"!"
    assert patch_of(new, base_of(old, tmp_path), tmp_path).runs == ((size - PAGE, PAGE),)


def test_agents_of_another_version_fall_back_to_whole_files_and_legacy_digests() -> None:
    """A base without this version's hash is not compared (the source sends the file whole);
    a patch from a source of an earlier version (blocks-sha256) is still verified."""
    from agents.delta import ForeignBase, parse_blocks_digest
    from agents.incremental import parse_selection_with_bases

    old_base = {"block_size": PAGE, "digests": base64.b64encode(bytes(DIGEST_SIZE)).decode()}
    with pytest.raises(ForeignBase):
        Base.from_json(old_base)
    body = json.dumps({"path": "big", "base": old_base}).encode() + b"\n"
    paths, bases = parse_selection_with_bases(body)
    assert bases == {} and b"big" in paths
    data = bytes(range(256)) * 100
    hashes = [hashlib.sha256(data[at : at + PAGE]).digest() for at in range(0, len(data), PAGE)]
    legacy = f"blocks-sha256:{PAGE}:{hashlib.sha256(b''.join(hashes)).hexdigest()}"
    assert parse_blocks_digest(legacy) == ("sha256", PAGE)
    assert parse_blocks_digest(blocks_of(data)) == ("blake3", PAGE)
    assert parse_blocks_digest(f"blocks-md5:{PAGE}:" + "0" * 64) is None
