"""The data path end to end: a real target agent pulls from a real source agent, each on its
own Docker engine, and the volumes end up identical — including after interruptions."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import docker
import pytest

from tests.agentclient import AgentHTTP, assert_problem
from tests.faultproxy import FaultProxy, Faults
from tests.fidelity import build_fidelity_tree
from tests.testbed import AgentProcess
from tests.transfers import (
    assert_same_tree,
    get_pull,
    mountpoint,
    start_pull,
    wait_for,
    wait_pull,
)

pytestmark = pytest.mark.integration

CHUNK = 1 << 20  # small frames, so "at most one frame re-sent" is a sharp bound
FRAME_OVERHEAD = 64


@pytest.fixture
def source_volume(docker_a: docker.DockerClient, volume_name: str) -> Path:
    docker_a.api.create_volume(volume_name, labels={"app": "db", "tier": "gold"})
    return mountpoint(docker_a, volume_name)


def fill_bulk(root: Path, *, big_mib: int = 24, small: int = 200) -> None:
    """One big file (a resume lands mid-file) and many small ones of random bytes."""
    rng = secrets.token_bytes
    (root / "big.bin").write_bytes(rng(big_mib << 20))
    (root / "small").mkdir()
    for i in range(small):
        (root / "small" / f"f{i:04d}").write_bytes(rng(1 + (i * 7919) % 20000))


def test_round_trip_of_the_fidelity_volume(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
) -> None:
    build_fidelity_tree(source_volume)
    pull = wait_pull(agent_b, start_pull(agent_a, agent_b, volume_name))
    assert pull["state"] == "succeeded", pull
    target = mountpoint(docker_b, volume_name)
    assert_same_tree(source_volume, target)
    # The 1 GiB sparse file stays sparse: about the same blocks on both sides.
    src_blocks = os.lstat(source_volume / "sparse.img").st_blocks
    dst_blocks = os.lstat(target / "sparse.img").st_blocks
    assert dst_blocks <= src_blocks + 64, (src_blocks, dst_blocks)
    # The target volume was created with the source's driver, options and labels.
    assert docker_b.api.inspect_volume(volume_name)["Labels"] == {"app": "db", "tier": "gold"}
    assert pull["created_volume"] is True
    # The source was not modified.
    assert docker_a.api.inspect_volume(volume_name)["Labels"] == {"app": "db", "tier": "gold"}


@pytest.mark.parametrize("compression", ["none", "zstd", "auto"])
def test_bulk_transfer_with_each_compression(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
    compression: str,
) -> None:
    fill_bulk(source_volume, big_mib=8, small=50)
    (source_volume / "zeros.txt").write_bytes(b"compressible " * 100_000)
    pull = wait_pull(agent_b, start_pull(agent_a, agent_b, volume_name, compression=compression))
    assert pull["state"] == "succeeded", pull
    assert_same_tree(source_volume, mountpoint(docker_b, volume_name))
    assert pull["progress"]["bytes_done"] == pull["progress"]["bytes_total"] > 8 << 20
    assert pull["result"]["transfer_digest"].startswith("sha256:")


@pytest.mark.parametrize("cuts", [[0.3], [0.3, 0.7]], ids=["cut-30", "cut-30-70"])
def test_connection_cut_resumes_from_the_committed_offset(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
    cuts: list[float],
) -> None:
    fill_bulk(source_volume)
    total = sum(f.stat().st_size for f in source_volume.rglob("*") if f.is_file())
    with FaultProxy(agent_a.port, Faults(cut_at=[int(total * c) for c in cuts])) as proxy:
        pull = wait_pull(
            agent_b,
            start_pull(
                agent_a,
                agent_b,
                volume_name,
                source_url=proxy.url,
                compression="none",
                chunk_size=CHUNK,
            ),
        )
        assert pull["state"] == "succeeded", pull
        assert proxy.cuts == len(cuts)
        assert pull["reconnects"] == len(cuts)
        assert_same_tree(source_volume, mountpoint(docker_b, volume_name))
        stream = pull["progress"]["bytes_total"]
        frames = stream // CHUNK + 1
        # Everything on the wire beyond one copy of the stream, its frame headers and the
        # HTTP framing of each connection: at most one frame per cut.
        overhead = frames * FRAME_OVERHEAD + proxy.connections * 4096 + frames * 16
        resent = proxy.downstream_bytes - stream - overhead
        assert resent <= len(cuts) * (CHUNK + FRAME_OVERHEAD), (resent, proxy.downstream_bytes)


def test_flipped_byte_is_refetched_and_never_written(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
) -> None:
    fill_bulk(source_volume, big_mib=8, small=20)
    with FaultProxy(agent_a.port, Faults(flip_at=[3 << 20])) as proxy:
        pull = wait_pull(
            agent_b,
            start_pull(
                agent_a,
                agent_b,
                volume_name,
                source_url=proxy.url,
                compression="none",
                chunk_size=CHUNK,
            ),
        )
    assert proxy.flips == 1
    assert pull["state"] == "succeeded", pull
    assert pull["reconnects"] == 1
    assert "checksum" in agent_b.log_tail(20_000) or "frame rejected" in agent_b.log_tail(20_000)
    assert_same_tree(source_volume, mountpoint(docker_b, volume_name))


@pytest.mark.parametrize("victim", ["target", "source"])
def test_agent_killed_mid_file_resumes_after_restart(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
    victim: str,
) -> None:
    """SIGKILL of either agent in the middle of a 32 MiB file; started again, the pull goes on
    from the target's committed offset and re-fetches at most one frame."""
    agent = agent_b if victim == "target" else agent_a
    (source_volume / "big.bin").write_bytes(secrets.token_bytes(32 << 20))
    with FaultProxy(agent_a.port) as proxy:
        pull_id = start_pull(
            agent_a,
            agent_b,
            volume_name,
            source_url=proxy.url,
            compression="none",
            chunk_size=CHUNK,
            max_rate_bytes_per_s=16 << 20,
        )
        wait_for(
            lambda: get_pull(agent_b, pull_id)["committed_offset"] > 10 << 20,
            what="a third of the file",
        )
        agent.kill()
        if victim == "target":
            committed = get_journal_offset(agent_b, pull_id)
            assert 0 < committed < 32 << 20  # killed in the middle of big.bin
        agent.start()
        pull = wait_pull(agent_b, pull_id)
        assert pull["state"] == "succeeded", pull
        if victim == "source":
            assert pull["reconnects"] >= 1
        assert_same_tree(source_volume, mountpoint(docker_b, volume_name))
        stream = pull["progress"]["bytes_total"]
        frames = stream // CHUNK + 1
        overhead = frames * (FRAME_OVERHEAD + 16) + proxy.connections * 4096
        assert proxy.downstream_bytes - stream - overhead <= CHUNK + FRAME_OVERHEAD


