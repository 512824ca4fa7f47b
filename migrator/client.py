"""The CLI's HTTP client of the public coordinator API (DESIGN section 4), on stdlib `urllib`
only, so `migrator status` starts in milliseconds instead of importing aiohttp.

Owns: building request URLs and headers (bearer token, Idempotency-Key, Last-Event-ID), reading
JSON and problem+json answers, and the server-sent-events line reader. Every foreign failure
(`urllib.error`, `http.client`, socket errors, timeouts) becomes one of two errors here, in
`_mapped_errors` and nowhere else:

    ClientError                   base; `exit_code` is the CLI's exit code for it
    ├── CoordinatorUnreachable    4   connection refused, DNS, timeout, reset, 5xx
    └── RequestRefused            5   any 4xx; carries the API's problem document

Must not import aiohttp or anything of the coordinator's server side.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from migrator import __version__

# Control calls answer in milliseconds; 30 s covers a coordinator busy with a slow disk.
CALL_TIMEOUT_S = 30.0
# The events stream may stay silent while a migration waits in the queue; a read that sees
# nothing for this long is treated as a dropped connection and resumed with Last-Event-ID.
STREAM_READ_TIMEOUT_S = 75.0
# Answers to a `?wait=S` long poll come at most S seconds late; allow this much on top.
LONG_POLL_SLACK_S = 15.0


class ClientError(Exception):
    exit_code: ClassVar[int] = 1


class CoordinatorUnreachable(ClientError):
    """The coordinator did not answer usefully: no connection, a timeout, a 5xx (`status`)."""

    exit_code = 4

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RequestRefused(ClientError):
    """The API refused the request (4xx); `problem` is its problem+json document."""

    exit_code = 5

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.code = str(problem.get("code") or f"http_{status}")
        self.detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
        super().__init__(f"{self.detail} ({self.code})")


@dataclass(frozen=True)
class Event:
    """One server-sent event; `data` is the decoded JSON (or the raw text if it is not JSON)."""

    name: str
    data: Any
    id: str | None = None


class SseParser:
    """Turns the lines of a `text/event-stream` into events (the WHATWG parsing rules, minus
    `retry:`, which a CLI that reconnects on its own does not need)."""

    def __init__(self) -> None:
        self._name = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Event | None:
        """Consume one line (with or without its line ending); return an event on a blank line."""
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._name = ""
            return None
        text = "\n".join(self._data)
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = text
        event = Event(name=self._name or "message", data=data, id=self._id)
        self._name, self._data = "", []
        return event


@contextlib.contextmanager
def _mapped_errors(what: str) -> Iterator[None]:
    """The one place where urllib's, http.client's and the socket's errors become ours."""
    try:
        yield
    except urllib.error.HTTPError as e:  # before URLError: HTTPError is one
        with contextlib.closing(e):
            raw = e.read()
        if e.code >= 500:
            raise CoordinatorUnreachable(f"{what}: answered {e.code} {e.reason}", e.code) from e
        try:
            problem = json.loads(raw)
        except ValueError:
            problem = None
        if not isinstance(problem, dict):
            problem = {"status": e.code, "code": f"http_{e.code}", "detail": e.reason}
        raise RequestRefused(e.code, problem) from e
    except urllib.error.URLError as e:
        raise CoordinatorUnreachable(f"{what}: {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:  # OSError includes TimeoutError
        raise CoordinatorUnreachable(f"{what}: {type(e).__name__}: {e}") from e
    except ValueError as e:  # a 2xx whose body is not JSON
        raise CoordinatorUnreachable(f"{what}: unreadable answer: {e}") from e


class Coordinator:
    """Calls of the public API v1; each method returns the decoded JSON answer."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token or None
        self._opener = urllib.request.build_opener()

    def _open(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = CALL_TIMEOUT_S,
    ) -> http.client.HTTPResponse:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        all_headers = {"Accept": "application/json", "User-Agent": f"migrator/{__version__}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        all_headers.update(headers or {})
        request = urllib.request.Request(url, data=data, headers=all_headers, method=method)
        response: http.client.HTTPResponse = self._opener.open(request, timeout=timeout)
        return response

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        with _mapped_errors(f"{method} {path}"):
            with self._open(method, path, **kwargs) as response:
                raw = response.read()
            return json.loads(raw) if raw.strip() else None

    def create_migration(
        self, body: dict[str, Any], *, dry_run: bool = False, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        query = {"dry_run": "true"} if dry_run else None
        doc: dict[str, Any] = self._call(
            "POST", "/v1/migrations", body=body, query=query, headers=headers
        )
        return doc

    def get_migration(self, migration_id: str, *, wait_s: int | None = None) -> dict[str, Any]:
        if wait_s is None:
            doc: dict[str, Any] = self._call("GET", _migration_path(migration_id))
            return doc
        doc = self._call(
            "GET",
            _migration_path(migration_id),
            query={"wait": str(wait_s)},
            timeout=wait_s + LONG_POLL_SLACK_S,
        )
        return doc

    def list_migrations(self, *, state: str | None = None, limit: int | None = None) -> Any:
        query = {"state": state} if state else {}
        if limit is not None:
            query["limit"] = str(limit)
        return self._call("GET", "/v1/migrations", query=query)

    def act(self, migration_id: str, verb: str) -> Any:
        """`cancel`, `retry` or `discard` (each answers 202)."""
        return self._call("POST", f"{_migration_path(migration_id)}/{verb}")

    def agents(self) -> Any:
        return self._call("GET", "/v1/agents")

    def volumes(self, agent: str) -> Any:
        return self._call("GET", f"/v1/agents/{urllib.parse.quote(agent, safe='')}/volumes")

    def events(
        self, migration_id: str, *, last_event_id: str | None = None
    ) -> Generator[Event, None, None]:
        """The migration's events until the server ends the stream. A refused stream raises
        RequestRefused before the first event; a dropped one CoordinatorUnreachable."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        path = f"{_migration_path(migration_id)}/events"
        with _mapped_errors(f"GET {path}"):
            response = self._open("GET", path, headers=headers, timeout=STREAM_READ_TIMEOUT_S)
        with response, _mapped_errors(f"GET {path}"):
            kind = response.headers.get_content_type()
            if kind != "text/event-stream":
                raise RequestRefused(
                    response.status,
                    {"code": "not_an_event_stream", "detail": f"events answered {kind}"},
                )
            parser = SseParser()
            for raw in response:
                event = parser.feed(raw.decode("utf-8", errors="replace"))
                if event is not None:
                    yield event


def _migration_path(migration_id: str) -> str:
    return "/v1/migrations/" + urllib.parse.quote(migration_id, safe="")
