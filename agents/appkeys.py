"""Typed keys of the agent's application state (aiohttp `AppKey`), shared by app and views."""

from __future__ import annotations

from aiohttp import web

from agents.docker_volumes import DockerVolumes
from agents.pulls import PullManager
from agents.settings import AgentSettings

SETTINGS = web.AppKey("settings", AgentSettings)
VOLUMES = web.AppKey("volumes", DockerVolumes)
PULLS = web.AppKey("pulls", PullManager)