def test_source_changed_between_attempts_continues_incrementally(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
) -> None:
    (source_volume / "aa-big.bin").write_bytes(secrets.token_bytes(12 << 20))
    (source_volume / "small").mkdir()
    for i in range(300):
        (source_volume / "small" / f"f{i:04d}").write_bytes(secrets.token_bytes(20_000))
    (source_volume / "zz-late.txt").write_text("will change\n")
    (source_volume / "zz-gone.txt").write_text("will vanish\n")
    hour_ago = time.time_ns() - 3600 * 10**9
    for path in source_volume.rglob("*"):
        os.utime(path, ns=(hour_ago, hour_ago))
    with FaultProxy(agent_a.port) as proxy:
        pull_id = start_pull(
            agent_a,
            agent_b,
            volume_name,
            source_url=proxy.url,
            compression="none",
            chunk_size=CHUNK,
            max_rate_bytes_per_s=8 << 20,
        )
        # Past the big file, into the small ones.
        wait_for(
            lambda: get_pull(agent_b, pull_id)["committed_offset"] > 14 << 20,
            what="the big file and some small ones",
        )
        (source_volume / "small" / "f0001").write_bytes(b"changed content")
        (source_volume / "zz-late.txt").write_text("changed, longer than before\n")
        (source_volume / "zz-gone.txt").unlink()
        (source_volume / "added.txt").write_text("new file\n")
        proxy.cut_now()
        pull = wait_pull(agent_b, pull_id)
    assert pull["state"] == "succeeded", pull
    assert pull["passes"][-1]["incremental"] is True
    assert pull["passes"][-1]["pass"] == 2
    # The second pass sent what changed or had not arrived yet, never the big file again.
    assert pull["passes"][-1]["bytes"] < 5 << 20, pull["passes"]
    assert_same_tree(source_volume, mountpoint(docker_b, volume_name))


