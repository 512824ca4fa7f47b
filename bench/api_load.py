"""API latency under load: N small migrations submitted at once, while several threads poll them.

    .venv/bin/python bench/api_load.py [--migrations 50] [--pollers 8] [--rounds 3]

Starts its own test bed (two private Docker engines, an agent on each, a coordinator with its
own SQLite database) under $MIGRATOR_TESTBED_DIR, default .testbed-apibench/ (never the test
suite's). Each round:

* creates N source volumes on engine A holding three small files each;
* submits N `POST /v1/migrations` host-a -> host-b at the same moment, from N threads;
* while they run, P threads hammer `GET /v1/migrations/{id}` (no `wait`, no pause) round-robin
  over the migrations not yet seen terminal, recording each request's latency as the client sees
  it (a keep-alive session per thread, so the latency is the server's answer plus one loopback
  round trip and the client's own parsing);
* stops when every migration was seen terminal, then checks each one succeeded, verified, and
  that the target's files equal the source's byte for byte.

After the rounds, the same pollers hammer the finished migrations for a while with nothing
running: the idle latency, to tell the load's share from the request's own cost.

The table (per round, the median of the rounds, idle) goes to stdout and to
bench/results/api-load-<date>.md (git-ignored). The issue's target: p99 < 50 ms on a 2-core box.
Exit status 0 only if every migration succeeded and the target was met.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
# Never the test suite's test bed: concurrent engines on one data root stop each other.
# Set before tests.testbed reads it.
os.environ.setdefault("MIGRATOR_TESTBED_DIR", str(PROJECT / ".testbed-apibench"))
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import docker  # noqa: E402
import requests  # noqa: E402

from tests.testbed import TESTBED_DIR, AgentProcess, CoordinatorProcess, Engine  # noqa: E402

RESULTS_DIR = PROJECT / "bench" / "results"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
P99_TARGET_MS = 50.0
ROUND_TIMEOUT_S = 600.0
IDLE_S = 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- HTTP ------------------------------------------------------------------------------------


class Client:
    """The coordinator's API with one requests.Session per thread, all closed at the end."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"}
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(session)
        kw.setdefault("timeout", 120)
        return session.request(method, self.base + path, headers=self.headers, **kw)

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


# --- statistics ------------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Latencies:
    samples_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.samples_ms)
        return {
            "count": float(len(ordered)),
            "rate": len(ordered) / self.seconds if self.seconds > 0 else math.nan,
            "p50": percentile(ordered, 50),
            "p95": percentile(ordered, 95),
            "p99": percentile(ordered, 99),
            "max": ordered[-1] if ordered else math.nan,
        }


