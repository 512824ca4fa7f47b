"""What the agent knows about a volume, and the pure rules that decide what may be done with it.

Owns `VolumeInfo` (the agent's JSON for a volume) and two rules of DESIGN.md section 2:
* whether the volume's data can be read at its mountpoint (`readable`), and
* whether its options point at shared storage, so that recreating them elsewhere would copy
  the data onto itself.
Pure: no Docker, no I/O beyond the one `os.access` in `mountpoint_readable`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ContainerRef:
    """A container that references a volume (running or not)."""

    id: str
    name: str
    state: str
    """Docker's state word: created, running, paused, restarting, exited, dead."""

    @property
    def running(self) -> bool:
        return self.state in ("running", "paused", "restarting")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "state": self.state, "running": self.running}


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    driver: str
    options: dict[str, str]
    labels: dict[str, str]
    scope: str
    mountpoint: str
    created_at: str | None
    in_use_by: tuple[ContainerRef, ...] = field(default=())

    @property
    def unreadable_reason(self) -> str | None:
        """Why the agent cannot read this volume's data at its mountpoint, or None if it can."""
        return unreadable_reason(self.driver, self.options)

    def to_json(self, *, readable: bool) -> dict[str, Any]:
        reason = self.unreadable_reason
        if reason is None and not readable:
            reason = f"the agent cannot read the mountpoint {self.mountpoint}"
        return {
            "name": self.name,
            "driver": self.driver,
            "options": self.options,
            "labels": self.labels,
            "scope": self.scope,
            "mountpoint": self.mountpoint,
            "created_at": self.created_at,
            "readable": reason is None,
            "unreadable_reason": reason,
            "in_use_by": [c.to_json() for c in self.in_use_by],
        }


def unreadable_reason(driver: str, options: dict[str, str]) -> str | None:
    """The data of a `local` volume with `type=`/`device=` options is mounted at its mountpoint
    only while a container uses it (tmpfs, nfs, cifs, bind): reading the mountpoint of an unused
    one would find an empty directory, so such a volume is refused, never copied as empty.
    Other drivers keep their data where the agent cannot see it."""
    if driver != "local":
        return f"volume driver {driver!r} keeps its data outside the agent's reach"
    if "type" in options or "device" in options:
        kind = options.get("type", "bind")
        return (
            f"local volume with type={kind} options: its data is not at the mountpoint "
            "while no container uses it"
        )
    return None


def mountpoint_readable(info: VolumeInfo) -> bool:
    return info.unreadable_reason is None and os.access(info.mountpoint, os.R_OK | os.X_OK)


def shared_storage_reason(driver: str, options: dict[str, str]) -> str | None:
    """Options that would make a recreated volume point at the source's own storage."""
    if driver != "local":
        return None
    kind = options.get("type", "")
    o = {part.split("=", 1)[0] for part in options.get("o", "").split(",") if part}
    if kind in ("nfs", "nfs4", "cifs", "smb3"):
        return f"type={kind}: the target would mount the same remote share as the source"
    if "bind" in o or "rbind" in o or (kind in ("none", "") and "device" in options):
        return "bind mount: the target would point at the same directory as the source"
    return None
