"""Images for test containers, made without a registry: an empty image for containers that are
created but never started, and a 1 MB busybox userland (Debian's busybox-static) for containers
that run."""

from __future__ import annotations

import io
import shutil
import tarfile

import docker

BUSYBOX = "test/busybox:1"
APPLETS = ("sh", "sleep", "sync", "cat", "ls", "true")


def busybox_image(client: docker.DockerClient) -> str:
    if client.api.images(name=BUSYBOX.split(":")[0]):
        return BUSYBOX
    binary = shutil.which("busybox")
    assert binary, "busybox-static is missing: scripts/bootstrap installs it"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(binary, arcname="bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        tmp = tarfile.TarInfo("tmp")
        tmp.type = tarfile.DIRTYPE
        tmp.mode = 0o1777
        tar.addfile(tmp)
    repo, tag = BUSYBOX.split(":")
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag)
    return BUSYBOX


def run_sleeper(client: docker.DockerClient, volume: str, name: str) -> str:
    """A running container that uses `volume` (mounted at /data), stoppable at once."""
    image = busybox_image(client)
    container = client.api.create_container(
        image,
        command=["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
        name=name,
        host_config=client.api.create_host_config(
            binds={volume: {"bind": "/data", "mode": "rw"}}, network_mode="none"
        ),
    )
    client.api.start(container["Id"])
    return str(container["Id"])
