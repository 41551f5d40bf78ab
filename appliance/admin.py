"""Operational routes: /health (liveness), /ready (every model ready), /version, and behind the admin key
/admin/models (per-model status, restarts, recent errors, replica pids, KV stats, config with secrets redacted) and
/admin/reload (reload the config file)."""

from __future__ import annotations

import importlib.metadata

import msgspec
from litestar import Request, Response, get, post

from appliance.auth import require_admin_key
from appliance.config import ConfigError
from appliance.errors import APIError
from appliance.supervisor import ModelRuntime, Supervisor


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
    try:
        return {"version": importlib.metadata.version("kvbox")}
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return {"version": "unknown"}


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
        "num_inflight": model.num_inflight,
        "errors": [{"time": t, "message": message} for t, message in model.errors],
        "replicas": [{
            "replica": r.replica,
            "pid": r.pid,
            "alive": r.info is not None and not r.dead.is_set(),
            "num_inflight": r.num_inflight,
            "engine": msgspec.to_builtins(r.info),
            "stats": msgspec.to_builtins(r.stats),
        } for r in model.replicas],
        "config": config,
    }


@post("/admin/reload", guards=[require_admin_key])
async def admin_reload(request: Request) -> dict:
    """Reloads the config file: added models start, removed ones stop, changed ones restart, the rest stay."""
    try:
        changes = await request.app.state.reload()
    except ConfigError as e:
        raise APIError(400, str(e), code="invalid_config") from None
    return {"reloaded": True, **changes}


ROUTES = [health, ready, version, admin_models, admin_reload]
