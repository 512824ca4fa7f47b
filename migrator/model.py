"""Migrations as data: the request (parsed and validated exactly as the public API's contract
says), the migration object, and the pure state machine. No I/O, no event loop, no SQL.

States: queued → running → succeeded | failed | cancelled; failed and cancelled go back to
queued on `retry`. Phases (while running): preparing → [precopy → quiescing →] transferring →
verifying → finalizing.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from migrator.errors import InvalidRequest, InvalidState

VOLUME_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
AGENT_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
_HOST = r"(\[::1\]|([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63})"
_PORT = r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?"
AGENT_URL_RE = re.compile(rf"https?://{_HOST}{_PORT}(/[!-~]*)?")
"""An agent's address: http(s), a host name or address (IPv6: loopback only, for now), a
port; never credentials (the agent's token travels separately)."""


class State(enum.StrEnum):
    QUEUED = "queued"
    """Accepted; the runner has not started it (yet, or again after a retry)."""
    RUNNING = "running"
    """The runner is working on it; `phase` says where."""
    SUCCEEDED = "succeeded"
    """The target holds the source's data (verified, unless `verify: none`)."""
    FAILED = "failed"
    """Stopped with `error`; `retry` resumes from the checkpoint."""
    CANCELLED = "cancelled"
    """Stopped on request; `retry` resumes, `discard` removes the partial target."""


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})
ACTIVE = frozenset({State.QUEUED, State.RUNNING})


class Phase(enum.StrEnum):
    PREPARING = "preparing"
    """Checking agents, volumes, the target policy and free space."""
    PRECOPY = "precopy"
    """Copying while the source's containers still run (with `precopy: true`)."""
    QUIESCING = "quiescing"
    """Stopping the source's containers (with `quiesce: stop`)."""
    TRANSFERRING = "transferring"
    """The target agent pulls the stream from the source agent."""
    VERIFYING = "verifying"
    """The target re-reads its volume and compares with the content manifest."""
    FINALIZING = "finalizing"
    """Restarting containers, deleting the source if asked, writing the result."""


# The options of a migration request and their defaults (DESIGN section 4).
ENUMS: dict[str, tuple[str, ...]] = {
    "compression": ("auto", "zstd", "none"),
    "quiesce": ("none", "stop"),
    "if_target_exists": ("fail", "sync"),
    "verify": ("none", "checksum"),
}


@dataclass(frozen=True)
class Options:
    compression: str = "auto"
    quiesce: str = "none"
    precopy: bool = False
    restart_source_containers: bool = True
    stop_timeout_s: int = 30
    if_target_exists: str = "fail"
    verify: str = "checksum"
    delete_source: bool = False
    allow_in_use: bool = False
    max_rate_bytes_per_s: int | None = None


@dataclass(frozen=True)
class Endpoint:
    agent: str
    volume: str


COMPOSE_LABEL = "com.docker.compose.project"


