"""Sleep, wake and restart, behind the admin key: `POST /admin/models/{name}/sleep?level=1|2` (1: KV cache freed,
weights to host memory; 2: engines stopped), `POST /admin/models/{name}/wake` (or the model's next request),
`POST /admin/models/{name}/restart` (fresh engines); `appliance.fleet` does the work."""

from __future__ import annotations

from typing import Annotated

from litestar import Request, post
from litestar.params import Parameter

from appliance.auth import require_admin_key
from appliance.errors import APIError
from appliance.fleet import SleepError, memory_of
from appliance.openai.context import serving_context
from appliance.supervisor import ModelNotFoundError, ModelRuntime


def _model(request: Request, name: str) -> ModelRuntime:
    try:
        return serving_context(request).supervisor.get(name)
    except ModelNotFoundError:
        raise APIError(404, f"no model named {name!r}", param="name", code="model_not_found") from None


@post("/admin/models/{name:str}/sleep", guards=[require_admin_key], status_code=200)
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


@post("/admin/models/{name:str}/wake", guards=[require_admin_key], status_code=200)
async def admin_wake(request: Request, name: str) -> dict:
    model = _model(request, name)
    await serving_context(request).fleet.ensure_awake(model)
    return {"name": model.name, "status": model.status.value, "last_wake": model.last_wake,
            "memory": memory_of(model)}


@post("/admin/models/{name:str}/restart", guards=[require_admin_key], status_code=200)
async def admin_restart(request: Request, name: str) -> dict:
    model = _model(request, name)
    try:
        await serving_context(request).fleet.restart(model)
    except SleepError as e:
        raise APIError(e.status, str(e)) from None
    return {"name": model.name, "status": model.status.value, "memory": memory_of(model)}


ROUTES = [admin_sleep, admin_wake, admin_restart]
