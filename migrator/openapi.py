"""The OpenAPI 3.1 document of the public coordinator API v1 (DESIGN section 4), served at
`GET /openapi.json`.

Built in code from the model's own enums, defaults and name patterns, so the document cannot
drift from what `migrator.model` validates; tests/unit/test_openapi.py holds the two together.
Component schemas are defined once and referenced. Request bodies carry
`additionalProperties: false` because the server rejects unknown fields there; answers leave
objects open, since the contract may grow additively. Imports only the pure model and the
error tree.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from migrator.errors import (
    AgentNotFound,
    AgentUnavailable,
    Conflict,
    IdempotencyConflict,
    InvalidRequest,
    InvalidState,
    MigrationNotFound,
    MigratorError,
    RequestTooLarge,
    SourceBusy,
    TargetBusy,
    Unauthorized,
    UnknownAgent,
    VolumeInUse,
)
from migrator.model import (
    AGENT_NAME_RE,
    AGENT_URL_RE,
    ENUMS,
    VOLUME_NAME_RE,
    Options,
    Phase,
    State,
)

Schema = dict[str, Any]

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
VOLUME_NAME_PATTERN = f"^{VOLUME_NAME_RE.pattern}$"
AGENT_NAME_PATTERN = f"^{AGENT_NAME_RE.pattern}$"
# Matches views.MAX_WAIT_S and the `limit` bounds of views.list_migrations.
MAX_WAIT_S = 300
MAX_LIST_LIMIT = 1000
LOCATION = {"Location": {"$ref": "#/components/headers/Location"}}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def string_map(description: str) -> Schema:
    return {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": description,
    }


def json_body(schema: Schema, description: str, **extra: Any) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def problem_response(description: str, *errors: type[MigratorError]) -> Schema:
    """An error answer: problem+json whose `code` is one of the errors', with an example each."""
    media: Schema = {"schema": ref("Problem")}
    if errors:
        codes = [e.code for e in errors]
        media["schema"] = {"allOf": [ref("Problem"), {"properties": {"code": {"enum": codes}}}]}
        media["examples"] = {e.code: {"value": e(description).to_problem()} for e in errors}
    return {"description": description, "content": {PROBLEM_JSON: media}}


def resp(name: str) -> Schema:
    return {"$ref": f"#/components/responses/{name}"}


def param(name: str) -> Schema:
    return {"$ref": f"#/components/parameters/{name}"}


# -- component schemas -----------------------------------------------------------------------


def _options_schema() -> Schema:
    d = Options()

    def choice(name: str, description: str) -> Schema:
        default = getattr(d, name)
        return {
            "type": "string",
            "enum": list(ENUMS[name]),
            "default": default,
            "description": description,
        }

    def flag(name: str, description: str) -> Schema:
        return {"type": "boolean", "default": getattr(d, name), "description": description}

    return {
        "type": "object",
        "additionalProperties": False,
        "description": "Every field is optional and takes the default shown. `delete_source: true` "
        "needs `restart_source_containers: false` (otherwise 400 invalid_request).",
        "properties": {
            "compression": choice(
                "compression",
                "Per-frame zstd: `auto` only while the link is the bottleneck, `zstd` wherever it "
                "saves space, `none` never.",
            ),
            "quiesce": choice(
                "quiesce", "`stop` stops the source's running containers for the final pass."
            ),
            "precopy": flag("precopy", "Copy once while the containers still run, then quiesce."),
            "restart_source_containers": flag(
                "restart_source_containers", "Restart the containers `quiesce` stopped."
            ),
            "stop_timeout_s": {
                "type": "integer",
                "minimum": 0,
                "maximum": 3600,
                "default": d.stop_timeout_s,
                "description": "Grace period when stopping containers.",
            },
            "if_target_exists": choice(
                "if_target_exists",
                "`sync` makes an existing target identical (deleting extras; differing labels "
                "are reported as a warning).",
            ),
            "verify": choice(
                "verify", "`checksum` re-reads the target and compares with the source's hashes."
            ),
            "delete_source": flag(
                "delete_source",
                "Remove the source volume after a passed verification, if no container "
                "references it (otherwise a warning).",
            ),
            "allow_in_use": flag(
                "allow_in_use",
                "Migrate a volume a running container uses without stopping it "
                "(crash-consistent at best).",
            ),
            "max_rate_bytes_per_s": {
                "type": ["integer", "null"],
                "minimum": 1,
                "default": d.max_rate_bytes_per_s,
                "description": "Bandwidth cap of the transfer; null for none.",
            },
        },
        # delete_source cannot be combined with restart_source_containers: true (the default).
        "if": {"properties": {"delete_source": {"const": True}}, "required": ["delete_source"]},
        "then": {
            "properties": {"restart_source_containers": {"const": False}},
            "required": ["restart_source_containers"],
        },
    }