@dataclass(frozen=True)
class MigrationRequest:
    source: Endpoint
    """For several volumes, `volume` is the first listed one, or `compose:<project>`: the key
    that guards against a second active migration of the same set."""
    target: Endpoint
    options: Options = Options()
    target_driver: str | None = None
    target_driver_opts: dict[str, str] | None = None
    source_volumes: tuple[str, ...] | None = None
    """Several volumes in one quiesce window (`source.volumes`); names are kept."""
    compose_project: str | None = None
    """Every volume labelled com.docker.compose.project=<this> (`source.compose_project`)."""

    @property
    def several(self) -> bool:
        return self.source_volumes is not None or self.compose_project is not None

    def to_json(self) -> dict[str, Any]:
        source: dict[str, Any] = {"agent": self.source.agent}
        target: dict[str, Any] = {"agent": self.target.agent}
        if self.source_volumes is not None:
            source["volumes"] = list(self.source_volumes)
        elif self.compose_project is not None:
            source["compose_project"] = self.compose_project
        else:
            source["volume"] = self.source.volume
            target["volume"] = self.target.volume
        if self.target_driver is not None:
            target["driver"] = self.target_driver
        if self.target_driver_opts is not None:
            target["driver_opts"] = self.target_driver_opts
        return {"source": source, "target": target, "options": asdict(self.options)}

    def fingerprint(self) -> str:
        """Identity of the request for idempotency: equal bodies (after defaults) are equal."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _object(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be an object")
    unknown = set(value) - allowed
    if unknown:
        raise InvalidRequest(f"unknown field(s) in {where}: {', '.join(sorted(unknown))}")
    return value


def _string(value: Any, where: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where} must be a non-empty string")
    if pattern is not None and not pattern.fullmatch(value):
        raise InvalidRequest(f"{where} {value!r} is invalid: must match {pattern.pattern}")
    return value


def _string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidRequest(f"{where} must be an object of strings")
    return dict(value)


def parse_options(value: Any) -> Options:
    if value is None:
        return Options()
    known = {f.name for f in fields(Options)}
    raw = _object(value, "options", known)
    defaults = Options()
    parsed: dict[str, Any] = {}
    for name, given in raw.items():
        default = getattr(defaults, name)
        where = f"options.{name}"
        if name in ENUMS:
            if given not in ENUMS[name]:
                raise InvalidRequest(f"{where} must be one of {', '.join(ENUMS[name])}")
        elif isinstance(default, bool):
            if not isinstance(given, bool):
                raise InvalidRequest(f"{where} must be true or false")
        elif name == "max_rate_bytes_per_s":
            if given is not None and (
                isinstance(given, bool) or not isinstance(given, int) or given <= 0
            ):
                raise InvalidRequest(f"{where} must be a positive integer or null")
        elif name == "stop_timeout_s" and (
            isinstance(given, bool) or not isinstance(given, int) or not 0 <= given <= 3600
        ):
            raise InvalidRequest(f"{where} must be an integer from 0 to 3600")
        parsed[name] = given
    options = Options(**parsed)
    if options.delete_source and options.restart_source_containers:
        raise InvalidRequest(
            "options.delete_source cannot be combined with restart_source_containers: true"
        )
    return options


def parse_request(body: Any) -> MigrationRequest:
    """Validate a `POST /v1/migrations` body; raise InvalidRequest naming the first problem."""
    doc = _object(body, "request body", {"source", "target", "options"})
    if "source" not in doc or "target" not in doc:
        raise InvalidRequest("source and target are required")
    src = _object(doc["source"], "source", {"agent", "volume", "volumes", "compose_project"})
    dst = _object(doc["target"], "target", {"agent", "volume", "driver", "driver_opts"})
    given = [k for k in ("volume", "volumes", "compose_project") if k in src]
    if len(given) != 1:
        raise InvalidRequest("source needs exactly one of volume, volumes, compose_project")
    source_agent = _string(src.get("agent"), "source.agent", AGENT_NAME_RE)
    target_agent = _string(dst.get("agent"), "target.agent", AGENT_NAME_RE)
    volumes: tuple[str, ...] | None = None
    project: str | None = None
    if given[0] == "volume":
        source = Endpoint(source_agent, _string(src["volume"], "source.volume", VOLUME_NAME_RE))
        target = Endpoint(
            target_agent,
            _string(dst.get("volume", source.volume), "target.volume", VOLUME_NAME_RE),
        )
    else:
        if "volume" in dst:
            raise InvalidRequest(
                "target.volume is not allowed with several source volumes: names are kept"
            )
        if given[0] == "volumes":
            listed = src["volumes"]
            if not isinstance(listed, list) or not listed:
                raise InvalidRequest("source.volumes must be a non-empty list of volume names")
            volumes = tuple(
                _string(v, f"source.volumes[{i}]", VOLUME_NAME_RE) for i, v in enumerate(listed)
            )
            if len(set(volumes)) != len(volumes):
                raise InvalidRequest("source.volumes lists a volume twice")
            key = volumes[0]
        else:
            project = _string(src["compose_project"], "source.compose_project", AGENT_NAME_RE)
            key = f"compose:{project}"
        source = Endpoint(source_agent, key)
        target = Endpoint(target_agent, key)
    driver = dst.get("driver")
    if driver is not None:
        driver = _string(driver, "target.driver")
    driver_opts = dst.get("driver_opts")
    if driver_opts is not None:
        driver_opts = _string_map(driver_opts, "target.driver_opts")
    if source == target:
        raise InvalidRequest("source and target are the same volume on the same agent")
    return MigrationRequest(
        source=source,
        target=target,
        options=parse_options(doc.get("options")),
        target_driver=driver,
        target_driver_opts=driver_opts,
        source_volumes=volumes,
        compose_project=project,
    )


def request_from_json(doc: dict[str, Any]) -> MigrationRequest:
    """A stored request (already validated once)."""
    return parse_request(doc)


def now() -> datetime:
    return datetime.now(UTC)


def rfc3339(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def new_id() -> str:
    return "mig_" + uuid.uuid4().hex[:20]


@dataclass
class Progress:
    bytes_total: int = 0
    bytes_done: int = 0
    files_total: int = 0
    files_done: int = 0
    rate_bytes_per_s: float = 0.0
    eta_s: float | None = None


@dataclass
class Migration:
    id: str
    request: MigrationRequest
    state: State = State.QUEUED
    phase: Phase | None = None
    progress: Progress = field(default_factory=Progress)
    attempts: int = 1
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    created_at: datetime = field(default_factory=now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)
    """The runner's private, durable notes: pull id, whether it created the target, which
    containers it stopped. Never part of the public object."""

    # -- transitions ----------------------------------------------------------------------

    def start(self) -> None:
        if self.state is not State.QUEUED:
            raise InvalidState(f"cannot start a {self.state} migration")
        self.state = State.RUNNING
        self.phase = Phase.PREPARING
        self.started_at = self.started_at or now()

    def enter(self, phase: Phase) -> None:
        if self.state is not State.RUNNING:
            raise InvalidState(f"cannot enter {phase} in a {self.state} migration")
        self.phase = phase

    def succeed(self, result: dict[str, Any]) -> None:
        self._finish(State.SUCCEEDED)
        self.result = result
        self.error = None

    def fail(self, code: str, message: str, result: dict[str, Any] | None = None) -> None:
        self._finish(State.FAILED)
        self.error = {"code": code, "message": message}
        if result is not None:
            self.result = result

    def cancel(self, result: dict[str, Any] | None = None) -> None:
        if self.state in TERMINAL:
            raise InvalidState(f"cannot cancel a {self.state} migration")
        self._finish(State.CANCELLED)
        self.error = {"code": "cancelled", "message": "cancelled on request"}
        if result is not None:
            self.result = result

    def retry(self) -> None:
        if self.state not in (State.FAILED, State.CANCELLED):
            raise InvalidState(
                f"only failed or cancelled migrations can be retried, not {self.state}"
            )
        self.state = State.QUEUED
        self.phase = None
        self.error = None
        self.result = None
        self.finished_at = None
        self.attempts += 1

    def _finish(self, state: State) -> None:
        if self.state in TERMINAL:
            raise InvalidState(f"migration already {self.state}")
        self.state = state
        self.phase = None
        self.finished_at = now()

    # -- views ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The public migration object of the API contract."""
        req = self.request.to_json()
        return {
            "id": self.id,
            "state": self.state.value,
            "phase": None if self.phase is None else self.phase.value,
            "source": req["source"],
            "target": req["target"],
            "options": req["options"],
            "progress": asdict(self.progress),
            "attempts": self.attempts,
            "result": self.result,
            "error": self.error,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
        }

    def to_record(self) -> dict[str, Any]:
        """Everything, for the store (the public object plus the private checkpoint)."""
        return {**self.to_json(), "checkpoint": self.checkpoint}

    @classmethod
    def from_record(cls, doc: dict[str, Any]) -> Migration:
        def when(value: str | None) -> datetime | None:
            return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))

        created = when(doc["created_at"])
        assert created is not None
        return cls(
            id=doc["id"],
            request=request_from_json(
                {"source": doc["source"], "target": doc["target"], "options": doc["options"]}
            ),
            state=State(doc["state"]),
            phase=None if doc["phase"] is None else Phase(doc["phase"]),
            progress=Progress(**doc["progress"]),
            attempts=doc["attempts"],
            result=doc["result"],
            error=doc["error"],
            created_at=created,
            started_at=when(doc["started_at"]),
            finished_at=when(doc["finished_at"]),
            checkpoint=doc.get("checkpoint") or {},
        )
