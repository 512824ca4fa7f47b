"""Downtime benchmark: a ~1 GB PostgreSQL database under write load, migrated with
`quiesce: stop`, with and without pre-copy.

    .venv/bin/python bench/downtime.py [--scale 70] [--runs 1] [--modes full,precopy]

Starts its own test bed (two private Docker engines, an agent on each, a coordinator; under
`MIGRATOR_TESTBED_DIR`, default `.testbed-downtime/`) and stops and removes all of it on exit.
On engine A a Postgres 15 container (tests/postgres.py: the image is built once per machine and
cached) keeps its data directory in a named volume, loaded once with `pgbench -i -s SCALE`
(scale 70: 7 M accounts, ~1.1 GB). Every run then:

1. starts pgbench with 2 unthrottled clients against the source (a few seconds of warm-up);
2. migrates the volume host-a -> host-b through the public API with `quiesce: stop`, and
   `precopy: true` or not; pgbench ends when the product stops the container;
3. reads `downtime_s` (container stopped -> started again) and `duration_s` (the whole
   migration, verification included) from the result;
4. checks the target: Postgres on host B must start without crash recovery and hold the source's
   row counts as of the stop (read from the restarted source, which nothing writes to any more);
5. removes the target container and volume, so the next run is a fresh migration of the same
   source (which the product restarted).

Runs alternate between the modes. The table (medians over runs) goes to stdout and to
bench/results/downtime-<date>.md (git-ignored). The goal: with pre-copy, downtime below 20% of
the full copy's duration.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import secrets
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
# Never the test suite's test bed: engines sharing a data root stop each other. Set before
# tests.testbed reads it.
os.environ.setdefault("MIGRATOR_TESTBED_DIR", str(PROJECT / ".testbed-downtime"))
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import docker  # noqa: E402
import requests  # noqa: E402
from docker.models.containers import Container  # noqa: E402

from tests.postgres import (  # noqa: E402
    TARBALL,
    PgbenchLoad,
    PostgresError,
    build_rootfs,
    pgbench_init,
    postgres_image,
    psql,
    run_postgres,
    started_cleanly,
    wait_ready,
)
from tests.testbed import TESTBED_DIR, AgentProcess, CoordinatorProcess, Engine  # noqa: E402

RESULTS_DIR = PROJECT / "bench" / "results"
VOLUME = "pgdata"
CONTAINER = "db"
MODES = {"full": False, "precopy": True}
TARGET_RATIO = 0.20
WARMUP_S = 5.0
MIGRATION_TIMEOUT_S = 1800


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


@dataclass
class Run:
    mode: str
    n: int
    state: str = ""
    error: str = ""
    downtime_s: float | None = None
    duration_s: float | None = None
    passes: list[int] = field(default_factory=list)
    verified: bool | None = None
    pgbench_tx: int | None = None
    target_clean: bool | None = None
    rows_equal: bool | None = None
    note: str = ""


class Bed:
    """Two engines, their agents and a coordinator; everything stopped by `close`."""

    def __init__(self) -> None:
        self.engines = [Engine("dt-a"), Engine("dt-b")]
        self.agents: list[AgentProcess] = []
        self.coordinator: CoordinatorProcess | None = None
        self.token = secrets.token_urlsafe(24)
        self.clients: list[docker.DockerClient] = []

    def start(self) -> None:
        for e in self.engines:
            e.stop()
            shutil.rmtree(e.base / "data", ignore_errors=True)
            e.start()
            self.clients.append(docker.DockerClient(base_url=e.url, version="auto"))
        for e, host in zip(self.engines, ("a", "b"), strict=True):
            agent = AgentProcess(name=host, engine=e, token=secrets.token_urlsafe(24))
            shutil.rmtree(agent.dir, ignore_errors=True)
            self.agents.append(agent)
            agent.start()
        config = "".join(
            f'[agents.host-{a.name}]\nurl = "{a.url}"\ntoken = "{a.token}"\n\n' for a in self.agents
        )
        self.coordinator = CoordinatorProcess(name="downtime", token=self.token, config=config)
        shutil.rmtree(self.coordinator.dir, ignore_errors=True)
        self.coordinator.start()

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        assert self.coordinator is not None
        kw.setdefault("timeout", MIGRATION_TIMEOUT_S + 60)
        headers = {"Authorization": f"Bearer {self.token}"}
        return requests.request(method, self.coordinator.url + path, headers=headers, **kw)

    def migrate(self, precopy: bool) -> dict[str, Any]:
        body = {
            "source": {"agent": "host-a", "volume": VOLUME},
            "target": {"agent": "host-b"},
            "options": {"quiesce": "stop", "precopy": precopy},
        }
        r = self.api("POST", "/v1/migrations", json=body)
        r.raise_for_status()
        migration_id = r.json()["id"]
        deadline = time.monotonic() + MIGRATION_TIMEOUT_S
        while True:
            doc: dict[str, Any] = self.api("GET", f"/v1/migrations/{migration_id}?wait=300").json()
            if doc["state"] in ("succeeded", "failed", "cancelled"):
                return doc
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration {migration_id} still {doc['state']}")

    def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.close()
        if self.coordinator is not None:
            self.coordinator.stop()
        for agent in self.agents:
            agent.stop()
        for e in self.engines:
            e.stop()
            shutil.rmtree(e.base / "data", ignore_errors=True)


def row_counts(container: Container) -> dict[str, int]:
    tables = psql(
        container,
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    ).splitlines()
    return {t: int(psql(container, f"SELECT count(*) FROM {t}")) for t in tables}


def stop_load(source: Container, load: PgbenchLoad) -> None:
    """End pgbench when the product did not stop the source (a failed migration)."""
    if load.running:
        with contextlib.suppress(PostgresError):
            psql(
                source,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'pgbench'",
            )
    load.wait(timeout=60)


def file_states(root: Path) -> dict[str, tuple[int, int]]:
    states = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            states[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return states


@dataclass
class Delta:
    seconds: float
    changed_bytes: int
    changed_files: int
    total_bytes: int
    top: list[tuple[str, int]]


def delta_probe(bed: Bed, source: Container, seconds: float = 10.0) -> Delta:
    """What a file-granular final pass would have to send again: the bytes of every file of
    the data directory written during `seconds` of the same load (plus the product's 2 s window
    margin), measured on the source volume directly."""
    root = Path(bed.clients[0].api.inspect_volume(VOLUME)["Mountpoint"])
    load = PgbenchLoad(source, clients=2, seconds=3600).start()
    time.sleep(WARMUP_S)
    window_start = time.time_ns() - 2_000_000_000
    time.sleep(seconds)
    after = file_states(root)
    stop_load(source, load)
    changed = {p: size for p, (size, mtime) in after.items() if mtime >= window_start}
    top = sorted(changed.items(), key=lambda kv: -kv[1])[:5]
    return Delta(
        seconds=seconds,
        changed_bytes=sum(changed.values()),
        changed_files=len(changed),
        total_bytes=sum(size for size, _ in after.values()),
        top=[(os.path.relpath(p, root), size) for p, size in top],
    )


def one_run(bed: Bed, source: Container, mode: str, n: int) -> Run:
    run = Run(mode=mode, n=n)
    client_b = bed.clients[1]
    load = PgbenchLoad(source, clients=2, seconds=3600).start()
    time.sleep(WARMUP_S)
    if not load.running:
        run.state, run.error = "error", f"pgbench did not keep running:\n{load.output}"
        return run
    try:
        doc = bed.migrate(MODES[mode])
    finally:
        stop_load(source, load)
    run.pgbench_tx = load.transactions()
    run.state = doc["state"]
    result = doc.get("result") or {}
    run.downtime_s = result.get("downtime_s")
    run.duration_s = result.get("duration_s")
    run.passes = [int(p.get("bytes") or 0) for p in result.get("passes") or []]
    run.verified = result.get("verified")
    if doc["state"] != "succeeded":
        err = doc.get("error") or {}
        run.error = f"{err.get('code')}: {err.get('message')}"
        return run
    source.reload()
    if source.status != "running":
        run.note = f"source container left {source.status}"
        return run
    wait_ready(source)
    at_stop = row_counts(source)  # nothing writes to the restarted source: the stop's state
    target = run_postgres(client_b, VOLUME, f"{CONTAINER}-target")
    try:
        run.target_clean, head = started_cleanly(target)
        if not run.target_clean:
            run.note = "target needed crash recovery: " + " / ".join(head.splitlines()[:6])
        run.rows_equal = row_counts(target) == at_stop
    finally:
        target.remove(force=True)
        client_b.api.remove_volume(VOLUME, force=True)
    return run


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def fmt(value: float | None, unit: str = "s") -> str:
    return "—" if value is None else f"{value:.2f} {unit}".strip()


def report(
    runs: list[Run], scale: int, db_bytes: int, delta: Delta | None, image_s: float | None
) -> str:
    full = [r for r in runs if r.mode == "full" and r.state == "succeeded"]
    full_duration = median([r.duration_s for r in full])
    full_downtime = median([r.downtime_s for r in full])
    lines = [
        f"# Downtime: PostgreSQL under pgbench load, quiesce stop — {dt.date.today()}",
        "",
        f"Database: `pgbench -i -s {scale}`, data directory {db_bytes / 1e9:.2f} GB; load: "
        "pgbench, 2 unthrottled clients, from 5 s before the migration until the stop. "
        f"Host: {platform.node()}, {os.cpu_count()} cores; engines, agents and coordinator on "
        "this machine (loopback). Medians over the successful runs of each mode.",
        "",
        "| mode | runs ok / total | downtime_s | duration_s | downtime / full copy's duration "
        "| passes (MB each) | target clean start, rows equal |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        if not mine:
            continue
        ok = [r for r in mine if r.state == "succeeded"]
        downtime = median([r.downtime_s for r in ok])
        ratio = f"{downtime / full_duration:.1%}" if downtime is not None and full_duration else "—"
        passes = "; ".join(
            "[" + ", ".join(f"{b / 1e6:.0f}" for b in r.passes) + "]" for r in mine if r.passes
        )
        checks = ", ".join(f"{r.target_clean}/{r.rows_equal}" for r in ok) or "—"
        lines.append(
            f"| {mode} | {len(ok)} / {len(mine)} | {fmt(downtime)} | "
            f"{fmt(median([r.duration_s for r in ok]))} | {ratio} | {passes or '—'} | {checks} |"
        )
    pre = [r for r in runs if r.mode == "precopy" and r.state == "succeeded"]
    pre_downtime = median([r.downtime_s for r in pre])
    lines.append("")
    if pre_downtime is not None and full_duration:
        verdict = "met" if pre_downtime < TARGET_RATIO * full_duration else "NOT met"
        lines.append(
            f"Goal (pre-copy downtime < {TARGET_RATIO:.0%} of the full copy's duration "
            f"{full_duration:.2f} s): **{verdict}** ({pre_downtime:.2f} s; full copy's own "
            f"downtime {fmt(full_downtime)})."
        )
    else:
        lines.append(
            "Goal (pre-copy downtime < 20% of the full copy's duration): **not measurable** — "
            "no successful run of both modes."
        )
    problems = [r for r in runs if r.state != "succeeded" or r.note]
    if problems:
        lines += ["", "Failures and notes:", ""]
        for r in problems:
            lines.append(f"* {r.mode} run {r.n}: {r.state} {r.error} {r.note}".rstrip())
    lines += ["", "Per run:", ""]
    for r in runs:
        lines.append(
            f"* {r.mode} #{r.n}: {r.state}, downtime {fmt(r.downtime_s)}, duration "
            f"{fmt(r.duration_s)}, passes {len(r.passes)}, verified {r.verified}, pgbench "
            f"transactions before the stop {r.pgbench_tx}"
        )
    if delta is not None:
        lines += [
            "",
            f"Delta probe: under the same load, {delta.changed_files} files of the data directory "
            f"were written within {delta.seconds:.0f} s (+2 s margin): "
            f"{delta.changed_bytes / 1e6:.0f} MB of {delta.total_bytes / 1e6:.0f} MB. A pass that "
            "re-sends whole changed files sends at least this much however short the window: "
            + ", ".join(f"{p} {b / 1e6:.0f} MB" for p, b in delta.top)
            + ".",
        ]
    if image_s is not None:
        lines += [
            "",
            f"(The Postgres image's root filesystem was built in this run: {image_s:.0f} s.)",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=70)
    parser.add_argument("--runs", type=int, default=1, help="runs per mode (medians)")
    parser.add_argument("--modes", default="full,precopy")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(f"interrupted by signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    image_s = None
    if not TARBALL.exists():
        say("building the Postgres root filesystem (once per machine)")
        started = time.monotonic()
        build_rootfs()
        image_s = time.monotonic() - started
    bed = Bed()
    runs: list[Run] = []
    try:
        say(f"starting the test bed in {TESTBED_DIR}")
        bed.start()
        client_a = bed.clients[0]
        for client in bed.clients:
            postgres_image(client)
        source = run_postgres(client_a, VOLUME, CONTAINER)
        say(f"pgbench -i -s {args.scale}")
        started = time.monotonic()
        pgbench_init(source, args.scale)
        db_bytes = int(psql(source, "SELECT sum(pg_database_size(oid)) FROM pg_database"))
        say(f"loaded {db_bytes / 1e9:.2f} GB in {time.monotonic() - started:.0f} s")
        delta = delta_probe(bed, source)
        say(f"delta probe: {delta.changed_bytes / 1e6:.0f} MB in {delta.changed_files} files")
        for n in range(1, args.runs + 1):
            for mode in modes if n % 2 else reversed(modes):
                say(f"run {n}: {mode}")
                run = one_run(bed, source, mode, n)
                runs.append(run)
                say(
                    f"{mode} #{n}: {run.state} {run.error} downtime {fmt(run.downtime_s)} "
                    f"duration {fmt(run.duration_s)} passes {len(run.passes)} {run.note}"
                )
                if run.state != "succeeded":
                    if bed.coordinator is not None:
                        print(bed.coordinator.log_tail(2000))
                    source.reload()
                    if source.status != "running":
                        source.start()
                    wait_ready(source)
                    with contextlib.suppress(docker.errors.APIError):
                        bed.clients[1].api.remove_volume(VOLUME, force=True)
        text = report(runs, args.scale, db_bytes, delta, image_s)
        print(text)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"downtime-{dt.datetime.now():%Y-%m-%d-%H%M%S}.md"
        out.write_text(text)
        say(f"written to {out.relative_to(PROJECT)}")
        ok = all(r.state == "succeeded" and r.target_clean and r.rows_equal for r in runs)
        return 0 if ok else 1
    finally:
        bed.close()


if __name__ == "__main__":
    sys.exit(main())
