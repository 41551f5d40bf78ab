"""create_app(config, supervisor) -> the Litestar app: routes, API-key guard, error handling, metrics, lifespan.

The app holds no config of its own beyond what must be fixed at build time (body size limit, metrics path, CORS):
handlers read `supervisor.config`, which a reload replaces, so keys and limits follow SIGHUP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State

from appliance import admin, openai
from appliance.auth import require_api_key
from appliance.config import AppConfig
from appliance.errors import handle_exception
from appliance.metrics import Metrics, metrics_route
from appliance.openai import lora
from appliance.openai.serving import Admission
from appliance.stats import StatsHub
from appliance.supervisor import Supervisor
from ui.routes import ui_router
from ui.session import skip_self_authenticated


def create_app(config: AppConfig, supervisor: Supervisor) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Models load in the background so that /health answers at once; /ready turns 200 when they are loaded.
        app.state.startup = asyncio.create_task(supervisor.start(), name="supervisor-start")
        try:
            yield
        finally:
            app.state.startup.cancel()
            await asyncio.gather(app.state.startup, return_exceptions=True)
            await supervisor.stop()

    routes = [*openai.ROUTES, *admin.ROUTES, *lora.ROUTES]
    if config.metrics.enabled:
        routes.append(metrics_route(config.metrics.path))
    state = {"supervisor": supervisor, "metrics": Metrics(supervisor), "admission": Admission()}
    if config.ui.enabled:
        # The dashboard's statistics, fed by every engine step; its routes check the admin key or its own cookie.
        state["stats"] = StatsHub(supervisor)
        supervisor.on_step = state["stats"].on_step
        routes += [*admin.STATS_ROUTES, ui_router(config.ui.path)]
    origins = config.server.cors.allow_origins
    return Litestar(
        route_handlers=routes,
        guards=[skip_self_authenticated(require_api_key)],
        exception_handlers={Exception: handle_exception},
        request_max_body_size=config.server.max_body_bytes,
        cors_config=CORSConfig(allow_origins=list(origins)) if origins else None,
        lifespan=[lifespan],
        state=State(state),
        openapi_config=None,
        logging_config=None,  # the server configures logging; litestar's default would replace its format
    )
