"""The migration model: request validation as the contract says, and the state machine."""

from __future__ import annotations

from typing import Any

import pytest

from migrator.errors import InvalidRequest, InvalidState
from migrator.model import Migration, Options, Phase, State, new_id, parse_request

BASE: dict[str, Any] = {
    "source": {"agent": "host-a", "volume": "pgdata"},
    "target": {"agent": "host-b"},
}


def with_(**changes: Any) -> dict[str, Any]:
    doc = {k: dict(v) for k, v in BASE.items()}
    for path, value in changes.items():
        section, _, key = path.partition("__")
        if key:
            doc.setdefault(section, {})[key] = value
        else:
            doc[section] = value
    return doc


def test_defaults_follow_the_contract() -> None:
    req = parse_request(BASE)
    assert req.target.volume == "pgdata"
    assert req.options == Options()
    assert req.to_json()["options"] == {
        "compression": "auto",
        "quiesce": "none",
        "precopy": False,
        "restart_source_containers": True,
        "stop_timeout_s": 30,
        "if_target_exists": "fail",
        "verify": "checksum",
        "delete_source": False,
        "allow_in_use": False,
        "max_rate_bytes_per_s": None,
    }


def test_fingerprint_ignores_spelled_out_defaults() -> None:
    explicit = with_(options={"compression": "auto", "verify": "checksum"})
    assert parse_request(explicit).fingerprint() == parse_request(BASE).fingerprint()
    other = with_(options={"compression": "none"})
    assert parse_request(other).fingerprint() != parse_request(BASE).fingerprint()


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"source": BASE["source"]},
        with_(extra=1),
        with_(source__extra=1),
        with_(target__extra=1),
        with_(source__volume="-bad"),
        with_(source__volume="a"),
        with_(source__volume=5),
        with_(target__volume="has space"),
        with_(source__agent=""),
        with_(options={"compression": "lzma"}),
        with_(options={"quiesce": "pause"}),
        with_(options={"precopy": "yes"}),
        with_(options={"precopy": 1}),
        with_(options={"stop_timeout_s": -1}),
        with_(options={"stop_timeout_s": True}),
        with_(options={"max_rate_bytes_per_s": 0}),
        with_(options={"max_rate_bytes_per_s": 1.5}),
        with_(options={"unknown": 1}),
        with_(options={"delete_source": True}),
        with_(options=[]),
        with_(target__driver_opts={"o": 1}),
        with_(target={"agent": "host-a"}),
    ],
)
def test_invalid_requests(doc: Any) -> None:
    with pytest.raises(InvalidRequest):
        parse_request(doc)


def test_valid_variants() -> None:
    req = parse_request(
        with_(
            target__volume="pgdata-copy",
            target__driver="local",
            target__driver_opts={"type": "tmpfs", "device": "tmpfs"},
            options={
                "delete_source": True,
                "restart_source_containers": False,
                "max_rate_bytes_per_s": 1000,
                "quiesce": "stop",
                "precopy": True,
            },
        )
    )
    assert req.target_driver_opts == {"type": "tmpfs", "device": "tmpfs"}
    assert req.options.delete_source is True
    # Same agent, other volume: a copy on one host is fine.
    assert parse_request(with_(target={"agent": "host-a", "volume": "pgdata2"}))


def test_state_machine() -> None:
    m = Migration(id=new_id(), request=parse_request(BASE))
    assert m.state is State.QUEUED
    m.start()
    assert (m.state, m.phase) == (State.RUNNING, Phase.PREPARING)
    m.enter(Phase.TRANSFERRING)
    m.fail("transfer_failed", "cut")
    assert m.state is State.FAILED
    assert m.phase is None
    assert m.finished_at is not None
    with pytest.raises(InvalidState):
        m.cancel()
    m.retry()
    assert (m.state, m.attempts, m.error, m.finished_at) == (State.QUEUED, 2, None, None)
    m.start()
    m.succeed({"verified": True})
    with pytest.raises(InvalidState):
        m.retry()
    with pytest.raises(InvalidState):
        m.enter(Phase.VERIFYING)


def test_record_round_trip() -> None:
    m = Migration(id=new_id(), request=parse_request(with_(options={"compression": "none"})))
    m.start()
    m.checkpoint["transfer_started"] = True
    m.progress.bytes_done = 42
    again = Migration.from_record(m.to_record())
    assert again.to_record() == m.to_record()
    assert m.to_json()["created_at"].endswith("Z")
    assert "checkpoint" not in m.to_json()
