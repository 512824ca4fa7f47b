"""PostgreSQL 15 for database tests, without a registry: a Debian userland made by `debootstrap`
(with Debian's postgresql-15) and imported into a test engine with `docker import`, plus helpers
to run a database on a named volume, load and drive it with pgbench, fingerprint its tables and
check that it started cleanly and is intact.

The root filesystem is built once per machine (or CI run) and cached as a tarball in
`.testbed-cache/` at the project root (`MIGRATOR_TESTBED_CACHE` to move it), beside and not inside
the per-session test bed directories, which are wiped; a file lock keeps parallel sessions from
building it twice. Importing the tarball into an engine takes seconds.

Containers run with `network_mode="none"`: clients talk to the server over its unix socket in the
container's /tmp, through `docker exec` (docker-py's `exec_run`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.models.containers import Container

from tests.testbed import PROJECT, TestbedError

CACHE_DIR = Path(os.environ.get("MIGRATOR_TESTBED_CACHE", PROJECT / ".testbed-cache"))
SUITE = "bookworm"
PACKAGES = ("postgresql-15",)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PGDATA = "/var/lib/postgresql/data"
SOCKET_DIR = "/tmp"
IMAGE_CHANGES = (
    "ENV PATH=/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    f"ENV PGDATA={PGDATA}",
    f"ENV PGHOST={SOCKET_DIR}",
    "ENV PGUSER=postgres",
    "ENV LANG=C.UTF-8",
    "USER postgres",
    "WORKDIR /var/lib/postgresql",
)
# As the official postgres image's STOPSIGNAL: `docker stop` asks for a fast shutdown, which
# disconnects clients and writes the shutdown checkpoint. SIGTERM would be a *smart* shutdown
# that waits for every client (pgbench never leaves) until docker's SIGKILL. Set on each
# container: `docker import` of Docker 20.10 does not take a STOPSIGNAL change.
STOP_SIGNAL = "SIGINT"
# Bump "trim-N" when the root filesystem's recipe changes: a new cache entry is built.
ROOTFS_ID = hashlib.sha256(repr((SUITE, PACKAGES, "trim-1")).encode()).hexdigest()[:10]
TARBALL = CACHE_DIR / f"pg-rootfs-{ROOTFS_ID}.tar"
IMAGE_ID = hashlib.sha256(repr((ROOTFS_ID, IMAGE_CHANGES)).encode()).hexdigest()[:10]
IMAGE = f"test/postgres:15-{IMAGE_ID}"

# First start on an empty volume: initdb with page checksums, then the server as PID 1, so
# `docker stop`'s signal reaches the postmaster itself.
ENTRYPOINT = f"""\
set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  initdb --data-checksums --auth=trust --username=postgres --encoding=UTF8 --locale=C \\
         -D "$PGDATA" >/dev/null
fi
exec postgres -D "$PGDATA" -k {SOCKET_DIR} -c listen_addresses= -c log_line_prefix='%m [%p] '
"""

CLEAN_START = "database system was shut down at"
RECOVERY_SIGNS = (
    "database system was not properly shut down",
    "database system was interrupted",
    "automatic recovery in progress",
    "redo starts at",
)


# --- the image ----------------------------------------------------------------------------------


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror this machine's apt uses for `suite` (deb822 `.sources` files or
    one-line `sources.list` entries), so debootstrap fetches from the same place."""
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "deb":
                    rest = [w for w in words[1:] if not w.startswith("[")]
                    if len(rest) >= 2 and rest[1] == suite:
                        return rest[0].rstrip("/")
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if (
                    "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split()
                ):
                    return fields.get("uris", DEFAULT_MIRROR).split()[0].rstrip("/")
    return DEFAULT_MIRROR


