"""The OpenAPI document against the OpenAPI 3.1 schema, against itself (every `$ref`), and against
the code it describes: option enums and defaults, name rules, request validation and the
migration object. Pure: no server."""

from __future__ import annotations

import copy
from dataclasses import asdict, fields
from datetime import timedelta
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from migrator.errors import InvalidRequest
from migrator.model import (
    AGENT_NAME_RE,
    ENUMS,
    VOLUME_NAME_RE,
    Endpoint,
    Migration,
    MigrationRequest,
    Options,
    Phase,
    State,
    parse_request,
)
from migrator.openapi import openapi_document

DOC = openapi_document("1.2.3")
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]
PUBLIC = {("get", "/v1/health"), ("get", "/openapi.json")}

# Every operation of DESIGN section 4 (plus GET of one agent) and the statuses it documents.
OPERATIONS = {
    ("get", "/v1/health"): {"200"},
    ("get", "/v1/agents"): {"200", "401"},
    ("get", "/v1/agents/{name}"): {"200", "400", "401", "404"},
    ("put", "/v1/agents/{name}"): {"200", "201", "400", "401", "413"},
    ("delete", "/v1/agents/{name}"): {"204", "400", "401", "404"},
    ("get", "/v1/agents/{name}/volumes"): {"200", "400", "401", "404", "503"},
    ("post", "/v1/migrations"): {"200", "202", "400", "401", "409", "413"},
    ("get", "/v1/migrations"): {"200", "400", "401"},
    ("get", "/v1/migrations/{id}"): {"200", "400", "401", "404"},
    ("get", "/v1/migrations/{id}/events"): {"200", "400", "401", "404"},
    ("post", "/v1/migrations/{id}/cancel"): {"202", "401", "404", "409", "503"},
    ("post", "/v1/migrations/{id}/retry"): {"202", "401", "404", "409", "503"},
    ("post", "/v1/migrations/{id}/discard"): {"202", "401", "404", "409", "503"},
    ("get", "/openapi.json"): {"200"},
    ("get", "/metrics"): {"200", "401"},
}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def validator(schema_name: str) -> Draft202012Validator:
    """A JSON Schema validator for one component schema, its `$ref`s resolved in the document."""
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", Resource.from_contents(DOC, default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"urn:openapi#/components/schemas/{schema_name}"},
        registry=registry,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): op
        for path, item in DOC["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    }


def resolve(pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = DOC
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


# -- the document as a document --------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    validate_openapi(copy.deepcopy(DOC))
    assert DOC["openapi"] == "3.1.0"
    assert DOC["info"]["version"] == "1.2.3"


def test_every_ref_resolves() -> None:
    found = refs(DOC)
    assert len(found) > 50
    for pointer in found:
        assert isinstance(resolve(pointer), dict), pointer


def test_every_route_and_status_of_the_contract_is_documented() -> None:
    ops = operations()
    assert set(ops) == set(OPERATIONS)
    for key, statuses in OPERATIONS.items():
        documented = set(ops[key]["responses"]) - {"default"}
        assert documented == statuses, key


def test_operations_have_unique_ids_and_summaries() -> None:
    ops = operations()
    ids = [op["operationId"] for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert all(op["summary"] for op in ops.values())


def test_bearer_auth_everywhere_but_health_and_the_document() -> None:
    scheme = DOC["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert DOC["security"] == [{"bearerAuth": []}]
    for key, op in operations().items():
        if key in PUBLIC:
            assert op["security"] == [], key
            assert "401" not in op["responses"], key
        else:
            assert "security" not in op, key  # the global requirement applies
            assert "401" in op["responses"], key


def test_error_responses_are_problem_json_and_their_examples_valid() -> None:
    problem = validator("Problem")
    for key, op in operations().items():
        for status, response in op["responses"].items():
            if status[0] not in "45" and status != "default":
                continue
            body = resolve(response["$ref"]) if "$ref" in response else response
            assert set(body["content"]) == {"application/problem+json"}, (key, status)
            media = body["content"]["application/problem+json"]
            for example in media.get("examples", {}).values():
                problem.validate(example["value"])
                assert str(example["value"]["status"]) == status, (key, status)


@pytest.mark.parametrize(
    ("key", "codes"),
    [
        (("post", "/v1/migrations"), {"400": {"invalid_request", "agent_not_found"}}),
        (
            ("post", "/v1/migrations"),
            {"409": {"target_busy", "source_busy", "volume_in_use", "idempotency_conflict"}},
        ),
        (("post", "/v1/migrations"), {"413": {"request_too_large"}}),
        (("get", "/v1/agents/{name}"), {"404": {"agent_not_found"}}),
        (("get", "/v1/migrations/{id}"), {"404": {"migration_not_found"}}),
        (("get", "/v1/agents"), {"401": {"unauthorized"}}),
    ],
)
def test_error_responses_name_the_contract_codes(
    key: tuple[str, str], codes: dict[str, set[str]]
) -> None:
    [(status, expected)] = codes.items()
    response = resolve(operations()[key]["responses"][status]["$ref"])
    schema = response["content"]["application/problem+json"]["schema"]
    assert set(schema["allOf"][1]["properties"]["code"]["enum"]) == expected


def test_create_migration_parameters() -> None:
    op = operations()[("post", "/v1/migrations")]
    params = {(p["in"], p["name"]): p for p in op["parameters"]}
    assert params[("header", "Idempotency-Key")]["schema"]["type"] == "string"
    assert params[("query", "dry_run")]["schema"] == {"type": "boolean", "default": False}
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MigrationRequest"
    }
    assert "Location" in op["responses"]["202"]["headers"]
    listing = {p["name"]: p for p in operations()[("get", "/v1/migrations")]["parameters"]}
    assert listing["state"]["schema"]["enum"] == [s.value for s in State]
    assert listing["limit"]["schema"]["default"] == 100
    events = operations()[("get", "/v1/migrations/{id}/events")]
    assert ("header", "Last-Event-ID") in {(p["in"], p["name"]) for p in events["parameters"]}
    assert "text/event-stream" in events["responses"]["200"]["content"]
    metrics = operations()[("get", "/metrics")]
    assert "text/plain" in metrics["responses"]["200"]["content"]


# -- the document against the code -----------------------------------------------------------


def test_options_match_the_model() -> None:
    props = SCHEMAS["Options"]["properties"]
    assert list(props) == [f.name for f in fields(Options)]
    defaults = asdict(Options())
    for name, schema in props.items():
        assert schema["default"] == defaults[name], name
        if name in ENUMS:
            assert schema["enum"] == list(ENUMS[name]), name
    assert set(ENUMS) <= set(props)
    assert props["max_rate_bytes_per_s"]["type"] == ["integer", "null"]
    assert props["max_rate_bytes_per_s"]["minimum"] == 1
    assert (props["stop_timeout_s"]["minimum"], props["stop_timeout_s"]["maximum"]) == (0, 3600)


def test_name_patterns_match_the_model() -> None:
    assert SCHEMAS["VolumeName"]["pattern"] == "^[a-zA-Z0-9][a-zA-Z0-9_.-]+$"
    assert SCHEMAS["AgentName"]["pattern"] == "^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$"
    assert SCHEMAS["VolumeName"]["pattern"] == f"^{VOLUME_NAME_RE.pattern}$"
    assert SCHEMAS["AgentName"]["pattern"] == f"^{AGENT_NAME_RE.pattern}$"


def test_migration_enums_match_the_model() -> None:
    props = SCHEMAS["Migration"]["properties"]
    assert props["state"]["enum"] == [s.value for s in State]
    assert props["phase"]["enum"] == [*(p.value for p in Phase), None]


SRC = {"agent": "host-a", "volume": "pgdata"}
DST = {"agent": "host-b"}

VALID_BODIES: list[Any] = [
    {"source": SRC, "target": DST},
    {"source": SRC, "target": {"agent": "host-b", "volume": "pg.data_2-x"}},
    {"source": SRC, "target": {"agent": "host-a", "volume": "copy"}},
    {"source": SRC, "target": DST, "options": None},
    {"source": SRC, "target": DST, "options": {}},
    {"source": SRC, "target": DST, "options": asdict(Options())},
    {
        "source": SRC,
        "target": {**DST, "driver": "local", "driver_opts": {"type": "nfs", "o": "addr=x"}},
        "options": {
            "compression": "zstd",
            "quiesce": "stop",
            "precopy": True,
            "restart_source_containers": False,
            "stop_timeout_s": 0,
            "if_target_exists": "sync",
            "verify": "none",
            "delete_source": True,
            "allow_in_use": True,
            "max_rate_bytes_per_s": 1,
        },
    },
    {"source": SRC, "target": {**DST, "driver": None, "driver_opts": None}},
    {"source": SRC, "target": DST, "options": {"stop_timeout_s": 3600}},
    {"source": SRC, "target": DST, "options": {"max_rate_bytes_per_s": None}},
    {"source": {"agent": "a" * 64, "volume": "ab"}, "target": DST},
]

INVALID_BODIES: dict[str, Any] = {
    "not an object": [SRC, DST],
    "no source": {"target": DST},
    "no target": {"source": SRC},
    "unknown top-level field": {"source": SRC, "target": DST, "dry_run": True},
    "unknown source field": {"source": {**SRC, "driver": "local"}, "target": DST},
    "unknown target field": {"source": SRC, "target": {**DST, "labels": {}}},
    "unknown option": {"source": SRC, "target": DST, "options": {"fast": True}},
    "source without volume": {"source": {"agent": "host-a"}, "target": DST},
    "target without agent": {"source": SRC, "target": {"volume": "x1"}},
    "bad volume name (one char)": {"source": {**SRC, "volume": "a"}, "target": DST},
    "bad volume name (leading dot)": {"source": {**SRC, "volume": ".pg"}, "target": DST},
    "bad volume name (slash)": {"source": SRC, "target": {**DST, "volume": "a/b"}},
    "bad volume name (empty)": {"source": {**SRC, "volume": ""}, "target": DST},
    "bad agent name (too long)": {"source": {**SRC, "agent": "a" * 65}, "target": DST},
    "bad agent name (space)": {"source": SRC, "target": {"agent": "host b"}},
    "volume not a string": {"source": {**SRC, "volume": 7}, "target": DST},
    "target volume null": {"source": SRC, "target": {**DST, "volume": None}},
    "empty driver": {"source": SRC, "target": {**DST, "driver": ""}},
    "driver_opts not strings": {"source": SRC, "target": {**DST, "driver_opts": {"a": 1}}},
    "options not an object": {"source": SRC, "target": DST, "options": []},
    "wrong enum": {"source": SRC, "target": DST, "options": {"compression": "gzip"}},
    "enum null": {"source": SRC, "target": DST, "options": {"verify": None}},
    "enum wrong case": {"source": SRC, "target": DST, "options": {"quiesce": "STOP"}},
    "bool as string": {"source": SRC, "target": DST, "options": {"precopy": "true"}},
    "bool as int": {"source": SRC, "target": DST, "options": {"allow_in_use": 1}},
    "timeout as bool": {"source": SRC, "target": DST, "options": {"stop_timeout_s": True}},
    "timeout negative": {"source": SRC, "target": DST, "options": {"stop_timeout_s": -1}},
    "timeout too big": {"source": SRC, "target": DST, "options": {"stop_timeout_s": 3601}},
    "timeout as string": {"source": SRC, "target": DST, "options": {"stop_timeout_s": "30"}},
    "rate zero": {"source": SRC, "target": DST, "options": {"max_rate_bytes_per_s": 0}},
    "rate fractional": {"source": SRC, "target": DST, "options": {"max_rate_bytes_per_s": 1.5}},
    "rate as bool": {"source": SRC, "target": DST, "options": {"max_rate_bytes_per_s": True}},
    "delete_source with the default restart": {
        "source": SRC,
        "target": DST,
        "options": {"delete_source": True},
    },
    "delete_source with restart": {
        "source": SRC,
        "target": DST,
        "options": {"delete_source": True, "restart_source_containers": True},
    },
}

# Rules JSON Schema cannot state; the schema's description names them and the server enforces.
SERVER_ONLY: dict[str, Any] = {
    "target is the source": {"source": SRC, "target": {"agent": "host-a"}},
}


def server_accepts(body: Any) -> bool:
    try:
        parse_request(body)
    except InvalidRequest:
        return False
    return True


@pytest.mark.parametrize("body", VALID_BODIES)
def test_valid_requests_pass_schema_and_server(body: Any) -> None:
    validator("MigrationRequest").validate(body)
    assert server_accepts(body)


@pytest.mark.parametrize("body", list(INVALID_BODIES.values()), ids=list(INVALID_BODIES))
def test_invalid_requests_fail_schema_and_server(body: Any) -> None:
    assert not validator("MigrationRequest").is_valid(body)
    assert not server_accepts(body)


@pytest.mark.parametrize("body", list(SERVER_ONLY.values()), ids=list(SERVER_ONLY))
def test_rules_only_the_server_enforces(body: Any) -> None:
    assert validator("MigrationRequest").is_valid(body)
    assert not server_accepts(body)


def test_agent_registration_schema() -> None:
    check = validator("AgentRegistration")
    assert check.is_valid({"url": "http://10.0.0.2:8421", "token": "t"})
    assert check.is_valid({"url": "https://b", "token": "t", "data_url": None})
    assert check.is_valid({"url": "https://b", "token": "t", "data_url": "http://c:1"})
    assert not check.is_valid({"url": "https://b", "token": "t", "name": "b"})
    assert not check.is_valid({"url": "https://b"})
    assert not check.is_valid({"url": "ftp://b", "token": "t"})
    assert not check.is_valid({"url": "https://b", "token": ""})


# -- the migration object ----------------------------------------------------------------------


def request(**target: Any) -> MigrationRequest:
    return MigrationRequest(
        source=Endpoint("host-a", "pgdata"), target=Endpoint("host-b", "pgdata"), **target
    )


def test_fresh_migration_matches_the_schema() -> None:
    validator("Migration").validate(Migration(id="mig_1", request=request()).to_json())


def test_running_migration_with_target_driver_matches_the_schema() -> None:
    m = Migration(id="mig_2", request=request(target_driver="local", target_driver_opts={}))
    m.start()
    m.enter(Phase.TRANSFERRING)
    m.progress.bytes_total, m.progress.bytes_done = 100, 40
    m.progress.rate_bytes_per_s, m.progress.eta_s = 12.5, 4.8
    doc = m.to_json()
    validator("Migration").validate(doc)
    validator("Progress").validate(doc["progress"])


def test_succeeded_migration_matches_the_schema() -> None:
    m = Migration(id="mig_3", request=request())
    m.start()
    m.succeed(
        {
            "bytes": 1 << 30,
            "files": 1200,
            "digest": "sha256:" + "ab" * 32,
            "verified": True,
            "downtime_s": 1.5,
            "consistency": "quiesced",
            "passes": [
                {"bytes": 1 << 30, "files": 1200, "duration_s": None},
                {"bytes": 4096, "files": 3, "duration_s": 0.2},
            ],
            "target_complete": True,
            "mismatches": [],
            "warnings": ["labels differ on the existing target"],
            "duration_s": 12.25,
        }
    )
    assert m.finished_at is not None and m.started_at is not None
    m.finished_at = m.started_at + timedelta(seconds=12)
    validator("Migration").validate(m.to_json())


@pytest.mark.parametrize("how", ["fail", "cancel"])
def test_stopped_migration_with_partial_result_matches_the_schema(how: str) -> None:
    m = Migration(id="mig_4", request=request())
    m.start()
    if how == "fail":
        m.fail("agent_unreachable", "host-b did not answer", result={"target_complete": False})
    else:
        m.cancel(result={"target_complete": False})
    validator("Migration").validate(m.to_json())


def test_wrong_migration_objects_fail_the_schema() -> None:
    good = Migration(id="mig_5", request=request()).to_json()
    check = validator("Migration")
    for change in (
        {"state": "paused"},
        {"phase": "copying"},
        {"created_at": "yesterday"},
        {"attempts": 0},
        {"result": {"consistency": "maybe"}},
        {"result": {"digest": "md5:00"}},
        {"error": {"code": "x"}},
    ):
        assert not check.is_valid({**good, **change}), change
    assert not check.is_valid({k: v for k, v in good.items() if k != "progress"})
