"""The main job, end to end on this machine: two private Docker engines (two "hosts"), an agent
on each, a coordinator, and a real migration of a volume with data, labels and odd files from
host A to host B through the public API and the `migrator` CLI, verified by checksum.
Everything it starts is stopped when it ends."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docker

from tests.fidelity import build_fidelity_tree
from tests.testbed import AgentProcess, CoordinatorProcess, Engine

VOLUME = "demo-data"


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def main() -> int:
    engines = [Engine("demo-a"), Engine("demo-b")]
    agents: list[AgentProcess] = []
    coordinator: CoordinatorProcess | None = None
    try:
        for e in engines:
            say(f"starting Docker engine {e.name} ({e.url})")
            e.stop()
            shutil.rmtree(e.base / "data", ignore_errors=True)  # every run starts clean
            e.start()
        for e in engines:
            agent = AgentProcess(name=e.name, engine=e, token=secrets.token_urlsafe(24))
            shutil.rmtree(agent.dir, ignore_errors=True)
            agents.append(agent.start())
            say(f"agent for {e.name} at {agent.url}")
        a, b = agents
        token = secrets.token_urlsafe(24)
        config = "".join(
            f'[agents.host-{x.name[-1]}]\nurl = "{x.url}"\ntoken = "{x.token}"\n\n' for x in agents
        )
        coordinator = CoordinatorProcess(name="demo", token=token, config=config)
        shutil.rmtree(coordinator.dir, ignore_errors=True)
        coordinator.start()
        say(f"coordinator at {coordinator.url} (agents host-a, host-b)")

        client_a = docker.DockerClient(base_url=a.engine.url)
        client_a.api.create_volume(VOLUME, labels={"app": "demo", "owner": "ops"})
        root = Path(client_a.api.inspect_volume(VOLUME)["Mountpoint"])
        build_fidelity_tree(root)  # owners, setuid, links, a FIFO, a 1 GiB sparse file, xattrs
        (root / "db").mkdir()
        for i in range(8):
            (root / "db" / f"table{i}.dat").write_bytes(secrets.token_bytes(16 << 20))
        say(f"volume {VOLUME} on host A: 128 MiB of tables, labels, and one of every file kind")

        env = dict(os.environ, MIGRATOR_URL=coordinator.url, MIGRATOR_TOKEN=token)
        cli = str(Path(sys.executable).parent / "migrator")
        say(f"migrator migrate host-a:{VOLUME} host-b --wait")
        done = subprocess.run([cli, "migrate", f"host-a:{VOLUME}", "host-b", "--wait"], env=env)
        if done.returncode != 0:
            say(f"migration did not succeed (exit {done.returncode})")
            print(coordinator.log_tail())
            return 1
        listed = subprocess.run(
            [cli, "list", "--json"], env=env, capture_output=True, text=True, check=True
        )
        migration = json.loads(listed.stdout)["migrations"][0]
        result = migration["result"]
        client_b = docker.DockerClient(base_url=b.engine.url)
        target = client_b.api.inspect_volume(VOLUME)
        say(
            f"target on host B: labels {target['Labels']}, verified={result['verified']}, "
            f"digest {result['digest']}"
        )
        subprocess.run([cli, "volumes", "host-b"], env=env, check=True)
        say("done")
        return 0
    finally:
        if coordinator is not None:
            coordinator.stop()
        for agent in agents:
            agent.stop()
        for e in engines:
            e.stop()


if __name__ == "__main__":
    sys.exit(main())
