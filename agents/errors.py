"""The agent's error tree. Each class carries its HTTP status and a stable `code`.

Handlers and services raise these; the one error middleware (`agents.app`) renders them as
`application/problem+json`. Foreign exceptions (docker-py, requests, OS errors) are mapped to
this tree in the module that owns the foreign system, always with `raise ... from e`.

    AgentError
    ├── InvalidRequest            400 invalid_request
    │   └── InvalidVolumeName     400 invalid_request
    ├── DriverNotFound            400 driver_not_found
    ├── Unauthorized              401 unauthorized
    │   ├── TransferTokenInvalid  401 transfer_token_invalid
    │   └── TransferTokenExpired  401 transfer_token_expired
    ├── NotFound                  404 not_found
    │   ├── VolumeNotFound        404 volume_not_found
    │   └── PullNotFound          404 pull_not_found
    ├── MethodNotAllowed          405 method_not_allowed
    ├── Conflict                  409 conflict
    │   ├── VolumeExists          409 volume_exists
    │   ├── VolumeInUse           409 volume_in_use
    │   ├── VolumeNotReadable     409 volume_not_readable
    │   ├── SharedStorage         409 shared_storage
    │   └── StreamChanged         409 stream_changed
    ├── RequestTooLarge           413 request_too_large
    ├── DockerError               502 docker_error
    └── DockerUnavailable         503 docker_unavailable
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

# Docker's own rule for local volume names.
VOLUME_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


class AgentError(Exception):
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


class InvalidRequest(AgentError):
    status, code, title = 400, "invalid_request", "Invalid request"


class InvalidVolumeName(InvalidRequest):
    title = "Invalid volume name"


class DriverNotFound(AgentError):
    status, code, title = 400, "driver_not_found", "Volume driver not found"


class Unauthorized(AgentError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class TransferTokenInvalid(Unauthorized):
    code, title = "transfer_token_invalid", "Invalid transfer token"


class TransferTokenExpired(Unauthorized):
    code, title = "transfer_token_expired", "Transfer token expired"


class NotFound(AgentError):
    status, code, title = 404, "not_found", "Not found"


class VolumeNotFound(NotFound):
    code, title = "volume_not_found", "Volume not found"


class PullNotFound(NotFound):
    code, title = "pull_not_found", "Pull not found"


class MethodNotAllowed(AgentError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class Conflict(AgentError):
    status, code, title = 409, "conflict", "Conflict"


class VolumeExists(Conflict):
    code, title = "volume_exists", "Volume already exists"


class VolumeInUse(Conflict):
    code, title = "volume_in_use", "Volume in use"


class VolumeNotReadable(Conflict):
    code, title = "volume_not_readable", "Volume data not readable by the agent"


class SharedStorage(Conflict):
    code, title = "shared_storage", "Volume options point at shared storage"


class StreamChanged(Conflict):
    code, title = "stream_changed", "The source volume changed"


class RequestTooLarge(AgentError):
    status, code, title = 413, "request_too_large", "Request too large"


class DockerError(AgentError):
    status, code, title = 502, "docker_error", "Docker engine error"


class DockerUnavailable(AgentError):
    status, code, title = 503, "docker_unavailable", "Docker engine unavailable"


def check_volume_name(name: str) -> str:
    """Return `name` if Docker would accept it as a local volume name, else raise."""
    if not VOLUME_NAME_RE.fullmatch(name):
        raise InvalidVolumeName(
            f"invalid volume name {name!r}: must match [a-zA-Z0-9][a-zA-Z0-9_.-]+",
            name=name,
        )
    return name
