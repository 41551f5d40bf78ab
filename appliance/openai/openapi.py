"""The OpenAPI document at GET /openapi.json (behind the API key like every route): litestar lists the routes, and
the request bodies, which handlers decode themselves (strictly, see `appliance.openai.strict`), are described from
their msgspec Structs by `msgspec.json.schema_components`: bounds, enums and `additionalProperties: false` included.

A route handler declares its body with `@post(..., operation_class=request_body(TheStruct))`.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import version
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


def openapi_config(handlers: Iterable[Any]) -> OpenAPIConfig:
    """The document's config: its path, and the schemas of every body that `handlers` declare."""
    bodies = [t for h in handlers if (t := getattr(getattr(h, "operation_class", None), "body_type", None))]
    _, schemas = msgspec.json.schema_components(bodies, ref_template=_REF)
    return OpenAPIConfig(title="kvbox", version=version("kvbox"), path="/",
                         render_plugins=[JsonRenderPlugin(path=PATH)], components=Components(schemas=schemas),
                         create_examples=False)
