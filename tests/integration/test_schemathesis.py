"""Property-based conformance of the live coordinator to its own OpenAPI document (schemathesis).

Every operation of the document is fuzzed against a real coordinator with the two real agents
(host-a, host-b): the document's examples, schemathesis' coverage cases (boundaries, wrong
types, missing or unexpected parameters, undeclared methods), then generated valid and invalid
data. Every response must be no 5xx (a documented 503 from an unreachable agent aside), have a
documented status code, content type, headers and body; invalid requests must be refused, valid
ones accepted; without the token, 401. Afterwards the coordinator must have logged no unhandled
error: some never reach a client as a 500 (one raised after an event stream began).

Reproducible: a fixed seed, derandomized Hypothesis, no example database. Bounded: at most
MAX_EXAMPLES generated cases per operation, plus the coverage cases; about 20 s in all.

Cases are generated from the document `migrator.openapi` builds, loaded when tests are
collected: schemathesis' fixture-based loader (`schemathesis.pytest.from_fixture`) fails on
pytest 9.2 (`'Function' object has no attribute '_nodeid'`).
`test_the_fuzzed_document_is_the_served_one` holds the served `/openapi.json` to it.

The coordinator is this module's own (same token, same agents as the session's), so the agents
and migrations fuzzing creates never reach other tests. The real agents are never replaced nor
removed (`leave_real_agents_alone`); half of the migration ids are a real migration's, so the
migration routes answer more than 404 (`use_real_migration`).
"""

from __future__ import annotations

import shutil
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis

from migrator import __version__
from migrator.openapi import openapi_document
from tests.conftest import coordinator_config
from tests.coordinatorclient import API
from tests.testbed import AgentProcess, CoordinatorProcess

pytestmark = pytest.mark.integration

SEED = 20250101
MAX_EXAMPLES = 50
REAL_AGENTS = ("host-a", "host-b")
# Stands for host-a's URL (known only once the agent runs) in generated agent registrations.
REAL_AGENT_URL = "http://real-agent.invalid/"

# Values random generation rarely hits, each known to break a layer under the handlers. They
# replace generated values with DICTIONARY_PROBABILITY, where the schema allows them (or, in
# invalid cases, where it does not).
DICTIONARY_PROBABILITY = 0.25
DICTIONARIES = {
    # SQLite integers are signed 64-bit. As strings: header and query values are strings.
    "numbers": ["0", "-1", "9223372036854775807", "9223372036854775808"],
    # Agent URLs the coordinator calls back. None needs DNS, so no test waits on a resolver.
    "agent-urls": [
        REAL_AGENT_URL,
        "http://user:secret@127.0.0.1:9/",  # credentials beside the Authorization header
        f"http://{'a' * 64}:9/",  # a DNS label over 63 characters
        "http://127.0.0.1:9/",  # nothing listens: refused at once
        "http://127.0.0.1:99999/",
        "http://[::1/",
    ],
    # Agent tokens: the coordinator sends them on, in a header.
    "tokens": ["line\r\nbreak", "nul\x00byte", " ", "t"],
    "idempotency-keys": ["", "k"],
}


def use(dictionary: str, probability: float = DICTIONARY_PROBABILITY) -> dict[str, Any]:
    return {"dictionary": dictionary, "probability": probability}


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "request-timeout": 30,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            # No example database: a failure replays from the seed alone.
            "database": "none",
            # The test sends the real token itself: generated Authorization headers would only
            # be overwritten (the `ignored_auth` check still sends requests without it).
            "with-security-parameters": False,
            # Every string or integer parameter in the path, the query or a header.
            "dictionaries": {"string": use("numbers"), "integer": use("numbers")},
        },
        "dictionaries": {name: {"values": values} for name, values in DICTIONARIES.items()},
        "operations": [
            {
                "include-operation-id": "putAgent",
                "parameters": {
                    # Always one of these: a random host would wait on DNS at every probe.
                    "body.url": use("agent-urls", 1.0),
                    "body.data_url": use("agent-urls"),
                    "body.token": use("tokens"),
                },
            },
            {
                # Documented 503 agent_unreachable: fuzzing registers agents nothing answers for.
                "include-operation-id": "listAgentVolumes",
                "checks": {
                    "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}
                },
            },
            {
                "include-operation-id": "createMigration",
                "parameters": {"header.Idempotency-Key": use("idempotency-keys")},
                # Valid bodies mostly name unknown agents (400 agent_not_found) or a target that
                # is the source itself (400 invalid_request): both documented, and beyond what
                # a schema can say.
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": [
                            *("2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx")
                        ]
                    }
                },
            },
        ],
    }
)
schema = schemathesis.openapi.from_dict(openapi_document(__version__), config=CONFIG)


