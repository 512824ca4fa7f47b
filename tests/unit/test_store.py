"""The coordinator's store: schema versioning, round trips, the atomic guards (idempotency key,
one active writer per target volume), the event log, retention, and crash recovery."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from migrator.model import Migration, Phase, State, new_id, parse_request
from migrator.store import (
    SCHEMA_VERSION,
    AgentRecord,
    DuplicateKey,
    Store,
    StoreError,
    TargetTaken,
    UnknownMigration,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def migration(
    src: str = "pgdata",
    dst: str | None = None,
    *,
    source_agent: str = "host-a",
    target_agent: str = "host-b",
    created_at: datetime | None = None,
) -> Migration:
    target = {"agent": target_agent} if dst is None else {"agent": target_agent, "volume": dst}
    req = parse_request({"source": {"agent": source_agent, "volume": src}, "target": target})
    m = Migration(id=new_id(), request=req)
    if created_at is not None:
        m.created_at = created_at
    return m


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "coordinator.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store(db)
    s.open()
    yield s
    s.close()


# -- schema ---------------------------------------------------------------------------------


def test_open_creates_a_versioned_schema_in_wal_mode(store: Store, db: Path) -> None:
    assert store.schema_version == SCHEMA_VERSION >= 1
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"agents", "migrations", "idempotency", "events"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_reopen_keeps_data_and_does_not_reapply_the_schema(store: Store, db: Path) -> None:
    m = migration()
    store.insert_migration(m)
    store.upsert_agent(AgentRecord("host-a", "http://a:8421", "tok", None, "api"))
    store.close()
    again = Store(db)
    again.open()
    try:
        assert again.schema_version == SCHEMA_VERSION
        got = again.get_migration(m.id)
        assert got is not None and got.to_record() == m.to_record()
        assert [a.name for a in again.list_agents()] == ["host-a"]
    finally:
        again.close()


def test_a_newer_database_is_refused_and_left_untouched(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match=r"newer than this coordinator knows"):
        Store(db).open()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    conn.close()


def test_a_file_that_is_not_a_database_is_refused_clearly(db: Path) -> None:
    db.write_bytes(b"this is not an SQLite database, just some bytes" * 100)
    with pytest.raises(StoreError, match=r"unusable .* restore it from a backup"):
        Store(db).open()


def test_memory_database_and_use_before_open() -> None:
    s = Store(":memory:")
    with pytest.raises(StoreError, match="not open"):
        s.list_agents()
    s.open()
    s.insert_migration(migration())
    assert len(s.list_migrations()) == 1
    s.close()
    s.close()  # idempotent


# -- agents ---------------------------------------------------------------------------------


def test_agents_upsert_replace_delete_and_list(store: Store) -> None:
    b = AgentRecord("host-b", "http://b:8421", "tb", "http://b-data:8422", "config")
    a = AgentRecord("host-a", "http://a:8421", "ta", None, "api")
    assert store.upsert_agent(b) is True
    assert store.upsert_agent(a) is True
    assert store.list_agents() == [a, b]
    a2 = AgentRecord("host-a", "http://a2:8421", "ta2", "http://a2:9", "api")
    assert store.upsert_agent(a2) is False
    assert store.get_agent("host-a") == a2
    assert store.delete_agent("host-a") is True
    assert store.delete_agent("host-a") is False
    assert store.get_agent("host-a") is None
    assert store.list_agents() == [b]


def test_agent_source_is_checked(store: Store) -> None:
    with pytest.raises(StoreError, match="CHECK constraint"):
        store.upsert_agent(AgentRecord("x", "http://x", "t", None, "elsewhere"))


# -- migrations -----------------------------------------------------------------------------


def test_migration_round_trip_including_checkpoint_and_result(store: Store) -> None:
    m = migration("pgdata", "pgcopy", created_at=T0 + timedelta(microseconds=123))
    store.insert_migration(m)
    got = store.get_migration(m.id)
    assert got is not None and got.to_record() == m.to_record()

    m.start()
    m.enter(Phase.TRANSFERRING)
    m.progress.bytes_done = 4096
    m.progress.rate_bytes_per_s = 1.5
    m.checkpoint.update({"pull_id": "p1", "created": True, "stopped": ["db", "web"]})
    store.save_migration(m)
    got = store.get_migration(m.id)
    assert got is not None and got.to_record() == m.to_record()
    assert got.checkpoint == {"pull_id": "p1", "created": True, "stopped": ["db", "web"]}

    m.succeed({"bytes": 4096, "files": 2, "digest": "sha256:00", "verified": True})
    store.save_migration(m)
    got = store.get_migration(m.id)
    assert got is not None and got.to_record() == m.to_record()
    assert store.get_migration("mig_nope") is None


def test_save_of_an_unknown_migration_is_an_error(store: Store) -> None:
    with pytest.raises(UnknownMigration):
        store.save_migration(migration())


def test_list_is_newest_first_with_state_filter_and_limit(store: Store) -> None:
    old = migration("v1", created_at=T0)
    tie_first = migration("v2", created_at=T0 + timedelta(seconds=1))
    tie_second = migration("v3", created_at=T0 + timedelta(seconds=1))
    new = migration("v4", created_at=T0 + timedelta(seconds=1, microseconds=500))
    # Inserted out of time order: the order comes from created_at, then insertion.
    for m in (new, tie_first, old, tie_second):
        store.insert_migration(m)
    ids = [m.id for m in store.list_migrations()]
    assert ids == [new.id, tie_second.id, tie_first.id, old.id]
    assert [m.id for m in store.list_migrations(limit=2)] == [new.id, tie_second.id]
    assert store.list_migrations(limit=0) == []

    old.start()
    old.fail("transfer_failed", "boom")
    store.save_migration(old)
    assert [m.id for m in store.list_migrations(state="failed")] == [old.id]
    queued = [m.id for m in store.list_migrations(state="queued")]
    assert queued == [new.id, tie_second.id, tie_first.id]
    assert store.list_migrations(state="running") == []
    assert store.count_by_state() == {
        "queued": 3,
        "running": 0,
        "succeeded": 0,
        "failed": 1,
        "cancelled": 0,
    }


def test_idempotency_key_duplicate_and_lookup(store: Store) -> None:
    first = migration()
    store.insert_migration(first, idempotency_key="k1", fingerprint="f1")
    second = migration()
    with pytest.raises(DuplicateKey):
        store.insert_migration(second, idempotency_key="k1", fingerprint="f1")
    assert store.get_migration(second.id) is None  # rolled back with the key
    found = store.find_idempotent("k1")
    assert found is not None
    assert found[0].to_record() == first.to_record() and found[1] == "f1"
    assert store.find_idempotent("k2") is None
    with pytest.raises(ValueError, match="go together"):
        store.insert_migration(migration(), idempotency_key="k3")


def test_a_second_active_migration_on_the_same_target_is_refused(store: Store) -> None:
    first = migration("pgdata")
    store.insert_migration(first)
    other_source = migration("other", "pgdata")  # another source, same target volume
    with pytest.raises(TargetTaken) as info:
        store.insert_migration(other_source)
    assert info.value.migration_id == first.id
    assert store.get_migration(other_source.id) is None
    # Another target volume, or the same volume on another agent, is fine.
    store.insert_migration(migration("pgdata", "pgdata2"))
    store.insert_migration(migration("pgdata", target_agent="host-c"))
    assert store.active_by_target("host-b", "pgdata") is not None

    first.start()
    store.save_migration(first)
    with pytest.raises(TargetTaken):
        store.insert_migration(migration("other", "pgdata"))
    first.cancel()
    store.save_migration(first)
    assert store.active_by_target("host-b", "pgdata") is None
    again = migration("other", "pgdata")
    store.insert_migration(again)
    active = store.active_by_target("host-b", "pgdata")
    assert active is not None and active.id == again.id

    # Retrying the cancelled one while `again` is active would make two writers: refused.
    first.retry()
    with pytest.raises(TargetTaken) as info:
        store.save_migration(first)
    assert info.value.migration_id == again.id
    stored = store.get_migration(first.id)
    assert stored is not None and stored.state is State.CANCELLED


def test_active_by_source(store: Store) -> None:
    assert store.active_by_source("host-a", "pgdata") is None
    m = migration("pgdata")
    store.insert_migration(m)
    also = migration("pgdata", target_agent="host-c")  # reading one source twice is allowed
    store.insert_migration(also)
    found = store.active_by_source("host-a", "pgdata")
    assert found is not None and found.id in (m.id, also.id)
    assert store.active_by_source("host-b", "pgdata") is None
    for x in (m, also):
        x.start()
        x.succeed({})
        store.save_migration(x)
    assert store.active_by_source("host-a", "pgdata") is None


@pytest.mark.parametrize("connections", ["one shared store", "a store per thread"])
def test_concurrent_identical_creates_make_exactly_one_migration(
    tmp_path: Path, connections: str
) -> None:
    # All threads target one volume, so the key must be checked before the target (DuplicateKey,
    # never TargetTaken). "A store per thread" makes SQLite's own locking (BEGIN IMMEDIATE,
    # busy_timeout) do the work, opening included, as two coordinator processes would.
    db = tmp_path / "race.db"
    shared = Store(db)
    shared.open()
    barrier = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def create() -> None:
        store = shared if connections == "one shared store" else Store(db)
        store.open()  # a no-op on the shared, already open store
        m = migration()
        barrier.wait()
        try:
            store.insert_migration(m, idempotency_key="same", fingerprint="fp")
            outcome = "created"
        except DuplicateKey:
            outcome = "duplicate"
        except TargetTaken:
            outcome = "target_taken"
        finally:
            if store is not shared:
                store.close()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert sorted(outcomes) == ["created"] + ["duplicate"] * 7
        stored = shared.list_migrations()
        found = shared.find_idempotent("same")
        assert len(stored) == 1 and found is not None and found[0].id == stored[0].id
    finally:
        shared.close()


def test_unfinished_after_a_crash(db: Path) -> None:
    crashed = Store(db)
    crashed.open()
    queued = migration("v1", created_at=T0 + timedelta(seconds=2))
    running = migration("v2", created_at=T0)
    done = migration("v3", created_at=T0 + timedelta(seconds=1))
    for m in (queued, running, done):
        crashed.insert_migration(m)
    running.start()
    running.checkpoint["pull_id"] = "p9"
    crashed.save_migration(running)
    done.start()
    done.succeed({})
    crashed.save_migration(done)
    # No close(): the process died. A new store on the same file sees what was committed.
    restarted = Store(db)
    restarted.open()
    try:
        back = restarted.unfinished()
        assert [m.id for m in back] == [running.id, queued.id]  # oldest first
        assert back[0].state is State.RUNNING and back[0].checkpoint == {"pull_id": "p9"}
    finally:
        restarted.close()
        crashed.close()


# -- events ---------------------------------------------------------------------------------


def test_events_append_and_read_after(store: Store) -> None:
    a, b = migration("va"), migration("vb")
    store.insert_migration(a)
    store.insert_migration(b)
    ids = [store.append_event(a.id, "log", {"message": f"m{i}"}) for i in range(5)]
    other = store.append_event(b.id, "state", {"state": "queued"})
    assert ids == sorted(ids) and other > ids[-1]
    events = store.events_after(a.id, 0)
    assert [(e[0], e[1], e[2]["message"]) for e in events] == [
        (i, "log", f"m{n}") for n, i in enumerate(ids)
    ]
    assert [e[0] for e in store.events_after(a.id, ids[1])] == ids[2:]
    assert [e[0] for e in store.events_after(a.id, ids[1], 2)] == ids[2:4]
    assert store.events_after(a.id, ids[-1]) == []
    assert store.events_after(b.id, 0) == [(other, "state", {"state": "queued"})]
    with pytest.raises(UnknownMigration):
        store.append_event("mig_nope", "log", {})


# -- retention ------------------------------------------------------------------------------


def test_prune_removes_only_old_finished_migrations_with_their_events(store: Store) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=40)
    old_done = migration("v1", created_at=long_ago)
    old_failed = migration("v2", created_at=long_ago)
    old_running = migration("v3", created_at=long_ago)
    recent_done = migration("v4", created_at=long_ago)
    for m in (old_done, old_failed, old_running, recent_done):
        store.insert_migration(m, idempotency_key=f"key-{m.id}", fingerprint="f")
        store.append_event(m.id, "log", {"message": "hello"})
    for m in (old_done, old_failed, old_running, recent_done):
        m.start()
    old_done.succeed({})
    old_failed.fail("transfer_failed", "boom")
    recent_done.succeed({})
    old_done.finished_at = old_failed.finished_at = long_ago + timedelta(hours=1)
    for m in (old_done, old_failed, old_running, recent_done):
        store.save_migration(m)
    last_event = store.append_event(old_done.id, "log", {"message": "bye"})  # the highest id

    assert store.prune(older_than_s=30 * 86400) == 2
    assert store.get_migration(old_done.id) is None and store.get_migration(old_failed.id) is None
    assert store.events_after(old_done.id, 0) == []
    assert store.find_idempotent(f"key-{old_done.id}") is None
    assert store.find_idempotent(f"key-{old_running.id}") is not None
    assert {m.id for m in store.list_migrations()} == {old_running.id, recent_done.id}
    assert len(store.events_after(recent_done.id, 0)) == 1
    assert store.prune(older_than_s=30 * 86400) == 0
    # Event ids are never reused after a prune (a client's Last-Event-ID stays meaningful).
    assert store.append_event(recent_done.id, "log", {}) > last_event


def test_state_event_is_written_with_the_row(tmp_path: Path) -> None:
    """A reader that sees the new state also sees its event (one transaction)."""
    store = Store(tmp_path / "m.db")
    store.open()
    m = Migration(
        id=new_id(),
        request=parse_request(
            {"source": {"agent": "a1", "volume": "v1"}, "target": {"agent": "b1"}}
        ),
    )
    store.insert_migration(m)
    m.start()
    store.save_migration(m, state_event=True)
    [(_, kind, data)] = store.events_after(m.id, 0)
    assert kind == "state"
    assert data["state"] == "running"
    store.close()