def _request_schemas() -> dict[str, Schema]:
    return {
        "AgentName": {
            "type": "string",
            "pattern": AGENT_NAME_PATTERN,
            "description": "A registered agent's name.",
            "examples": ["host-a"],
        },
        "VolumeName": {
            "type": "string",
            "pattern": VOLUME_NAME_PATTERN,
            "description": "A Docker volume name (Docker's own rule).",
            "examples": ["pgdata"],
        },
        "Source": {
            "type": "object",
            "additionalProperties": False,
            "required": ["agent"],
            "description": "Exactly one of `volume`, `volumes` (several volumes in one quiesce "
            "window, names kept) or `compose_project` (every volume labelled "
            "`com.docker.compose.project=<name>`). With several volumes, `target.volume` is not "
            "allowed and `result.volumes` holds one result per volume.",
            "properties": {
                "agent": ref("AgentName"),
                "volume": ref("VolumeName"),
                "volumes": {
                    "type": "array",
                    "items": ref("VolumeName"),
                    "minItems": 1,
                    "uniqueItems": True,
                },
                "compose_project": ref("AgentName"),
            },
            "oneOf": [
                {"required": ["volume"]},
                {"required": ["volumes"]},
                {"required": ["compose_project"]},
            ],
        },
        "Target": {
            "type": "object",
            "additionalProperties": False,
            "required": ["agent"],
            "properties": {
                "agent": ref("AgentName"),
                "volume": {
                    "allOf": [ref("VolumeName")],
                    "description": "Defaults to the source's name.",
                },
                "driver": {
                    "type": ["string", "null"],
                    "minLength": 1,
                    "description": "Create the target with this driver instead of the source's.",
                },
                "driver_opts": {
                    "type": ["object", "null"],
                    "additionalProperties": {"type": "string"},
                    "description": "Create the target with these driver options instead of the "
                    "source's (required when those point at shared storage: `shared_storage`).",
                },
            },
        },
        "Options": _options_schema(),
        "MigrationRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["source", "target"],
            "description": "The server also refuses (400 invalid_request) a target that is the "
            "source itself: same agent and same volume.",
            "properties": {
                "source": ref("Source"),
                "target": ref("Target"),
                "options": {
                    "anyOf": [ref("Options"), {"type": "null"}],
                    "description": "Omitted or null: all defaults.",
                },
            },
            "examples": [
                {
                    "source": {"agent": "host-a", "volume": "pgdata"},
                    "target": {"agent": "host-b"},
                    "options": {"quiesce": "stop", "precopy": True},
                }
            ],
        },
        "AgentRegistration": {
            "type": "object",
            "additionalProperties": False,
            "required": ["url", "token"],
            "properties": {
                "url": {
                    "type": "string",
                    "pattern": AGENT_URL_PATTERN,
                    "description": "Where the coordinator reaches the agent.",
                },
                "token": {
                    "type": "string",
                    "pattern": "^[!-~]+$",
                    "description": "The agent's token (visible ASCII, no spaces).",
                },
                "data_url": {
                    "type": ["string", "null"],
                    "pattern": AGENT_URL_PATTERN,
                    "description": "Where other agents reach this one for data; defaults to `url`.",
                },
            },
        },
    }


