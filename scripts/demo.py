"""The main job, end to end on this machine: two private Docker engines (two "hosts"), an
agent on each, a volume with data, labels and driver options on host A, described by its agent
and recreated on host B from that description. Leaves everything stopped when it ends."""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from tests.testbed import AgentProcess, Engine


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def main() -> int:
    engines = [Engine("demo-a"), Engine("demo-b")]
    agents: list[AgentProcess] = []
    try:
        for e in engines:
            say(f"starting Docker engine {e.name} ({e.url})")
            e.stop()
            shutil.rmtree(e.base / "data", ignore_errors=True)  # every run starts clean
            e.start()
        for e in engines:
            agent = AgentProcess(name=e.name, engine=e, token=secrets.token_urlsafe(24)).start()
            agents.append(agent)
            say(f"agent for {e.name} at {agent.url}")
        a, b = agents

        def call(agent: AgentProcess, method: str, path: str, **kw: object) -> dict:
            r = requests.request(
                method,
                agent.url + path,
                headers={"Authorization": f"Bearer {agent.token}"},
                timeout=60,
                **kw,  # type: ignore[arg-type]
            )
            if r.status_code >= 400:
                raise SystemExit(f"{method} {path}: {r.status_code} {r.text}")
            return r.json() if "json" in r.headers.get("Content-Type", "") else {}

        name = "demo-data"
        say(f"creating volume {name} on host A with labels")
        vol = call(
            a,
            "POST",
            "/v1/volumes",
            json={
                "name": name,
                "labels": {"app": "demo", "owner": "ops"},
            },
        )
        root = Path(vol["mountpoint"])
        (root / "db").mkdir()
        (root / "db/table.dat").write_bytes(secrets.token_bytes(1 << 20))
        (root / "README").write_text("demo volume\n")
        r = requests.get(
            f"{a.url}/v1/volumes/{name}/manifest",
            headers={"Authorization": f"Bearer {a.token}"},
            timeout=60,
        )
        totals = json.loads(r.text.strip().splitlines()[-1])["totals"]
        say(f"manifest on A: {totals['entries']} entries, {totals['bytes']} bytes")
        say("recreating it on host B with the same driver, options and labels")
        created = call(
            b,
            "POST",
            "/v1/volumes",
            json={
                "name": vol["name"],
                "driver": vol["driver"],
                "driver_opts": vol["options"],
                "labels": vol["labels"],
            },
        )
        print(
            json.dumps({k: created[k] for k in ("name", "driver", "options", "labels")}, indent=2)
        )
        say(
            "volumes on B: "
            + ", ".join(v["name"] for v in call(b, "GET", "/v1/volumes")["volumes"])
        )
        say("done")
        return 0
    finally:
        for agent in agents:
            agent.stop()
        for e in engines:
            e.stop()


if __name__ == "__main__":
    sys.exit(main())
