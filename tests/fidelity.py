"""The fidelity volume: one of every kind of entry a migration must carry exactly.

Built straight into a volume's mountpoint (the tests run as root, like the agent). Returns
what each entry must look like, for the manifest tests and the round-trip tests.
"""

from __future__ import annotations

import os
from pathlib import Path

SPARSE_SIZE = 1 << 30
SPARSE_DATA_AT = 512 << 20
NON_UTF8 = b"caf\xe9-latin1.txt"
MTIME_NS = 1_700_000_000_123_456_789


def build_fidelity_tree(root: Path) -> None:
    """Populate `root` (an empty directory) with the fidelity set."""
    (root / "dir/nested/deeper").mkdir(parents=True)
    (root / "dir/nested/deeper/leaf.txt").write_text("leaf\n")
    (root / "empty-dir").mkdir()

    secret = root / "dir/secret.conf"
    secret.write_bytes(b"password=hunter2\n")
    os.chown(secret, 999, 999)
    secret.chmod(0o600)

    setuid = root / "setuid-bin"
    setuid.write_bytes(b"#!/bin/sh\necho hi\n")
    setuid.chmod(0o4755)

    sticky = root / "sticky-dir"
    sticky.mkdir()
    sticky.chmod(0o1777)

    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling-link")

    (root / "dir/original").write_bytes(b"linked content\n")
    os.link(root / "dir/original", root / "hardlink")

    os.mkfifo(root / "fifo")

    with open(root / "sparse.img", "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_DATA_AT)
        f.write(b"\xab" * 4096)

    xattr_file = root / "with-xattr"
    xattr_file.write_text("has attributes\n")
    os.setxattr(xattr_file, "user.migrator.test", b"v\x00lue")

    (root / os.fsdecode(NON_UTF8)).write_bytes(b"latin-1 name\n")

    os.utime(root / "dir/nested/deeper/leaf.txt", ns=(MTIME_NS, MTIME_NS))
    os.utime(root / "abs-link", ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)

    os.chown(root, 999, 999)
    root.chmod(0o700)
