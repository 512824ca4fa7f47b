"""The manifest endpoint on a real volume holding one of everything, every field checked."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import docker
import pytest

from agents.manifest import decode_path
from tests.agentclient import AgentHTTP
from tests.fidelity import MTIME_NS, NON_UTF8, SPARSE_DATA_AT, SPARSE_SIZE, build_fidelity_tree
from tests.testbed import AgentProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def fidelity_volume(agent_a: AgentProcess, docker_a: docker.DockerClient, volume_name: str) -> Path:
    docker_a.api.create_volume(volume_name)
    root = Path(docker_a.api.inspect_volume(volume_name)["Mountpoint"])
    build_fidelity_tree(root)
    return root


def _by_path(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["path"]: e for e in entries}


def test_manifest_describes_every_entry_exactly(
    agent_a: AgentProcess, fidelity_volume: Path, volume_name: str
) -> None:
    entries, totals = AgentHTTP(agent_a).manifest(volume_name)
    got = _by_path(entries)
    root = fidelity_volume

    # Sorted by raw path bytes, depth first, the root first.
    paths = [e["path"] for e in entries]
    assert paths[0] == "."
    raw = [p.encode("utf-8", "surrogateescape").replace(b"/", b"\x00") for p in paths[1:]]
    assert raw == sorted(raw)
    # Every entry on disk is listed, and nothing else.
    on_disk = {"."} | {
        decode_path(os.path.relpath(os.path.join(d, n), os.fsencode(root)))
        for d, dirs, files in os.walk(os.fsencode(root))
        for n in dirs + files
    }
    assert set(paths) == on_disk

    for path, e in got.items():
        st = os.lstat(os.path.join(os.fsencode(root), path.encode("utf-8", "surrogateescape")))
        assert e["mode"] == stat.S_IMODE(st.st_mode), path
        assert (e["uid"], e["gid"]) == (st.st_uid, st.st_gid), path
        assert e["mtime_ns"] == st.st_mtime_ns, path
        assert e["ctime_ns"] == st.st_ctime_ns, path
        assert e["ino"] == st.st_ino, path

    assert got["."]["type"] == "dir"
    assert (got["."]["uid"], got["."]["gid"], got["."]["mode"]) == (999, 999, 0o700)
    assert got["dir/nested/deeper"]["type"] == "dir"
    assert got["empty-dir"]["type"] == "dir"
    assert got["dir/nested/deeper/leaf.txt"]["mtime_ns"] == MTIME_NS

    secret = got["dir/secret.conf"]
    assert (secret["type"], secret["uid"], secret["gid"], secret["mode"]) == (
        "file",
        999,
        999,
        0o600,
    )
    assert secret["size"] == len(b"password=hunter2\n")

    assert got["setuid-bin"]["mode"] == 0o4755
    assert got["sticky-dir"]["mode"] == 0o1777

    assert got["abs-link"]["type"] == "symlink"
    assert got["abs-link"]["link_target"] == "/etc/passwd"
    assert got["abs-link"]["mtime_ns"] == MTIME_NS
    assert got["dangling-link"]["type"] == "symlink"
    assert got["dangling-link"]["link_target"] == "does/not/exist"

    assert got["dir/original"]["hardlink_of"] is None
    assert got["dir/original"]["nlink"] == 2
    assert got["hardlink"]["type"] == "file"
    assert got["hardlink"]["hardlink_of"] == "dir/original"
    assert got["hardlink"]["ino"] == got["dir/original"]["ino"]

    assert got["fifo"]["type"] == "fifo"

    sparse = got["sparse.img"]
    assert sparse["size"] == SPARSE_SIZE
    assert sparse["sparse"] is True
    # The 4 KiB of data is reported where it is; the filesystem may round the run to a block.
    [[offset, length]] = sparse["data_segments"]
    assert offset <= SPARSE_DATA_AT < SPARSE_DATA_AT + 4096 <= offset + length
    assert length <= 1 << 20
    assert got["dir/secret.conf"]["sparse"] is False

    assert got["with-xattr"]["xattrs"] == {
        "user.migrator.test": base64.b64encode(b"v\x00lue").decode()
    }
    assert got["dir/secret.conf"]["xattrs"] == {}

    latin = decode_path(NON_UTF8)
    assert got[latin]["type"] == "file"
    assert got[latin]["path"].encode("utf-8", "surrogateescape") == NON_UTF8

    files = [e for e in entries if e["type"] == "file"]
    assert totals["entries"] == len(entries)
    assert totals["files"] == len(files)
    assert totals["dirs"] == sum(e["type"] == "dir" for e in entries)
    # The hard link's bytes are counted once.
    assert totals["bytes"] == sum(e["size"] for e in files if e["hardlink_of"] is None)


def test_manifest_of_empty_volume_is_just_the_root(
    agent_a: AgentProcess, docker_a: docker.DockerClient, volume_name: str
) -> None:
    docker_a.api.create_volume(volume_name)
    entries, totals = AgentHTTP(agent_a).manifest(volume_name)
    assert [e["path"] for e in entries] == ["."]
    assert totals["entries"] == 1 and totals["files"] == 0 and totals["bytes"] == 0


def test_manifest_streams_a_large_volume(
    agent_a: AgentProcess, docker_a: docker.DockerClient, volume_name: str
) -> None:
    """More entries than one batch: the stream is cut into batches and stays ordered."""
    docker_a.api.create_volume(volume_name)
    root = Path(docker_a.api.inspect_volume(volume_name)["Mountpoint"])
    for d in range(5):
        (root / f"d{d}").mkdir()
        for i in range(1000):
            (root / f"d{d}" / f"f{i:04d}").write_bytes(b"x" * (i % 7))
    entries, totals = AgentHTTP(agent_a).manifest(volume_name)
    assert totals["entries"] == 1 + 5 + 5000 == len(entries)
    assert [e["path"] for e in entries][:3] == [".", "d0", "d0/f0000"]
    assert totals["bytes"] == 5 * sum(i % 7 for i in range(1000))
