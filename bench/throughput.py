"""Data-path benchmark: a real target agent pulls real volumes from a real source agent, each on
its own private Docker engine, against baselines measured in the same invocation.

    .venv/bin/python bench/throughput.py [--quick] [--runs N] [--workloads large,small,empty]

Workloads (generated once on engine A, cached between invocations, see bench/README.md):

* large: 4 x 512 MiB of incompressible random data;
* small: 100,000 files of 4 KiB of random data in 400 directories;
* empty: 1,000,000 empty files in 1,000 directories (peak memory of a pull, compression none
  and auto; timed, no baseline).

Paths, each into a fresh target on engine B's disk, each charged with a final `sync -f` of that
file system (the product fsyncs and syncfs()es as it commits, so the baselines pay the same):

* `tar -C SRC -cf - . | tar -C DST -xf -` between the two volume mountpoints;
* the classic `docker run -v vol:/data busybox tar c` piped into `docker -H B run -i ... tar x`;
* `rsync -a SRC/ DST/` (small files only);
* the product: `POST /v1/pulls` on agent B, from the POST until the pull reads `succeeded`, with
  compression none, zstd and auto.

Each run measures every path once (the order rotates from run to run); the table reports medians
and ratios against the baselines of the same invocation, and the agents' peak RSS (VmHWM; both
agents are restarted before every pull, so a peak belongs to that pull's workload and mode).
The table goes to stdout and to bench/results/throughput-<date>.md (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
# The benchmark never shares the test suite's test bed: concurrent engines on one data root
# would stop each other. Set before tests.testbed reads it.
os.environ.setdefault("MIGRATOR_TESTBED_DIR", str(PROJECT / ".testbed-bench"))
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import docker  # noqa: E402

from tests.testbed import TESTBED_DIR, AgentProcess, Engine  # noqa: E402
from tests.transfers import TERMINAL, get_pull, start_pull  # noqa: E402

RESULTS_DIR = PROJECT / "bench" / "results"
CACHE_DIR = TESTBED_DIR / "bench-cache"
LAST_DELETE = TESTBED_DIR / "last-bulk-delete"
IMAGE = "bench-busybox:latest"
MIB = 1 << 20
PRODUCT_MODES = ("none", "zstd", "auto")
PULL_TIMEOUT_S = 3600.0
# On ext4 without a journal (as on this machine) the inode allocator skips every inode freed in
# the last 60 s, or 360 s while its inode-table block is dirty, looking each one up: creating
# files soon after deleting many costs ~0.3-0.7 ms per file instead of ~20 us (perf:
# find_inode_bit -> recently_deleted -> find_get_block_common). So targets holding many files
# are removed only at the end of the invocation, and an invocation first waits until the last
# one's bulk deletion is that old.
SETTLE_S = 365.0
DEFER_DELETE_FILES = 1000

# The issue's targets.
LARGE_VS_TAR = 0.7
LARGE_VS_DOCKER = 10.0
SMALL_VS_TAR = 0.5
RSS_LIMIT_MB = 250.0


# --- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    key: str
    files: int
    dirs: int
    file_size: int
    baselines: tuple[str, ...]
    modes: tuple[str, ...]
    runs: int

    @property
    def volume(self) -> str:
        return f"bench-{self.key}-{self.files}x{self.file_size}"

    @property
    def bytes(self) -> int:
        return self.files * self.file_size

    @property
    def title(self) -> str:
        if self.key == "large":
            return f"large: {self.files} x {self.file_size // MIB} MiB random"
        if self.key == "small":
            return f"small: {self.files:,} x {self.file_size // 1024} KiB in {self.dirs} dirs"
        return f"empty: {self.files:,} empty files in {self.dirs} dirs"


def workloads(quick: bool, runs: int) -> dict[str, Workload]:
    scale = 8 if quick else 1
    return {
        "large": Workload(
            "large",
            files=4,
            dirs=0,
            file_size=512 * MIB // scale,
            baselines=("tar pipe", "docker run"),
            modes=PRODUCT_MODES,
            runs=runs,
        ),
        "small": Workload(
            "small",
            files=100_000 // (10 if quick else 1),
            dirs=400 // (10 if quick else 1),
            file_size=4096,
            baselines=("tar pipe", "docker run", "rsync -a"),
            modes=PRODUCT_MODES,
            runs=runs,
        ),
        "empty": Workload(
            "empty",
            files=1_000_000 // (10 if quick else 1),
            dirs=1000 // (10 if quick else 1),
            file_size=0,
            baselines=(),
            # auto (the default) sends these headers compressed, none does not: the peak
            # memory of the target differs (see bench/README.md).
            modes=("none", "auto"),
            runs=1,
        ),
    }


def generate(wl: Workload, root: Path) -> None:
    """Fill an empty volume directory with the workload's files."""
    if wl.key == "large":
        block = 8 * MIB
        for i in range(wl.files):
            with open(root / f"big-{i}.bin", "wb") as f:
                left = wl.file_size
                while left:
                    n = min(block, left)
                    f.write(os.urandom(n))
                    left -= n
        return
    per_dir = -(-wl.files // wl.dirs)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    made = 0
    for d in range(wl.dirs):
        sub = root / f"d{d:04d}"
        sub.mkdir()
        dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(min(per_dir, wl.files - made)):
                fd = os.open(f"f{i:05d}", flags, 0o644, dir_fd=dfd)
                try:
                    if wl.file_size:
                        os.write(fd, os.urandom(wl.file_size))
                finally:
                    os.close(fd)
                made += 1
        finally:
            os.close(dfd)


def tree_stats(root: str | Path) -> tuple[int, int]:
    """(regular files, their total size) under root."""
    files = size = 0
    stack = [os.fspath(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    files += 1
                    size += e.stat(follow_symlinks=False).st_size
    return files, size


# --- the test bed ----------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync_fs(path: str | Path) -> None:
    """syncfs() of the file system holding path, as `sync -f` does."""
    subprocess.run(["sync", "-f", os.fspath(path)], check=True)


@dataclass
class Bed:
    engine_a: Engine
    engine_b: Engine
    api_a: Any
    api_b: Any
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    created_b: set[str] = field(default_factory=set)
    profile_dir: Path | None = None
    idle_rss_mb: float | None = None

    def mountpoint(self, api: Any, volume: str) -> str:
        return str(api.inspect_volume(volume)["Mountpoint"])

    def fresh_target(self, prefix: str) -> tuple[str, str]:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.api_b.create_volume(name)
        self.created_b.add(name)
        return name, self.mountpoint(self.api_b, name)

    def remove_target(self, name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.api_b.remove_volume(name, force=True)
        self.created_b.discard(name)

    def release_target(self, wl: Workload, name: str) -> None:
        """Remove a measured target now, or at the end when it holds many files (SETTLE_S)."""
        if wl.files <= DEFER_DELETE_FILES:
            self.remove_target(name)

    def restart_agents(self) -> tuple[AgentProcess, AgentProcess]:
        self.stop_agents()
        for name, engine in (("a", self.engine_a), ("b", self.engine_b)):
            agent = AgentProcess(name=name, engine=engine, token=secrets.token_urlsafe(24))
            shutil.rmtree(agent.dir, ignore_errors=True)
            self.agents[name] = agent.start()
        if self.idle_rss_mb is None:
            self.idle_rss_mb = max(vm_hwm_mb(a) for a in self.agents.values())
        return self.agents["a"], self.agents["b"]

    def stop_agents(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.agents.clear()


def cpu_seconds(agent: AgentProcess) -> float:
    """User + system CPU time of the agent process so far (all its threads)."""
    assert agent.proc is not None
    with open(f"/proc/{agent.proc.pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_mb(agent: AgentProcess) -> float:
    assert agent.proc is not None
    with open(f"/proc/{agent.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"no VmHWM for agent {agent.name}")


def start_engine(name: str, *, wipe: bool) -> Engine:
    engine = Engine(name)
    engine.stop()  # a leftover from an interrupted run
    if wipe:
        shutil.rmtree(engine.base / "data", ignore_errors=True)
    return engine.start()


def import_busybox(engine: Engine, api: Any) -> None:
    """A one-megabyte image: Debian's static busybox with sh and tar links (no registry)."""
    with contextlib.suppress(docker.errors.ImageNotFound):
        api.inspect_image(IMAGE)
        return
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise SystemExit(
            "busybox is missing: apt-get install -y busybox-static (scripts/bootstrap)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        (root / "bin").mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        for link in ("sh", "tar"):
            (root / "bin" / link).symlink_to("busybox")
        archive = Path(tmp) / "image.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        subprocess.run(
            ["docker", "-H", engine.url, "import", "-c", "ENV PATH=/bin", str(archive), IMAGE],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def note_bulk_delete() -> None:
    """Remember when many files were deleted (wall clock: the next invocation reads it)."""
    with contextlib.suppress(OSError):
        sync_fs(TESTBED_DIR.parent)
        LAST_DELETE.parent.mkdir(parents=True, exist_ok=True)
        LAST_DELETE.write_text(f"{time.time()}\n")


def settle() -> None:
    """Wait until the last bulk deletion can no longer slow file creation down (SETTLE_S)."""
    try:
        last = float(LAST_DELETE.read_text())
    except (OSError, ValueError):
        return
    sync_fs(TESTBED_DIR.parent)
    wait = last + SETTLE_S - time.time()
    if wait > 0:
        log(
            f"waiting {wait:.0f}s: files were deleted recently, and ext4 without a journal "
            "creates files slowly until freed inodes are old (--no-settle skips this)"
        )
        time.sleep(wait)


def source_volume(bed: Bed, wl: Workload) -> str:
    """The workload's volume on engine A, generated unless a complete one is cached."""
    marker = CACHE_DIR / f"{wl.volume}.json"
    with contextlib.suppress(docker.errors.NotFound, OSError, ValueError):
        info = bed.api_a.inspect_volume(wl.volume)
        if json.loads(marker.read_text()).get("created") == info["CreatedAt"]:
            log(f"{wl.key}: using the cached source volume {wl.volume}")
            return str(info["Mountpoint"])
    with contextlib.suppress(docker.errors.NotFound):
        bed.api_a.remove_volume(wl.volume, force=True)
        note_bulk_delete()
        settle()
    log(f"{wl.key}: generating {wl.title} in {wl.volume}")
    t0 = time.monotonic()
    info = bed.api_a.create_volume(wl.volume)
    mp = bed.mountpoint(bed.api_a, wl.volume)
    generate(wl, Path(mp))
    sync_fs(mp)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"created": bed.api_a.inspect_volume(wl.volume)["CreatedAt"]}))
    log(f"{wl.key}: generated in {time.monotonic() - t0:.1f}s")
    return mp


# --- measurements ----------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    rss_source_mb: float | None = None
    rss_target_mb: float | None = None
    cpu_s: float | None = None
    """CPU seconds (user + system) of the path's own processes: the tar/rsync processes, or
    both agents during the pull; None for docker run (the work happens inside dockerd)."""


@contextlib.contextmanager
def group(cmd: str) -> Iterator[subprocess.Popen[bytes]]:
    """A shell pipeline in its own process group, killed (by that group id) on any error."""
    proc = subprocess.Popen(
        ["bash", "-c", "set -euo pipefail; " + cmd],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def run_baseline(bed: Bed, wl: Workload, path: str, src: str) -> Sample:
    name, dst = bed.fresh_target("bench-t")
    try:
        a, b = bed.engine_a.url, bed.engine_b.url
        if path == "tar pipe":
            cmd = f"tar -C '{src}' -cf - . | tar -C '{dst}' -xf -"
        elif path == "docker run":
            cmd = (
                f"docker -H {a} run --rm --network none -v {wl.volume}:/data:ro {IMAGE} "
                f"tar c -C /data . | docker -H {b} run -i --rm --network none "
                f"-v {name}:/data {IMAGE} tar x -C /data"
            )
        elif path == "rsync -a":
            cmd = f"rsync -a '{src}/' '{dst}/'"
        else:
            raise ValueError(path)
        cmd += f"; sync -f '{dst}'"
        sync_fs(dst)  # nobody else's dirty pages are charged to this measurement
        t0 = time.monotonic()
        with group(cmd) as proc:
            assert proc.stderr is not None
            err = proc.stderr.read()
            _, status, usage = os.wait4(proc.pid, 0)  # rusage includes the waited-for children
            proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{path} failed ({proc.returncode}): {err.decode()[-2000:]}")
        check_copy(wl, dst, path)
        cpu = None if path == "docker run" else usage.ru_utime + usage.ru_stime
        return Sample(seconds, cpu_s=cpu)
    finally:
        bed.release_target(wl, name)


@contextlib.contextmanager
def profiled(bed: Bed, label: str, agents: dict[str, AgentProcess]) -> Iterator[None]:
    """With --py-spy DIR: sample each agent (all threads, idle ones too) while the body runs."""
    if bed.profile_dir is None:
        yield
        return
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        raise SystemExit(f"--py-spy needs {exe}: .venv/bin/pip install py-spy")
    bed.profile_dir.mkdir(parents=True, exist_ok=True)
    spies = []
    for role, agent in agents.items():
        assert agent.proc is not None
        out = bed.profile_dir / f"{label}-{role}.txt"
        cmd = [str(exe), "record", "--pid", str(agent.proc.pid), "--rate", "250"]
        cmd += ["--format", "raw", "--threads", "--idle", "--nonblocking", "--output", str(out)]
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.5)  # attached before the pull starts
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for spy in spies:
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()


def run_pull(bed: Bed, wl: Workload, mode: str) -> Sample:
    agent_a, agent_b = bed.restart_agents()
    name = f"bench-p-{uuid.uuid4().hex[:10]}"
    bed.created_b.add(name)  # the agent creates it; removed in any case
    label = f"{wl.key}-{mode}-{name}"
    try:
        sync_fs(agent_b.dir)
        with profiled(bed, label, {"source": agent_a, "target": agent_b}):
            cpu0 = cpu_seconds(agent_a) + cpu_seconds(agent_b)
            t0 = time.monotonic()
            pull_id = start_pull(agent_a, agent_b, wl.volume, target_volume=name, compression=mode)
            doc = wait_terminal(agent_b, pull_id)
            seconds = time.monotonic() - t0
            cpu = cpu_seconds(agent_a) + cpu_seconds(agent_b) - cpu0
        rss_a, rss_b = vm_hwm_mb(agent_a), vm_hwm_mb(agent_b)
        if doc["state"] != "succeeded":
            raise RuntimeError(f"pull {mode} {doc['state']}: {doc['error']}\n{agent_b.log_tail()}")
        check_copy(wl, bed.mountpoint(bed.api_b, name), f"pull {mode}")
        return Sample(seconds, rss_a, rss_b, cpu)
    finally:
        bed.stop_agents()
        bed.release_target(wl, name)


def wait_terminal(agent: AgentProcess, pull_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + PULL_TIMEOUT_S
    while time.monotonic() < deadline:
        doc = get_pull(agent, pull_id)
        if doc["state"] in TERMINAL:
            return doc
        time.sleep(0.05)
    raise RuntimeError(f"pull {pull_id} not done after {PULL_TIMEOUT_S}s\n{agent.log_tail()}")


def check_copy(wl: Workload, dst: str, what: str) -> None:
    got = tree_stats(dst)
    if got != (wl.files, wl.bytes):
        raise RuntimeError(
            f"{what}: target has {got} (files, bytes), expected {wl.files, wl.bytes}"
        )


# --- the report ------------------------------------------------------------------------------


@dataclass
class Row:
    workload: Workload
    path: str
    samples: list[Sample]

    @property
    def median(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def median_cpu(self) -> float | None:
        values = [s.cpu_s for s in self.samples if s.cpu_s is not None]
        return statistics.median(values) if values else None

    def peak(self, attr: str) -> float | None:
        values = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        return max(values) if values else None

    @property
    def product(self) -> bool:
        return self.path.startswith("pull")

    @property
    def rate(self) -> str:
        if self.workload.key == "large":
            return f"{self.workload.bytes / 1e6 / self.median:,.0f} MB/s"
        return f"{self.workload.files / self.median:,.0f} files/s"


def ratio(rows: list[Row], row: Row, baseline: str) -> float | None:
    """How many times faster than `baseline` (same workload, same invocation)."""
    for other in rows:
        if other.workload.key == row.workload.key and other.path == baseline:
            return other.median / row.median
    return None


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def render(rows: list[Row], header: list[str]) -> tuple[str, list[dict[str, Any]]]:
    out = [*header, ""]
    out += [
        "| workload | path | median s | throughput | x tar pipe | x docker run "
        "| CPU s | peak RSS src / tgt MB | runs (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        rss = (
            f"{fmt(row.peak('rss_source_mb'), '.0f')} / {fmt(row.peak('rss_target_mb'), '.0f')}"
            if row.product
            else "—"
        )
        out.append(
            f"| {row.workload.title} | {row.path} | {row.median:.2f} | {row.rate} "
            f"| {fmt(ratio(rows, row, 'tar pipe'), suffix='x')} "
            f"| {fmt(ratio(rows, row, 'docker run'), '.1f', 'x')} "
            f"| {fmt(row.median_cpu, '.1f')} | {rss} "
            f"| {' '.join(f'{s.seconds:.2f}' for s in row.samples)} |"
        )
    targets = evaluate(rows)
    out += ["", "Targets (from the issue):", "", "| target | measured | status |", "|---|---|---|"]
    for t in targets:
        out.append(f"| {t['target']} | {t['measured']} | {'met' if t['met'] else 'NOT MET'} |")
    return "\n".join(out) + "\n", targets


def evaluate(rows: list[Row]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def add(target: str, value: float | None, limit: float, better: str, spec: str) -> None:
        if value is None:
            return
        met = value >= limit if better == "higher" else value < limit
        targets.append({"target": target, "measured": f"{value:{spec}}", "met": met})

    for row in rows:
        if not row.product:
            continue
        key = row.workload.key
        if key == "large":
            add(
                f"large, {row.path}: ≥ {LARGE_VS_TAR}x tar pipe",
                ratio(rows, row, "tar pipe"),
                LARGE_VS_TAR,
                "higher",
                ".2f",
            )
            add(
                f"large, {row.path}: ≥ {LARGE_VS_DOCKER:.0f}x docker run",
                ratio(rows, row, "docker run"),
                LARGE_VS_DOCKER,
                "higher",
                ".1f",
            )
        elif key == "small":
            add(
                f"small, {row.path}: ≥ {SMALL_VS_TAR}x tar pipe files/s",
                ratio(rows, row, "tar pipe"),
                SMALL_VS_TAR,
                "higher",
                ".2f",
            )
        peak = max(row.peak("rss_source_mb") or 0.0, row.peak("rss_target_mb") or 0.0)
        add(
            f"{key}, {row.path}: agent peak RSS < {RSS_LIMIT_MB:.0f} MB",
            peak,
            RSS_LIMIT_MB,
            "lower",
            ".0f",
        )
    return targets


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def host_header(args: argparse.Namespace, bed: Bed | None) -> list[str]:
    rev = subprocess.run(
        ["git", "-C", str(PROJECT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dockerd = subprocess.run(
        ["dockerd", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    fs = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(TESTBED_DIR)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    mode = "quick (reduced sizes: a smoke test, not a measurement)" if args.quick else "full"
    lines = [
        f"# Data-path benchmark, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"* mode: {mode}; medians of {args.runs} run(s) per path (empty-files: 1 run)",
        f"* host: {os.cpu_count()} cores, Linux {platform.release()}, {fs or '?'}, {dockerd}",
        f"* revision: {rev or '?'}; test bed: {TESTBED_DIR}",
        "* every path writes a fresh target on engine B's disk and ends with `sync -f` "
        "(the product fsyncs/syncfs()es as it commits); the source is warm in the page cache "
        "for every path",
        "* throughput in MB/s is 10^6 bytes of file data per second; ratios are "
        "baseline median / path median (above 1: faster than the baseline)",
    ]
    start_load = getattr(args, "load_at_start", "?")
    lines.append(
        f"* machine load (1/5/15 min) at start: {start_load}; at the end: {load_average()} "
        "(other work on the machine adds noise: compare ratios, not seconds)"
    )
    if bed is not None and bed.idle_rss_mb is not None:
        lines.append(f"* idle agent RSS right after start: {bed.idle_rss_mb:.0f} MB")
    return lines


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes, 1 run: a smoke test")
    p.add_argument("--runs", type=int, default=None, help="runs per path (default 3, quick 1)")
    p.add_argument(
        "--workloads",
        default="large,small,empty",
        help="comma-separated subset of large,small,empty",
    )
    p.add_argument(
        "--modes", default=",".join(PRODUCT_MODES), help="product compression modes to measure"
    )
    p.add_argument(
        "--no-baselines", action="store_true", help="measure only the product (for profiling)"
    )
    p.add_argument(
        "--baselines",
        default=None,
        help="comma-separated subset of the baselines to measure (default: all of a workload's)",
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record py-spy samples of both agents during every pull into DIR "
        "(raw collapsed stacks; timings then include the sampling overhead)",
    )
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="do not wait for inodes freed by a previous run to age (see SETTLE_S)",
    )
    p.add_argument(
        "--clean",
        action="store_true",
        help="at the end also remove the cached source volumes and the engines' data",
    )
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    return args


def measure(
    bed: Bed,
    wl: Workload,
    src: str,
    modes: tuple[str, ...],
    baselines: tuple[str, ...],
    rows: list[Row],
) -> None:
    paths: list[tuple[str, Callable[[], Sample]]] = [
        (b, lambda b=b: run_baseline(bed, wl, b, src)) for b in baselines
    ]
    paths += [(f"pull {m}", lambda m=m: run_pull(bed, wl, m)) for m in wl.modes if m in modes]
    by_path = {name: Row(wl, name, []) for name, _ in paths}
    for run in range(wl.runs):
        shift = run % len(paths)
        for name, fn in paths[shift:] + paths[:shift]:
            sample = fn()
            by_path[name].samples.append(sample)
            rss = (
                f", peak RSS {sample.rss_source_mb:.0f}/{sample.rss_target_mb:.0f} MB"
                if sample.rss_source_mb is not None
                else ""
            )
            log(f"{wl.key} run {run + 1}/{wl.runs}: {name}: {sample.seconds:.2f}s{rss}")
    rows.extend(by_path[name] for name, _ in paths)


def disk_needed(chosen: list[Workload], modes: tuple[str, ...]) -> int:
    """Bytes a run may hold at once: sources, and every target kept until the end."""
    need = 1 << 30
    for wl in chosen:
        paths = len(wl.baselines) + len([m for m in wl.modes if m in modes])
        per_copy = wl.files * (4096 + -(-wl.file_size // 4096) * 4096)  # inode-ish + blocks
        need += per_copy  # the source (cached or generated)
        need += per_copy * (paths * wl.runs if wl.files > DEFER_DELETE_FILES else 1)
    return need


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    table = workloads(args.quick, args.runs)
    unknown = set(chosen) - set(table)
    if unknown:
        raise SystemExit(f"unknown workloads: {', '.join(sorted(unknown))}")
    modes = tuple(m.strip() for m in args.modes.split(","))
    need = disk_needed([table[k] for k in chosen], modes)
    free = shutil.disk_usage(PROJECT).free
    if free < need:
        raise SystemExit(f"need ~{need / 1e9:.0f} GB free for this run, have {free / 1e9:.0f} GB")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below
    started = dt.datetime.now()
    log(f"test bed {TESTBED_DIR}; disk: {shutil.disk_usage(PROJECT).free / 1e9:.0f} GB free")
    engine_a = engine_b = None
    bed: Bed | None = None
    rows: list[Row] = []
    try:
        if (Engine("b").base / "data").exists():  # an interrupted run's targets
            shutil.rmtree(Engine("b").base / "data", ignore_errors=True)
            note_bulk_delete()
        if not args.no_settle:
            settle()
        args.load_at_start = load_average()
        engine_a = start_engine("a", wipe=False)  # keeps the cached source volumes
        engine_b = start_engine("b", wipe=True)
        bed = Bed(
            engine_a,
            engine_b,
            docker.APIClient(base_url=engine_a.url, version="auto"),
            docker.APIClient(base_url=engine_b.url, version="auto"),
            profile_dir=args.py_spy,
        )
        for engine, api in ((engine_a, bed.api_a), (engine_b, bed.api_b)):
            import_busybox(engine, api)
        for key in chosen:
            wl = table[key]
            src = source_volume(bed, wl)
            baselines = () if args.no_baselines else wl.baselines
            if args.baselines is not None:
                keep = {b.strip() for b in args.baselines.split(",")}
                baselines = tuple(b for b in baselines if b in keep)
            measure(bed, wl, src, modes, baselines, rows)
    finally:
        cleanup(bed, engine_a, engine_b, args, [table[k] for k in chosen])
    text, targets = render(rows, host_header(args, bed))
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"throughput-{started.strftime('%Y-%m-%d-%H%M%S')}{'-quick' if args.quick else ''}"
    (RESULTS_DIR / f"{stem}.md").write_text(text)
    raw = [
        {
            "workload": r.workload.key,
            "path": r.path,
            "files": r.workload.files,
            "bytes": r.workload.bytes,
            "seconds": [s.seconds for s in r.samples],
            "rss_source_mb": [s.rss_source_mb for s in r.samples],
            "rss_target_mb": [s.rss_target_mb for s in r.samples],
            "cpu_s": [s.cpu_s for s in r.samples],
        }
        for r in rows
    ]
    (RESULTS_DIR / f"{stem}.json").write_text(
        json.dumps({"quick": args.quick, "rows": raw, "targets": targets}, indent=1)
    )
    log(f"wrote {RESULTS_DIR / stem}.md")
    return 0 if all(t["met"] for t in targets) else 1


def cleanup(
    bed: Bed | None,
    engine_a: Engine | None,
    engine_b: Engine | None,
    args: argparse.Namespace,
    chosen: list[Workload],
) -> None:
    """Agents and engines stop in every case; targets go; cached sources stay unless --clean."""
    if bed is not None:
        bed.stop_agents()
        if bed.created_b:
            log(f"removing {len(bed.created_b)} target volume(s)")
            for name in list(bed.created_b):
                with contextlib.suppress(Exception):
                    bed.remove_target(name)
            note_bulk_delete()
        if args.clean:
            for wl in chosen:
                with contextlib.suppress(Exception):
                    bed.api_a.remove_volume(wl.volume, force=True)
    for engine in (engine_a, engine_b):
        if engine is not None:
            engine.stop()
    # Engine B holds only targets: nothing there is worth keeping.
    if engine_b is not None:
        shutil.rmtree(engine_b.base / "data", ignore_errors=True)
    if args.clean:
        shutil.rmtree(TESTBED_DIR, ignore_errors=True)
        note_bulk_delete()


if __name__ == "__main__":
    sys.exit(main())
