"""A real PostgreSQL database under write load, moved with `quiesce: stop` and pre-copy: the
target starts without crash recovery and holds exactly what the source held when it stopped."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import docker
import pytest
from docker.models.containers import Container

from tests.coordinatorclient import API
from tests.postgres import (
    PgbenchLoad,
    amcheck,
    checksums_offline,
    count_rows,
    last_startup,
    pgbench_init,
    postgres_image,
    psql,
    run_postgres,
    started_cleanly,
    table_digests,
    wait_ready,
)
from tests.testbed import CoordinatorProcess, Engine
from tests.transfers import wait_for

pytestmark = pytest.mark.integration

SCALE = 20  # 2 M accounts, ~300 MB of data directory
PGBENCH_TABLES = {
    "public.pgbench_accounts",
    "public.pgbench_branches",
    "public.pgbench_history",
    "public.pgbench_tellers",
}


@pytest.fixture(scope="session")
def pg_image(engine_a: Engine, engine_b: Engine) -> str:
    """The PostgreSQL image in both engines: the root filesystem is built at most once per
    machine (cached on disk), imported once per session into each engine."""
    for engine in (engine_a, engine_b):
        client = docker.DockerClient(base_url=engine.url, version="auto")
        try:
            image = postgres_image(client)
        finally:
            client.close()
    return image


@pytest.fixture
def databases(
    docker_a: docker.DockerClient, docker_b: docker.DockerClient, volume_name: str
) -> Iterator[list[Container]]:
    """Containers a test starts; removed afterwards, with the test's volume on both hosts, so
    idle databases do not load the rest of the session."""
    started: list[Container] = []
    yield started
    for container in started:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)
    for client in (docker_a, docker_b):
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_volume(volume_name, force=True)


def migrate(volume: str, **options: object) -> dict[str, object]:
    return {
        "source": {"agent": "host-a", "volume": volume},
        "target": {"agent": "host-b"},
        "options": options,
    }


@pytest.mark.timeout(900)
def test_database_under_load_moves_consistently(
    coordinator: CoordinatorProcess,
    api_token: str,
    pg_image: str,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    volume_name: str,
    databases: list[Container],
) -> None:
    """pgbench writes with 2 unthrottled clients through the pre-copy passes; the final pass
    runs with the database stopped.

    What the source held "at the moment of the stop" is read afterwards, from the source
    itself: pgbench runs inside the source container (`docker exec`), so stopping the container
    ends it, and nothing starts it again. When the migration has succeeded the product has
    restarted the source container, and from the stop on nothing has written to that database
    but its own clean shutdown and restart, which change no table contents. So the restarted
    source, read before anything else touches it, shows exactly the rows of the stop; the
    target, started from the migrated volume, must show the same rows, and must come up from a
    clean shutdown checkpoint (no crash recovery), with every page checksum and index intact.
    """
    volume, name = volume_name, f"{volume_name}-pg"
    source = run_postgres(docker_a, volume, name)
    databases.append(source)
    pgbench_init(source, SCALE)

    load = PgbenchLoad(source, clients=2, seconds=600).start()
    wait_for(lambda: count_rows(source, "pgbench_history") > 100, what="pgbench to be writing")
    api = API(coordinator, api_token)
    created = api.create(migrate(volume, quiesce="stop", precopy=True))
    history_at_create = count_rows(source, "pgbench_history")
    done = api.wait(created["id"], seconds=300)

    assert done["state"] == "succeeded", f"{done.get('error')}\n{coordinator.log_tail()}"
    assert load.wait(timeout=60) is not None, "pgbench still running: was the source stopped?"
    assert load.exit_code != 0, f"pgbench ended normally, not by the stop:\n{load.output}"
    result = done["result"]
    assert result["verified"] is True
    assert result["consistency"] == "quiesced"
    assert len(result["passes"]) >= 2, result["passes"]
    assert result["downtime_s"] > 0

    # The source is back, and it came back from a clean shutdown (docker stop's signal let
    # Postgres write its shutdown checkpoint).
    source.reload()
    assert source.status == "running", source.status
    wait_ready(source)
    clean, head = started_cleanly(source)
    assert clean, f"the source restarted with crash recovery:\n{head}"
    at_stop = table_digests(source)
    assert set(at_stop) == PGBENCH_TABLES
    assert at_stop["public.pgbench_accounts"][0] == SCALE * 100_000
    # The load went on while the pre-copy ran: the final pass had changes to carry.
    assert at_stop["public.pgbench_history"][0] > history_at_create

    # The target: every page checksum right before the first start (pg_checksums also refuses
    # a cluster that was not shut down cleanly), then a start without recovery.
    code, report = checksums_offline(docker_b, volume)
    assert code == 0 and "Bad checksums:  0" in report, report
    target = run_postgres(docker_b, volume, name)
    databases.append(target)
    clean, head = started_cleanly(target)
    assert clean, f"Postgres on host B needed crash recovery:\n{head}"
    assert table_digests(target) == at_stop
    amcheck(target)  # raises with pg_amcheck's report on any corruption
    assert "database system is ready to accept connections" in last_startup(target)


def test_dry_run_lists_the_database_and_changes_nothing(
    coordinator: CoordinatorProcess,
    api_token: str,
    pg_image: str,
    docker_a: docker.DockerClient,
    docker_b: docker.DockerClient,
    volume_name: str,
    databases: list[Container],
) -> None:
    volume, name = volume_name, f"{volume_name}-pg"
    source = run_postgres(docker_a, volume, name)
    databases.append(source)
    psql(source, "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (1), (2)")
    started_at = source.attrs["State"]["StartedAt"]
    api = API(coordinator, api_token)
    before = [m["id"] for m in api.request("GET", "/v1/migrations?limit=1000").json()["migrations"]]

    r = api.request(
        "POST",
        "/v1/migrations?dry_run=true",
        json=migrate(volume, quiesce="stop", precopy=True),
    )
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert plan["containers_to_stop"] == [name]
    assert plan["running_containers"] == [name]
    assert plan["would_fail"] == []
    assert plan["target_exists"] is False
    assert plan["bytes"] > 0 and plan["files"] > 0

    source.reload()
    assert source.status == "running"
    assert source.attrs["State"]["StartedAt"] == started_at  # never stopped nor restarted
    assert psql(source, "SELECT count(*) FROM kept") == "2"
    assert volume not in [v["Name"] for v in docker_b.api.volumes()["Volumes"] or []]
    after = [m["id"] for m in api.request("GET", "/v1/migrations?limit=1000").json()["migrations"]]
    assert after == before  # no migration was created
