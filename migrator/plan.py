"""Dry runs and create-time checks: what a migration would touch, asked of the agents, with
nothing changed anywhere. Used by `POST /v1/migrations?dry_run=true` and by the create call's
`volume_in_use` check."""

from __future__ import annotations

import contextlib
from typing import Any

from migrator.agent_client import AgentClient, AgentRefused, AgentUnreachable
from migrator.model import COMPOSE_LABEL, MigrationRequest


async def source_volumes(req: MigrationRequest, source: AgentClient) -> list[tuple[str, str]]:
    """(source, target) volume names; a compose project is looked up on the source agent."""
    if req.source_volumes is not None:
        return [(v, v) for v in req.source_volumes]
    if req.compose_project is None:
        return [(req.source.volume, req.target.volume)]
    volumes = await source.list_volumes()
    return sorted(
        (v["name"], v["name"])
        for v in volumes
        if (v.get("labels") or {}).get(COMPOSE_LABEL) == req.compose_project
    )


async def running_users(req: MigrationRequest, source: AgentClient) -> list[str]:
    """Names of running containers that use the source volumes; [] when the agent cannot say
    right now (the runner re-checks, and fails with a clear code if it must)."""
    names: list[str] = []
    with contextlib.suppress(AgentUnreachable, AgentRefused):
        for src, _ in await source_volumes(req, source):
            with contextlib.suppress(AgentRefused):
                info = await source.inspect_volume(src)
                names += [
                    c["name"] for c in info["in_use_by"] if c["running"] and c["name"] not in names
                ]
    return names


async def plan(req: MigrationRequest, source: AgentClient, target: AgentClient) -> dict[str, Any]:
    problems: list[str] = []
    doc: dict[str, Any] = {"source": req.to_json()["source"], "target": req.to_json()["target"]}
    try:
        pairs = await source_volumes(req, source)
    except AgentUnreachable:
        pairs = []
        problems.append("agent_unreachable")
    if not pairs and "agent_unreachable" not in problems:
        problems.append("source_volume_not_found")
    volumes: list[dict[str, Any]] = []
    running: list[str] = []
    conflicts: list[str] = []
    need = 0
    free = None
    with contextlib.suppress(AgentRefused, AgentUnreachable):
        free = (await target.health()).get("volumes_free_bytes")
    for src, dst in pairs:
        entry: dict[str, Any] = {"name": src, "target": dst}
        try:
            info = await source.inspect_volume(src)
            entry.update(driver=info["driver"], options=info["options"], labels=info["labels"])
            running += [c["name"] for c in info["in_use_by"] if c["running"]]
            if info["readable"]:
                totals = await source.volume_totals(src)
                entry.update(bytes=totals["bytes"], files=totals["files"])
            else:
                problems.append("volume_not_readable")
        except AgentRefused as e:
            problems.append("source_volume_not_found" if e.code == "volume_not_found" else e.code)
            continue
        except AgentUnreachable:
            problems.append("agent_unreachable")
            continue
        try:
            await target.inspect_volume(dst)
            conflicts.append(f"volume {dst!r} exists")
            entry["target_exists"] = True
        except AgentRefused:
            entry["target_exists"] = False
            need += int(entry.get("bytes") or 0)
        except AgentUnreachable:
            problems.append("agent_unreachable")
        volumes.append(entry)
    running = sorted(set(running))
    if running and req.options.quiesce == "none" and not req.options.allow_in_use:
        problems.append("volume_in_use")
    if conflicts and req.options.if_target_exists == "fail":
        problems.append("target_exists")
    doc["volumes"] = volumes
    doc["bytes"] = sum(int(v.get("bytes") or 0) for v in volumes)
    doc["files"] = sum(int(v.get("files") or 0) for v in volumes)
    doc["containers_to_stop"] = running if req.options.quiesce == "stop" else []
    doc["running_containers"] = running
    doc["target_exists"] = bool(conflicts)
    doc["target_conflicts"] = conflicts
    doc["target_free_bytes"] = free
    doc["free_space_ok"] = None if free is None else free >= need
    if doc["free_space_ok"] is False:
        problems.append("target_no_space")
    doc["would_fail"] = sorted(set(problems))
    return doc
