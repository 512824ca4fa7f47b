"""The migration runner: drives each migration through its phases by calling agents, persists
every step, and resumes unfinished migrations after a restart.

Nothing here touches volume data: the target agent pulls from the source agent. What must run
once is keyed so that running it again is harmless: the pull's id is the migration's id (a
second `POST /v1/pulls` with it returns or resumes the same pull), and the checkpoint records
what was done (target created, transfer started). Transient agent failures are retried with
exponential backoff; permanent ones fail the migration at once with a stable code.

Ids are stable within one attempt, so a restarted coordinator reattaches to its pulls. A retry
of a quiesced migration is the exception on purpose: its containers ran again after the failed
attempt, and the target agent may have finished that attempt's final pull on its own meanwhile
(it resumes unfinished pulls when it restarts), so the retry stops them again and reads the
source in a final pull of its own (`…-final-a<attempt>`), continuing the last pull's content
manifest so that only what changed is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import aiohttp

from agents.transfer_token import default_expiry, mint_transfer_token
from migrator.agent_client import AgentClient, AgentRefused, AgentUnreachable
from migrator.errors import (
    AgentNotFound,
    AgentUnavailable,
    Conflict,
    InvalidState,
    MigrationNotFound,
    TargetBusy,
)
from migrator.model import TERMINAL, Migration, Phase, State, now
from migrator.plan import source_volumes
from migrator.settings import CoordinatorSettings
from migrator.store import AgentRecord, Store, TargetTaken

log = logging.getLogger("migrator.orchestrator")
T = TypeVar("T")

# Progress events at most this often per migration (the API promises about once a second).
PROGRESS_EVERY_S = 1.0
# Room the target must have beyond the source's data: filesystem overhead of the new files.
SPACE_MARGIN = 1.05
# Pre-copy (DESIGN, issue of database-safe migrations): stop when a pass sends less than this,
# or less than this share of the pass before, and never run more passes than this.
PRECOPY_SMALL_BYTES = 64 << 20
PRECOPY_SHRINK = 0.05
PRECOPY_MAX_PASSES = 5
# A pass that sends at least this share of the one before made no headway.
PRECOPY_NO_GAIN = 0.8
# While the source's containers are stopped, every poll interval is downtime.
QUIESCED_POLL_S = 0.02
# What one attempt's quiesce records in the checkpoint; a retry after its containers were
# started again begins afresh.
QUIESCE_KEYS = ("stopping_ids", "stopped_ids", "stopped_at", "restarted", "restarted_at")
PULL_ERROR_CODES = {
    "volume_not_found": "source_volume_not_found",
    "http_404": "source_volume_not_found",
}


class MigrationFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Metrics:
    bytes_transferred: int = 0
    retries: int = 0
    duration_sum_s: float = 0.0
    succeeded: int = 0
    """Sum and count of succeeded migrations' durations (a Prometheus summary needs no more,
    and a list would grow for as long as the coordinator runs)."""


class Orchestrator:
    def __init__(
        self, store: Store, settings: CoordinatorSettings, session: aiohttp.ClientSession
    ) -> None:
        self.store = store
        self.settings = settings
        self.session = session
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.metrics = Metrics()
        self._changed = asyncio.Condition()
        self._cancelling: set[str] = set()
        self._last_progress: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Pick up what a previous run left unfinished."""
        for m in await asyncio.to_thread(self.store.unfinished):
            log.info("resuming migration %s (%s, phase %s)", m.id, m.state, m.phase)
            self.schedule(m)

    async def stop(self) -> None:
        """Stop the runners without touching the migrations: they resume on the next start."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def schedule(self, m: Migration) -> None:
        task = asyncio.get_running_loop().create_task(self._run(m.id), name=f"migration-{m.id}")
        self.tasks[m.id] = task
        migration_id = m.id

        def forget(done: asyncio.Task[None]) -> None:
            if self.tasks.get(migration_id) is done:
                del self.tasks[migration_id]

        task.add_done_callback(forget)

    # -- reading and waiting --------------------------------------------------------------

    async def get(self, migration_id: str) -> Migration:
        m = await asyncio.to_thread(self.store.get_migration, migration_id)
        if m is None:
            raise MigrationNotFound(f"no migration {migration_id!r}", id=migration_id)
        return m

    async def wait_terminal(self, migration_id: str, seconds: float) -> Migration:
        """The migration once it is terminal, or as it is after `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            m = await self.get(migration_id)
            left = deadline - time.monotonic()
            if m.state in TERMINAL or left <= 0:
                return m
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=min(left, 5))

    async def wait_event(self, seconds: float) -> None:
        """Until anything changes, or `seconds` pass."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=seconds)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- persistence and events -----------------------------------------------------------

    async def save(self, m: Migration, *, state_event: bool = True) -> None:
        await asyncio.to_thread(self.store.save_migration, m, state_event=state_event)
        await self._notify()

    async def log(self, m: Migration, level: str, message: str) -> None:
        getattr(log, level if level in ("info", "warning", "error") else "info")(
            "%s: %s", m.id, message
        )
        data = {
            "time": now().isoformat().replace("+00:00", "Z"),
            "level": level,
            "message": message,
        }
        await asyncio.to_thread(self.store.append_event, m.id, "log", data)
        await self._notify()

    async def _progress(self, m: Migration) -> None:
        await asyncio.to_thread(self.store.save_migration, m)
        last = self._last_progress.get(m.id, 0.0)
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            self._last_progress[m.id] = time.monotonic()
            await asyncio.to_thread(self.store.append_event, m.id, "progress", asdict(m.progress))
        await self._notify()

    # -- agents ---------------------------------------------------------------------------

    async def agent(self, name: str) -> tuple[AgentRecord, AgentClient]:
        rec = await asyncio.to_thread(self.store.get_agent, name)
        if rec is None:
            raise AgentNotFound(f"no agent named {name!r}", agent=name)
        return rec, AgentClient(self.session, rec.url, rec.token)

    async def _retrying(self, m: Migration, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Call an agent, retrying while it is unreachable; then fail with agent_unreachable."""
        attempt = 0
        while True:
            try:
                return await call()
            except AgentUnreachable as e:
                attempt += 1
                if attempt >= self.settings.agent_retries:
                    raise MigrationFailed(
                        "agent_unreachable", f"{what}: {e} (gave up after {attempt} attempts)"
                    ) from e
                self.metrics.retries += 1
                delay = min(self.settings.agent_retry_max_delay_s, 0.5 * 2 ** (attempt - 1))
                await self.log(m, "warning", f"{what}: {e}; retrying in {delay:.1f}s")
                await asyncio.sleep(delay)

    # -- commands -------------------------------------------------------------------------

    async def cancel(self, migration_id: str) -> Migration:
        m = await self.get(migration_id)
        if m.state in TERMINAL:
            raise InvalidState(f"migration {migration_id} is already {m.state}")
        task = self.tasks.get(migration_id)
        if task is not None:
            self._cancelling.add(migration_id)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            self._cancelling.discard(migration_id)
            return await self.get(migration_id)
        m.cancel(result={"target_complete": False})
        await self.save(m)
        return m

    async def retry(self, migration_id: str) -> Migration:
        m = await self.get(migration_id)
        m.retry()
        try:
            await self.save(m)
        except TargetTaken as e:
            raise TargetBusy(
                f"migration {e.migration_id} now writes {e.agent}:{e.volume}; retry after it",
                migration=e.migration_id,
            ) from e
        await self.log(m, "info", f"retry: attempt {m.attempts}")
        self.schedule(m)
        return m

    async def discard(self, migration_id: str) -> Migration:
        """Remove the partial target this migration created, and the target's journal."""
        m = await self.get(migration_id)
        if m.state not in (State.FAILED, State.CANCELLED):
            raise InvalidState(
                f"only a failed or cancelled migration can be discarded, not a {m.state} one"
            )
        _, target = await self.agent(m.request.target.agent)
        removed = False
        # Later passes first: only the first pull created the volume, and it goes last.
        for pull_id in reversed(m.checkpoint.get("pulls") or [m.id]):
            try:
                pull = await target.delete_pull(pull_id, discard=True)
            except AgentUnreachable as e:
                raise AgentUnavailable(f"target agent unreachable; discard later: {e}") from e
            except AgentRefused as e:
                if e.code != "pull_not_found":
                    raise Conflict(
                        f"the target agent refused: {e.detail}", agent_code=e.code
                    ) from e
                pull = None
            removed = removed or bool(pull and pull.get("created_volume"))
        m.checkpoint["discarded"] = True
        if m.result is not None:
            m.result["target_complete"] = False
        await self.save(m)
        await self.log(
            m,
            "info",
            "discarded: the partial target volume was removed"
            if removed
            else "discarded: the target's journal was removed (the volume was not ours)",
        )
        return m

    # -- the runner -----------------------------------------------------------------------

    async def _run(self, migration_id: str) -> None:
        m = await self.get(migration_id)
        try:
            if m.state is State.QUEUED:
                m.start()
                # Wall-clock and durable: a run resumed after a restart counts from here too.
                m.checkpoint["run_started_at"] = time.time()
                await self.save(m)
            started = float(m.checkpoint.get("run_started_at") or time.time())
            result = await self._migrate(m)
            result["duration_s"] = round(time.time() - started, 3)
            m.succeed(result)
            self.metrics.bytes_transferred += int(result.get("bytes") or 0)
            self.metrics.duration_sum_s += result["duration_s"]
            self.metrics.succeeded += 1
            # The log line goes first: the terminal state is the stream's last event.
            await self.log(m, "info", "succeeded")
            await self.save(m)
        except MigrationFailed as e:
            await self._restart_stopped(m)
            m.fail(e.code, e.message, result=m.result or {"target_complete": False})
            await self.log(m, "error", f"failed: {e.code}: {e.message}")
            await self.save(m)
        except AgentNotFound as e:
            m.fail("agent_not_found", e.detail)
            await self.save(m)
        except asyncio.CancelledError:
            if migration_id not in self._cancelling:
                raise  # shutting down: the migration resumes on the next start
            await self._stop_pull(m)
            await self._restart_stopped(m)
            m.cancel(result={"target_complete": False})
            await self.log(m, "info", "cancelled")
            await self.save(m)
        except Exception as e:
            log.exception("migration %s failed unexpectedly", migration_id)
            await self._restart_stopped(m)
            m.fail("internal_error", f"{type(e).__name__}: {e}")
            await self.save(m)

    async def _stop_pull(self, m: Migration) -> None:
        pull_id = m.checkpoint.get("current_pull", m.id)
        with contextlib.suppress(Exception):
            _, target = await self.agent(m.request.target.agent)
            await asyncio.wait_for(target.delete_pull(pull_id), timeout=10)

    async def _restart_stopped(self, m: Migration) -> None:
        """Start again exactly the containers this migration stopped (never others), however
        it ends; retried while the source agent is unreachable."""
        ids = m.checkpoint.get("stopped_ids") or m.checkpoint.get("stopping_ids")
        if not ids or m.checkpoint.get("restarted"):
            return
        _, source = await self.agent(m.request.source.agent)
        volume = self._pairs(m)[0][0]  # the route needs a volume; the ids are what count
        try:
            answer = await self._retrying(
                m,
                "restarting the source's containers",
                lambda: source.unquiesce(volume, list(ids)),
            )
        except (MigrationFailed, AgentRefused) as e:
            await self.log(m, "error", f"could not restart containers {ids}: {e}")
            return
        m.checkpoint["restarted"] = True
        m.checkpoint["restarted_at"] = time.time()
        await self.save(m, state_event=False)
        await self.log(m, "info", f"restarted source containers: {answer.get('started')}")

    def _pairs(self, m: Migration) -> list[tuple[str, str]]:
        """(source volume, target volume) of every volume this migration moves."""
        pairs = m.checkpoint.get("volumes")
        if pairs is None:
            return [(m.request.source.volume, m.request.target.volume)]
        return [(str(a), str(b)) for a, b in pairs]

    def _pull_id(self, m: Migration, index: int, suffix: str | None) -> str:
        """Stable pull ids: the migration's id for a plain migration, with the pass and the
        volume's position added where there are several."""
        base = f"{m.id}-v{index}" if m.request.several else m.id
        return base if suffix is None else f"{base}-{suffix}"

    def _chain(self, m: Migration, index: int) -> list[str]:
        """The pulls into volume `index` so far, in the order they were created: each one
        continues the content manifest of the one before."""
        base = self._pull_id(m, index, None)
        return [p for p in m.checkpoint.get("pulls") or [] if p == base or p.startswith(base + "-")]

    async def _migrate(self, m: Migration) -> dict[str, Any]:
        req = m.request
        source_rec, source = await self.agent(req.source.agent)
        _, target = await self.agent(req.target.agent)
        # Once containers are being stopped, what preparing found stands: run again, it would
        # see our own stopped containers as idle and never start them again.
        if not m.checkpoint.get("transfer_started") and "stopping_ids" not in m.checkpoint:
            m.enter(Phase.PREPARING)
            await self.save(m)
            await self._prepare(m, source, target)
        pairs = self._pairs(m)
        quiesce = req.options.quiesce == "stop" and bool(m.checkpoint.get("running"))
        passes: list[dict[str, Any]] = []
        previous: list[str | None] | None = None
        if quiesce and req.options.precopy:
            previous = [*await self._precopy(m, source_rec, target, passes)]
        finals = [
            self._pull_id(m, i, "final" if previous is not None else None)
            for i in range(len(pairs))
        ]
        if quiesce and m.attempts > 1:
            # The containers ran again after the failed attempt, and the target agent may have
            # finished that attempt's final pull on its own meanwhile (a copy of a running
            # app): this attempt reads the source in a final pull of its own, once they are
            # stopped again, continuing the last pull so that only what changed is sent.
            finals = [self._pull_id(m, i, f"final-a{m.attempts}") for i in range(len(pairs))]
            previous = await self._settle_earlier_pulls(m, source_rec, target, finals, passes)
        if quiesce:
            await self._quiesce(m, source)
        m.enter(Phase.TRANSFERRING)
        await self.save(m)
        # After pre-copy the final delta is small: the source freezes it (copies it aside when
        # naming the stream), and its containers run again as soon as it reports so.
        freeze = quiesce and previous is not None and req.options.restart_source_containers
        pulls = await self._run_pass(
            m,
            source_rec,
            target,
            finals,
            previous,
            freeze=freeze,
            on_source_read=self._restart_stopped if freeze else None,
        )
        passes.append(_merge_summaries(pulls))
        downtime = 0.0
        if quiesce:
            # The source has been read: its containers need not wait for verification.
            if req.options.restart_source_containers:
                await self._restart_stopped(m)
            end = m.checkpoint.get("restarted_at") or time.time()
            downtime = round(end - m.checkpoint["stopped_at"], 3)
        result: dict[str, Any] = {
            "bytes": m.checkpoint.get("source_bytes", 0),
            "files": m.checkpoint.get("source_files", 0),
            "digest": None,
            "verified": False,
            "downtime_s": downtime,
            "consistency": m.checkpoint.get("consistency", "idle"),
            "passes": passes,
            "target_complete": True,
            "mismatches": [],
            "warnings": list(m.checkpoint.get("warnings", [])),
        }
        per_volume = [
            {
                "volume": dst,
                "bytes": t["bytes"],
                "files": t["files"],
                "digest": None,
                "verified": False,
                "mismatches": [],
            }
            for (_, dst), t in zip(pairs, m.checkpoint.get("volume_totals", []), strict=False)
        ]
        if req.several:
            result["volumes"] = per_volume
        m.result = result
        if req.options.verify == "checksum":
            m.enter(Phase.VERIFYING)
            await self.save(m)
            await self._verify(m, target, finals, per_volume, result)
        m.enter(Phase.FINALIZING)
        await self.save(m)
        if req.options.delete_source:
            if result["verified"]:
                for src, _ in pairs:
                    await self._delete_source(m, source, src, result)
            else:
                result["warnings"].append("source kept: delete_source needs verify: checksum")
        return result

    async def _verify(
        self,
        m: Migration,
        target: AgentClient,
        finals: list[str],
        per_volume: list[dict[str, Any]],
        result: dict[str, Any],
    ) -> None:
        """The target re-reads each volume and compares it with what the source read."""
        failed = 0
        digests = []
        for pull_id, volume in zip(finals, per_volume, strict=True):
            verification = await self._retrying(
                m, f"verifying {volume['volume']}", functools.partial(target.verify_pull, pull_id)
            )
            volume.update(
                digest=verification["digest"],
                verified=verification["verified"],
                mismatches=verification["mismatches"],
            )
            digests.append(f"{volume['volume']} {verification['digest']}")
            failed += int(verification["mismatch_count"])
            result["mismatches"].extend(
                f"{volume['volume']}:{p}" if m.request.several else p
                for p in verification["mismatches"]
            )
        del result["mismatches"][100:]
        result["digest"] = (
            per_volume[0]["digest"]
            if not m.request.several
            else "sha256:" + hashlib.sha256("\n".join(digests).encode()).hexdigest()
        )
        if failed:
            raise MigrationFailed(
                "verification_failed", f"{failed} path(s) differ from what the source read"
            )
        result["verified"] = True

    async def _resolve_volumes(self, m: Migration, source: AgentClient) -> list[tuple[str, str]]:
        req = m.request
        pairs = await self._retrying(
            m, "listing the source's volumes", functools.partial(source_volumes, req, source)
        )
        if not pairs:
            raise MigrationFailed(
                "source_volume_not_found",
                f"no volume on {req.source.agent} belongs to compose project "
                f"{req.compose_project!r}",
            )
        if req.compose_project is not None:
            names = ", ".join(src for src, _ in pairs)
            await self.log(m, "info", f"compose project {req.compose_project}: {names}")
        return pairs

    async def _prepare(self, m: Migration, source: AgentClient, target: AgentClient) -> None:
        req = m.request
        pairs = await self._resolve_volumes(m, source)
        running: list[str] = []
        totals_list: list[dict[str, Any]] = []
        need = 0
        missing_targets = 0
        for src, dst in pairs:
            info = await self._inspect(m, source, src)
            running += [
                c["name"]
                for c in info.get("in_use_by", [])
                if c.get("running") and c["name"] not in running
            ]
            exists = await self._target_exists(m, target, dst)
            if (
                exists
                and req.options.if_target_exists == "fail"
                and not m.checkpoint.get("created")
            ):
                raise MigrationFailed(
                    "target_exists",
                    f"volume {dst!r} already exists on {req.target.agent} "
                    "(use if_target_exists: sync to make it identical)",
                )
            totals = await self._retrying(
                m, f"measuring {src}", functools.partial(source.volume_totals, src)
            )
            totals_list.append({"bytes": totals["bytes"], "files": totals["files"]})
            if not exists:
                need += int(totals["data_bytes"])
                missing_targets += 1
        if running and req.options.quiesce == "none":
            if not req.options.allow_in_use:
                raise MigrationFailed(
                    "volume_in_use", f"running containers use the source: {', '.join(running)}"
                )
            m.checkpoint["consistency"] = "crash_consistent"
            m.checkpoint.setdefault("warnings", []).append(
                f"copied while {', '.join(running)} kept running: crash-consistent at best"
            )
        else:
            m.checkpoint["consistency"] = "quiesced" if running else "idle"
        m.checkpoint["running"] = running
        m.checkpoint["volumes"] = [list(p) for p in pairs]
        m.checkpoint["volume_totals"] = totals_list
        m.checkpoint["source_bytes"] = sum(t["bytes"] for t in totals_list)
        m.checkpoint["source_files"] = sum(t["files"] for t in totals_list)
        m.progress.bytes_total = m.checkpoint["source_bytes"]
        m.progress.files_total = m.checkpoint["source_files"]
        health = await self._retrying(m, "checking the target", target.health)
        free = health.get("volumes_free_bytes")
        if free is not None and missing_targets and free < need * SPACE_MARGIN:
            raise MigrationFailed(
                "target_no_space", f"the target has {free} bytes free, the source holds {need}"
            )
        await self.save(m, state_event=False)

    async def _inspect(self, m: Migration, source: AgentClient, volume: str) -> dict[str, Any]:
        try:
            info: dict[str, Any] = await self._retrying(
                m, f"inspecting {volume}", lambda: source.inspect_volume(volume)
            )
        except AgentRefused as e:
            code = "source_volume_not_found" if e.code == "volume_not_found" else e.code
            raise MigrationFailed(code, e.detail) from e
        if not info.get("readable", False):
            raise MigrationFailed(
                "volume_not_readable", f"source volume {volume!r}: {info.get('unreadable_reason')}"
            )
        return info

    async def _target_exists(self, m: Migration, target: AgentClient, volume: str) -> bool:
        try:
            await self._retrying(
                m, f"inspecting the target {volume}", lambda: target.inspect_volume(volume)
            )
        except AgentRefused as e:
            if e.code != "volume_not_found":
                raise MigrationFailed(e.code, e.detail) from e
            return False
        return True

    async def _precopy(
        self,
        m: Migration,
        source_rec: AgentRecord,
        target: AgentClient,
        passes: list[dict[str, Any]],
    ) -> list[str]:
        """Copy while the containers run, pass after pass while each shrinks the delta: stop
        when a pass sends less than 64 MiB or 5% of the one before, at most 5 passes."""
        m.enter(Phase.PRECOPY)
        await self.save(m)
        count = len(self._pairs(m))
        previous: list[str] | None = None
        sent_before: int | None = None
        for n in range(1, PRECOPY_MAX_PASSES + 1):
            ids = [self._pull_id(m, i, f"p{n}") for i in range(count)]
            summary = _merge_summaries(
                await self._run_pass(m, source_rec, target, ids, previous, precopy=True)
            )
            passes.append(summary)
            previous = ids
            sent = int(summary["bytes"])
            await self.log(m, "info", f"pre-copy pass {n} sent {sent} bytes")
            if sent < PRECOPY_SMALL_BYTES or (
                sent_before is not None and sent < sent_before * PRECOPY_SHRINK
            ):
                break
            if sent_before is not None and sent >= sent_before * PRECOPY_NO_GAIN:
                # The delta does not shrink (files rewritten faster than we copy them): more
                # passes only cost time; the final pass takes it from here.
                await self.log(m, "info", "pre-copy stopped: the delta no longer shrinks")
                break
            sent_before = sent
        assert previous is not None
        return previous

    async def _settle_earlier_pulls(
        self,
        m: Migration,
        source_rec: AgentRecord,
        target: AgentClient,
        finals: list[str],
        passes: list[dict[str, Any]],
    ) -> list[str | None]:
        """Before a retry stops the containers again: the last pull into each volume, finished
        while they still run, as a pre-copy pass. Returns those pulls, for the final pass to
        continue (None for a volume not pulled yet).

        A pull an earlier attempt left unfinished (failed, cancelled, or resumed by a restarted
        target agent as a final pass that must hold still) is resumed from its journal: it
        re-applies its last uncommitted frame and records everything it wrote, which a new
        pull could not, and whatever it reads from a running source the final pass re-reads."""
        heads: list[str | None] = []
        resumed: list[dict[str, Any]] = []
        starts: list[int] = []
        for i, (src, dst) in enumerate(self._pairs(m)):
            # This attempt's own final pull, if a resumed run already started it, is not
            # earlier: the final pass reattaches to it.
            chain = [p for p in self._chain(m, i) if p != finals[i]]
            heads.append(chain[-1] if chain else None)
            if not chain:
                continue
            head = chain[-1]
            try:
                pull: dict[str, Any] | None = await self._retrying(
                    m, "inspecting the last pull", functools.partial(target.get_pull, head)
                )
            except AgentRefused as e:
                if e.code != "pull_not_found":
                    raise MigrationFailed(e.code, e.detail) from e
                pull = None  # the target lost it: `_pass` starts it again
            if pull is not None and pull["state"] == "succeeded":
                if pull.get("pass_started_ns"):
                    starts.append(int(pull["pass_started_ns"]))
                continue
            if pull is not None and pull["state"] == "running":
                # Resumed by the target as it was (a final pass, which must hold still): it
                # goes on as a pre-copy pass instead, from its journal.
                try:
                    await self._retrying(
                        m, "stopping the last pull", functools.partial(target.delete_pull, head)
                    )
                except AgentRefused as e:
                    raise MigrationFailed(e.code, e.detail) from e
            if not resumed:
                m.enter(Phase.PRECOPY)
                await self.save(m)
            await self.log(
                m,
                "info",
                f"pass {head}: finishing the earlier attempt's pull while the containers run",
            )
            before = chain[-2] if len(chain) > 1 else None
            done = await self._pass(
                m, source_rec, target, src, dst, head, continues=before, precopy=True
            )
            resumed.append(done)
            if done.get("pass_started_ns"):
                starts.append(int(done["pass_started_ns"]))
        if resumed:
            passes.append(_merge_summaries(resumed))
        if starts:
            # As after any pass: the final pass re-sends what changed since these started.
            m.checkpoint["window_start_ns"] = min(starts)
            await self.save(m, state_event=False)
        return heads

    async def _run_pass(
        self,
        m: Migration,
        source_rec: AgentRecord,
        target: AgentClient,
        pull_ids: list[str],
        previous: Sequence[str | None] | None,
        *,
        precopy: bool = False,
        freeze: bool = False,
        on_source_read: Callable[[Migration], Awaitable[None]] | None = None,
    ) -> list[dict[str, Any]]:
        """One pass over every volume, one after the other (a 2-core host gains nothing from
        pulling several at once, and progress stays readable). `on_source_read` runs once the
        source has been read for every volume: the last pull reports its stream frozen."""
        pulls: list[dict[str, Any]] = []
        pairs = self._pairs(m)
        for i, ((src, dst), pull_id) in enumerate(zip(pairs, pull_ids, strict=True)):
            continues = None if previous is None else previous[i]
            pulls.append(
                await self._pass(
                    m,
                    source_rec,
                    target,
                    src,
                    dst,
                    pull_id,
                    continues=continues,
                    precopy=precopy,
                    freeze=freeze,
                    on_source_read=on_source_read if i == len(pairs) - 1 else None,
                )
            )
        # The next pass re-sends what changed since this one started: every file modified
        # later was either re-read by this pass or has a later mtime (by induction, the
        # earliest pass's window is not needed).
        starts = [p["pass_started_ns"] for p in pulls if p.get("pass_started_ns")]
        if starts:
            m.checkpoint["window_start_ns"] = min(starts)
        return pulls

    async def _quiesce(self, m: Migration, source: AgentClient) -> None:
        """Stop the source's running containers, recording durably which ones: first those
        about to be stopped, then those the agent did stop. Once per attempt: a resumed run
        finds them stopped (or, after its final pass, started again), a retry stops them
        again."""
        cp = m.checkpoint
        # Checkpoints written before attempts were recorded here belong to the first attempt.
        same_attempt = cp.get("quiesce_attempt", 1) == m.attempts
        if same_attempt and "stopped_ids" in cp:
            return  # a resumed run: they are stopped already
        if not same_attempt and "stopping_ids" in cp:
            if cp.get("restarted"):
                # Started again when the earlier attempt ended: this attempt's own stop, and
                # its own downtime.
                for key in QUIESCE_KEYS:
                    cp.pop(key, None)
            else:
                # Never started again (the source agent could not be reached): still stopped
                # by us, still ours to start; their downtime goes on from the first stop.
                cp["stopping_ids"] = list(cp.get("stopped_ids") or cp.get("stopping_ids") or [])
                cp.pop("stopped_ids", None)
        cp["quiesce_attempt"] = m.attempts
        m.enter(Phase.QUIESCING)
        pairs = self._pairs(m)
        # A run that died while stopping them may have stopped these already: still ours.
        previous: list[str] = list(cp.get("stopping_ids") or [])
        stopping = list(previous)
        for src, _ in pairs:
            info = await self._inspect(m, source, src)
            stopping += [
                c["id"] for c in info["in_use_by"] if c["running"] and c["id"] not in stopping
            ]
        cp["stopping_ids"] = stopping
        cp.setdefault("stopped_at", time.time())  # the downtime began at the first stop
        await self.save(m)
        stopped: list[dict[str, str]] = []
        for src, _ in pairs:
            try:
                stopped += await self._retrying(
                    m,
                    f"stopping the containers of {src}",
                    functools.partial(source.quiesce, src, m.request.options.stop_timeout_s),
                )
            except AgentRefused as e:
                raise MigrationFailed(e.code, f"stopping containers: {e.detail}") from e
        m.checkpoint["stopped_ids"] = previous + [
            c["id"] for c in stopped if c["id"] not in previous
        ]
        await self.save(m, state_event=False)
        await self.log(m, "info", f"stopped {', '.join(c['name'] for c in stopped) or 'nothing'}")

    def _pull_body(
        self,
        m: Migration,
        source_rec: AgentRecord,
        volumes: tuple[str, str],
        pull_id: str,
        continues: str | None,
        *,
        precopy: bool,
        freeze: bool = False,
    ) -> dict[str, Any]:
        req = m.request
        src, dst = volumes
        token = mint_transfer_token(
            source_rec.token, volume=src, transfer_id=m.id, expires_at=default_expiry()
        )
        options: dict[str, Any] = {
            "compression": req.options.compression,
            # A target this migration created is synced, never refused: a pull started again
            # after the target agent lost it finds the volume its first attempt made.
            "if_target_exists": "sync"
            if continues or m.checkpoint.get("created")
            else req.options.if_target_exists,
            # Files changing under a running container are the next pass's business (or,
            # for a crash-consistent copy, the best there is); a quiesced final pass must
            # hold still, so it keeps passing until nothing changed.
            "accept_dirty": self._accept_dirty(m, precopy=precopy),
        }
        if precopy:  # another pass follows: it need not read the large files again
            options["keep_bases"] = True
        if freeze:
            options["freeze"] = True
        if continues is not None:
            options["continues"] = continues
            if m.checkpoint.get("window_start_ns") is not None:
                options["window_start_ns"] = m.checkpoint["window_start_ns"]
        if req.options.max_rate_bytes_per_s is not None:
            options["max_rate_bytes_per_s"] = req.options.max_rate_bytes_per_s
        if req.target_driver is not None:
            options["driver"] = req.target_driver
        if req.target_driver_opts is not None:
            options["driver_opts"] = req.target_driver_opts
        return {
            "id": pull_id,
            "volume": dst,
            "source": {"url": source_rec.data_url or source_rec.url, "volume": src, "token": token},
            "options": options,
        }

    def _accept_dirty(self, m: Migration, *, precopy: bool) -> bool:
        """Whether a pass may end with files that changed while read: yes while containers
        still run (a pre-copy pass, or a crash-consistent copy with allow_in_use); no for an
        idle volume or a quiesced final pass, which must hold still."""
        return precopy or (
            bool(m.checkpoint.get("running")) and m.request.options.quiesce != "stop"
        )

    async def _pass(
        self,
        m: Migration,
        source_rec: AgentRecord,
        target: AgentClient,
        src: str,
        dst: str,
        pull_id: str,
        *,
        continues: str | None,
        precopy: bool,
        freeze: bool = False,
        on_source_read: Callable[[Migration], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """One pull into the target, followed to its end. Keyed by `pull_id`, so a resumed
        run finds the pull the target already has (running, or done) instead of a new one."""
        req = m.request
        body = self._pull_body(
            m, source_rec, (src, dst), pull_id, continues, precopy=precopy, freeze=freeze
        )
        started = time.monotonic()
        try:
            await self._retrying(m, "starting the pull", lambda: target.create_pull(body))
        except AgentRefused as e:
            raise MigrationFailed(e.code, e.detail) from e
        if pull_id not in m.checkpoint.setdefault("pulls", []):
            m.checkpoint["pulls"].append(pull_id)
            m.checkpoint["current_pull"] = pull_id
            m.checkpoint["transfer_started"] = True
            await self.save(m, state_event=False)
            await self.log(
                m,
                "info",
                f"pass {pull_id}: {req.target.agent}:{dst} pulls from {req.source.agent}:{src}",
            )
        elif m.checkpoint.get("current_pull") != pull_id:
            # An earlier pull followed again (a retry finishing it): the one a cancel stops.
            m.checkpoint["current_pull"] = pull_id
            await self.save(m, state_event=False)
        last_seen: object = None
        while True:
            try:
                pull = await self._retrying(
                    m, "following the pull", lambda: target.get_pull(pull_id)
                )
            except AgentRefused as e:
                if e.code != "pull_not_found":
                    raise MigrationFailed(e.code, e.detail) from e
                try:  # the target lost its state: start it again
                    await self._retrying(m, "restarting the pull", lambda: target.create_pull(body))
                except AgentRefused as refused:
                    raise MigrationFailed(refused.code, refused.detail) from refused
                continue
            if (
                on_source_read is not None
                and pull.get("source_read")
                and pull["state"] in ("running", "succeeded")
            ):
                # The containers first: every write before it (progress, log) is downtime.
                await on_source_read(m)
                on_source_read = None
                await self.log(m, "info", f"pass {pull_id}: the source had been read (frozen)")
            seen = (pull["state"], pull["progress"], pull.get("created_volume"))
            if seen != last_seen:  # an unchanged poll writes nothing
                last_seen = seen
                self._follow(m, pull)
                await self._progress(m)
            if pull["state"] == "succeeded":
                pull["duration_s"] = round(time.monotonic() - started, 3)
                return pull
            if pull["state"] in ("failed", "cancelled"):
                err = pull.get("error") or {}
                code = str(err.get("code") or "transfer_failed")
                raise MigrationFailed(PULL_ERROR_CODES.get(code, code), str(err.get("message")))
            await asyncio.sleep(self._poll_interval(m))

    def _poll_interval(self, m: Migration) -> float:
        """While the source's containers are stopped, every poll interval is downtime."""
        cp = m.checkpoint
        if "stopped_at" in cp and not cp.get("restarted"):
            return min(self.settings.poll_interval_s, QUIESCED_POLL_S)
        return self.settings.poll_interval_s

    def _follow(self, m: Migration, pull: dict[str, Any]) -> None:
        p = pull["progress"]
        m.progress.bytes_total = int(p["bytes_total"]) or m.progress.bytes_total
        m.progress.bytes_done = int(p["bytes_done"])
        m.progress.files_total = int(p["files_total"]) or m.progress.files_total
        m.progress.files_done = int(p["files_done"])
        m.progress.rate_bytes_per_s = float(p["rate_bytes_per_s"])
        left = m.progress.bytes_total - m.progress.bytes_done
        m.progress.eta_s = (
            round(left / m.progress.rate_bytes_per_s, 1)
            if m.progress.rate_bytes_per_s > 0 and left > 0
            else None
        )
        if pull.get("created_volume"):
            m.checkpoint["created"] = True

    async def _delete_source(
        self, m: Migration, source: AgentClient, name: str, result: dict[str, Any]
    ) -> None:
        try:
            await self._retrying(m, "deleting the source", lambda: source.delete_volume(name))
        except AgentRefused as e:
            result["warnings"].append(f"source volume {name!r} was kept: {e.detail}")
            return
        await self.log(m, "info", f"source volume {name!r} deleted after verification")


def _merge_summaries(pulls: list[dict[str, Any]]) -> dict[str, Any]:
    """One pass over several volumes, as one entry of `result.passes`."""
    summaries = [_pass_summary(p) for p in pulls]
    return {
        "bytes": sum(s["bytes"] for s in summaries),
        "files": sum(s["files"] for s in summaries),
        "duration_s": round(sum(s["duration_s"] or 0 for s in summaries), 3),
    }


def _pass_summary(pull: dict[str, Any]) -> dict[str, Any]:
    return {
        "bytes": sum(int(p.get("bytes") or 0) for p in pull.get("passes") or []),
        "files": sum(int(p.get("files") or 0) for p in pull.get("passes") or []),
        "duration_s": pull.get("duration_s"),
    }
