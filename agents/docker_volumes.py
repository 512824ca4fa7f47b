"""The agent's only door to the Docker Engine (the only module that imports `docker`).

Names reuse Docker's verbs (`inspect`, `create`, `remove`). Every call blocks (docker-py is
synchronous, even its constructor), so callers run these off the event loop. Foreign errors
become the agent's own in exactly one place, `_docker_errors`: a daemon that is down surfaces
from docker-py as `requests.exceptions.ConnectionError`, which is mapped too.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import threading
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions

from agents.errors import (
    DockerError,
    DockerUnavailable,
    DriverNotFound,
    InvalidRequest,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
)
from agents.volumes import ContainerRef, VolumeInfo

# How long one engine call may take before the engine counts as unavailable.
DOCKER_TIMEOUT_S = 60
EMPTY_IMAGE = "volume-migrator/empty:1"


@contextlib.contextmanager
def _docker_errors(*, volume: str | None = None, driver: str | None = None) -> Iterator[None]:
    try:
        yield
    except docker.errors.NotFound as e:
        explanation = str(getattr(e, "explanation", "") or e)
        if driver is not None and "plugin" in explanation:
            raise DriverNotFound(f"volume driver {driver!r} not found: {explanation}") from e
        if volume is not None:
            raise VolumeNotFound(f"no volume named {volume!r}", volume=volume) from e
        raise DockerError(explanation) from e
    except docker.errors.APIError as e:
        explanation = str(e.explanation or e)
        if e.status_code == 400:
            raise InvalidRequest(f"Docker refused the request: {explanation}") from e
        if e.status_code == 409 and volume is not None:
            raise VolumeInUse(f"volume {volume!r} is in use: {explanation}", volume=volume) from e
        raise DockerError(f"Docker engine error: {explanation}") from e
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise DockerUnavailable(f"Docker engine unreachable: {e}") from e
    except docker.errors.DockerException as e:
        # docker-py raises a bare DockerException when it cannot reach the daemon at all
        # (e.g. while negotiating the API version).
        raise DockerUnavailable(f"Docker engine unreachable: {e}") from e


def _volume_info(raw: dict[str, Any], users: tuple[ContainerRef, ...]) -> VolumeInfo:
    return VolumeInfo(
        name=raw["Name"],
        driver=raw.get("Driver") or "local",
        options=dict(raw.get("Options") or {}),
        labels=dict(raw.get("Labels") or {}),
        scope=raw.get("Scope") or "local",
        mountpoint=raw.get("Mountpoint") or "",
        created_at=raw.get("CreatedAt"),
        in_use_by=users,
    )


class DockerVolumes:
    """Volumes and the containers that use them, on one engine."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    def _api(self) -> Any:
        with self._lock:
            if self._client is None:
                with _docker_errors():
                    self._client = docker.DockerClient(
                        base_url=self.base_url, version="auto", timeout=DOCKER_TIMEOUT_S
                    )
            return self._client.api

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def version(self) -> str:
        api = self._api()
        with _docker_errors():
            return str(api.version()["Version"])

    def _users_by_volume(self) -> dict[str, list[ContainerRef]]:
        users: dict[str, list[ContainerRef]] = {}
        with _docker_errors():
            containers = self._api().containers(all=True)
        for c in containers:
            ref = ContainerRef(
                id=c["Id"], name=(c.get("Names") or ["/?"])[0].lstrip("/"), state=c["State"]
            )
            for mount in c.get("Mounts") or []:
                if mount.get("Type") == "volume" and mount.get("Name"):
                    users.setdefault(mount["Name"], []).append(ref)
        return users

    def list(self) -> list[VolumeInfo]:
        with _docker_errors():
            raw = self._api().volumes().get("Volumes") or []
        users = self._users_by_volume()
        infos = [_volume_info(v, tuple(users.get(v["Name"], ()))) for v in raw]
        return sorted(infos, key=lambda v: v.name)

    def inspect(self, name: str) -> VolumeInfo:
        with _docker_errors(volume=name):
            raw = self._api().inspect_volume(name)
        with _docker_errors():
            containers = self._api().containers(all=True, filters={"volume": name})
        users = tuple(
            ContainerRef(
                id=c["Id"], name=(c.get("Names") or ["/?"])[0].lstrip("/"), state=c["State"]
            )
            for c in containers
        )
        return _volume_info(raw, users)

    def exists(self, name: str) -> bool:
        try:
            with _docker_errors(volume=name):
                self._api().inspect_volume(name)
        except VolumeNotFound:
            return False
        return True

    def create(
        self, name: str, driver: str, driver_opts: dict[str, str], labels: dict[str, str]
    ) -> VolumeInfo:
        """Create exactly as given. Docker answers an existing name with the existing volume,
        so existence is checked first: creating never adopts someone else's volume."""
        if self.exists(name):
            raise VolumeExists(f"volume {name!r} already exists", volume=name)
        with _docker_errors(driver=driver):
            raw = self._api().create_volume(
                name, driver=driver, driver_opts=driver_opts or None, labels=labels or None
            )
        return _volume_info(raw, ())

    def remove(self, name: str) -> None:
        """Remove a volume; Docker refuses (409 volume_in_use) while a container references it."""
        with _docker_errors(volume=name):
            self._api().remove_volume(name)

    def free_bytes(self) -> int:
        """Bytes available where this engine keeps its volumes."""
        with _docker_errors():
            root = self._api().info()["DockerRootDir"]
        st = os.statvfs(os.path.join(root, "volumes"))
        return st.f_bavail * st.f_frsize

    def stop_container(self, container_id: str, timeout_s: int) -> None:
        """Graceful `docker stop`: SIGTERM (or the image's stop signal), SIGKILL after
        `timeout_s`, so a database gets its shutdown checkpoint."""
        with _docker_errors():
            self._api().stop(container_id, timeout=timeout_s)

    def start_container(self, container_id: str) -> None:
        with _docker_errors():
            self._api().start(container_id)

    def container_running(self, container_id: str) -> bool | None:
        """True/False, or None when the container no longer exists."""
        with _docker_errors():
            try:
                state = self._api().inspect_container(container_id)["State"]
            except docker.errors.NotFound:
                return None
        return bool(state.get("Running"))

    def ensure_empty_image(self) -> str:
        """Import an empty image (an empty tar through `docker import`), for helper containers
        that are created but never started: no registry is ever needed."""
        api = self._api()
        with _docker_errors():
            if api.images(name=EMPTY_IMAGE.split(":")[0]):
                return EMPTY_IMAGE
            buf = io.BytesIO()
            tarfile.open(fileobj=buf, mode="w").close()
            repo, tag = EMPTY_IMAGE.split(":")
            api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag)
        return EMPTY_IMAGE
