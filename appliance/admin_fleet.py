"""Sleep, wake and restart, behind the admin key or the dashboard's session: `POST /admin/models/{name}/sleep?level=1|2`
(1: KV cache freed, weights to host memory; 2: engines stopped), `POST /admin/models/{name}/wake` (or the model's
next request), `POST /admin/models/{name}/restart` (fresh engines), and `GET /admin/fleet`, every model's state and
memory (the dashboard's fleet card); `appliance.fleet` does the work."""

from __future__ import annotations

from typing import Annotated

from litestar import Request, get, post
from litestar.params import Parameter

from appliance.errors import APIError
from appliance.fleet import SleepError, memory_of
from appliance.openai.context import serving_context
from appliance.supervisor import ModelNotFoundError, ModelRuntime
from ui.session import SELF_AUTHENTICATED, require_admin_session_for_changes

# A change through the dashboard's session cookie needs its CSRF header, as the LoRA routes do.
_ADMIN = {"guards": [require_admin_session_for_changes], "opt": {SELF_AUTHENTICATED: True}}


def _model(request: Request, name: str) -> ModelRuntime:
    try:
        return serving_context(request).supervisor.get(name)
    except ModelNotFoundError:
        raise APIError(404, f"no model named {name!r}", param="name", code="model_not_found") from None


@post("/admin/models/{name:str}/sleep", status_code=200, **_ADMIN)
async def admin_sleep(request: Request, name: str,
                      level: Annotated[int, Parameter(query="level", description="1 or 2")] = 2) -> dict:
    model = _model(request, name)
    if level not in (1, 2):  # checked here so that the error names its parameter
        raise APIError(400, f"sleep level {level}: 1 or 2", param="level")
    try:
        await serving_context(request).fleet.sleep(model, level)
    except SleepError as e:
        raise APIError(e.status, str(e), param="level" if e.status == 400 else None) from None
    return {"name": model.name, "status": model.status.value, "sleep_level": model.sleep_level,
            "memory": memory_of(model)}


@post("/admin/models/{name:str}/wake", status_code=200, **_ADMIN)
async def admin_wake(request: Request, name: str) -> dict:
    model = _model(request, name)
    await serving_context(request).fleet.ensure_awake(model)
    return {"name": model.name, "status": model.status.value, "last_wake": model.last_wake,
            "memory": memory_of(model)}


@post("/admin/models/{name:str}/restart", status_code=200, **_ADMIN)
async def admin_restart(request: Request, name: str) -> dict:
    model = _model(request, name)
    try:
        await serving_context(request).fleet.restart(model)
    except SleepError as e:
        raise APIError(e.status, str(e)) from None
    return {"name": model.name, "status": model.status.value, "memory": memory_of(model)}


@get("/admin/fleet", sync_to_thread=False, **_ADMIN)
def admin_fleet(request: Request) -> dict:
    return {"models": [{
        "name": m.name, "status": m.status.value, "sleep_level": m.sleep_level, "restarts": m.restarts,
        "last_wake": m.last_wake, "last_wake_s": m.last_wake_s, "memory": memory_of(m),
    } for m in serving_context(request).supervisor.models.values()]}


ROUTES = [admin_sleep, admin_wake, admin_restart, admin_fleet]
