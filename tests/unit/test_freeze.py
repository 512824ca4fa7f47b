"""Frozen streams: the source copies a stream's data aside when it names it, so the stream no
longer depends on the volume (a quiesced final pass restarts the containers then)."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents import delta, source, spool, tarstream
from agents.delta import MIN_BLOCK_SIZE
from agents.source import Snapshots
from agents.spool import SpoolDamaged
from tests.unit.test_source import produce


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    root = tmp_path / "vol"
    (root / "db").mkdir(parents=True)
    (root / "db" / "table").write_bytes(secrets.token_bytes(3 << 20))
    (root / "db" / "small").write_bytes(b"s" * 1000)
    (root / "empty").write_bytes(b"")
    fd = os.open(root / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"data", 1 << 20)
    os.close(fd)
    os.symlink("db/small", root / "link")
    os.link(root / "db" / "small", root / "hard")
    return root


def test_a_frozen_stream_is_the_same_stream_and_ignores_later_changes(
    tmp_path: Path, volume: Path
) -> None:
    snapshots = Snapshots(tmp_path / "snap")
    plain = snapshots.take(volume, None)
    expected, _ = produce(volume, plain)
    frozen = snapshots.take(volume, None, freeze=True)
    assert frozen.stream_id == plain.stream_id and frozen.frozen
    assert frozen.spool is not None
    assert frozen.spool.stat().st_size == sum(tarstream.data_bytes(e) for e in frozen.entries())
    # The containers run again: the volume changes in place, same sizes.
    with open(volume / "db" / "table", "r+b") as f:
        f.write(b"X" * 4096)
    (volume / "db" / "small").write_bytes(b"t" * 1000)
    raw, trailer = produce(volume, frozen)
    assert raw == expected
    assert trailer["dirty"] == []
    # A resume (after a restart of the agent) finds it frozen, mid-file too.
    again = snapshots.find(frozen.stream_id)
    assert again is not None and again.frozen
    offset = len(expected) // 2 // 512 * 512
    rest, _ = produce(volume, again, offset)
    assert rest == expected[offset:]
    # The same stream read from the changed volume would not be.
    live, trailer = produce(volume, plain)
    assert live != expected and sorted(trailer["dirty"]) == ["db/small", "db/table"]


def test_a_frozen_patch_carries_only_its_runs(tmp_path: Path, volume: Path) -> None:
    old = (volume / "db" / "table").read_bytes()
    fd = os.open(volume / "db" / "table", os.O_RDONLY)
    try:
        base = delta.describe(fd, len(old), MIN_BLOCK_SIZE)
    finally:
        os.close(fd)
    with open(volume / "db" / "table", "r+b") as f:
        f.seek(5 * MIN_BLOCK_SIZE)
        f.write(b"Y" * 100)
    selection = [b".", b"db", b"db/table"]
    snapshots = Snapshots(tmp_path / "snap")
    expected, _ = produce(volume, snapshots.take(volume, selection, {b"db/table": base}))
    frozen = snapshots.take(volume, selection, {b"db/table": base}, freeze=True)
    assert frozen.spool is not None and frozen.spool.stat().st_size == MIN_BLOCK_SIZE
    (volume / "db" / "table").write_bytes(old)  # put back: the frozen stream still patches
    raw, trailer = produce(volume, frozen)
    assert raw == expected and trailer["dirty"] == []


def test_not_frozen_when_too_large_or_changing(
    tmp_path: Path, volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshots = Snapshots(tmp_path / "snap")
    monkeypatch.setattr(source, "FREEZE_MAX_BYTES", 1 << 20)
    big = snapshots.take(volume, None, freeze=True)
    assert not big.frozen and not list((tmp_path / "snap").glob("*.data"))
    monkeypatch.setattr(source, "FREEZE_MAX_BYTES", 1 << 30)
    monkeypatch.setattr(tarstream, "freeze", lambda root, entries, out: [b"db/table"])
    changing = snapshots.take(volume, None, freeze=True)
    assert not changing.frozen and not list((tmp_path / "snap").glob("*.data"))
    again = snapshots.find(changing.stream_id)
    assert again is not None and not again.frozen


def test_spools_are_bounded(tmp_path: Path, volume: Path) -> None:
    snapshots = Snapshots(tmp_path / "snap")
    ids = []
    for i in range(source.FROZEN_KEPT + 2):
        (volume / f"f{i}").write_bytes(b"x")
        ids.append(snapshots.take(volume, None, freeze=True).stream_id)
        os.utime(tmp_path / "snap" / f"{ids[-1]}.frozen", ns=(i * 10**9, i * 10**9))
    spools = sorted(p.name.removesuffix(".data") for p in (tmp_path / "snap").glob("*.data"))
    assert spools == sorted(ids[-source.FROZEN_KEPT :])
    oldest = snapshots.find(ids[0])
    assert oldest is not None and not oldest.frozen  # generated from the volume again


def test_a_damaged_copy_fails_the_stream_instead_of_sending_it(
    tmp_path: Path, volume: Path
) -> None:
    """The copy is not synced while the containers wait: a crash of the host may damage it.
    Every MiB of it is checked against its digest when read back."""
    snapshots = Snapshots(tmp_path / "snap")
    frozen = snapshots.take(volume, None, freeze=True)
    assert frozen.spool is not None
    size = frozen.spool.stat().st_size
    with open(frozen.spool, "r+b") as f:
        f.seek(size - 10)
        f.write(b"\xff" * 10)
    with pytest.raises(SpoolDamaged):
        b"".join(tarstream.generate(volume, frozen.entries(), spool=frozen.spool))
    spool.sums_path(frozen.spool).write_bytes(b"short")
    with pytest.raises(SpoolDamaged):
        b"".join(tarstream.generate(volume, frozen.entries(), spool=frozen.spool))
    # Digests are not synced either: a crash may lose them, which is damage too.
    spool.sums_path(frozen.spool).unlink()
    with pytest.raises(SpoolDamaged):
        b"".join(tarstream.generate(volume, frozen.entries(), spool=frozen.spool))


def test_a_copy_that_fails_fails_the_walk_and_leaves_nothing(
    tmp_path: Path, volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy runs beside the walk; when it fails, the walk still ends (it never waits on
    a queue nobody takes from, here with more files than the queue holds) and says why."""
    many = volume / "many"
    many.mkdir()
    for i in range(5000):
        (many / str(i)).write_bytes(b"m")

    def broken(root: object, entries: object, out: object) -> list[bytes]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarstream, "freeze", broken)
    snapshots = Snapshots(tmp_path / "snap")
    outcome: list[BaseException | None] = []

    def take() -> None:
        try:
            snapshots.take(volume, None, freeze=True)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    walker = threading.Thread(target=take)
    walker.start()
    walker.join(timeout=60)
    assert not walker.is_alive()
    assert isinstance(outcome[0], OSError) and outcome[0].errno == 28
    assert not [p.name for p in (tmp_path / "snap").iterdir() if not p.name.endswith(".snap")]