def _migration_schemas() -> dict[str, Schema]:
    all_options = [f.name for f in fields(Options)]
    return {
        "Progress": {
            "type": "object",
            "required": [
                "bytes_total",
                "bytes_done",
                "files_total",
                "files_done",
                "rate_bytes_per_s",
                "eta_s",
            ],
            "properties": {
                "bytes_total": {"type": "integer", "minimum": 0},
                "bytes_done": {"type": "integer", "minimum": 0},
                "files_total": {"type": "integer", "minimum": 0},
                "files_done": {"type": "integer", "minimum": 0},
                "rate_bytes_per_s": {"type": "number", "minimum": 0},
                "eta_s": {"type": ["number", "null"], "description": "null while unknown."},
            },
        },
        "Pass": {
            "type": "object",
            "description": "One transfer pass (full, incremental, or the final quiesced one).",
            "properties": {
                "bytes": {"type": ["integer", "null"]},
                "files": {"type": ["integer", "null"]},
                "duration_s": {"type": ["number", "null"]},
            },
        },
        "MigrationResult": {
            "type": "object",
            "description": "Complete once a migration succeeded; a failed or cancelled one may "
            "carry a partial result (at least `target_complete: false`).",
            "properties": {
                "volumes": {
                    "type": "array",
                    "description": "With several source volumes: one result per volume.",
                    "items": {
                        "type": "object",
                        "properties": {
                            "volume": ref("VolumeName"),
                            "bytes": {"type": "integer", "minimum": 0},
                            "files": {"type": "integer", "minimum": 0},
                            "digest": {"type": ["string", "null"]},
                            "verified": {"type": "boolean"},
                            "mismatches": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                },
                "bytes": {"type": "integer", "minimum": 0},
                "files": {"type": "integer", "minimum": 0},
                "digest": {
                    "type": ["string", "null"],
                    "pattern": "^sha256:[0-9a-f]{64}$",
                    "description": "SHA-256 of the canonical content manifest: equal digests, "
                    "equal trees. null without verification.",
                },
                "verified": {"type": "boolean"},
                "downtime_s": {"type": "number", "minimum": 0},
                "duration_s": {"type": "number", "minimum": 0},
                "consistency": {"type": "string", "enum": ["quiesced", "idle", "crash_consistent"]},
                "passes": {"type": "array", "items": ref("Pass")},
                "target_complete": {"type": "boolean"},
                "mismatches": {
                    "type": "array",
                    "maxItems": 100,
                    "items": {"type": "string"},
                    "description": "Paths that differ after verification, with the reason.",
                },
                "warnings": {"type": "array", "items": {"type": "string"}},
            },
        },
        "MigrationError": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {
                    "type": "string",
                    "description": "The API's problem codes plus runtime codes: "
                    "source_volume_not_found, target_exists, target_no_space, "
                    "agent_unreachable, volume_not_readable, shared_storage, "
                    "verification_failed, transfer_failed, cancelled, internal_error. "
                    "Codes reported by an agent are passed through.",
                    "examples": ["target_exists"],
                },
                "message": {"type": "string"},
            },
        },
        "Migration": {
            "type": "object",
            "required": [
                "id",
                "state",
                "phase",
                "source",
                "target",
                "options",
                "progress",
                "attempts",
                "result",
                "error",
                "created_at",
                "started_at",
                "finished_at",
            ],
            "properties": {
                "id": {"type": "string", "description": "Opaque.", "examples": ["mig_0123"]},
                "state": {"type": "string", "enum": [s.value for s in State]},
                "phase": {
                    "type": ["string", "null"],
                    "enum": [*(p.value for p in Phase), None],
                    "description": "Set while running, otherwise null.",
                },
                "source": ref("Source"),
                "target": {
                    "allOf": [ref("Target")],
                    "required": ["agent", "volume"],
                    "description": "`driver` and `driver_opts` only when the request gave them.",
                },
                "options": {
                    "allOf": [ref("Options")],
                    "required": all_options,
                    "description": "Every option, with defaults filled in.",
                },
                "progress": ref("Progress"),
                "attempts": {"type": "integer", "minimum": 1},
                "result": nullable(ref("MigrationResult")),
                "error": nullable(ref("MigrationError")),
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": {"type": ["string", "null"], "format": "date-time"},
                "finished_at": {"type": ["string", "null"], "format": "date-time"},
            },
        },
        "LogEntry": {
            "type": "object",
            "description": "The data of a `log` event.",
            "required": ["time", "level", "message"],
            "properties": {
                "time": {"type": "string", "format": "date-time"},
                "level": {"type": "string", "examples": ["info"]},
                "message": {"type": "string"},
            },
        },
        "PlanVolume": {
            "type": "object",
            "description": "A source volume as its agent sees it; null where the agent could "
            "not say.",
            "properties": {
                "name": {"type": "string"},
                "driver": {"type": ["string", "null"]},
                "options": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
                "labels": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
                "bytes": {"type": ["integer", "null"]},
                "files": {"type": ["integer", "null"]},
            },
        },
        "Plan": {
            "type": "object",
            "description": "What the migration would do (free-form; these fields are documented).",
            "properties": {
                "source": ref("Source"),
                "target": ref("Target"),
                "volumes": {"type": "array", "items": ref("PlanVolume")},
                "bytes": {"type": ["integer", "null"]},
                "files": {"type": ["integer", "null"]},
                "containers_to_stop": {"type": "array", "items": {"type": "string"}},
                "running_containers": {"type": "array", "items": {"type": "string"}},
                "target_exists": {"type": "boolean"},
                "target_conflicts": {"type": "array", "items": {"type": "string"}},
                "target_free_bytes": {"type": ["integer", "null"]},
                "free_space_ok": {"type": ["boolean", "null"], "description": "null: unknown."},
                "would_fail": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Error codes the migration would fail with.",
                },
            },
        },
        "DryRun": {
            "type": "object",
            "required": ["plan"],
            "properties": {"plan": ref("Plan")},
        },
        "ListMigrations": {
            "type": "object",
            "required": ["migrations"],
            "properties": {"migrations": {"type": "array", "items": ref("Migration")}},
        },
    }


