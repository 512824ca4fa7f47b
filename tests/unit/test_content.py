"""The pull's content manifest: rows of a frame in one transaction, deletions with subtrees."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from agents.content import ContentDB, PathIndex, verify_volume
from agents.delta import block_digest, blocks_digest
from agents.extract import FileDigest


def test_one_commit_per_frame_not_per_file(tmp_path: Path) -> None:
    db = ContentDB(tmp_path / "content.db")
    statements: list[str] = []
    db._db.set_trace_callback(statements.append)
    db.record(FileDigest(b"d/f%d" % i, "ab" * 32, i) for i in range(1000))
    assert db.count() == 1000
    assert sum(s.strip().upper() == "COMMIT" for s in statements) == 1
    db.close()


def test_forget_removes_a_path_and_its_subtree_only(tmp_path: Path) -> None:
    db = ContentDB(tmp_path / "content.db")
    db.record(FileDigest(p, "00" * 32, 1) for p in (b"a", b"a/x", b"a/y/z", b"a.b", b"ab"))
    db.forget(b"a")
    assert [p for p in (b"a", b"a/x", b"a/y/z", b"a.b", b"ab") if db.lookup(p)] == [b"a.b", b"ab"]
    db.close()


def test_path_index_is_a_throwaway_set_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    path.write_bytes(b"not a database: replaced on open")
    index = PathIndex(path)
    index.add(b"d/f%d" % i for i in range(5000))
    index.add([b"d/f1", b"caf\xe9", b"a\nb"])
    assert b"d/f4999" in index and b"caf\xe9" in index and b"a\nb" in index
    assert b"d/f5000" not in index and b"d" not in index
    index.close()
    assert list(tmp_path.iterdir()) == []
    again = PathIndex(path)
    assert b"d/f1" not in again
    again.close()


def test_a_patched_file_is_verified_block_by_block_and_the_tree_digest_is_plain(
    tmp_path: Path,
) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    data = secrets.token_bytes(3 * (8 << 10) + 100)
    (root / "patched").write_bytes(data)
    (root / "plain").write_bytes(b"p")
    plain = ContentDB(tmp_path / "plain.db")
    plain.record(
        [
            FileDigest(b"patched", hashlib.sha256(data).hexdigest(), len(data)),
            FileDigest(b"plain", hashlib.sha256(b"p").hexdigest(), 1),
        ]
    )
    blocks = [block_digest(data[at : at + (8 << 10)]) for at in range(0, len(data), 8 << 10)]
    patched = ContentDB(tmp_path / "patched.db")
    patched.record(
        [
            FileDigest(b"patched", blocks_digest(8 << 10, blocks), len(data)),
            FileDigest(b"plain", hashlib.sha256(b"p").hexdigest(), 1),
        ]
    )
    # A patch from a source of an earlier version: SHA-256 blocks (blocks-sha256).
    legacy_blocks = [
        hashlib.sha256(data[at : at + (8 << 10)]).digest() for at in range(0, len(data), 8 << 10)
    ]
    legacy = ContentDB(tmp_path / "legacy.db")
    legacy.record(
        [
            FileDigest(b"patched", blocks_digest(8 << 10, legacy_blocks, "sha256"), len(data)),
            FileDigest(b"plain", hashlib.sha256(b"p").hexdigest(), 1),
        ]
    )
    one, other = verify_volume(str(root), plain), verify_volume(str(root), patched)
    assert one.verified and other.verified, (one.mismatches, other.mismatches)
    assert one.digest == other.digest  # the same tree, however its files were written
    old = verify_volume(str(root), legacy)
    assert old.verified and old.digest == one.digest, old.mismatches
    with open(root / "patched", "r+b") as f:
        f.seek(9000)
        f.write(b"!")
    broken = verify_volume(str(root), patched)
    assert not broken.verified and broken.mismatches == [
        "patched: content differs from what the source read"
    ]
