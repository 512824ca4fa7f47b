"""The `migrator` CLI against a fake coordinator (tests/api/fake_coordinator.py): the request it
sends for each flag, what it prints, and the exit codes of the contract (DESIGN section 4)."""

from __future__ import annotations

import argparse
import io
import json
import signal
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from migrator import cli
from migrator.client import SseParser
from tests.api.fake_coordinator import FakeCoordinator

MID = "mig_0123456789abcdef0123"
EVENTS = f"/v1/migrations/{MID}/events"


def migration(state: str = "queued", phase: str | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": MID,
        "state": state,
        "phase": phase,
        "source": {"agent": "host-a", "volume": "pgdata"},
        "target": {"agent": "host-b", "volume": "pgdata"},
        "options": {"quiesce": "none"},
        "progress": {
            "bytes_total": 0,
            "bytes_done": 0,
            "files_total": 0,
            "files_done": 0,
            "rate_bytes_per_s": 0.0,
            "eta_s": None,
        },
        "attempts": 1,
        "result": None,
        "error": None,
        "created_at": "2024-05-01T12:00:00Z",
        "started_at": None,
        "finished_at": None,
    }
    doc.update(extra)
    return doc


SUCCEEDED = migration(
    "succeeded",
    result={
        "bytes": 3 * 2**30,
        "files": 1234,
        "digest": "sha256:00",
        "verified": True,
        "downtime_s": 12.2,
        "duration_s": 125,
        "consistency": "quiesced",
        "warnings": ["labels differ on the existing target"],
    },
)
FAILED = migration("failed", error={"code": "verification_failed", "message": "3 files differ"})
CANCELLED = migration("cancelled", error={"code": "cancelled", "message": "cancelled on request"})


def progress(done: int, total: int = 4 * 2**30) -> dict[str, Any]:
    return {
        "bytes_total": total,
        "bytes_done": done,
        "files_total": 100,
        "files_done": 10,
        "rate_bytes_per_s": 80 * 2**20,
        "eta_s": 30.0,
    }


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCoordinator]:
    coordinator = FakeCoordinator().start()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MIGRATOR_URL", coordinator.url)
    monkeypatch.delenv("MIGRATOR_TOKEN", raising=False)
    yield coordinator
    coordinator.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- the request -----------------------------------------------------------------------------


