"""The OpenAPI document at GET /openapi.json (behind the API key like every route): litestar lists the routes, and
the request bodies, which handlers decode themselves (strictly, see `appliance.openai.strict`), are described from
their msgspec Structs by `msgspec.json.schema_components`: bounds, enums and `additionalProperties: false` included.

A route handler declares its body with `@post(..., operation_class=request_body(TheStruct))`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from appliance.version import kvbox_version
from typing import Any

import msgspec
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, Operation

PATH = "/openapi.json"
_REF = "#/components/schemas/{name}"


def request_body(type_: type[msgspec.Struct]) -> type[Operation]:
    """An Operation whose document names `type_` as the route's JSON request body."""

    class BodyOperation(Operation):
        body_type = type_

        def to_schema(self) -> dict[str, Any]:
            schema = super().to_schema()
            schema["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": _REF.format(name=type_.__name__)}}}}
            return schema

    return BodyOperation


@dataclass
class _Components(Components):
    """litestar replaces the components' schemas with those it generated: the bodies' join them when written."""

    body_schemas: dict[str, Any] = field(default_factory=dict)

    @property
    def _exclude_fields(self) -> set[str]:
        return {"body_schemas"}

    def to_schema(self) -> dict[str, Any]:
        schema = super().to_schema()
        schema["schemas"] = {**schema.get("schemas", {}), **self.body_schemas}
        return schema


def openapi_config(handlers: Iterable[Any]) -> OpenAPIConfig:
    """The document's config: its path, and the schemas of every body that `handlers` declare."""
    bodies = [t for h in handlers if (t := getattr(getattr(h, "operation_class", None), "body_type", None))]
    _, schemas = msgspec.json.schema_components(bodies, ref_template=_REF)
    return OpenAPIConfig(title="kvbox", version=kvbox_version(), path="/",
                         render_plugins=[JsonRenderPlugin(path=PATH)], components=_Components(body_schemas=schemas),
                         create_examples=False)
