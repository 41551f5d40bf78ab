"""API-key guards: `require_api_key` on every route (except `server.public_paths`), `require_admin_key` on admin ones.

Keys are read from the supervisor's current config on each request, so a SIGHUP reload rotates them. Comparison is
constant-time: both sides are hashed to equal length first and every configured key is compared.
"""

from __future__ import annotations

import hashlib
import hmac

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from appliance.config import ServerSpec
from appliance.errors import APIError


def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    server = _server_config(connection)
    keys = server.api_keys + server.admin_keys
    if not keys or is_public(connection.scope["path"], server.public_paths):
        return
    if not _matches(_bearer(connection), keys):
        raise APIError(401, "Invalid or missing API key; send it as 'Authorization: Bearer KEY'.",
                       code="invalid_api_key")


def require_admin_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    server = _server_config(connection)
    if not server.admin_keys:
        if server.api_keys:  # the API is protected, so an unprotected admin surface would be a hole
            raise APIError(403, "The admin routes are disabled: set server.admin_keys.", code="admin_disabled")
        return
    if not _matches(_bearer(connection), server.admin_keys):
        raise APIError(401, "Invalid or missing admin key.", code="invalid_api_key")


def is_public(path: str, public_paths: tuple[str, ...]) -> bool:
    """A path is public if listed, or under a listed path (`/ui` opens `/ui/static/app.js`)."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in public_paths)


def _server_config(connection: ASGIConnection) -> ServerSpec:
    return connection.app.state.supervisor.config.server


def _bearer(connection: ASGIConnection) -> str:
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    digest = hashlib.sha256(token.encode()).digest()
    found = False
    for key in keys:  # no early exit: the time taken does not tell which key, if any, matched
        found |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return found and bool(token)