@pytest.fixture(scope="module")
def fuzz_coordinator(
    agent_a: AgentProcess, agent_b: AgentProcess, api_token: str
) -> Iterator[CoordinatorProcess]:
    proc = CoordinatorProcess(
        name="schemathesis", token=api_token, config=coordinator_config(agent_a, agent_b)
    )
    shutil.rmtree(proc.dir, ignore_errors=True)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def real_migration(fuzz_coordinator: CoordinatorProcess, api_token: str) -> str:
    """A real migration, failed at once (no such source volume): quick to stream, wait for,
    retry and discard, with nothing to copy."""
    api = API(fuzz_coordinator, api_token)
    missing = f"t{uuid.uuid4().hex[:12]}"
    created = api.create(
        {"source": {"agent": "host-a", "volume": missing}, "target": {"agent": "host-b"}}
    )
    done = api.wait(created["id"], seconds=60)
    assert done["state"] == "failed", done
    return str(done["id"])


def leave_real_agents_alone(case: schemathesis.Case, agent_url: str) -> None:
    """PUT and DELETE of host-a or host-b (the document's example names) go to another, as
    valid, name; registrations at REAL_AGENT_URL get host-a's URL (with a made-up token)."""
    params: dict[str, Any] | None = case.path_parameters
    if case.method.upper() in ("PUT", "DELETE") and params and params.get("name") in REAL_AGENTS:
        params["name"] = f"fuzz-{params['name']}"
    if case.operation.method.upper() == "PUT" and isinstance(case.body, dict):
        for key in ("url", "data_url"):
            if case.body.get(key) == REAL_AGENT_URL:
                case.body[key] = agent_url


def use_real_migration(case: schemathesis.Case, migration_id: str) -> None:
    """Half of the generated migration ids (by checksum, so runs repeat) become the real
    migration's. Any string is a valid id, so the case stays as valid as it was."""
    params: dict[str, Any] | None = case.path_parameters
    if params and "id" in params and zlib.crc32(str(params["id"]).encode()) % 2 == 0:
        params["id"] = migration_id


@schema.parametrize()
def test_api_conforms_to_openapi_document(
    case: schemathesis.Case,
    fuzz_coordinator: CoordinatorProcess,
    real_migration: str,
    agent_a: AgentProcess,
    api_token: str,
) -> None:
    leave_real_agents_alone(case, agent_a.url)
    use_real_migration(case, real_migration)
    case.call_and_validate(
        base_url=fuzz_coordinator.url, headers={"Authorization": f"Bearer {api_token}"}
    )


def test_the_fuzzed_document_is_the_served_one(fuzz_coordinator: CoordinatorProcess) -> None:
    served = schemathesis.openapi.from_url(f"{fuzz_coordinator.url}/openapi.json", config=CONFIG)
    assert served.raw_schema == schema.raw_schema


def test_fuzzing_kept_real_agents_and_logged_no_unhandled_error(
    fuzz_coordinator: CoordinatorProcess,
    api_token: str,
    agent_a: AgentProcess,
    agent_b: AgentProcess,
) -> None:
    """Runs after the fuzzing above (file order). Whatever fuzzing registered, the agents still
    list, and host-a and host-b are as configured."""
    api = API(fuzz_coordinator, api_token)
    r = api.request("GET", "/v1/agents")
    assert r.status_code == 200, r.text
    for name, agent in zip(REAL_AGENTS, (agent_a, agent_b), strict=True):
        r = api.request("GET", f"/v1/agents/{name}")
        assert r.status_code == 200, r.text
        assert r.json()["url"] == agent.url and r.json()["healthy"], r.json()
    log = fuzz_coordinator.log_tail(50_000_000)
    unhandled = [line for line in log.splitlines() if "unhandled error" in line]
    assert not unhandled, f"{len(unhandled)} unhandled errors; see {fuzz_coordinator.dir}"