def _other_schemas() -> dict[str, Schema]:
    return {
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details with a stable `code`. Some carry context "
            "members: `agent`, `containers` (volume_in_use), `migration` (conflicts).",
            "required": ["status", "code", "title", "detail"],
            "properties": {
                "type": {"type": "string", "default": "about:blank"},
                "status": {"type": "integer"},
                "code": {"type": "string"},
                "title": {"type": "string"},
                "detail": {"type": "string"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "version"],
            "properties": {"status": {"const": "ok"}, "version": {"type": "string"}},
        },
        "Agent": {
            "type": "object",
            "required": ["name", "url", "healthy", "docker_version", "last_error"],
            "properties": {
                "name": ref("AgentName"),
                "url": {"type": "string"},
                "data_url": {"type": ["string", "null"]},
                "healthy": {"type": "boolean"},
                "docker_version": {"type": ["string", "null"]},
                "last_error": {"type": ["string", "null"]},
            },
        },
        "ListAgents": {
            "type": "object",
            "required": ["agents"],
            "properties": {"agents": {"type": "array", "items": ref("Agent")}},
        },
        "Volume": {
            "type": "object",
            "required": ["name", "driver", "options", "labels", "in_use_by"],
            "properties": {
                "name": {"type": "string"},
                "driver": {"type": "string"},
                "options": string_map("Driver options."),
                "labels": string_map("Volume labels."),
                "in_use_by": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Names of the containers (running or stopped) that use it.",
                },
            },
        },
        "ListVolumes": {
            "type": "object",
            "required": ["volumes"],
            "properties": {"volumes": {"type": "array", "items": ref("Volume")}},
        },
    }


# -- reusable parameters, headers and responses ----------------------------------------------


def _parameters() -> dict[str, Schema]:
    return {
        "AgentName": {
            "name": "name",
            "in": "path",
            "required": True,
            "schema": ref("AgentName"),
        },
        "MigrationId": {
            "name": "id",
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": "The migration's opaque id.",
        },
    }


AGENT_URL_PATTERN = f"^{AGENT_URL_RE.pattern}$"


def _responses() -> dict[str, Schema]:
    return {
        "InvalidRequest": problem_response(
            "Invalid request: bad JSON, unknown fields, wrong types or values.", InvalidRequest
        ),
        "Unauthorized": problem_response("Missing or invalid bearer token.", Unauthorized),
        "AgentNotFound": problem_response("No agent with this name.", UnknownAgent),
        "MigrationNotFound": problem_response("No migration with this id.", MigrationNotFound),
        "InvalidState": problem_response(
            "Not possible in the migration's current state; for retry, another active "
            "migration now writes the target (`target_busy`); for discard, the target agent "
            "refused (`conflict`).",
            InvalidState,
            TargetBusy,
            Conflict,
        ),
        "RequestTooLarge": problem_response("Request body over 1 MiB.", RequestTooLarge),
        "AgentUnreachable": problem_response("The agent did not answer.", AgentUnavailable),
        "MigrationRefused": problem_response(
            "Invalid request, or the body names an unknown agent.", InvalidRequest, AgentNotFound
        ),
        "MigrationConflict": problem_response(
            "Another active migration writes the target or quiesces the source; a running "
            "container uses the source (without `quiesce: stop` or `allow_in_use`); or the "
            "Idempotency-Key was used with another body.",
            TargetBusy,
            SourceBusy,
            VolumeInUse,
            IdempotencyConflict,
        ),
        "Error": problem_response("Any other error (e.g. 405, 500), as problem+json."),
    }