def test_existing_target_fails_with_target_exists(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
) -> None:
    (source_volume / "data").write_text("source\n")
    docker_b.api.create_volume(volume_name)
    (mountpoint(docker_b, volume_name) / "mine").write_text("target's own\n")
    pull = wait_pull(agent_b, start_pull(agent_a, agent_b, volume_name))
    assert pull["state"] == "failed"
    assert pull["error"]["code"] == "target_exists"
    assert (mountpoint(docker_b, volume_name) / "mine").read_text() == "target's own\n"
    assert not (mountpoint(docker_b, volume_name) / "data").exists()


def test_sync_makes_an_existing_target_identical(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
) -> None:
    build_fidelity_tree(source_volume)
    docker_b.api.create_volume(volume_name)
    target = mountpoint(docker_b, volume_name)
    (target / "extra-dir/sub").mkdir(parents=True)
    (target / "extra-dir/sub/file").write_text("delete me\n")
    (target / "setuid-bin").write_text("stale\n")
    pull = wait_pull(agent_b, start_pull(agent_a, agent_b, volume_name, if_target_exists="sync"))
    assert pull["state"] == "succeeded", pull
    assert_same_tree(source_volume, target)


def test_shared_storage_source_is_refused(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_a: docker.DockerClient,
    volume_name: str,
    tmp_path: Path,
) -> None:
    """A bind-backed volume is refused as unreadable (its data is elsewhere while unused); the
    source never streams it, and nothing is created on the target."""
    docker_a.api.create_volume(
        volume_name, driver_opts={"type": "none", "o": "bind", "device": str(tmp_path)}
    )
    pull = wait_pull(agent_b, start_pull(agent_a, agent_b, volume_name))
    assert pull["state"] == "failed"
    assert pull["error"]["code"] == "volume_not_readable"
    assert pull["created_volume"] is False


def test_stream_refuses_bad_tokens(
    agent_a: AgentProcess, source_volume: Path, volume_name: str
) -> None:
    http = AgentHTTP(agent_a, token="")
    path = f"/v1/volumes/{volume_name}/stream"
    assert_problem(http.get(path), 401, "transfer_token_invalid")
    assert_problem(
        http.get(path, headers={"Authorization": f"Bearer {agent_a.token}"}),
        401,
        "transfer_token_invalid",
    )
    from agents.transfer_token import mint_transfer_token

    expired = mint_transfer_token(agent_a.token, volume=volume_name, transfer_id="t", expires_at=1)
    assert_problem(
        http.get(path, headers={"Authorization": f"Transfer {expired}"}),
        401,
        "transfer_token_expired",
    )
    other = mint_transfer_token(agent_a.token, volume="othervol", transfer_id="t", expires_at=2**40)
    assert_problem(
        http.get(path, headers={"Authorization": f"Transfer {other}"}),
        401,
        "transfer_token_invalid",
    )


def get_journal_offset(agent: AgentProcess, pull_id: str) -> int:
    import json

    doc = json.loads((agent.state_dir / "pulls" / pull_id / "journal.json").read_text())
    return int(doc["offset"])


def test_verify_rereads_the_target_and_finds_tampering(
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    docker_b: docker.DockerClient,
    source_volume: Path,
    volume_name: str,
) -> None:
    build_fidelity_tree(source_volume)
    fill_bulk(source_volume, big_mib=2, small=20)
    pull_id = start_pull(agent_a, agent_b, volume_name)
    assert wait_pull(agent_b, pull_id)["state"] == "succeeded"
    http = AgentHTTP(agent_b)
    first = http.post(f"/v1/pulls/{pull_id}/verify").json()
    assert first["verified"] is True, first
    assert first["mismatches"] == []
    assert first["digest"].startswith("sha256:")
    assert http.post(f"/v1/pulls/{pull_id}/verify").json()["digest"] == first["digest"]
    # Flip one byte on the target behind the migration's back: verification must see it.
    target = mountpoint(docker_b, volume_name)
    victim = target / "small" / "f0003"
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    (target / "small" / "f0004").unlink()
    second = http.post(f"/v1/pulls/{pull_id}/verify").json()
    assert second["verified"] is False
    assert any("small/f0003" in m for m in second["mismatches"]), second
    assert any("gone" in m for m in second["mismatches"]), second
    assert second["digest"] != first["digest"]
