"""Typed keys of the coordinator's application state (aiohttp `AppKey`)."""

from __future__ import annotations

from aiohttp import web

from migrator.orchestrator import Orchestrator
from migrator.settings import CoordinatorSettings
from migrator.store import Store

SETTINGS = web.AppKey("settings", CoordinatorSettings)
STORE = web.AppKey("store", Store)
ORCHESTRATOR = web.AppKey("orchestrator", Orchestrator)
