"""Helpers for data-path tests: start a pull the way the coordinator will, wait for it, and
compare two volumes entry by entry and byte by byte."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import docker

from agents.manifest import Entry, EntryType, walk
from agents.transfer_token import default_expiry, mint_transfer_token
from tests.agentclient import AgentHTTP
from tests.testbed import AgentProcess

TERMINAL = {"succeeded", "failed", "cancelled"}


def start_pull(
    source: AgentProcess,
    target: AgentProcess,
    volume: str,
    *,
    target_volume: str | None = None,
    source_url: str | None = None,
    pull_id: str | None = None,
    **options: Any,
) -> str:
    pull_id = pull_id or f"p-{uuid.uuid4().hex[:12]}"
    token = mint_transfer_token(
        source.token, volume=volume, transfer_id=pull_id, expires_at=default_expiry()
    )
    r = AgentHTTP(target).post(
        "/v1/pulls",
        json={
            "id": pull_id,
            "volume": target_volume or volume,
            "source": {"url": source_url or source.url, "volume": volume, "token": token},
            "options": options,
        },
    )
    assert r.status_code == 202, r.text
    return pull_id


def mountpoint(client: docker.DockerClient, name: str) -> Path:
    """Where an engine keeps a volume's data (the agents read and write it there)."""
    return Path(client.api.inspect_volume(name)["Mountpoint"])


def get_pull(target: AgentProcess, pull_id: str) -> dict[str, Any]:
    r = AgentHTTP(target).get(f"/v1/pulls/{pull_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def wait_pull(target: AgentProcess, pull_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = get_pull(target, pull_id)
        if doc["state"] in TERMINAL:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"pull {pull_id} not done after {timeout}s: {doc}\n{target.log_tail()}")


def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def file_sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _comparable(e: Entry) -> dict[str, Any]:
    return {
        "type": e.type,
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "size": e.size,
        "mtime_ns": e.mtime_ns,
        "link_target": e.link_target,
        "hardlink_of": e.hardlink_of,
        "xattrs": e.xattrs,
        "sparse": e.sparse,
        "nlink": e.nlink,
        "rdev": (e.rdev_major, e.rdev_minor),
    }


def assert_same_tree(source: Path, target: Path) -> None:
    """Every entry equal field by field (all but inode and ctime, which no copy can keep) and
    every regular file equal byte for byte."""
    src = {e.path: e for e in walk(source) if e.type is not EntryType.SOCKET}
    dst = {e.path: e for e in walk(target)}
    assert sorted(src) == sorted(dst), (
        f"only in source: {sorted(set(src) - set(dst))[:20]}, "
        f"only in target: {sorted(set(dst) - set(src))[:20]}"
    )
    for path, s in src.items():
        assert _comparable(s) == _comparable(dst[path]), path
        if s.type is EntryType.FILE and s.hardlink_of is None:
            a = file_sha256(os.path.join(os.fsencode(source), path))
            b = file_sha256(os.path.join(os.fsencode(target), path))
            assert a == b, path


def disk_blocks(path: Path) -> int:
    return os.lstat(path).st_blocks