def test_naming_a_stream_clears_what_older_versions_and_dead_processes_left(
    tmp_path: Path, volume: Path
) -> None:
    """JSON-lines snapshots of an earlier version, and the walk and copy files of an agent
    process that is gone (killed while it named a stream), go when the next stream is named;
    this process's own files stay."""
    snap = tmp_path / "snap"
    snap.mkdir()
    dead = os.getpid() + 1_000_000  # above any pid this machine hands out
    leftovers = [
        snap / "m1-0123.ndjson",
        snap / f".walk-{dead}-7.tmp",
        snap / f".freeze-{dead}-7.data",
        snap / f".freeze-{dead}-7.sums",
    ]
    ours = snap / f".walk-{os.getpid()}-0.tmp"  # another thread of this process, walking
    for path in [*leftovers, ours]:
        path.write_bytes(b"x")
    identity = Snapshots(snap).take(volume, None, freeze=True)
    assert identity.frozen
    assert not [p for p in leftovers if p.exists()] and ours.exists()


def test_a_walk_that_fails_stops_its_copy_and_leaves_nothing(
    tmp_path: Path, volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = source.stream_entries

    def failing(*args: object, **kwargs: object) -> Iterator[object]:
        for n, entry in enumerate(real(*args, **kwargs)):  # type: ignore[arg-type]
            if n == 3:
                raise OSError(5, "Input/output error")
            yield entry

    monkeypatch.setattr(source, "stream_entries", failing)
    with pytest.raises(OSError, match="Input/output"):
        Snapshots(tmp_path / "snap").take(volume, None, freeze=True)
    assert list((tmp_path / "snap").iterdir()) == []
