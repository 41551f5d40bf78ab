"""Operational routes: /health (liveness), /ready (every model ready), /version, and behind the admin key
/admin/models (per-model status, restarts, recent errors, replica pids, KV stats, config with secrets redacted) and
/admin/reload (reload the config file).

With the dashboard (`ui.enabled`), `STATS_ROUTES` adds /admin/stats (the live statistics of `appliance.stats`, one
JSON document) and /admin/stats/stream (the same, pushed as server-sent events); they accept the admin key or the
dashboard's session cookie."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromQuery, QueryParameter
from litestar.response import Stream

from appliance.auth import require_admin_key
from appliance.config import ConfigError
from appliance.errors import APIError
from appliance.fleet import memory_of
from appliance.stats import DEFAULT_RANGE_S, RANGES_S
from appliance.supervisor import ModelRuntime, Supervisor
from appliance.version import kvbox_version
from ui.session import SELF_AUTHENTICATED, require_admin_session, require_admin_session_for_changes

STREAM_INTERVAL_S = (0.25, 1.0, 5.0)  # the least, default and most seconds between two stats events


@get("/health", sync_to_thread=False)
def health() -> dict:
    return {"status": "ok"}


@get("/ready", sync_to_thread=False)
def ready(request: Request) -> Response:
    supervisor: Supervisor = request.app.state.supervisor
    is_ready = supervisor.is_ready and not supervisor.draining
    models = {name: model.status.value for name, model in supervisor.models.items()}
    return Response({"ready": is_ready, "models": models}, status_code=200 if is_ready else 503)


@get("/version", sync_to_thread=False)
def version() -> dict:
    return {"version": kvbox_version()}


@get("/admin/models", guards=[require_admin_key], sync_to_thread=False)
def admin_models(request: Request) -> dict:
    supervisor: Supervisor = request.app.state.supervisor
    configs = {spec["name"]: spec for spec in supervisor.config.redacted()["models"]}
    return {"draining": supervisor.draining,
            "models": [_status(model, configs.get(model.name)) for model in supervisor.models.values()]}


def _status(model: ModelRuntime, config: dict | None) -> dict:
    return {
        "name": model.name,
        "status": model.status.value,
        "started_at": model.started_at,
        "restarts": model.restarts,
        "last_wake": model.last_wake,  # unix time its engines last started after a sleep (null: never slept)
        "last_wake_s": model.last_wake_s,
        "sleep_level": model.sleep_level,  # while sleeping: 1 (weights in host memory) or 2 (engines stopped)
        "memory": memory_of(model),
        "num_inflight": model.num_inflight,
        "errors": [{"time": t, "message": message} for t, message in model.errors],
        "replicas": [{
            "replica": r.replica,
            "pid": r.pid,
            "alive": r.live,
            "num_inflight": r.num_inflight,
            "engine": msgspec.to_builtins(r.info),
            "stats": msgspec.to_builtins(r.stats),
        } for r in model.replicas],
        "config": config,
    }


# The dashboard's fleet card reloads with its session cookie (and CSRF header) too.
@post("/admin/reload", guards=[require_admin_session_for_changes], opt={SELF_AUTHENTICATED: True})
async def admin_reload(request: Request) -> dict:
    """Reloads the config file: added models start, removed ones stop, changed ones restart, the rest stay."""
    try:
        changes = await request.app.state.reload()
    except ConfigError as e:
        raise APIError(400, str(e), code="invalid_config") from None
    return {"reloaded": True, **changes}


ROUTES = [health, ready, version, admin_models, admin_reload]


@get("/admin/stats", guards=[require_admin_session], opt={SELF_AUTHENTICATED: True}, sync_to_thread=False)
def admin_stats(request: Request, range_s: Annotated[int, QueryParameter(query="range")] = DEFAULT_RANGE_S,
                charted: Annotated[str | None, QueryParameter(query="model")] = None) -> Response:
    """The snapshot, its charts covering `range` seconds (one of `RANGES_S`), of every model or only of `model`."""
    start = time.perf_counter()
    body = request.app.state.stats.snapshot_json(_range(range_s), charted)
    return Response(body, media_type="application/json", headers={
        "Cache-Control": "no-store", "Server-Timing": f"stats;dur={(time.perf_counter() - start) * 1000:.2f}"})


@get("/admin/stats/stream", guards=[require_admin_session], opt={SELF_AUTHENTICATED: True}, sync_to_thread=False)
def admin_stats_stream(request: Request, interval: FromQuery[float] = STREAM_INTERVAL_S[1],
                       range_s: Annotated[int, QueryParameter(query="range")] = DEFAULT_RANGE_S,
                       charted: Annotated[str | None, QueryParameter(query="model")] = None) -> Stream:
    """A snapshot every `interval` seconds until the client leaves or a drain has stopped every engine (the page
    shows the drain until then; an open stream must not hold up the server's exit)."""
    stats, supervisor = request.app.state.stats, request.app.state.supervisor
    interval = min(max(interval, STREAM_INTERVAL_S[0]), STREAM_INTERVAL_S[2])
    range_s = _range(range_s)

    async def events() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"  # EventSource reconnects after 2 s
        while not (supervisor.draining and not supervisor.models):
            yield b"data: " + stats.snapshot_json(range_s, charted) + b"\n\n"  # compact JSON: one line
            await asyncio.sleep(interval)

    return Stream(events(), media_type="text/event-stream",
                  headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _range(range_s: int) -> int:
    if range_s not in RANGES_S:
        raise APIError(400, f"range must be one of {', '.join(map(str, RANGES_S))} (seconds)", param="range")
    return range_s


STATS_ROUTES = [admin_stats, admin_stats_stream]
