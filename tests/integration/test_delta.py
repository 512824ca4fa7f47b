"""Block deltas end to end: a later pass into a target that already has a large file sends only
the blocks that changed, between real agents on real engines, and the result is identical and
verifies, also when the connection is cut in the middle of a patch."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.agentclient import AgentHTTP
from tests.faultproxy import FaultProxy, Faults
from tests.testbed import AgentProcess
from tests.transfers import assert_same_tree, get_pull, mountpoint, start_pull, wait_pull

pytestmark = pytest.mark.integration

PAGE = 8 << 10
CHUNK = 1 << 20


def rewrite_pages(path: Path, pages: list[int]) -> int:
    """Overwrite whole 8 KiB pages in place, as a database does; returns the bytes changed."""
    with open(path, "r+b") as f:
        for page in pages:
            f.seek(page * PAGE)
            f.write(secrets.token_bytes(PAGE))
    return len(pages) * PAGE


@pytest.fixture
def source_volume(docker_a: docker.DockerClient, volume_name: str) -> Path:
    docker_a.api.create_volume(volume_name)
    return mountpoint(docker_a, volume_name)


def first_copy(agent_a: AgentProcess, agent_b: AgentProcess, volume: str) -> str:
    pull_id = start_pull(agent_a, agent_b, volume, compression="none", chunk_size=CHUNK)
    pull = wait_pull(agent_b, pull_id)
    assert pull["state"] == "succeeded", pull
    return pull_id


def next_pass(
    agent_a: AgentProcess, agent_b: AgentProcess, volume: str, earlier: str, **options: Any
) -> dict[str, Any]:
    """A later pass into the same target volume, continuing `earlier`, until it ends."""
    pull_id = start_pull(
        agent_a,
        agent_b,
        volume,
        compression="none",
        chunk_size=CHUNK,
        if_target_exists="sync",
        continues=earlier,
        **options,
    )
    return wait_pull(agent_b, pull_id)


def test_second_pass_sends_only_changed_blocks(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
) -> None:
    (source_volume / "base").mkdir()
    table = source_volume / "base" / "16396"
    table.write_bytes(secrets.token_bytes(24 << 20))
    index = source_volume / "base" / "16404"
    index.write_bytes(secrets.token_bytes(6 << 20))
    (source_volume / "base" / "small").write_bytes(b"v1")
    earlier = first_copy(agent_a, agent_b, volume_name)

    changed = rewrite_pages(table, [0, 1, 700, 2047, 3071])
    with open(index, "ab") as f:  # grows
        f.write(secrets.token_bytes(3 * PAGE + 100))
    changed += 3 * PAGE + 100
    (source_volume / "base" / "small").write_bytes(b"v2, longer")
    future = time.time_ns() + 10**9  # an mtime the target cannot already have
    os.utime(table, ns=(future, future))

    pull = next_pass(agent_a, agent_b, volume_name, earlier)
    pull_id = pull["id"]
    assert pull["state"] == "succeeded", pull
    target = mountpoint(docker_b, volume_name)
    assert_same_tree(source_volume, target)
    sent = pull["passes"][-1]["bytes"]
    # Five pages and a grown tail, not 30 MiB: headers, sparse maps and the runs.
    assert changed < sent < changed + (64 << 10), pull["passes"]
    report = AgentHTTP(agent_b).post(f"/v1/pulls/{pull_id}/verify").json()
    assert report["verified"] is True, report
    # The patched file's recorded digest is the source's: damage to an unsent block shows.
    with open(target / "base" / "16396", "r+b") as f:
        f.seek(1500 * PAGE)
        f.write(b"\0")
    report = AgentHTTP(agent_b).post(f"/v1/pulls/{pull_id}/verify").json()
    assert report["verified"] is False
    assert any("base/16396" in m for m in report["mismatches"]), report


def test_cut_in_the_middle_of_a_patch_resumes(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
) -> None:
    big = source_volume / "big"
    big.write_bytes(secrets.token_bytes(32 << 20))
    earlier = first_copy(agent_a, agent_b, volume_name)
    # Every other page of the first 8 MiB: a patch of 4 MiB in 512 runs, several frames.
    changed = rewrite_pages(big, list(range(0, 1024, 2)))
    with FaultProxy(agent_a.port, Faults(cut_at=[changed // 2])) as proxy:
        pull = next_pass(agent_a, agent_b, volume_name, earlier, source_url=proxy.url)
        assert proxy.cuts == 1
    assert pull["state"] == "succeeded", pull
    assert pull["reconnects"] == 1
    assert pull["passes"][-1]["bytes"] < changed + (64 << 10), pull["passes"]
    assert_same_tree(source_volume, mountpoint(docker_b, volume_name))


def test_renamed_large_files_are_renamed_not_resent(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
) -> None:
    """PostgreSQL recycles WAL segments by renaming them; log rotation renames too."""
    wal = source_volume / "pg_wal"
    wal.mkdir()
    for n in range(4):
        (wal / f"00000001000000000000000{n}").write_bytes(secrets.token_bytes(4 << 20))
    earlier = first_copy(agent_a, agent_b, volume_name)
    os.rename(wal / "000000010000000000000000", wal / "000000010000000000000004")
    os.rename(wal / "000000010000000000000001", wal / "000000010000000000000005")
    changed = rewrite_pages(wal / "000000010000000000000005", [0, 1])  # recycled, then written
    pull = next_pass(agent_a, agent_b, volume_name, earlier)
    assert pull["state"] == "succeeded", pull
    assert pull["passes"][-1]["bytes"] < changed + (64 << 10), pull["passes"]
    target = mountpoint(docker_b, volume_name)
    assert_same_tree(source_volume, target)
    assert AgentHTTP(agent_b).post(f"/v1/pulls/{pull['id']}/verify").json()["verified"] is True


def test_a_file_renamed_but_unchanged_since_the_last_pass_is_only_renamed(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
) -> None:
    """A pass that keeps bases notes which source file each large path is; when one is then
    renamed and not written (a recycled WAL segment waiting for reuse), the next pass renames
    the target's copy and neither compares nor sends it, and its content digest follows."""
    wal = source_volume / "pg_wal"
    wal.mkdir()
    old_ns = time.time_ns() - 3600 * 10**9
    for n in range(3):
        (wal / f"00000001000000000000000{n}").write_bytes(secrets.token_bytes(4 << 20))
        os.utime(wal / f"00000001000000000000000{n}", ns=(old_ns, old_ns))
    earlier = first_copy(agent_a, agent_b, volume_name)
    window = get_pull(agent_b, earlier)["pass_started_ns"]
    noted = next_pass(
        agent_a, agent_b, volume_name, earlier, keep_bases=True, window_start_ns=window
    )
    assert noted["state"] == "succeeded", noted
    os.rename(wal / "000000010000000000000000", wal / "000000010000000000000003")
    pull = next_pass(
        agent_a, agent_b, volume_name, noted["id"], window_start_ns=noted["pass_started_ns"]
    )
    assert pull["state"] == "succeeded", pull
    last = pull["passes"][-1]
    assert (last["files"], last["bases_kept"], last["bases_read"]) == (0, 0, 0), last
    target = mountpoint(docker_b, volume_name)
    assert_same_tree(source_volume, target)
    assert AgentHTTP(agent_b).post(f"/v1/pulls/{pull['id']}/verify").json()["verified"] is True