def debootstrap_command(root: Path, mirror: str | None = None) -> list[str]:
    return [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(root),
        mirror or apt_mirror(),
    ]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _unmount_under(root: Path) -> None:
    """Unmount what a failed debootstrap left mounted in the chroot (/proc, /sys), deepest first,
    so removing the build directory never reaches into the machine's own /proc or /sys."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _remove_build(build: Path) -> None:
    if build.exists():
        _unmount_under(build)
        shutil.rmtree(build, ignore_errors=True)


def _postgres_ids(root: Path) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == "postgres":
            return int(parts[2]), int(parts[3])
    raise TestbedError(f"no postgres user in {root}/etc/passwd: did postgresql-15 install?")


def _trim(root: Path) -> None:
    """Make the root filesystem an image: drop caches and docs and the Debian package's own
    cluster, and give the data directory to postgres (a new named volume mounted there takes
    its ownership and mode from the image)."""
    for rel in ("usr/share/doc", "usr/share/man", "usr/share/info", "var/lib/apt/lists"):
        shutil.rmtree(root / rel, ignore_errors=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    shutil.rmtree(root / "var/lib/postgresql/15", ignore_errors=True)
    shutil.rmtree(root / "etc/postgresql/15", ignore_errors=True)
    uid, gid = _postgres_ids(root)
    data = root / PGDATA.lstrip("/")
    data.mkdir(parents=True, exist_ok=True)
    os.chown(data, uid, gid)
    data.chmod(0o700)
    os.chown(data.parent, uid, gid)


def build_rootfs(out: Path = TARBALL) -> Path:
    """The cached root filesystem tarball: built now if missing, by exactly one process."""
    if out.exists():
        return out
    with _locked(out.with_suffix(".lock")):
        if out.exists():  # another session built it while we waited
            return out
        if os.geteuid() != 0:
            raise TestbedError(
                "building the PostgreSQL test image needs root (debootstrap); as root run: "
                + " ".join(debootstrap_command(Path("ROOT")))
            )
        if shutil.which("debootstrap") is None:
            raise TestbedError(
                "debootstrap is missing (scripts/bootstrap installs it): "
                "apt-get install -y debootstrap"
            )
        build = out.parent / f"build-{ROOTFS_ID}"
        _remove_build(build)  # a leftover of an interrupted build
        root = build / "root"
        root.mkdir(parents=True)
        cmd = debootstrap_command(root)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                log = root / "debootstrap" / "debootstrap.log"
                detail = log.read_text(errors="replace") if log.exists() else done.stderr
                raise TestbedError(
                    f"debootstrap failed (exit {done.returncode}); the command was:\n"
                    f"  {' '.join(cmd)}\n{(done.stdout + detail)[-3000:]}"
                )
            _unmount_under(root)
            _trim(root)
            partial = out.with_name(out.name + ".partial")
            tar = subprocess.run(
                [
                    "tar",
                    "-C",
                    str(root),
                    "--numeric-owner",
                    "--xattrs",
                    "--exclude=./dev/*",
                    "--exclude=./proc/*",
                    "--exclude=./sys/*",
                    "-cf",
                    str(partial),
                    ".",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if tar.returncode != 0:
                raise TestbedError(f"packing {root} failed: {tar.stderr[-2000:]}")
            partial.rename(out)  # complete or absent: never a half-written cache
        finally:
            _remove_build(build)
    return out


def postgres_image(client: docker.DockerClient) -> str:
    """The PostgreSQL 15 image in this engine (imported from the cached root filesystem, which
    is built first if this machine has none)."""
    repo, tag = IMAGE.split(":")
    if client.api.images(name=IMAGE):
        return IMAGE
    tarball = build_rootfs()
    answer = client.api.import_image(
        src=str(tarball), repository=repo, tag=tag, changes=list(IMAGE_CHANGES)
    )
    if not client.api.images(name=IMAGE):
        raise TestbedError(f"docker import of {tarball} did not make {IMAGE}: {answer}")
    return IMAGE


# --- a database on a volume ---------------------------------------------------------------------


class PostgresError(AssertionError):
    """A command in the database container failed; the message has its output."""


def run_postgres(
    client: docker.DockerClient, volume: str, name: str, *, timeout: float = 120
) -> Container:
    """A running PostgreSQL container with its data directory in `volume` (initialised with
    page checksums on first start), ready for queries."""
    container = client.containers.run(
        postgres_image(client),
        command=["/bin/sh", "-c", ENTRYPOINT],
        name=name,
        volumes={volume: {"bind": PGDATA, "mode": "rw"}},
        network_mode="none",
        stop_signal=STOP_SIGNAL,
        shm_size=str(256 << 20),
        detach=True,
    )
    wait_ready(container, timeout=timeout)
    return container


def wait_ready(container: Container, *, timeout: float = 120) -> None:
    """Wait until the server accepts connections (and its startup, or recovery, is over)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        if container.status in ("exited", "dead"):
            raise PostgresError(
                f"{container.name} exited during startup:\n{logs(container)[-3000:]}"
            )
        if container.status == "running":
            code, _ = container.exec_run(["pg_isready", "-q", "-h", SOCKET_DIR])
            if code == 0:
                return
        time.sleep(0.2)
    raise PostgresError(f"{container.name} not ready after {timeout}s:\n{logs(container)[-3000:]}")


