"""`migrator`: the command line. `serve` runs the coordinator; every other command is a client of
the public API (DESIGN section 4) through `migrator.client`, which owns all HTTP.

Owns: argument parsing, the request body built from flags, following a migration to its end
(events stream, reconnects, long-poll fallback), the progress display and the exit codes. Must
not import aiohttp or the coordinator's server modules at start-up: `serve` imports
`migrator.app` only when it runs, so client commands start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from migrator.client import Coordinator, CoordinatorUnreachable, RequestRefused
from migrator.model import ENUMS, TERMINAL, State

DEFAULT_URL = "http://127.0.0.1:8420"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_DETACHED = 130  # the shell's code for "ended by SIGINT"

# A redraw costs a write to the terminal; 10 per second looks live and costs nothing.
TTY_REDRAW_S = 0.1
# Plain progress lines (CI logs): one every 5 s keeps a 1-hour migration at ~720 lines.
PLAIN_EVERY_S = 5.0
# Long-poll window when the events stream is unavailable: also the progress refresh period.
POLL_WAIT_S = 5
# A coordinator restart takes seconds; after this long without an answer we give up (exit 4).
RECONNECT_GIVE_UP_S = 60.0

EPILOG = """\
environment:
  MIGRATOR_URL    coordinator URL (default http://127.0.0.1:8420); --url overrides it
  MIGRATOR_TOKEN  API bearer token; --token overrides it

exit codes:
  0  succeeded (or accepted, without --wait)   3  cancelled
  1  migration failed                          4  coordinator unreachable (or a 5xx)
  2  usage error                               5  request refused by the API (4xx)
  130  Ctrl-C while waiting: detaches, the migration continues on the coordinator
"""

MAX_RATE_HELP = (
    "bandwidth limit in bytes/s: a plain number, or with a suffix k, M, G, T -- binary like "
    "curl and rsync (50M = 50 MiB/s); KiB/MiB/GiB are binary too, kB/MB/GB decimal "
    "(50MB = 50,000,000); an optional '/s' is allowed"
)


class UsageError(Exception):
    """A command line the API would refuse anyway, or that cannot be sent (exit 2)."""


# -- parsing ---------------------------------------------------------------------------------

_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(iB|i|B)?(?:/s)?")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_rate(text: str) -> int:
    """`--max-rate` in bytes per second (see MAX_RATE_HELP for the units)."""
    match = _RATE_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: try 1048576, 512k, 50M or 1G")
    number, prefix, unit = match.groups()
    power = _POWERS[prefix.lower()]
    base = 1000 if unit == "B" and prefix else 1024
    if unit == "i" and not prefix:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: 'i' needs a prefix (Mi)")
    rate = round(float(number) * int(base**power))
    if rate < 1:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: must be at least 1 byte/s")
    return rate


def parse_endpoint(text: str, *, volume_required: bool) -> dict[str, str]:
    agent, sep, volume = text.partition(":")
    if not agent or (sep and not volume) or (volume_required and not volume):
        form = "AGENT:VOLUME" if volume_required else "AGENT[:VOLUME]"
        raise UsageError(f"{text!r} is not {form}")
    return {"agent": agent, "volume": volume} if volume else {"agent": agent}


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The `POST /v1/migrations` body: only the options the user gave, so server defaults apply."""
    if args.delete_source and not args.no_restart:
        raise UsageError(
            "--delete-source needs --no-restart: the API will not delete the source of "
            "containers it restarts"
        )
    target: dict[str, Any] = dict(parse_endpoint(args.target, volume_required=False))
    if args.target_driver is not None:
        target["driver"] = args.target_driver
    body: dict[str, Any] = {
        "source": parse_endpoint(args.source, volume_required=True),
        "target": target,
    }
    if args.target_driver_opt:
        pairs = [opt.partition("=") for opt in args.target_driver_opt]
        if any(not key or not sep for key, sep, _ in pairs):
            raise UsageError("--target-driver-opt takes KEY=VALUE")
        target["driver_opts"] = {key: value for key, _, value in pairs}
    options: dict[str, Any] = {}
    for name in ("quiesce", "compression", "verify", "if_target_exists"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    for flag, name, value in (
        ("precopy", "precopy", True),
        ("allow_in_use", "allow_in_use", True),
        ("delete_source", "delete_source", True),
        ("no_restart", "restart_source_containers", False),
    ):
        if getattr(args, flag):
            options[name] = value
    if args.stop_timeout is not None:
        options["stop_timeout_s"] = args.stop_timeout
    if args.max_rate is not None:
        options["max_rate_bytes_per_s"] = args.max_rate
    if options:
        body["options"] = options
    return body


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before or after the command name, neither overwrites the other.
    common.add_argument("--url", default=argparse.SUPPRESS, help="coordinator URL")
    common.add_argument("--token", default=argparse.SUPPRESS, help="API bearer token")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", help="print the API's JSON answer, nothing else on stdout"
    )
    waits = argparse.ArgumentParser(add_help=False)
    waits.add_argument(
        "--wait",
        action="store_true",
        help="follow the migration to its end with a progress display; Ctrl-C detaches "
        "(exit 130) and the migration continues",
    )
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="migrator",
        description="Move Docker named volumes between Docker hosts.",
        epilog=EPILOG,
        formatter_class=raw,
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the coordinator")
    serve.add_argument("--listen", default="127.0.0.1:8420", help="HOST:PORT (default %(default)s)")
    serve.add_argument("--db", required=True, help="SQLite database file")
    serve.add_argument("--token-file", help="API tokens, one per line (no auth without it)")
    serve.add_argument("--config", help="TOML file with [agents.NAME] url, token, data_url")
    serve.add_argument(
        "--retention-days",
        type=_non_negative,
        default=30,
        help="keep finished migrations this long (default %(default)s)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    clients = [common, as_json]
    mig = sub.add_parser(
        "migrate",
        help="start a migration",
        parents=[*clients, waits],
        epilog=EPILOG,
        formatter_class=raw,
    )
    mig.add_argument("source", metavar="SRC_AGENT:VOLUME")
    mig.add_argument("target", metavar="DST_AGENT[:VOLUME]", help="volume defaults to the source's")
    mig.add_argument("--quiesce", choices=ENUMS["quiesce"], help="stop the source's containers")
    mig.add_argument("--precopy", action="store_true", help="copy once before quiescing")
    mig.add_argument("--compression", choices=ENUMS["compression"])
    mig.add_argument("--verify", choices=ENUMS["verify"])
    mig.add_argument("--if-target-exists", choices=ENUMS["if_target_exists"])
    mig.add_argument("--allow-in-use", action="store_true", help="copy a volume in use (risky)")
    mig.add_argument("--delete-source", action="store_true", help="needs --no-restart")
    mig.add_argument("--no-restart", action="store_true", help="leave stopped containers stopped")
    mig.add_argument("--stop-timeout", type=_non_negative, metavar="S", help="docker stop -t")
    mig.add_argument("--max-rate", type=parse_rate, metavar="RATE", help=MAX_RATE_HELP)
    mig.add_argument("--target-driver", metavar="NAME", help="create the target with this driver")
    mig.add_argument("--target-driver-opt", action="append", metavar="KEY=VALUE", help="repeatable")
    mig.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    mig.add_argument("--idempotency-key", metavar="KEY", help="retrying with it never duplicates")

    status = sub.add_parser(
        "status",
        help="show a migration",
        parents=[*clients, waits],
        epilog=EPILOG,
        formatter_class=raw,
    )
    status.add_argument("id")
    lst = sub.add_parser("list", help="list migrations, newest first", parents=clients)
    lst.add_argument("--state", choices=[s.value for s in State])
    lst.add_argument("--limit", type=_non_negative)
    for verb, text in (
        ("cancel", "cancel a migration (stopped containers are restarted)"),
        ("retry", "resume a failed or cancelled migration"),
        ("discard", "remove the partial target of a failed or cancelled migration"),
    ):
        sub.add_parser(verb, help=text, parents=clients).add_argument("id")
    sub.add_parser("agents", help="list agents", parents=clients)
    sub.add_parser("volumes", help="list an agent's volumes", parents=clients).add_argument("agent")
    return parser


# -- human output ----------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """Binary units, like `docker system df` and `du -h`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = max(0, math.ceil(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def format_progress(label: str, progress: dict[str, Any], *, bar_width: int = 0) -> str:
    """One line: phase, [bar,] done / total, percent, rate, ETA."""
    done = progress.get("bytes_done") or 0
    total = progress.get("bytes_total") or 0
    rate = progress.get("rate_bytes_per_s") or 0
    eta = progress.get("eta_s")
    if eta is None and rate > 0 and total > done:
        eta = (total - done) / rate
    parts = [f"{label:<12}"]
    if total > 0:
        fraction = min(1.0, done / total)
        if bar_width:
            filled = int(fraction * bar_width)
            parts.append("[" + "#" * filled + "." * (bar_width - filled) + "]")
        parts.append(f"{human_bytes(done)} / {human_bytes(total)} {fraction * 100:3.0f}%")
    elif done:
        parts.append(human_bytes(done))
    if rate > 0:
        parts.append(f"{human_bytes(rate)}/s")
    if eta is not None and done < total:
        parts.append(f"ETA {human_duration(eta)}")
    return "  ".join(parts)


def _label(migration: dict[str, Any]) -> str:
    return str(migration.get("phase") or migration.get("state") or "?")


class ProgressView:
    """The progress of one migration: one line redrawn with \\r on a terminal, plain lines at
    most every PLAIN_EVERY_S otherwise. Log events become lines either way."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream, self.tty, self.enabled, self.clock = stream, tty, enabled, clock
        self._label = ""
        self._seen: tuple[Any, Any] | None = None
        self._progress: dict[str, Any] = {}
        self._last = -math.inf
        self._width = 0  # characters of the bar now on screen

    def state(self, migration: dict[str, Any]) -> None:
        seen = (migration.get("state"), migration.get("phase"))
        if seen == self._seen:
            return
        self._seen, self._label = seen, _label(migration)
        if migration.get("state") in TERMINAL:
            return
        if self.tty:
            self.progress(migration.get("progress") or self._progress, force=True)
        else:
            state, phase = seen
            self._write(f"{state}: {phase}\n" if phase else f"{state}\n")

    def progress(self, progress: dict[str, Any], *, force: bool = False) -> None:
        self._progress = progress
        now = self.clock()
        if not force and now - self._last < (TTY_REDRAW_S if self.tty else PLAIN_EVERY_S):
            return
        self._last = now
        if self.tty:
            self._draw()
        elif progress.get("bytes_total") or progress.get("bytes_done"):
            self._write(format_progress(self._label, progress) + "\n")

    def log(self, entry: dict[str, Any]) -> None:
        when = str(entry.get("time") or "")
        when = when.partition("T")[2][:8] or when
        line = f"{when} {entry.get('level', 'info'):<7} {entry.get('message', '')}\n"
        if self.tty and self._width:
            self._write("\r" + " " * self._width + "\r" + line)
            self._width = 0
            self._draw()
        else:
            self._write(line)

    def close(self) -> None:
        """End the bar's line, so what follows starts on its own line."""
        if self._width:
            self._write("\n")
            self._width = 0

    def _draw(self) -> None:
        columns = shutil.get_terminal_size().columns
        text = format_progress(self._label, self._progress)
        # The bar takes what the numbers leave of the line, up to 30 cells; under 10, none.
        bar = min(30, columns - 1 - len(text) - 4)
        if bar >= 10 and self._progress.get("bytes_total"):
            text = format_progress(self._label, self._progress, bar_width=bar)
        text = text[: columns - 1]
        self._write("\r" + text + " " * max(0, self._width - len(text)))
        self._width = len(text)

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()


def verdict(migration: dict[str, Any]) -> list[str]:
    state, mid = migration.get("state"), migration.get("id")
    result = migration.get("result") or {}
    error = migration.get("error") or {}
    if state == State.SUCCEEDED:
        lines = [f"warning: {w}" for w in result.get("warnings") or []]
        # Downtime is what the operator budgets: tenths of a second matter below a minute.
        downtime = result.get("downtime_s") or 0
        shown = f"{downtime:.1f}s" if downtime < 60 else human_duration(downtime)
        lines.append(
            f"succeeded: {human_bytes(result.get('bytes') or 0)}, "
            f"{result.get('files') or 0:,} files in "
            f"{human_duration(result.get('duration_s') or 0)}, "
            f"verified: {'yes' if result.get('verified') else 'no'}, downtime: "
            + ("none" if not downtime else shown)
        )
        return lines
    if state == State.FAILED:
        return [
            f"failed: {error.get('code', '?')}: {error.get('message', '')}",
            f"resume it: migrator retry {mid}",
        ]
    if state == State.CANCELLED:
        return [
            f"cancelled; resume it: migrator retry {mid}, "
            f"or remove the partial target: migrator discard {mid}"
        ]
    return []


def _endpoint(doc: dict[str, Any] | None) -> str:
    doc = doc or {}
    return f"{doc.get('agent', '?')}:{doc.get('volume', '?')}"


def summary(migration: dict[str, Any]) -> list[str]:
    phase = migration.get("phase")
    progress = migration.get("progress") or {}
    rows = [
        ("id", migration.get("id")),
        ("state", f"{migration.get('state')} ({phase})" if phase else migration.get("state")),
        ("source", _endpoint(migration.get("source"))),
        ("target", _endpoint(migration.get("target"))),
        ("progress", format_progress("", progress).strip() or "-"),
        ("files", f"{progress.get('files_done', 0):,} / {progress.get('files_total', 0):,}"),
        ("attempts", migration.get("attempts")),
        ("created", migration.get("created_at")),
        ("started", migration.get("started_at") or "-"),
        ("finished", migration.get("finished_at") or "-"),
    ]
    return [f"{key + ':':<10} {value}" for key, value in rows] + verdict(migration)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [list(headers)] + [["-" if v in (None, "") else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def render_plan(value: Any, indent: str = "") -> list[str]:
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines += [f"{indent}{key}:", *render_plan(item, indent + "  ")]
            else:
                lines.append(f"{indent}{key}: {json.dumps(item)}")
        return lines
    if isinstance(value, list):
        return [f"{indent}- {json.dumps(item)}" for item in value]
    return [f"{indent}{json.dumps(value)}"]


def _print(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def exit_code(migration: dict[str, Any]) -> int:
    state = migration.get("state")
    if state == State.FAILED:
        return EXIT_FAILED
    if state == State.CANCELLED:
        return EXIT_CANCELLED
    return EXIT_OK


# -- following a migration -------------------------------------------------------------------


class Reconnects:
    """Backoff between attempts (0.5, 1, 2, 4, 5, 5 … s); gives up RECONNECT_GIVE_UP_S after
    the last answer."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._delay = 0.5

    def ok(self) -> None:
        self._since, self._delay = None, 0.5

    def failed(self, error: CoordinatorUnreachable) -> None:
        now = time.monotonic()
        self._since = self._since or now
        if now - self._since > RECONNECT_GIVE_UP_S:
            raise error
        time.sleep(self._delay)
        self._delay = min(self._delay * 2, 5.0)


def follow(client: Coordinator, migration: dict[str, Any], view: ProgressView) -> dict[str, Any]:
    """Follow the events stream until a terminal state, resuming a dropped stream with
    Last-Event-ID; a stream the API refuses (or does not have) falls back to long polls."""
    view.state(migration)
    mid = migration["id"]
    last_id: str | None = None
    retries = Reconnects()
    while migration.get("state") not in TERMINAL:
        try:
            events = 0
            with contextlib.closing(client.events(mid, last_event_id=last_id)) as stream:
                for event in stream:
                    events += 1
                    retries.ok()
                    last_id = event.id or last_id
                    if not isinstance(event.data, dict):
                        continue
                    if event.name == "state":
                        migration = event.data
                        view.state(migration)
                        if migration.get("state") in TERMINAL:
                            return migration
                    elif event.name == "progress":
                        view.progress(event.data)
                    elif event.name == "log":
                        view.log(event.data)
            # Ended without a terminal state: cut by a proxy or a restart. Ask, then resume.
            migration = client.get_migration(mid)
            view.state(migration)
            if not events:
                time.sleep(1)  # a server that closes at once must not make us spin
        except RequestRefused:
            return poll(client, migration, view)
        except CoordinatorUnreachable as e:
            if e.status is not None and not events:  # a 5xx (a proxy without streaming?)
                return poll(client, migration, view)
            retries.failed(e)
    return migration


def poll(client: Coordinator, migration: dict[str, Any], view: ProgressView) -> dict[str, Any]:
    retries = Reconnects()
    while migration.get("state") not in TERMINAL:
        started = time.monotonic()
        try:
            migration = client.get_migration(migration["id"], wait_s=POLL_WAIT_S)
        except CoordinatorUnreachable as e:
            retries.failed(e)
            continue
        retries.ok()
        view.state(migration)
        view.progress(migration.get("progress") or {})
        if migration.get("state") not in TERMINAL and time.monotonic() - started < 1:
            time.sleep(1)  # a server that ignores ?wait= must not make us spin
    return migration


def wait_and_report(client: Coordinator, migration: dict[str, Any], *, as_json: bool) -> int:
    # With --json stdout carries the final object only; the display goes to a terminal's stderr.
    stream = sys.stderr if as_json else sys.stdout
    view = ProgressView(stream, tty=stream.isatty(), enabled=not as_json or stream.isatty())
    try:
        migration = follow(client, migration, view)
    except KeyboardInterrupt:
        view.close()
        print(
            f"detached; the migration continues: migrator status {migration['id']} --wait",
            file=sys.stderr,
        )
        return EXIT_DETACHED
    finally:
        view.close()
    if as_json:
        _print_json(migration)
    else:
        _print(verdict(migration))
    return exit_code(migration)


# -- commands --------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, client: Coordinator) -> int:
    body = request_body(args)
    key = args.idempotency_key
    if args.dry_run:
        doc = client.create_migration(body, dry_run=True, idempotency_key=key)
        if args.json:
            _print_json(doc)
        else:
            print("dry run: nothing was started; the plan:")
            _print(render_plan(doc.get("plan", doc), "  "))
        return EXIT_OK
    migration = client.create_migration(body, idempotency_key=key)
    if args.wait:
        return wait_and_report(client, migration, as_json=args.json)
    if args.json:
        _print_json(migration)
    else:
        mid = migration["id"]
        print(
            f"{mid} {migration.get('state')}: {_endpoint(migration.get('source'))} -> "
            f"{_endpoint(migration.get('target'))}"
        )
        print(f"follow it: migrator status {mid} --wait")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, client: Coordinator) -> int:
    migration = client.get_migration(args.id)
    if args.wait:
        return wait_and_report(client, migration, as_json=args.json)
    if args.json:
        _print_json(migration)
    else:
        _print(summary(migration))
    return exit_code(migration)


def cmd_list(args: argparse.Namespace, client: Coordinator) -> int:
    doc = client.list_migrations(state=args.state, limit=args.limit)
    if args.json:
        _print_json(doc)
        return EXIT_OK
    rows = []
    for m in doc.get("migrations") or []:
        progress = m.get("progress") or {}
        total = progress.get("bytes_total") or 0
        done = f"{(progress.get('bytes_done') or 0) / total * 100:.0f}%" if total else None
        source, target = _endpoint(m.get("source")), _endpoint(m.get("target"))
        rows.append([m.get("id"), m.get("state"), m.get("phase"), source, target, done,
                     m.get("created_at")])  # fmt: skip
    if not rows:
        print("no migrations")
        return EXIT_OK
    headers = ["ID", "STATE", "PHASE", "SOURCE", "TARGET", "DONE", "CREATED"]
    _print(table(headers, rows))
    return EXIT_OK


def cmd_action(args: argparse.Namespace, client: Coordinator) -> int:
    doc = client.act(args.id, args.command)
    if args.json:
        if doc is not None:
            _print_json(doc)
        return EXIT_OK
    state = f" (now {doc['state']})" if isinstance(doc, dict) and "state" in doc else ""
    print(f"{args.command} accepted: {args.id}{state}")
    return EXIT_OK


def cmd_agents(args: argparse.Namespace, client: Coordinator) -> int:
    doc = client.agents()
    if args.json:
        _print_json(doc)
        return EXIT_OK
    rows = [
        [a.get("name"), "yes" if a.get("healthy") else "no", a.get("docker_version"),
         a.get("url"), a.get("last_error")]
        for a in doc.get("agents") or []
    ]  # fmt: skip
    _print(
        table(["NAME", "HEALTHY", "DOCKER", "URL", "LAST ERROR"], rows) if rows else ["no agents"]
    )
    return EXIT_OK


def cmd_volumes(args: argparse.Namespace, client: Coordinator) -> int:
    doc = client.volumes(args.agent)
    if args.json:
        _print_json(doc)
        return EXIT_OK
    rows = [
        [v.get("name"), v.get("driver"), ", ".join(v.get("in_use_by") or [])]
        for v in doc.get("volumes") or []
    ]
    _print(table(["NAME", "DRIVER", "IN USE BY"], rows) if rows else ["no volumes"])
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Coordinator], int]] = {
    "migrate": cmd_migrate,
    "status": cmd_status,
    "list": cmd_list,
    "cancel": cmd_action,
    "retry": cmd_action,
    "discard": cmd_action,
    "agents": cmd_agents,
    "volumes": cmd_volumes,
}


def run_serve(args: argparse.Namespace) -> int:
    # Imported here: aiohttp and the server's modules would slow every client command.
    app = importlib.import_module("migrator.app")
    return int(
        app.serve(
            listen=args.listen,
            db=args.db,
            token_file=args.token_file,
            config=args.config,
            retention_days=args.retention_days,
            log_level=args.log_level,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command == "serve":
        return run_serve(args)
    url = getattr(args, "url", None) or os.environ.get("MIGRATOR_URL") or DEFAULT_URL
    token = getattr(args, "token", None) or os.environ.get("MIGRATOR_TOKEN")
    try:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"coordinator URL {url!r} must start with http:// or https://")
        return COMMANDS[args.command](args, Coordinator(url, token))
    except UsageError as e:
        print(f"migrator: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RequestRefused as e:
        if getattr(args, "json", False):
            _print_json(e.problem)
        print(f"migrator: {e.detail} ({e.code})", file=sys.stderr)
        return EXIT_REFUSED
    except CoordinatorUnreachable as e:
        print(f"migrator: cannot reach the coordinator at {url}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_DETACHED


if __name__ == "__main__":
    sys.exit(main())