@dataclass
class Round:
    number: int
    gets: Latencies
    posts: Latencies
    submit_s: float = math.nan
    all_done_s: float = math.nan
    succeeded: int = 0
    total: int = 0
    failures: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process group from the first POST until all were terminal."""
    wall_s: float = math.nan

    @property
    def all_succeeded(self) -> bool:
        return self.total > 0 and self.succeeded == self.total and not self.failures


# --- the test bed ----------------------------------------------------------------------------


@dataclass
class Bed:
    engines: list[Engine] = field(default_factory=list)
    agents: list[AgentProcess] = field(default_factory=list)
    coordinator: CoordinatorProcess | None = None
    api_a: Any = None
    api_b: Any = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    def start(self) -> None:
        for name in ("a", "b"):
            engine = Engine(name)
            engine.stop()  # a leftover from an interrupted run
            shutil.rmtree(engine.base / "data", ignore_errors=True)
            self.engines.append(engine)
            engine.start()
        self.api_a = docker.APIClient(base_url=self.engines[0].url, version="auto")
        self.api_b = docker.APIClient(base_url=self.engines[1].url, version="auto")
        for name, engine in zip(("a", "b"), self.engines, strict=True):
            agent = AgentProcess(name=name, engine=engine, token=secrets.token_urlsafe(24))
            shutil.rmtree(agent.dir, ignore_errors=True)
            self.agents.append(agent)
            agent.start()
        config = "".join(
            f'[agents.host-{a.name}]\nurl = "{a.url}"\ntoken = "{a.token}"\n\n' for a in self.agents
        )
        self.coordinator = CoordinatorProcess(name="apibench", token=self.token, config=config)
        shutil.rmtree(self.coordinator.dir, ignore_errors=True)
        self.coordinator.start()

    def stop(self) -> None:
        """Coordinator, agents, engines: each stopped whatever happened to the others."""
        for api in (self.api_a, self.api_b):
            if api is not None:
                with contextlib.suppress(Exception):
                    api.close()
        procs: list[Any] = [self.coordinator, *self.agents, *self.engines]
        for proc in procs:
            if proc is None:
                continue
            try:
                proc.stop()
            except Exception as e:
                log(f"stopping {proc!r} failed: {e}")
        for engine in self.engines:
            shutil.rmtree(engine.base / "data", ignore_errors=True)


def small_tree(root: Path, seed: int) -> None:
    (root / "readme.txt").write_text(f"volume {seed}\n" * (1 + seed % 7))
    (root / "sub").mkdir()
    (root / "sub" / "data.bin").write_bytes(secrets.token_bytes(512 + 97 * seed))
    (root / "sub" / "empty").write_bytes(b"")


def read_tree(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


def mountpoint(api: Any, volume: str) -> Path:
    return Path(api.inspect_volume(volume)["Mountpoint"])


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds: user + system, threads included) of every process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return table


def cpu_snapshot(bed: Bed) -> dict[str, float]:
    """CPU seconds so far of the coordinator, each agent, the engines (dockerd and its
    descendants, containerd included) and this process."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)

    def tree(root: int | None) -> float:
        total, stack = 0.0, [root] if root is not None else []
        while stack:
            pid = stack.pop()
            total += table.get(pid, (0, 0.0))[1]
            stack.extend(children.get(pid, []))
        return total

    def pid_of(proc: Any) -> int | None:
        return None if proc is None or proc.proc is None else int(proc.proc.pid)

    snap = {"coordinator": tree(pid_of(bed.coordinator))}
    for agent in bed.agents:
        snap[f"agent {agent.name}"] = tree(pid_of(agent))
    snap["engines"] = sum(tree(pid_of(e)) for e in bed.engines)
    mine = os.times()
    snap["bench client"] = mine.user + mine.system
    # Everything else the machine did: on a shared box, other people's work.
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    busy = sum(ticks[0:3]) + ticks[5] + ticks[6]  # user nice system irq softirq
    snap["other processes"] = busy / CLK_TCK - sum(snap.values())
    return snap


# --- one round -------------------------------------------------------------------------------


def run_round(
    bed: Bed, client: Client, number: int, n: int, pollers: int, long_pollers: int
) -> Round:
    prefix = f"r{number}-{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}-{i:03d}" for i in range(n)]
    expected: dict[str, dict[str, bytes]] = {}
    rnd = Round(number, Latencies(), Latencies(), total=n)
    try:
        for i, name in enumerate(names):
            bed.api_a.create_volume(name)
            small_tree(mountpoint(bed.api_a, name), i)
            expected[name] = read_tree(mountpoint(bed.api_a, name))
        before, t0 = cpu_snapshot(bed), time.monotonic()
        ids = run_migrations(client, names, pollers, long_pollers, rnd)
        after, rnd.wall_s = cpu_snapshot(bed), time.monotonic() - t0
        rnd.cpu = {k: after[k] - before.get(k, 0.0) for k in after}
        check_results(bed, client, ids, expected, rnd)
    finally:
        for name in names:
            for api in (bed.api_a, bed.api_b):
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_volume(name, force=True)
    return rnd


