"""The coordinator's error tree. Each class carries its HTTP status and a stable `code`; the one
error middleware renders them as problem+json, and the CLI maps them to exit codes.

    MigratorError                      500 internal_error
    ├── InvalidRequest                 400 invalid_request
    ├── AgentNotFound                  400 agent_not_found   (404 on /v1/agents/{name})
    ├── Unauthorized                   401 unauthorized
    ├── NotFound                       404 not_found
    │   ├── UnknownAgent               404 agent_not_found   (on /v1/agents/{name})
    │   └── MigrationNotFound          404 migration_not_found
    ├── MethodNotAllowed               405 method_not_allowed
    ├── Conflict                       409 conflict
    │   ├── TargetBusy                 409 target_busy
    │   ├── SourceBusy                 409 source_busy
    │   ├── VolumeInUse                409 volume_in_use
    │   ├── IdempotencyConflict        409 idempotency_conflict
    │   └── InvalidState               409 invalid_state
    ├── RequestTooLarge                413 request_too_large
    └── AgentUnavailable               503 agent_unreachable
"""

from __future__ import annotations

from typing import Any, ClassVar


class MigratorError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def to_problem(self) -> dict[str, Any]:
        return {
            "type": "about:blank",
            "status": self.status,
            "code": self.code,
            "title": self.title,
            "detail": self.detail,
            **self.extra,
        }


class InvalidRequest(MigratorError):
    status, code, title = 400, "invalid_request", "Invalid request"


class AgentNotFound(MigratorError):
    status, code, title = 400, "agent_not_found", "Agent not found"


class Unauthorized(MigratorError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class NotFound(MigratorError):
    status, code, title = 404, "not_found", "Not found"


class UnknownAgent(NotFound):
    code, title = "agent_not_found", "Agent not found"


class MigrationNotFound(NotFound):
    code, title = "migration_not_found", "Migration not found"


class MethodNotAllowed(MigratorError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class Conflict(MigratorError):
    status, code, title = 409, "conflict", "Conflict"


class TargetBusy(Conflict):
    code, title = "target_busy", "Target volume busy"


class SourceBusy(Conflict):
    code, title = "source_busy", "Source volume busy"


class VolumeInUse(Conflict):
    code, title = "volume_in_use", "Volume in use by a running container"


class IdempotencyConflict(Conflict):
    code, title = "idempotency_conflict", "Idempotency key reused with another request"


class InvalidState(Conflict):
    code, title = "invalid_state", "Not possible in the migration's current state"


class RequestTooLarge(MigratorError):
    status, code, title = 413, "request_too_large", "Request too large"


class AgentUnavailable(MigratorError):
    status, code, title = 503, "agent_unreachable", "Agent unreachable"