def exec_ok(container: Container, cmd: list[str]) -> str:
    """Run `cmd` in the container; its output, or PostgresError with it."""
    code, out = container.exec_run(cmd)
    text = out.decode(errors="replace") if out else ""
    if code != 0:
        raise PostgresError(f"{' '.join(cmd)} exited {code} in {container.name}:\n{text[-3000:]}")
    return text


def psql(container: Container, sql: str, database: str = "postgres") -> str:
    """Run SQL (stops at the first error); unaligned, tuples only: one row a line, `|` between
    columns."""
    return exec_ok(
        container,
        ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql],
    ).strip()


def pgbench_init(container: Container, scale: int) -> None:
    """pgbench's tables at `scale` (100,000 accounts per unit), vacuumed, with primary keys."""
    exec_ok(container, ["pgbench", "-i", "-q", "-s", str(scale), "postgres"])


@dataclass
class PgbenchLoad:
    """pgbench in the background (a thread doing exec_run): `clients` unthrottled clients for
    `seconds`, or until the server goes away (a stopped container kills it too)."""

    container: Container
    clients: int = 2
    seconds: int = 600
    exit_code: int | None = field(default=None, init=False)
    output: str = field(default="", init=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def start(self) -> PgbenchLoad:
        cmd = ["pgbench", "-n", "-c", str(self.clients), "-j", str(self.clients)]
        cmd += ["-T", str(self.seconds), "postgres"]

        def run() -> None:
            try:
                code, out = self.container.exec_run(cmd)
                self.exit_code = -1 if code is None else int(code)
                self.output = out.decode(errors="replace") if out else ""
            except Exception as e:  # the engine dropped the exec stream
                self.exit_code = -1
                self.output = f"exec_run failed: {e!r}"

        self._thread = threading.Thread(target=run, name="pgbench", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float = 60) -> int | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return None if self.running else self.exit_code

    def transactions(self) -> int | None:
        """Transactions pgbench reports it completed, when it got to print its summary."""
        found = re.search(r"number of transactions actually processed: (\d+)", self.output)
        return int(found.group(1)) if found else None


def tables(container: Container, database: str = "postgres") -> list[str]:
    rows = psql(
        container,
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
        database,
    )
    return rows.splitlines()


def table_digests(container: Container, database: str = "postgres") -> dict[str, tuple[int, str]]:
    """Every user table's row count and content digest: md5 over the sorted md5s of its rows,
    so equal multisets of rows (not physical order, not hidden columns) give equal digests."""
    digests: dict[str, tuple[int, str]] = {}
    for table in tables(container, database):
        row = psql(
            container,
            "SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') "
            f"FROM (SELECT md5(t::text) AS h FROM {table} AS t) AS s",
            database,
        )
        count, _, digest = row.partition("|")
        digests[table] = (int(count), digest)
    return digests


def count_rows(container: Container, table: str, database: str = "postgres") -> int:
    return int(psql(container, f"SELECT count(*) FROM {table}", database))


def amcheck(container: Container) -> str:
    """pg_amcheck of every database (heap and B-tree indexes, every index entry matched to its
    heap tuple), installing the amcheck extension where it is missing; raises on corruption."""
    return exec_ok(
        container,
        ["pg_amcheck", "--all", "--install-missing", "--heapallindexed"],
    )


def checksums_offline(
    client: docker.DockerClient, volume: str, *, timeout: float = 300
) -> tuple[int, str]:
    """`pg_checksums --check` of the data directory in `volume`, server not running: every
    page's checksum, and a refusal unless the cluster was shut down cleanly. (exit, output)"""
    container = client.containers.run(
        postgres_image(client),
        command=["pg_checksums", "--check", "-D", PGDATA],
        volumes={volume: {"bind": PGDATA, "mode": "rw"}},
        network_mode="none",
        detach=True,
    )
    try:
        code = int(container.wait(timeout=timeout)["StatusCode"])
        return code, logs(container)
    finally:
        container.remove(force=True)


def logs(container: Container) -> str:
    return str(container.logs(stdout=True, stderr=True).decode(errors="replace"))


def last_startup(container: Container) -> str:
    """The server log since its latest start (a container's log spans all its runs)."""
    text = logs(container)
    at = text.rfind("starting PostgreSQL")
    return text if at < 0 else text[at:]


def started_cleanly(container: Container) -> tuple[bool, str]:
    """Whether the latest start found a cleanly shut down cluster (no crash recovery), and the
    log lines of that start to show when not."""
    text = last_startup(container)
    head = "\n".join(text.splitlines()[:20])
    clean = CLEAN_START in text and not any(sign in text for sign in RECOVERY_SIGNS)
    return clean, head
