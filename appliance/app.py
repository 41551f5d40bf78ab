"""create_app(config, supervisor) -> the Litestar app: routes, API-key guard, request ids, error handling, metrics,
lifespan.

The supervisor is the app's view of the models, whatever runs their engines: engine processes (`Supervisor(config)`,
what `kvbox serve` uses) or engines on threads of this process (`Supervisor(config, engine_factory=
InProcessEngineClient)`, for tests and embedding). The app holds no config of its own beyond what must be fixed at
build time (body size limit, metrics path, CORS): handlers read `supervisor.config`, which a reload replaces, so keys
and limits follow SIGHUP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State

from appliance import admin, admin_fleet, admin_logs
from appliance.access_log import access_log_middleware
from appliance.auth import require_api_key
from appliance.config import AppConfig
from appliance.errors import handle_exception
from appliance.fleet import Fleet
from appliance.metrics import Metrics, metrics_route
from appliance.openai.context import ServingContext
from appliance.openai.openapi import openapi_config
from appliance.openai.routes import ROUTES
from appliance.request_ids import request_id_middleware
from appliance.stats import StatsHub
from appliance.supervisor import Supervisor
from ui.routes import ui_router
from ui.session import skip_self_authenticated


def create_app(config: AppConfig, supervisor: Supervisor) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Models load in the background so that /health answers at once; /ready turns 200 when they are loaded.
        app.state.startup = asyncio.create_task(supervisor.start(), name="supervisor-start")
        serving.fleet.start()
        tasks = [app.state.startup]
        if serving.stats is not None:  # the dashboard's once-a-second sampler
            tasks.append(asyncio.create_task(serving.stats.run(), name="stats-sampler"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await serving.fleet.stop()
            await supervisor.stop()

    routes = [*ROUTES, *admin.ROUTES, *admin_fleet.ROUTES]
    serving = ServingContext(supervisor, Metrics(supervisor), fleet=Fleet(supervisor))
    supervisor.on_step = serving.metrics.on_step
    if config.metrics.enabled:
        routes.append(metrics_route(config.metrics.path, serving.metrics))
    if config.ui.enabled:
        # The dashboard's statistics, fed by every engine step; its routes check the admin key or its own cookie.
        stats = serving.stats = StatsHub(supervisor)
        metrics_on_step = serving.metrics.on_step

        def on_step(model_name: str, replica_index: int, message) -> None:
            metrics_on_step(model_name, replica_index, message)
            stats.on_step(model_name, replica_index, message)

        supervisor.on_step = on_step
        admin_logs.attach_ring(config)  # the log view's ring, fed by this process and the engine processes
        routes += [*admin.STATS_ROUTES, *admin_logs.ROUTES, ui_router(config.ui.path)]
    # The supervisor and the statistics also on their own: the API-key guard and the dashboard read them.
    state = {"supervisor": supervisor, "serving": serving, "stats": serving.stats}
    origins = config.server.cors.allow_origins
    return Litestar(
        route_handlers=routes,
        guards=[skip_self_authenticated(require_api_key)],
        exception_handlers={Exception: handle_exception},
        middleware=[request_id_middleware, access_log_middleware(
            _quiet_paths(config), serving.stats.on_http if serving.stats is not None else None)],
        request_max_body_size=config.server.max_body_bytes,
        cors_config=CORSConfig(allow_origins=list(origins)) if origins else None,
        lifespan=[lifespan],
        state=State(state),
        openapi_config=openapi_config(routes),
        logging_config=None,  # the server configures logging; litestar's default would replace its format
    )


def _quiet_paths(config: AppConfig) -> frozenset[str]:
    """Monitoring that polls: kept out of the access log unless it fails."""
    return frozenset({config.metrics.path, "/health", "/ready", "/admin/stats", "/admin/stats/stream",
                      admin_logs.LOGS_PATH})
