"""GET /v1/models and /v1/models/{name}: every configured model, whatever its state (see /ready for that)."""

from __future__ import annotations

from litestar import Request, get

from appliance.openai.protocol import ModelCard, ModelList
from appliance.supervisor import ModelRuntime, Supervisor


@get("/v1/models", sync_to_thread=False)
def list_models(request: Request) -> ModelList:
    supervisor: Supervisor = request.app.state.supervisor
    return ModelList([_card(model) for model in supervisor.models.values()])


@get("/v1/models/{name:path}", sync_to_thread=False)
def retrieve_model(request: Request, name: str) -> ModelCard:
    # A path parameter because model names may contain "/" (org/model); litestar keeps the leading one.
    return _card(request.app.state.supervisor.get(name.removeprefix("/")))


def _card(model: ModelRuntime) -> ModelCard:
    info = model.info
    return ModelCard(id=model.name, created=int(model.started_at), root=model.spec.source,
                     max_model_len=info.max_model_len if info is not None else model.spec.max_model_len)