def test_migrate_without_flags_sends_no_options(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("POST", "/v1/migrations", 202, migration())
    code, out, _ = run(capsys, "migrate", "host-a:pgdata", "host-b")
    assert code == 0
    (sent,) = fake.requests_to("POST", "/v1/migrations")
    assert sent.body == {
        "source": {"agent": "host-a", "volume": "pgdata"},
        "target": {"agent": "host-b"},
    }
    assert sent.query == {}
    assert "Authorization" not in sent.headers and "Idempotency-Key" not in sent.headers
    assert out.splitlines() == [
        f"{MID} queued: host-a:pgdata -> host-b:pgdata",
        f"follow it: migrator status {MID} --wait",
    ]


def test_migrate_flags_become_exactly_these_options(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("POST", "/v1/migrations", 202, migration())
    code, _, _ = run(
        capsys,
        "migrate",
        "host-a:pgdata",
        "host-b:pgdata2",
        "--quiesce", "stop", "--precopy", "--compression", "zstd", "--verify", "none",
        "--if-target-exists", "sync", "--allow-in-use", "--delete-source", "--no-restart",
        "--max-rate", "50M", "--stop-timeout", "60",
        "--target-driver", "local", "--target-driver-opt", "type=none",
    )  # fmt: skip
    assert code == 0
    (sent,) = fake.requests_to("POST", "/v1/migrations")
    assert sent.body == {
        "source": {"agent": "host-a", "volume": "pgdata"},
        "target": {
            "agent": "host-b",
            "volume": "pgdata2",
            "driver": "local",
            "driver_opts": {"type": "none"},
        },
        "options": {
            "quiesce": "stop",
            "compression": "zstd",
            "verify": "none",
            "if_target_exists": "sync",
            "precopy": True,
            "allow_in_use": True,
            "delete_source": True,
            "restart_source_containers": False,
            "stop_timeout_s": 60,
            "max_rate_bytes_per_s": 50 * 2**20,
        },
    }


def test_idempotency_key_and_bearer_token_headers(
    fake: FakeCoordinator, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.reply("POST", "/v1/migrations", 202, migration())
    monkeypatch.setenv("MIGRATOR_TOKEN", "from-env")
    assert run(capsys, "migrate", "a:v", "b", "--idempotency-key", "ci-42")[0] == 0
    assert run(capsys, "migrate", "a:v", "b", "--token", "from-flag")[0] == 0
    first, second = fake.requests_to("POST", "/v1/migrations")
    assert first.headers["Idempotency-Key"] == "ci-42"
    assert first.headers["Authorization"] == "Bearer from-env"
    assert second.headers["Authorization"] == "Bearer from-flag"
    assert "Idempotency-Key" not in second.headers


def test_url_flag_overrides_the_environment(
    fake: FakeCoordinator, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.reply("GET", "/v1/agents", 200, {"agents": []})
    monkeypatch.setenv("MIGRATOR_URL", "http://127.0.0.1:1")
    assert run(capsys, "--url", fake.url, "agents")[:2] == (0, "no agents\n")
    assert run(capsys, "agents", "--url", fake.url)[:2] == (0, "no agents\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("512k", 512 * 1024),
        ("512K", 512 * 1024),
        ("50M", 50 * 2**20),
        ("1G", 2**30),
        ("1.5G", 3 * 2**29),
        ("2T", 2 * 2**40),
        ("50MiB", 50 * 2**20),
        ("50Mi", 50 * 2**20),
        ("50MB", 50_000_000),
        ("10kB", 10_000),
        ("100B", 100),
        ("50M/s", 50 * 2**20),
        (" 8 M ", 8 * 2**20),
    ],
)
def test_max_rate_units(text: str, expected: int) -> None:
    assert cli.parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "-1", "0", "0.1", "50Mb", "5X", "1i", "M"])
def test_max_rate_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_rate(text)


# -- usage errors (2) ------------------------------------------------------------------------


def test_delete_source_without_no_restart_is_a_one_line_usage_error(
    fake: FakeCoordinator, capsys: Any
) -> None:
    code, out, err = run(capsys, "migrate", "a:v", "b", "--delete-source")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--delete-source needs --no-restart" in err
    assert fake.requests == []


@pytest.mark.parametrize(
    "argv",
    [
        ["migrate", "host-a", "host-b"],  # no source volume
        ["migrate", "host-a:", "host-b"],
        ["migrate", "a:v", "b:"],
        ["migrate", "a:v", "b", "--max-rate", "lots"],
        ["migrate", "a:v", "b", "--quiesce", "pause"],
        ["migrate", "a:v", "b", "--target-driver-opt", "novalue"],
        ["list", "--state", "sleeping"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(fake: FakeCoordinator, capsys: Any, argv: list[str]) -> None:
    assert run(capsys, *argv)[0] == 2
    assert fake.requests == []


def test_help_exits_0_and_documents_detaching(capsys: Any) -> None:
    code, out, _ = run(capsys, "status", "--help")
    assert code == 0 and "Ctrl-C detaches" in out.replace("\n", " ").replace("  ", " ")


def test_bad_url_is_a_usage_error(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIGRATOR_URL", "127.0.0.1:8420")
    code, _, err = run(capsys, "agents")
    assert code == 2 and "http://" in err


# -- refused (5), unreachable (4) ------------------------------------------------------------

PROBLEM = {
    "type": "about:blank",
    "status": 409,
    "code": "volume_in_use",
    "title": "Volume in use by a running container",
    "detail": "pgdata is used by running container(s): db",
}


def test_refused_prints_detail_and_code_on_one_line(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("POST", "/v1/migrations", 409, PROBLEM)
    code, out, err = run(capsys, "migrate", "host-a:pgdata", "host-b")
    assert code == 5 and out == ""
    assert err == "migrator: pgdata is used by running container(s): db (volume_in_use)\n"


def test_refused_with_json_prints_the_problem_document(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("POST", "/v1/migrations", 409, PROBLEM)
    code, out, _ = run(capsys, "migrate", "host-a:pgdata", "host-b", "--json")
    assert code == 5 and json.loads(out) == PROBLEM


def test_not_found_and_unauthorized_are_refusals(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("GET", "/v1/agents", 401, {"status": 401, "code": "unauthorized", "detail": "no"})
    assert run(capsys, "agents")[0] == 5
    code, _, err = run(capsys, "status", "mig_missing")  # unknown path: the fake's 404
    assert code == 5 and "(not_found)" in err


def test_closed_port_is_unreachable(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MIGRATOR_URL", f"http://127.0.0.1:{port}")
    code, out, err = run(capsys, "status", MID)
    assert code == 4 and out == ""
    assert err.startswith(f"migrator: cannot reach the coordinator at http://127.0.0.1:{port}")


def test_server_error_counts_as_unreachable(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("GET", "/v1/agents", 503, {"status": 503, "code": "internal_error"})
    assert run(capsys, "agents")[0] == 4


# -- --json and the plain outputs ------------------------------------------------------------


def test_json_prints_exactly_the_migration_object(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("POST", "/v1/migrations", 202, migration())
    code, out, _ = run(capsys, "migrate", "host-a:pgdata", "host-b", "--json")
    assert code == 0 and json.loads(out) == migration()


def test_dry_run_prints_the_plan(fake: FakeCoordinator, capsys: Any) -> None:
    plan = {"plan": {"source": {"bytes": 100, "files": 3}, "target_exists": False, "steps": ["a"]}}
    fake.reply("POST", "/v1/migrations", 200, plan)
    code, out, _ = run(capsys, "migrate", "host-a:pgdata", "host-b", "--dry-run", "--wait")
    assert code == 0
    (sent,) = fake.requests_to("POST", "/v1/migrations")
    assert sent.query == {"dry_run": "true"}
    assert out.splitlines() == [
        "dry run: nothing was started; the plan:",
        "  source:",
        "    bytes: 100",
        "    files: 3",
        "  target_exists: false",
        "  steps:",
        '    - "a"',
    ]
    assert (
        run(capsys, "migrate", "h:v", "g", "--dry-run", "--json")[1]
        == json.dumps(plan, indent=2) + "\n"
    )


def test_status_summary_and_exit_code_of_the_state(fake: FakeCoordinator, capsys: Any) -> None:
    running = migration("running", "transferring", progress=progress(2**30))
    fake.reply("GET", f"/v1/migrations/{MID}", 200, running)
    code, out, _ = run(capsys, "status", MID)
    assert code == 0
    assert f"id:        {MID}" in out
    assert "state:     running (transferring)" in out
    assert "1.0 GiB / 4.0 GiB  25%" in out
    fake.reply("GET", f"/v1/migrations/{MID}", 200, FAILED)
    fake.reply("GET", f"/v1/migrations/{MID}", 200, CANCELLED)
    assert run(capsys, "status", MID)[0] == 0  # the first reply is used up now
    code, out, _ = run(capsys, "status", MID)
    assert code == 1 and "failed: verification_failed: 3 files differ" in out
    code, out, _ = run(capsys, "status", MID, "--json")
    assert code == 3 and json.loads(out) == CANCELLED


def test_list_table_and_filters(fake: FakeCoordinator, capsys: Any) -> None:
    rows = [migration("running", "precopy", progress=progress(2**30)), SUCCEEDED]
    fake.reply("GET", "/v1/migrations", 200, {"migrations": rows})
    code, out, _ = run(capsys, "list", "--state", "running", "--limit", "5")
    assert code == 0
    assert fake.requests[-1].query == {"state": "running", "limit": "5"}
    assert out.splitlines() == [
        f"{'ID':<{len(MID)}}  STATE      PHASE    SOURCE         TARGET         DONE  CREATED",
        f"{MID}  running    precopy  host-a:pgdata  host-b:pgdata  25%   2024-05-01T12:00:00Z",
        f"{MID}  succeeded  -        host-a:pgdata  host-b:pgdata  -     2024-05-01T12:00:00Z",
    ]  # fmt: skip
    assert json.loads(run(capsys, "list", "--json")[1]) == {"migrations": rows}


def test_agents_and_volumes_tables(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("GET", "/v1/agents", 200, {"agents": [
        {"name": "host-a", "url": "http://a:8421", "healthy": True, "docker_version": "27.1",
         "last_error": None},
        {"name": "host-b", "url": "http://b:8421", "healthy": False, "docker_version": None,
         "last_error": "connection refused"},
    ]})  # fmt: skip
    fake.reply("GET", "/v1/agents/host-a/volumes", 200, {"volumes": [
        {"name": "pgdata", "driver": "local", "options": {}, "labels": {}, "in_use_by": ["db"]},
        {"name": "cache", "driver": "local", "options": {}, "labels": {}, "in_use_by": []},
    ]})  # fmt: skip
    assert run(capsys, "agents")[1].splitlines() == [
        "NAME    HEALTHY  DOCKER  URL            LAST ERROR",
        "host-a  yes      27.1    http://a:8421  -",
        "host-b  no       -       http://b:8421  connection refused",
    ]
    assert run(capsys, "volumes", "host-a")[1].splitlines() == [
        "NAME    DRIVER  IN USE BY",
        "pgdata  local   db",
        "cache   local   -",
    ]


@pytest.mark.parametrize("verb", ["cancel", "retry", "discard"])
def test_actions_post_and_exit_0(fake: FakeCoordinator, capsys: Any, verb: str) -> None:
    fake.reply("POST", f"/v1/migrations/{MID}/{verb}", 202, migration("running"))
    code, out, _ = run(capsys, verb, MID)
    assert code == 0 and out == f"{verb} accepted: {MID} (now running)\n"
    assert len(fake.requests_to("POST", f"/v1/migrations/{MID}/{verb}")) == 1


# -- --wait ----------------------------------------------------------------------------------


def test_wait_prints_plain_lines_and_the_verdict(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("POST", "/v1/migrations", 202, migration())
    fake.stream(EVENTS, [
        ("state", 1, migration("running", "transferring")),
        ("progress", 2, progress(2**30)),
        ("progress", 3, progress(2 * 2**30)),  # within 5 s of the last line: not printed
        ("log", 4, {"time": "2024-05-01T12:00:03.5Z", "level": "info", "message": "pass 1 done"}),
        ("state", 5, migration("running", "verifying")),
        ("state", 6, SUCCEEDED),
    ])  # fmt: skip
    code, out, err = run(capsys, "migrate", "host-a:pgdata", "host-b", "--wait")
    assert code == 0, err
    assert out.splitlines() == [
        "queued",
        "running: transferring",
        "transferring  1.0 GiB / 4.0 GiB  25%  80.0 MiB/s  ETA 30s",
        "12:00:03 info    pass 1 done",
        "running: verifying",
        "warning: labels differ on the existing target",
        "succeeded: 3.0 GiB, 1,234 files in 2m 05s, verified: yes, downtime: 12.2s",
    ]
    (events,) = fake.requests_to("GET", EVENTS)
    assert events.headers["Accept"] == "text/event-stream"


def test_wait_failed_exits_1_with_the_error(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("POST", "/v1/migrations", 202, migration())
    fake.stream(EVENTS, [("state", 1, FAILED)])
    code, out, _ = run(capsys, "migrate", "host-a:pgdata", "host-b", "--wait")
    assert code == 1
    assert out.splitlines()[-2:] == [
        "failed: verification_failed: 3 files differ",
        f"resume it: migrator retry {MID}",
    ]


def test_wait_json_prints_only_the_final_object(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("GET", f"/v1/migrations/{MID}", 200, migration("running", "precopy"))
    fake.stream(EVENTS, [("progress", 1, progress(5)), ("state", 2, CANCELLED)])
    code, out, err = run(capsys, "status", MID, "--wait", "--json")
    assert code == 3 and json.loads(out) == CANCELLED and err == ""


def test_wait_resumes_a_dropped_stream_with_last_event_id(
    fake: FakeCoordinator, capsys: Any
) -> None:
    fake.reply("GET", f"/v1/migrations/{MID}", 200, migration("running", "transferring"))
    fake.stream(EVENTS, [("progress", 7, progress(1))])  # then the connection drops
    fake.stream(EVENTS, [("state", 8, SUCCEEDED)])
    code, _, _ = run(capsys, "status", MID, "--wait")
    assert code == 0
    first, second = fake.requests_to("GET", EVENTS)
    assert "Last-Event-ID" not in first.headers
    assert second.headers["Last-Event-ID"] == "7"


def test_wait_falls_back_to_long_polls_without_a_stream(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("GET", f"/v1/migrations/{MID}", 200, migration("running", "transferring"))
    fake.reply("GET", f"/v1/migrations/{MID}", 200, SUCCEEDED)
    # No stream is scripted: the events path answers 404 and the CLI polls with ?wait=.
    code, out, _ = run(capsys, "status", MID, "--wait")
    assert code == 0 and out.splitlines()[-1].startswith("succeeded: 3.0 GiB")
    polls = fake.requests_to("GET", f"/v1/migrations/{MID}")
    assert polls[-1].query == {"wait": str(cli.POLL_WAIT_S)}


def test_wait_falls_back_to_long_polls_when_the_stream_fails(
    fake: FakeCoordinator, capsys: Any
) -> None:
    fake.reply("GET", f"/v1/migrations/{MID}", 200, migration("running", "transferring"))
    fake.reply("GET", f"/v1/migrations/{MID}", 200, FAILED)
    fake.reply("GET", EVENTS, 503, {"status": 503, "code": "internal_error"})
    assert run(capsys, "status", MID, "--wait")[0] == 1
    assert fake.requests_to("GET", f"/v1/migrations/{MID}")[-1].query == {"wait": "5"}


def test_wait_gives_up_on_a_coordinator_gone_for_good(
    fake: FakeCoordinator, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "RECONNECT_GIVE_UP_S", 0.3)
    fake.reply("POST", "/v1/migrations", 202, migration())
    fake.stream(EVENTS, [])  # every connection ends at once, without a terminal state
    fake.reply("GET", f"/v1/migrations/{MID}", 502, None)
    code, out, err = run(capsys, "migrate", "host-a:pgdata", "host-b", "--wait")
    assert code == 4 and "answered 502" in err
    assert out == "queued\n"


def test_already_finished_migration_needs_no_stream(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("GET", f"/v1/migrations/{MID}", 200, SUCCEEDED)
    assert run(capsys, "status", MID, "--wait")[0] == 0
    assert fake.requests_to("GET", EVENTS) == []


def test_ctrl_c_detaches_with_130(fake: FakeCoordinator, capsys: Any) -> None:
    fake.reply("POST", "/v1/migrations", 202, migration())
    fake.stream(EVENTS, [("state", 1, migration("running", "transferring"))], hold=True)
    main_thread = threading.main_thread().ident
    assert main_thread is not None and threading.get_ident() == main_thread

    def interrupt() -> None:
        if fake.streamed.wait(timeout=30):
            time.sleep(0.2)  # let the CLI block in its read of the stream
            signal.pthread_kill(main_thread, signal.SIGINT)

    sender = threading.Thread(target=interrupt)
    sender.start()
    try:
        code, out, err = run(capsys, "migrate", "host-a:pgdata", "host-b", "--wait")
    finally:
        sender.join()
    assert code == 130
    assert "running: transferring" in out  # the event arrived while the stream was open
    assert err == f"detached; the migration continues: migrator status {MID} --wait\n"
    assert fake.requests_to("POST", f"/v1/migrations/{MID}/cancel") == []


# -- pieces ----------------------------------------------------------------------------------


def test_sse_parser() -> None:
    parser = SseParser()
    lines = [": comment", "event: state", "id: 4", "data: {\"a\":", "data: 1}", "",
             "", "data:plain", "retry: 10", "\r\n"]  # fmt: skip
    events = [e for line in lines if (e := parser.feed(line + "\n")) is not None]
    assert [(e.name, e.id, e.data) for e in events] == [
        ("state", "4", {"a": 1}),
        ("message", "4", "plain"),
    ]


def test_tty_bar_is_one_redrawn_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "96")
    stream = io.StringIO()
    now = [0.0]
    view = cli.ProgressView(stream, tty=True, clock=lambda: now[0])
    view.state(migration("running", "transferring", progress=progress(0)))
    now[0] = 0.05
    view.progress(progress(2**30))  # too soon after the last draw: skipped
    now[0] = 0.5
    view.progress(progress(2**31))
    view.log({"time": "2024-05-01T12:00:04Z", "level": "warning", "message": "slow disk"})
    view.close()
    text = stream.getvalue()
    assert "\n" not in text.split("slow disk")[0]  # bars only redraw with \r before the log
    assert text.count("2.0 GiB / 4.0 GiB") == 2  # drawn, and redrawn after the log line
    assert "[" + "#" * 15 + "." * 15 + "]" in text  # 30 cells fit in 96 columns
    assert "12:00:04 warning slow disk\n" in text
    assert text.endswith("\n")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59.2, "1m 00s"), (61, "1m 01s"), (3725, "1h 02m")]
)
def test_human_duration(seconds: float, text: str) -> None:
    assert cli.human_duration(seconds) == text


def test_serve_passes_its_flags_to_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def serve(**kwargs: Any) -> int:
        calls.append(kwargs)
        return 0

    monkeypatch.setitem(sys.modules, "migrator.app", types.SimpleNamespace(serve=serve))
    argv = ["serve", "--db", "/tmp/m.db", "--token-file", "t", "--retention-days", "7"]
    assert cli.main(argv) == 0
    assert calls == [
        {
            "listen": "127.0.0.1:8420",
            "db": "/tmp/m.db",
            "token_file": "t",
            "config": None,
            "retention_days": 7,
            "log_level": "info",
        }
    ]
