"""The test bed: private Docker engines and real agent processes on one machine.

Each `Engine` is a separate `dockerd` with its own data-root (on disk, under `.testbed/`), its
own exec-root and socket (under /run: unix socket paths must stay short), started with
`--bridge=none --iptables=false` so it never touches the machine's network set-up, and stopped
by the pid in its pidfile. Nothing here ever talks to the machine's default engine.

Used by the test fixtures (tests/conftest.py), by `bench/` and by the demo script, so it depends
on the standard library only (plus the project's own packages when starting agents).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
TESTBED_DIR = Path(os.environ.get("MIGRATOR_TESTBED_DIR", PROJECT / ".testbed"))
INSTALL_HINT = "apt-get update && apt-get install -y docker.io"


class TestbedError(RuntimeError):
    """The test bed could not be set up; the message says what to do."""

    __test__ = False


def ensure_dockerd() -> str:
    """Path of `dockerd`, installing Debian's docker.io first when it is missing and we are root."""
    found = shutil.which("dockerd")
    if found:
        return found
    if os.geteuid() != 0:
        raise TestbedError(f"dockerd is not installed; run as root: {INSTALL_HINT}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "docker.io"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise TestbedError(
                f"installing docker.io failed ({' '.join(cmd)}): {done.stderr.strip()[-500:]}\n"
                f"run: {INSTALL_HINT}"
            )
    found = shutil.which("dockerd")
    if not found:
        raise TestbedError(f"dockerd still missing after installing docker.io; run: {INSTALL_HINT}")
    return found


def _run_dir(data_dir: Path) -> Path:
    # Sockets live under /run with a short name derived from the data directory, so two
    # checkouts (or CI beside a developer) never share one, and paths stay under ~100 chars.
    tag = hashlib.sha256(str(data_dir).encode()).hexdigest()[:10]
    return Path("/run/vm-testbed") / tag


@dataclass
class Engine:
    """One private Docker engine: a simulated host."""

    name: str
    base: Path = field(init=False)
    run: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base = TESTBED_DIR / f"engine-{self.name}"
        self.run = _run_dir(self.base)

    @property
    def socket(self) -> Path:
        return self.run / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.run / "docker.pid"

    @property
    def volumes_dir(self) -> Path:
        return self.base / "data" / "volumes"

    def start(self, timeout: float = 60.0) -> Engine:
        dockerd = ensure_dockerd()
        self.stop()
        (self.base / "data").mkdir(parents=True, exist_ok=True)
        self.run.mkdir(parents=True, exist_ok=True)
        log = open(self.base / "dockerd.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                dockerd,
                "--data-root",
                str(self.base / "data"),
                "--exec-root",
                str(self.run / "exec"),
                "-H",
                self.url,
                "--pidfile",
                str(self.pidfile),
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                "--ip6tables=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.base / "dockerd.log").read_text(errors="replace")[-2000:]
                raise TestbedError(f"dockerd for engine {self.name} exited:\n{tail}")
            if self.ping():
                return self
            time.sleep(0.1)
        self.stop()
        raise TestbedError(f"dockerd for engine {self.name} did not answer within {timeout}s")

    def ping(self) -> bool:
        """True when the engine answers `GET /_ping` on its socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.socket))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.0 200") or False
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the engine by its pidfile (never by name) and wait for it to go."""
        pid = None
        if self.proc is not None and self.proc.poll() is None:
            pid = self.proc.pid
        elif self.pidfile.exists():
            with contextlib.suppress(ValueError, OSError):
                pid = int(self.pidfile.read_text().strip())
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                if self.proc is not None and self.proc.pid == pid:
                    self.proc.poll()
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as gone.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        if f.read().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """A project service run as a real subprocess, answering `GET /v1/health` when up.
    Subclasses give `name`, `port`, `dir` and `command()`."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None
    kind = "service"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dir(self) -> Path:
        return TESTBED_DIR / f"{self.kind}-{self.name}"

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.kind}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def launch(self, timeout: float) -> None:
        """Start `command()`, appending its output to the log, and wait until it is healthy."""
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TestbedError(f"{self.kind} {self.name} exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise TestbedError(f"{self.kind} {self.name} did not answer within {timeout}s")

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def kill(self) -> None:
        """SIGKILL: a crash, as a test wants it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def _script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@dataclass
class AgentProcess(ServiceProcess):
    """A real `migrator-agent serve` process pointed at one engine."""

    name: str
    engine: Engine
    token: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    extra_args: list[str] = field(default_factory=list)
    kind = "agent"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def command(self) -> list[str]:
        token_file = self.dir / "token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        return [
            _script("migrator-agent"),
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--token-file",
            str(token_file),
            "--docker-host",
            self.engine.url,
            "--state-dir",
            str(self.state_dir),
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> AgentProcess:
        self.launch(timeout)
        return self


@dataclass
class CoordinatorProcess(ServiceProcess):
    """A real `migrator serve` process with its own SQLite database."""

    name: str
    token: str | None
    config: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    extra_args: list[str] = field(default_factory=list)
    kind = "coordinator"

    def command(self) -> list[str]:
        args = [
            _script("migrator"),
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--db",
            str(self.dir / "migrator.db"),
        ]
        if self.token is not None:
            token_file = self.dir / "tokens"
            token_file.write_text(self.token + "\n")
            args += ["--token-file", str(token_file)]
        if self.config is not None:
            config_file = self.dir / "config.toml"
            config_file.write_text(self.config)
            args += ["--config", str(config_file)]
        return [*args, *self.extra_args]

    def start(self, timeout: float = 30.0) -> CoordinatorProcess:
        self.launch(timeout)
        return self
