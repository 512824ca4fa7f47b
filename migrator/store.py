"""The coordinator's persistence: agents, migrations, idempotency keys and the event log, in one
SQLite file. The only module that imports `sqlite3`; it must not import aiohttp or anything
that does I/O besides SQLite.

The API is synchronous; callers on the event loop run it through `asyncio.to_thread`. It is safe
from several threads: one connection (`check_same_thread=False`) guarded by a `threading.Lock`.
One connection rather than one per call because SQLite serializes writers anyway, our write rate
is a few commits per second per running migration, and `":memory:"` (tests) only works with a
single connection (each new connection would see an empty database).

Durability: WAL with `synchronous=FULL`. NORMAL can lose the last commits on power loss; those
may be the idempotency row of an answered 202 or the checkpoint flag that lets `discard` remove
a target volume this migration created. FULL measured 0.19 ms per commit against 0.03 ms for
NORMAL (500 small commits on the development machine's disk), noise at our rate.

Schema: `PRAGMA user_version` is the schema version; `_STEPS[i]` takes a database from version
i to i + 1. `open()` applies the missing steps in one transaction and refuses a database newer
than the code. Add a step at the end to change the schema; never edit a released one.

Error tree:

    StoreError            the database is unusable (too new, corrupt, not open, an I/O error
                          from SQLite): the message says what to do
    ├── DuplicateKey      insert_migration: the idempotency key is already stored
    ├── TargetTaken       an active migration already writes that target volume (`migration_id`)
    └── UnknownMigration  save_migration / append_event on an id that is not stored
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from migrator.model import ACTIVE, TERMINAL, Migration, State


class StoreError(Exception):
    """The database cannot be used as it is; the message says what to do."""


class DuplicateKey(StoreError):
    """The idempotency key is stored already: answer with the migration `find_idempotent` gives."""

    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency key {key!r} is already stored")
        self.key = key


class TargetTaken(StoreError):
    """Another queued or running migration writes the same target volume."""

    def __init__(self, agent: str, volume: str, migration_id: str) -> None:
        super().__init__(f"active migration {migration_id} already writes {agent}:{volume}")
        self.agent = agent
        self.volume = volume
        self.migration_id = migration_id


class UnknownMigration(StoreError):
    """A write named a migration that is not stored (never inserted, or pruned)."""

    def __init__(self, migration_id: str) -> None:
        super().__init__(f"no stored migration {migration_id!r}")
        self.migration_id = migration_id


@dataclass(frozen=True)
class AgentRecord:
    name: str
    url: str
    token: str
    data_url: str | None
    source: str
    """`api` (registered by PUT /v1/agents/{name}) or `config` (from the config file)."""


# Times in indexed columns are Unix seconds (REAL): RFC 3339 text from `isoformat()` drops the
# fraction when it is zero, so it does not sort as text.
_STEPS: tuple[tuple[str, ...], ...] = (
    (  # 0 → 1
        """CREATE TABLE agents (
            name TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            token TEXT NOT NULL,
            data_url TEXT,
            source TEXT NOT NULL CHECK (source IN ('api', 'config')),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        # `seq` is the insertion order (newest-first ties); an INTEGER PRIMARY KEY keeps its
        # values across VACUUM, a bare rowid does not.
        """CREATE TABLE migrations (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            finished_at REAL,
            source_agent TEXT NOT NULL,
            source_volume TEXT NOT NULL,
            target_agent TEXT NOT NULL,
            target_volume TEXT NOT NULL,
            doc TEXT NOT NULL
        )""",
        "CREATE INDEX migrations_by_created ON migrations (created_at, seq)",
        "CREATE INDEX migrations_by_state ON migrations (state, created_at, seq)",
        # At most one active migration per target volume, enforced by the database itself.
        """CREATE UNIQUE INDEX migrations_active_target
            ON migrations (target_agent, target_volume) WHERE state IN ('queued', 'running')""",
        """CREATE INDEX migrations_active_source
            ON migrations (source_agent, source_volume) WHERE state IN ('queued', 'running')""",
        """CREATE TABLE idempotency (
            key TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            migration_id TEXT NOT NULL REFERENCES migrations (id) ON DELETE CASCADE,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX idempotency_by_migration ON idempotency (migration_id)",
        # AUTOINCREMENT: ids are never reused after a prune, so a Last-Event-ID stays valid.
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            migration_id TEXT NOT NULL REFERENCES migrations (id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX events_by_migration ON events (migration_id, id)",
    ),
)
SCHEMA_VERSION = len(_STEPS)

# Must match the partial indexes' WHERE clause word for word, or SQLite will not use them.
_IS_ACTIVE = "state IN ('queued', 'running')"
assert {State(s) for s in ("queued", "running")} == ACTIVE
_TERMINAL_STATES = tuple(sorted(s.value for s in TERMINAL))

# Another process holding the write lock (a second coordinator by mistake, the sqlite3 shell).
_BUSY_TIMEOUT_MS = 5000


def _dump(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def _epoch(t: datetime | None) -> float | None:
    return None if t is None else t.timestamp()


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, switch to WAL and bring the schema up to date (one transaction)."""
        with self._lock:
            if self._conn is not None:
                return
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as e:
                raise StoreError(f"cannot open database {self.path}: {e}") from e
            try:
                self._prepare(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            if str(self.path) != ":memory:":
                # Readers get their own connection: under WAL they never wait for a writer's
                # commit (an fsync, 30 ms at p99 on a busy disk here), which is what kept
                # GET /v1/migrations/{id} above 50 ms at p99 while 50 migrations ran.
                reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                reader.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                reader.execute("PRAGMA query_only = ON")
                self._reader = reader

    def _prepare(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")  # a no-op inside a transaction: set first
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"database {self.path} has schema version {version}, newer than this "
                        f"coordinator knows ({SCHEMA_VERSION}): run a newer coordinator, or "
                        "point --db at another file"
                    )
                for step in _STEPS[version:]:
                    for statement in step:
                        conn.execute(statement)
                # PRAGMA takes no parameters; SCHEMA_VERSION is our own integer.
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreError(
                f"database {self.path} is unusable ({e}): restore it from a backup, or move it "
                "away to start with an empty one"
            ) from e

    def close(self) -> None:
        with self._lock, self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A connection for reading (the reader's, when there is one); any SQLite error leaving
        it becomes a StoreError."""
        if self._reader is None:
            with self._writer() as conn:
                yield conn
            return
        with self._reader_lock:
            if self._reader is None:
                raise StoreError(f"store {self.path} is not open: call open() first")
            try:
                yield self._reader
            except sqlite3.Error as e:
                raise StoreError(f"database {self.path}: {e}") from e

    @contextmanager
    def _writer(self) -> Iterator[sqlite3.Connection]:
        """The writing connection, under the lock."""
        with self._lock:
            if self._conn is None:
                raise StoreError(f"store {self.path} is not open: call open() first")
            try:
                yield self._conn
            except sqlite3.Error as e:
                raise StoreError(f"database {self.path}: {e}") from e

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; BEGIN IMMEDIATE takes the write lock before the first read, so a
        check and the write it guards cannot interleave with another writer."""
        with self._writer() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # also when COMMIT itself failed
                    conn.execute("ROLLBACK")
                raise

    # -- agents ---------------------------------------------------------------------------

    def upsert_agent(self, rec: AgentRecord) -> bool:
        """Store or replace an agent; True if it was new."""
        now = time.time()
        with self._write() as conn:
            existed = conn.execute("SELECT 1 FROM agents WHERE name = ?", (rec.name,)).fetchone()
            conn.execute(
                """INSERT INTO agents (name, url, token, data_url, source, created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET url = excluded.url, token = excluded.token,
                       data_url = excluded.data_url, source = excluded.source,
                       updated_at = excluded.updated_at""",
                (rec.name, rec.url, rec.token, rec.data_url, rec.source, now, now),
            )
        return existed is None

    def delete_agent(self, name: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM agents WHERE name = ?", (name,)).rowcount > 0

    def get_agent(self, name: str) -> AgentRecord | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT name, url, token, data_url, source FROM agents WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else AgentRecord(*row)

    def list_agents(self) -> list[AgentRecord]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT name, url, token, data_url, source FROM agents ORDER BY name"
            ).fetchall()
        return [AgentRecord(*row) for row in rows]

    # -- migrations -----------------------------------------------------------------------

    def insert_migration(
        self, m: Migration, *, idempotency_key: str | None = None, fingerprint: str | None = None
    ) -> None:
        """Store a new migration, atomically with its idempotency key.

        Raises DuplicateKey if the key is stored (checked first, so two identical requests
        racing give one migration and one DuplicateKey, never a TargetTaken), TargetTaken if
        `m` is active and an active migration writes the same target volume.
        """
        if (idempotency_key is None) != (fingerprint is None):
            raise ValueError("idempotency_key and fingerprint go together")
        target = m.request.target
        with self._write() as conn:
            if (
                idempotency_key is not None
                and conn.execute(
                    "SELECT 1 FROM idempotency WHERE key = ?", (idempotency_key,)
                ).fetchone()
            ):
                raise DuplicateKey(idempotency_key)
            try:
                conn.execute(
                    """INSERT INTO migrations (state, created_at, finished_at, source_agent,
                           source_volume, target_agent, target_volume, doc, id)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (*self._columns(m), m.id),
                )
            except sqlite3.IntegrityError as e:
                # The unique partial index refuses a second active writer of the target.
                if m.state in ACTIVE and (
                    other := self._active(conn, "target", target.agent, target.volume)
                ):
                    raise TargetTaken(target.agent, target.volume, other[0]) from e
                raise StoreError(f"migration {m.id} is already stored") from e
            if idempotency_key is not None:
                conn.execute(
                    "INSERT INTO idempotency (key, fingerprint, migration_id, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (idempotency_key, fingerprint, m.id, time.time()),
                )

    def save_migration(self, m: Migration, *, state_event: bool = False) -> None:
        """Update a stored migration (document and indexed columns), and with `state_event`
        append its `state` event in the same transaction, so a reader never sees the new state
        without its event (an event stream ending on the terminal row would miss it). Raises
        TargetTaken if it becomes active (a retry) while another active migration writes its
        target, and UnknownMigration if it is not stored."""
        target = m.request.target
        with self._write() as conn:
            try:
                cur = conn.execute(
                    """UPDATE migrations SET state = ?, created_at = ?, finished_at = ?,
                           source_agent = ?, source_volume = ?, target_agent = ?,
                           target_volume = ?, doc = ?
                       WHERE id = ?""",
                    (*self._columns(m), m.id),
                )
            except sqlite3.IntegrityError as e:  # only the unique active-target index can fail
                other = self._active(conn, "target", target.agent, target.volume)
                raise TargetTaken(target.agent, target.volume, other[0] if other else "?") from e
            if cur.rowcount == 0:
                raise UnknownMigration(m.id)
            if state_event:
                conn.execute(
                    "INSERT INTO events (migration_id, kind, data, created_at) VALUES (?, ?, ?, ?)",
                    (m.id, "state", _dump(m.to_json()), time.time()),
                )

    @staticmethod
    def _columns(m: Migration) -> tuple[Any, ...]:
        """state, created_at, finished_at, source_agent, source_volume, target_agent,
        target_volume, doc."""
        req = m.request
        return (
            m.state.value,
            _epoch(m.created_at),
            _epoch(m.finished_at),
            req.source.agent,
            req.source.volume,
            req.target.agent,
            req.target.volume,
            _dump(m.to_record()),
        )

    def get_migration(self, migration_id: str) -> Migration | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT doc FROM migrations WHERE id = ?", (migration_id,)
            ).fetchone()
        return None if row is None else Migration.from_record(json.loads(row[0]))

    def list_migrations(self, *, state: str | None = None, limit: int = 100) -> list[Migration]:
        """Newest first (created_at, then insertion order)."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        where, args = ("WHERE state = ?", (state,)) if state is not None else ("", ())
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT doc FROM migrations {where} ORDER BY created_at DESC, seq DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [Migration.from_record(json.loads(doc)) for (doc,) in rows]

    def find_idempotent(self, key: str) -> tuple[Migration, str] | None:
        """The migration an idempotency key created, and the request fingerprint stored with it."""
        with self._read() as conn:
            row = conn.execute(
                """SELECT m.doc, i.fingerprint FROM idempotency i
                   JOIN migrations m ON m.id = i.migration_id WHERE i.key = ?""",
                (key,),
            ).fetchone()
        return None if row is None else (Migration.from_record(json.loads(row[0])), row[1])

    def active_by_target(self, agent: str, volume: str) -> Migration | None:
        return self._active_migration("target", agent, volume)

    def active_by_source(self, agent: str, volume: str) -> Migration | None:
        """The oldest queued or running migration reading that source volume."""
        return self._active_migration("source", agent, volume)

    def _active_migration(self, side: str, agent: str, volume: str) -> Migration | None:
        with self._read() as conn:
            row = self._active(conn, side, agent, volume)
        return None if row is None else Migration.from_record(json.loads(row[1]))

    @staticmethod
    def _active(
        conn: sqlite3.Connection, side: str, agent: str, volume: str
    ) -> tuple[str, str] | None:
        """(id, doc) of the oldest active migration with that source or target volume."""
        assert side in ("source", "target")  # column names cannot be parameters
        row = conn.execute(
            f"SELECT id, doc FROM migrations WHERE {side}_agent = ? AND {side}_volume = ?"
            f" AND {_IS_ACTIVE} ORDER BY created_at, seq LIMIT 1",
            (agent, volume),
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def unfinished(self) -> list[Migration]:
        """Queued and running migrations, oldest first: what a restarted coordinator resumes."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT doc FROM migrations WHERE {_IS_ACTIVE} ORDER BY created_at, seq"
            ).fetchall()
        return [Migration.from_record(json.loads(doc)) for (doc,) in rows]

    def count_by_state(self) -> dict[str, int]:
        """Every state, zeros included (a Prometheus series should not vanish)."""
        counts = {s.value: 0 for s in State}
        with self._read() as conn:
            for state, n in conn.execute("SELECT state, COUNT(*) FROM migrations GROUP BY state"):
                counts[state] = n
        return counts

    # -- events ---------------------------------------------------------------------------

    def append_event(self, migration_id: str, kind: str, data: dict[str, Any]) -> int:
        """Append to a migration's event log; the id increases and is never reused."""
        with self._write() as conn:
            try:
                cur = conn.execute(
                    "INSERT INTO events (migration_id, kind, data, created_at) VALUES (?, ?, ?, ?)",
                    (migration_id, kind, _dump(data), time.time()),
                )
            except sqlite3.IntegrityError as e:  # the foreign key: no such migration
                raise UnknownMigration(migration_id) from e
            assert cur.lastrowid is not None
            return cur.lastrowid

    def events_after(
        self, migration_id: str, after_id: int, limit: int = 1000
    ) -> list[tuple[int, str, dict[str, Any]]]:
        """A migration's events with an id above `after_id`, oldest first: (id, kind, data)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, kind, data FROM events WHERE migration_id = ? AND id > ?"
                " ORDER BY id LIMIT ?",
                (migration_id, after_id, limit),
            ).fetchall()
        return [(event_id, kind, json.loads(data)) for event_id, kind, data in rows]

    # -- retention ------------------------------------------------------------------------

    def prune(self, *, older_than_s: float) -> int:
        """Delete finished migrations that finished more than `older_than_s` seconds ago, with
        their events and idempotency keys (foreign keys cascade). Returns how many."""
        cutoff = time.time() - older_than_s
        marks = ", ".join("?" for _ in _TERMINAL_STATES)
        with self._write() as conn:
            cur = conn.execute(
                f"DELETE FROM migrations WHERE state IN ({marks})"
                " AND COALESCE(finished_at, created_at) < ?",
                (*_TERMINAL_STATES, cutoff),
            )
            return cur.rowcount
