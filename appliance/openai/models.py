"""GET /v1/models and /v1/models/{name}: every configured model, whatever its state (see /ready for that), and each
model's LoRA adapters with the model as their `parent` (as vLLM lists them)."""

from __future__ import annotations

from litestar import Request, get

from appliance.openai.context import serving_context
from appliance.openai.protocol import ModelCard, ModelList
from appliance.supervisor import ModelRuntime


@get("/v1/models", sync_to_thread=False)
def list_models(request: Request) -> ModelList:
    supervisor = serving_context(request).supervisor
    return ModelList([card for model in supervisor.models.values()
                      for card in [_card(model), *(_card(model, name) for name in model.adapters)]])


@get("/v1/models/{name:path}", sync_to_thread=False)
def retrieve_model(request: Request, name: str) -> ModelCard:
    # A path parameter because model names may contain "/" (org/model); litestar keeps the leading one.
    model, adapter = serving_context(request).supervisor.resolve(name.removeprefix("/"))
    return _card(model, adapter)


def _card(model: ModelRuntime, adapter: str | None = None) -> ModelCard:
    info = model.info
    max_model_len = info.max_model_len if info is not None else model.spec.max_model_len
    if adapter is not None:
        return ModelCard(id=adapter, created=int(model.started_at), root=adapter,  # no server paths to API users
                         max_model_len=max_model_len, parent=model.name)
    return ModelCard(id=model.name, created=int(model.started_at), root=model.spec.source, max_model_len=max_model_len)