def _with_errors(ok: dict[str, Any], *errors: tuple[str, str]) -> Schema:
    """Responses of a secured operation: its own, 401, the named errors and a default."""
    out: Schema = dict(ok)
    for status, name in (*errors, ("401", "Unauthorized")):
        out[status] = resp(name)
    out["default"] = resp("Error")
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == "default", kv[0])))


def _op(operation_id: str, summary: str, responses: Schema, **extra: Any) -> Schema:
    return {"operationId": operation_id, "summary": summary, **extra, "responses": responses}


def _migration_action(operation_id: str, summary: str, description: str) -> Schema:
    return {
        "post": _op(
            operation_id,
            summary,
            _with_errors(
                {"202": json_body(ref("Migration"), "Accepted; the migration.")},
                ("404", "MigrationNotFound"),
                ("409", "InvalidState"),
                ("503", "AgentUnreachable"),
            ),
            description=description,
            tags=["migrations"],
        ),
        "parameters": [param("MigrationId")],
    }


def _paths() -> Schema:
    agent_404 = ("404", "AgentNotFound")
    bad_request = ("400", "InvalidRequest")
    migration_404 = ("404", "MigrationNotFound")
    return {
        "/v1/health": {
            "get": _op(
                "getHealth",
                "Liveness and version (never needs a token)",
                {"200": json_body(ref("Health"), "The coordinator is up.")},
                security=[],
                tags=["service"],
            )
        },
        "/v1/agents": {
            "get": _op(
                "listAgents",
                "Registered agents, each probed for health",
                _with_errors({"200": json_body(ref("ListAgents"), "The agents.")}),
                tags=["agents"],
            )
        },
        "/v1/agents/{name}": {
            "parameters": [param("AgentName")],
            "get": _op(
                "getAgent",
                "One agent, probed for health",
                _with_errors(
                    {"200": json_body(ref("Agent"), "The agent.")}, bad_request, agent_404
                ),
                tags=["agents"],
            ),
            "put": _op(
                "putAgent",
                "Register or replace an agent",
                _with_errors(
                    {
                        "200": json_body(ref("Agent"), "Replaced."),
                        "201": json_body(ref("Agent"), "Registered."),
                    },
                    bad_request,
                    ("413", "RequestTooLarge"),
                ),
                requestBody={
                    "required": True,
                    "content": {JSON: {"schema": ref("AgentRegistration")}},
                },
                tags=["agents"],
            ),
            "delete": _op(
                "deleteAgent",
                "Forget an agent",
                _with_errors({"204": {"description": "Removed."}}, bad_request, agent_404),
                tags=["agents"],
            ),
        },
        "/v1/agents/{name}/volumes": {
            "parameters": [param("AgentName")],
            "get": _op(
                "listAgentVolumes",
                "The Docker volumes on an agent's host",
                _with_errors(
                    {"200": json_body(ref("ListVolumes"), "The volumes.")},
                    bad_request,
                    agent_404,
                    ("503", "AgentUnreachable"),
                ),
                tags=["agents"],
            ),
        },
        "/v1/migrations": {
            "post": _op(
                "createMigration",
                "Start a migration (or plan one with dry_run)",
                _with_errors(
                    {
                        "200": json_body(
                            {"oneOf": [ref("Migration"), ref("DryRun")]},
                            "With `dry_run=true`: the plan, and nothing happens. Otherwise an "
                            "`Idempotency-Key` seen before with the same body: that migration.",
                            headers=LOCATION,
                        ),
                        "202": json_body(
                            ref("Migration"), "Accepted; the new migration.", headers=LOCATION
                        ),
                    },
                    ("400", "MigrationRefused"),
                    ("409", "MigrationConflict"),
                    ("413", "RequestTooLarge"),
                ),
                parameters=[
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                        "description": "Same key and body: the same migration (200); same key, "
                        "another body: 409 idempotency_conflict.",
                    },
                    {
                        "name": "dry_run",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "boolean", "default": False},
                        "description": "Answer 200 with a plan; nothing happens.",
                    },
                ],
                requestBody={
                    "required": True,
                    "content": {JSON: {"schema": ref("MigrationRequest")}},
                },
                tags=["migrations"],
            ),
            "get": _op(
                "listMigrations",
                "Migrations, newest first",
                _with_errors(
                    {"200": json_body(ref("ListMigrations"), "The migrations.")}, bad_request
                ),
                parameters=[
                    {
                        "name": "state",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": [s.value for s in State]},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIST_LIMIT,
                            "default": 100,
                        },
                    },
                ],
                tags=["migrations"],
            ),
        },
        "/v1/migrations/{id}": {
            "parameters": [param("MigrationId")],
            "get": _op(
                "getMigration",
                "A migration (long-poll with wait)",
                _with_errors(
                    {"200": json_body(ref("Migration"), "The migration, terminal or not.")},
                    bad_request,
                    migration_404,
                ),
                parameters=[
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 0,
                            "maximum": MAX_WAIT_S,
                            "default": 0,
                        },
                        "description": "Block up to this many seconds until the migration is "
                        "terminal, then answer with its current state either way.",
                    }
                ],
                tags=["migrations"],
            ),
        },
        "/v1/migrations/{id}/events": {
            "parameters": [param("MigrationId")],
            "get": _op(
                "streamMigrationEvents",
                "Server-sent events of a migration",
                _with_errors(
                    {
                        "200": {
                            "description": "`text/event-stream`. Events, each with an `id:`: "
                            "`state` (data: a Migration), `progress` (data: a Progress), `log` "
                            "(data: a LogEntry). Comment lines keep the connection alive. The "
                            "stream ends after the terminal state.",
                            "content": {
                                "text/event-stream": {
                                    "schema": {
                                        "description": "One event of the stream.",
                                        "type": "object",
                                        "properties": {
                                            "id": {"type": "string", "pattern": "^[0-9]+$"},
                                            "event": {"enum": ["state", "progress", "log"]},
                                            "data": {"type": "string"},
                                        },
                                    },
                                    "example": 'id: 7\nevent: log\ndata: {"time": '
                                    '"2025-01-01T00:00:00Z", "level": "info", "message": '
                                    '"succeeded"}\n\n',
                                }
                            },
                        }
                    },
                    bad_request,
                    migration_404,
                ),
                parameters=[
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                        "description": "Resume after this event.",
                    },
                    {
                        "name": "last_event_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                        "description": "Same as `Last-Event-ID`, for clients that cannot set "
                        "headers; the header wins.",
                    },
                ],
                tags=["migrations"],
            ),
        },
        "/v1/migrations/{id}/cancel": _migration_action(
            "cancelMigration",
            "Cancel a queued or running migration",
            "Containers it stopped are restarted.",
        ),
        "/v1/migrations/{id}/retry": _migration_action(
            "retryMigration",
            "Retry a failed or cancelled migration",
            "It resumes from its checkpoint.",
        ),
        "/v1/migrations/{id}/discard": _migration_action(
            "discardMigration",
            "Discard what a failed or cancelled migration left on the target",
            "Removes the partial target volume (only one this migration created) and the "
            "target agent's journal.",
        ),
        "/openapi.json": {
            "get": _op(
                "getOpenapi",
                "This document (never needs a token)",
                {"200": json_body({"type": "object"}, "The OpenAPI 3.1 document.")},
                security=[],
                tags=["service"],
            )
        },
        "/metrics": {
            "get": _op(
                "getMetrics",
                "Prometheus metrics",
                _with_errors(
                    {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    }
                ),
                tags=["service"],
            )
        },
    }


def openapi_document(version: str) -> dict[str, Any]:
    """The complete OpenAPI 3.1.0 document of the coordinator API, for `GET /openapi.json`."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "volume-migrator coordinator API",
            "version": version,
            "summary": "Move Docker named volumes between Docker hosts.",
            "description": "Public API v1 of the coordinator. With a token file, every route "
            "but /v1/health and /openapi.json needs `Authorization: Bearer <token>`; without "
            "one the coordinator runs without auth on a loopback address only. Errors are "
            "`application/problem+json` with stable codes. Ids are opaque strings; times are "
            "RFC 3339 UTC.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:8420", "description": "The default listen address"}],
        "tags": [
            {"name": "service", "description": "Health, this document, metrics."},
            {"name": "agents", "description": "The agent registry."},
            {"name": "migrations", "description": "Volume migrations."},
        ],
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Any token of the coordinator's token file.",
                }
            },
            "schemas": {**_request_schemas(), **_migration_schemas(), **_other_schemas()},
            "parameters": _parameters(),
            "headers": {
                "Location": {
                    "description": "The migration's URL: /v1/migrations/{id}.",
                    "schema": {"type": "string"},
                }
            },
            "responses": _responses(),
        },
    }