def run_migrations(
    client: Client, names: list[str], pollers: int, long_pollers: int, rnd: Round
) -> list[str]:
    """Submit one migration per volume at once, poll until all are terminal; their ids."""
    n = len(names)
    barrier = threading.Barrier(n)
    lock = threading.Lock()

    def submit(volume: str) -> tuple[int, str]:
        body = {"source": {"agent": "host-a", "volume": volume}, "target": {"agent": "host-b"}}
        barrier.wait(timeout=60)
        t0 = time.perf_counter()
        r = client.request("POST", "/v1/migrations", json=body)
        ms = (time.perf_counter() - t0) * 1000
        with lock:
            rnd.posts.samples_ms.append(ms)
        return r.status_code, r.text if r.status_code != 202 else r.json()["id"]

    started = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(submit, names))
    rnd.submit_s = rnd.posts.seconds = time.monotonic() - started
    refused = {v: a for v, a in zip(names, answers, strict=True) if a[0] != 202}
    if refused:
        rnd.failures.update(
            {v: f"POST {code}: {text[:300]}" for v, (code, text) in refused.items()}
        )
        example = next(iter(refused.values()))
        log(f"round {rnd.number}: {len(refused)} POST(s) refused, e.g. {example}")
    pending = [a[1] for a in answers if a[0] == 202]
    unfinished = set(pending)
    stop = threading.Event()
    last_terminal = [started]

    def poll(offset: int) -> None:
        i = offset
        while not stop.is_set():
            with lock:
                if not unfinished:
                    return
                live = sorted(unfinished)
            migration_id = live[i % len(live)]
            i += 1
            t0 = time.perf_counter()
            try:
                r = client.request("GET", f"/v1/migrations/{migration_id}")
            except requests.RequestException as e:
                with lock:
                    key = type(e).__name__
                    rnd.gets.errors[key] = rnd.gets.errors.get(key, 0) + 1
                continue
            ms = (time.perf_counter() - t0) * 1000
            with lock:
                rnd.gets.samples_ms.append(ms)
                if r.status_code != 200:
                    key = f"HTTP {r.status_code}"
                    rnd.gets.errors[key] = rnd.gets.errors.get(key, 0) + 1
                elif r.json()["state"] in TERMINAL and migration_id in unfinished:
                    unfinished.discard(migration_id)
                    last_terminal[0] = time.monotonic()

    def long_poll(share: list[str]) -> None:
        """A `migrator migrate --wait` client: long polls its migrations one after another."""
        for migration_id in share:
            while not stop.is_set():
                try:
                    r = client.request("GET", f"/v1/migrations/{migration_id}?wait=60")
                except requests.RequestException:
                    continue
                if r.status_code != 200 or r.json()["state"] in TERMINAL:
                    break

    polling = time.monotonic()
    threads = [
        threading.Thread(target=poll, args=(k * max(1, n // pollers),), daemon=True)
        for k in range(pollers)
    ]
    threads += [
        threading.Thread(target=long_poll, args=(pending[k::long_pollers],), daemon=True)
        for k in range(long_pollers)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    rnd.gets.seconds = time.monotonic() - polling
    rnd.all_done_s = last_terminal[0] - started
    if unfinished:
        rnd.failures.update({m: f"not terminal after {ROUND_TIMEOUT_S:.0f}s" for m in unfinished})
    return pending


def check_results(
    bed: Bed, client: Client, ids: list[str], expected: dict[str, dict[str, bytes]], rnd: Round
) -> None:
    """Each migration succeeded, verified, and its target holds the source's files."""
    for migration_id in ids:
        doc = client.request("GET", f"/v1/migrations/{migration_id}").json()
        volume = doc["source"]["volume"]
        if doc["state"] != "succeeded" or not (doc["result"] or {}).get("verified"):
            rnd.failures[volume] = {
                "id": migration_id,
                "state": doc["state"],
                "error": doc["error"],
            }
            continue
        got = read_tree(mountpoint(bed.api_b, doc["target"]["volume"]))
        if got != expected[volume]:
            rnd.failures[volume] = {"id": migration_id, "error": "target content differs"}
            continue
        rnd.succeeded += 1


def measure_idle(client: Client, ids: list[str], pollers: int, seconds: float) -> Latencies:
    """GET latency of finished migrations with nothing running."""
    lat = Latencies()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def poll(offset: int) -> None:
        i = offset
        mine: list[float] = []
        while time.monotonic() < end:
            t0 = time.perf_counter()
            r = client.request("GET", f"/v1/migrations/{ids[i % len(ids)]}")
            mine.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            i += 1
        with lock:
            lat.samples_ms.extend(mine)

    started = time.monotonic()
    with ThreadPoolExecutor(pollers) as pool:
        list(pool.map(poll, range(pollers)))
    lat.seconds = time.monotonic() - started
    return lat


def store_counts(db: Path) -> dict[str, int]:
    """Events in the coordinator's database, by kind (read-only, after the run)."""
    counts: dict[str, int] = {}
    with contextlib.suppress(sqlite3.Error):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            for kind, n in conn.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind"):
                counts[str(kind)] = int(n)
            counts["migrations"] = int(
                conn.execute("SELECT COUNT(*) FROM migrations").fetchone()[0]
            )
        finally:
            conn.close()
    return counts


# --- the report ------------------------------------------------------------------------------


def render(
    args: argparse.Namespace,
    started: dt.datetime,
    rounds: list[Round],
    idle: Latencies | None,
    counts: dict[str, int],
) -> tuple[str, bool]:
    rev = subprocess.run(
        ["git", "-C", str(PROJECT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    n = args.migrations
    lines = [
        f"# API load benchmark, {started.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"* {n} migrations of small volumes (3 files, < 6 KiB each) host-a -> host-b, "
        f"submitted at once from {n} threads; {args.pollers} threads polling "
        "`GET /v1/migrations/{id}` (no `wait`, no pause) over the unfinished ones until all "
        f"are terminal; {args.rounds} round(s)"
        + (
            f"; also {args.long_pollers} threads long polling (`?wait=60`) them"
            if args.long_pollers
            else ""
        ),
        "* latency as the client sees it (requests, a keep-alive session per thread, on the "
        "same machine as the coordinator, both agents and both engines)",
        f"* host: {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}; revision {rev or '?'}; test bed {TESTBED_DIR}",
        f"* load average (1 min) at the start {args.load_before:.1f}, at the end "
        f"{os.getloadavg()[0]:.1f}: other work on the machine competes for the same cores "
        "(see the CPU table)",
        "",
        "| run | GETs | GET/s | p50 ms | p95 ms | p99 ms | max ms | POST p50 / max ms "
        "| all terminal after s | succeeded |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, g: dict[str, float], post: str, done: str, ok: str) -> str:
        return (
            f"| {label} | {g['count']:.0f} | {g['rate']:.0f} | {g['p50']:.1f} | {g['p95']:.1f} "
            f"| {g['p99']:.1f} | {g['max']:.1f} | {post} | {done} | {ok} |"
        )

    summaries = []
    for r in rounds:
        g = r.gets.summary()
        p = r.posts.summary()
        summaries.append((g, p, r.all_done_s))
        lines.append(
            row(
                f"round {r.number}",
                g,
                f"{p['p50']:.0f} / {p['max']:.0f}",
                f"{r.all_done_s:.1f}",
                f"{r.succeeded}/{r.total}",
            )
        )
    median_p99 = math.nan
    if summaries:
        med = {
            k: statistics.median(s[0][k] for s in summaries)
            for k in ("count", "rate", "p50", "p95", "p99", "max")
        }
        median_p99 = med["p99"]
        post_p50 = statistics.median(s[1]["p50"] for s in summaries)
        post_max = statistics.median(s[1]["max"] for s in summaries)
        done = statistics.median(s[2] for s in summaries)
        ok = sum(r.succeeded for r in rounds)
        total = sum(r.total for r in rounds)
        lines.append(
            row(
                "**median**",
                med,
                f"{post_p50:.0f} / {post_max:.0f}",
                f"{done:.1f}",
                f"{ok}/{total}",
            )
        )
    if idle is not None:
        lines.append(row(f"idle ({IDLE_S:.0f} s, nothing running)", idle.summary(), "", "", ""))
    all_ok = bool(rounds) and all(r.all_succeeded for r in rounds)
    met = all_ok and median_p99 < P99_TARGET_MS
    lines += [
        "",
        f"* target p99 < {P99_TARGET_MS:.0f} ms under load: "
        f"{'met' if median_p99 < P99_TARGET_MS else 'NOT met'} (median p99 {median_p99:.1f} ms)",
        f"* all migrations succeeded, verified, content equal: {'yes' if all_ok else 'NO'}",
    ]
    if rounds and all(r.cpu for r in rounds):
        cores = os.cpu_count() or 1
        wall = statistics.median(r.wall_s for r in rounds)
        lines += [
            "",
            f"CPU from the first POST until all were terminal (median of the rounds; wall "
            f"{wall:.1f} s, {cores} cores = {cores * wall:.1f} CPU-seconds available):",
            "",
            "| process | CPU s | % of the machine |",
            "|---|---:|---:|",
        ]
        for key in rounds[0].cpu:
            sec = statistics.median(r.cpu.get(key, 0.0) for r in rounds)
            share = statistics.median(r.cpu.get(key, 0.0) / (cores * r.wall_s) for r in rounds)
            lines.append(f"| {key} | {sec:.2f} | {100 * share:.0f} % |")
        lines.append("")
    errors: dict[str, int] = {}
    for r in rounds:
        for k, v in r.gets.errors.items():
            errors[k] = errors.get(k, 0) + v
    if errors:
        lines.append(f"* GET errors: {errors}")
    if counts:
        lines.append(
            "* coordinator database after the run: "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + " (events by kind)"
        )
    for r in rounds:
        for volume, why in list(r.failures.items())[:10]:
            lines.append(f"* round {r.number} failure: {volume}: {why}")
    return "\n".join(lines) + "\n", met


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--migrations", type=int, default=50, help="migrations per round (50)")
    p.add_argument("--pollers", type=int, default=8, help="polling threads (8)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the table adds their median (3)")
    p.add_argument(
        "--long-pollers",
        type=int,
        default=0,
        help="also this many threads long polling (`?wait=60`) the migrations, as "
        "`migrator migrate --wait` clients do (0)",
    )
    p.add_argument("--no-idle", action="store_true", help="skip the idle measurement")
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="record the coordinator with py-spy during the rounds into FILE "
        "(raw collapsed stacks; the latencies then include the sampling overhead)",
    )
    args = p.parse_args(argv)
    args.load_before = os.getloadavg()[0]
    if args.long_pollers < 0:
        p.error("--long-pollers must not be negative")
    if args.migrations < 1 or args.pollers < 1 or args.rounds < 1:
        p.error("--migrations, --pollers and --rounds must be at least 1")
    return args


@contextlib.contextmanager
def spying(coordinator: CoordinatorProcess, out: Path | None) -> Any:
    if out is None:
        yield
        return
    assert coordinator.proc is not None
    exe = Path(sys.executable).parent / "py-spy"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(exe), "record", "--pid", str(coordinator.proc.pid), "--rate", "200"]
    cmd += ["--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below
    started = dt.datetime.now()
    log(f"test bed {TESTBED_DIR}")
    bed = Bed()
    client: Client | None = None
    rounds: list[Round] = []
    idle: Latencies | None = None
    counts: dict[str, int] = {}
    try:
        bed.start()
        assert bed.coordinator is not None
        client = Client(bed.coordinator.url, bed.token)
        with spying(bed.coordinator, args.py_spy):
            for number in range(1, args.rounds + 1):
                rnd = run_round(
                    bed, client, number, args.migrations, args.pollers, args.long_pollers
                )
                g = rnd.gets.summary()
                log(
                    f"round {number}: {rnd.succeeded}/{rnd.total} succeeded, all terminal after "
                    f"{rnd.all_done_s:.1f}s; {g['count']:.0f} GETs, p50 {g['p50']:.1f} ms, "
                    f"p99 {g['p99']:.1f} ms, max {g['max']:.1f} ms"
                )
                rounds.append(rnd)
        if not args.no_idle:
            docs = client.request("GET", "/v1/migrations?limit=1000").json()["migrations"]
            ids = [d["id"] for d in docs]
            if ids:
                idle = measure_idle(client, ids, args.pollers, IDLE_S)
        counts = store_counts(bed.coordinator.dir / "migrator.db")
    except Exception:  # an interruption (SIGTERM, ^C) only cleans up
        if bed.coordinator is not None:
            log(f"coordinator log tail:\n{bed.coordinator.log_tail()}")
        for agent in bed.agents:
            log(f"agent {agent.name} log tail:\n{agent.log_tail()}")
        raise
    finally:
        if client is not None:
            client.close()
        bed.stop()
    text, met = render(args, started, rounds, idle, counts)
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"api-load-{started.strftime('%Y-%m-%d-%H%M%S')}.md"
    out.write_text(text)
    log(f"wrote {out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
