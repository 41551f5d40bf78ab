"""LoRA adapters at run time, behind the admin key.

vLLM-compatible: POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST /v1/unload_lora_adapter
{"lora_name"}; with several base models an optional "base_model" says which (needed only when ambiguous).
The admin API: GET/POST /admin/models/{model}/loras ({"name", "path"}) and DELETE /admin/models/{model}/loras/{name};
these also accept the dashboard's session cookie (`ui.session.require_admin_session_for_changes`: changes need its
`X-Kvbox-Dashboard: 1` header too), which is how the dashboard's LoRA card loads and unloads adapters.

Every change applies to all data-parallel replicas or to none (`Supervisor.load_lora` rolls back); loading under a
served name replaces the adapter atomically (running requests finish on the old version). Paths, symlinks resolved,
must lie inside the model's `lora.allowed_dirs`.
"""

from __future__ import annotations

import msgspec
from litestar import Request, Response, delete, get, post

from appliance.auth import require_admin_key
from appliance.errors import RETRY_UNAVAILABLE_S, APIError
from appliance.openai.context import serving_context
from appliance.openai.openapi import request_body
from appliance.openai.protocol import AdminLoadLora, LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from appliance.openai.strict import decode
from appliance.supervisor import LoraError, ModelRuntime, Supervisor
from ui.session import SELF_AUTHENTICATED, require_admin_session_for_changes

# The admin routes also accept the dashboard's session cookie (changes only with its CSRF header), so they do their own
# authentication: the app-wide API-key guard passes over them, as over the stats routes.
_ADMIN = {"guards": [require_admin_session_for_changes], "opt": {SELF_AUTHENTICATED: True}}


def _supervisor(request: Request) -> Supervisor:
    return serving_context(request).supervisor


def _base_model(supervisor: Supervisor, base_model: str | None, lora_name: str) -> ModelRuntime:
    """The named base model; else the one already serving `lora_name`; else the only model with LoRA enabled."""
    if base_model is not None:
        model = supervisor.models.get(base_model)
        if model is None:
            raise APIError(404, f"The model `{base_model}` does not exist.", param="base_model",
                           code="model_not_found")
        return model
    owner = next((m for m in supervisor.models.values() if lora_name in m.adapters), None)
    if owner is not None:
        return owner
    enabled = [m for m in supervisor.models.values() if m.spec.lora.enabled]
    if len(enabled) == 1:
        return enabled[0]
    if not enabled:
        raise APIError.invalid("base_model", "LoRA is not enabled for any model (set lora.enabled in the config)")
    raise APIError.invalid("base_model", f"several models serve LoRA adapters ({', '.join(m.name for m in enabled)}); "
                                         f"name one as base_model")


def _api_error(e: LoraError) -> APIError:
    return APIError(e.status, e.message, param=e.param, code="lora_adapter_not_found" if e.status == 404 else None,
                    retry_after=RETRY_UNAVAILABLE_S if e.status == 503 else None)


def _listing(model: ModelRuntime) -> dict:
    """The adapters served, with the engine's usage counters (from the first live replica that reported them)."""
    infos = {}
    for replica in model.replicas:
        if replica.live:
            infos = {info.name: info for info in replica.loras}
            break
    loras = []
    for name, path in model.adapters.items():
        entry = {"name": name, "path": path}
        if (info := infos.get(name)) is not None:
            entry.update(msgspec.to_builtins(info))
        loras.append(entry)
    return {"model": model.name, "enabled": model.spec.lora.enabled, "max_loras": model.spec.lora.max_loras,
            "max_lora_rank": model.spec.lora.max_lora_rank, "max_cpu_loras": model.spec.lora.max_cpu_loras,
            "loras": loras}


async def _load(supervisor: Supervisor, model: ModelRuntime, name: str, path: str) -> None:
    try:
        await supervisor.load_lora(model, name, path)
    except LoraError as e:
        raise _api_error(e) from None


async def _unload(supervisor: Supervisor, model: ModelRuntime, name: str) -> None:
    try:
        await supervisor.unload_lora(model, name)
    except LoraError as e:
        raise _api_error(e) from None


# ---- vLLM-compatible ----
@post("/v1/load_lora_adapter", guards=[require_admin_key], status_code=200,
      operation_class=request_body(LoadLoraAdapterRequest))
async def load_lora_adapter(request: Request) -> Response:
    req = decode(await request.body(), LoadLoraAdapterRequest)
    supervisor = _supervisor(request)
    await _load(supervisor, _base_model(supervisor, req.base_model, req.lora_name), req.lora_name, req.lora_path)
    return Response(f"Success: LoRA adapter '{req.lora_name}' added successfully.", media_type="text/plain")


@post("/v1/unload_lora_adapter", guards=[require_admin_key], status_code=200,
      operation_class=request_body(UnloadLoraAdapterRequest))
async def unload_lora_adapter(request: Request) -> Response:
    req = decode(await request.body(), UnloadLoraAdapterRequest)
    supervisor = _supervisor(request)
    model = _base_model(supervisor, req.base_model, req.lora_name)
    await _unload(supervisor, model, req.lora_name)
    return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.", media_type="text/plain")


# ---- admin API ----
@get("/admin/models/{model:str}/loras", **_ADMIN, sync_to_thread=False)
def admin_list_loras(request: Request, model: str) -> dict:
    return _listing(_supervisor(request).get(model))


@post("/admin/models/{model:str}/loras", **_ADMIN, status_code=200, operation_class=request_body(AdminLoadLora))
async def admin_load_lora(request: Request, model: str) -> dict:
    req = decode(await request.body(), AdminLoadLora)
    supervisor = _supervisor(request)
    runtime = supervisor.get(model)
    await _load(supervisor, runtime, req.name, req.path)
    return _listing(runtime)


@delete("/admin/models/{model:str}/loras/{name:str}", **_ADMIN, status_code=200)
async def admin_unload_lora(request: Request, model: str, name: str) -> dict:
    supervisor = _supervisor(request)
    runtime = supervisor.get(model)
    await _unload(supervisor, runtime, name)
    return _listing(runtime)


ROUTES = [load_lora_adapter, unload_lora_adapter, admin_list_loras, admin_load_lora, admin_unload_lora]
