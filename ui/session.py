"""The dashboard's login: an admin key typed once into a form, remembered by an HttpOnly, SameSite=Strict cookie.

A browser sends no `Authorization` header on page loads, nor from `EventSource`, so the dashboard and the stats
routes accept either the admin key as a Bearer token (curl, scripts) or this cookie. The cookie holds no key: it is
`EXPIRES.SIGNATURE`, the signature an HMAC-SHA256 of the expiry time under the admin key that logged in. Checking it
recomputes the signature under every configured admin key and compares each in constant time, so rotating the keys
(a SIGHUP reload) ends every session, and the server keeps no session state.

When no admin key is configured the dashboard follows the admin routes' rule: open if the API has no keys either,
refused (403) if it has.

CSRF: besides SameSite=Strict, a state-changing request (not GET/HEAD/OPTIONS) authenticated by the cookie alone must
carry `X-Kvbox-Dashboard: 1` (`require_admin_session_for_changes`), a header a cross-site form cannot send and a
cross-site fetch could only send after a CORS preflight. Bearer admin keys need no such header.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Literal

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from appliance.auth import require_admin_key
from appliance.errors import APIError

COOKIE_NAME = "kvbox_dashboard"
SESSION_TTL_S = 12 * 3600
# Handlers whose `opt` sets this do their own authentication (admin key or session cookie, or none for the login
# page and static assets); the app-wide API-key guard leaves them alone.
SELF_AUTHENTICATED = "kvbox_self_authenticated"
# The header the dashboard's own scripts send with cookie-authenticated changes (see the module's docstring).
CSRF_HEADER = "X-Kvbox-Dashboard"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Guard = Callable[[ASGIConnection, BaseRouteHandler], None]


def skip_self_authenticated(guard: Guard) -> Guard:
    """Wraps the app-wide API-key guard so that it passes over the dashboard's self-authenticated handlers."""

    def guarded(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        if not handler.opt.get(SELF_AUTHENTICATED):
            guard(connection, handler)

    return guarded


def require_admin_session(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """The admin key as a Bearer token or a valid session cookie; else the admin routes' 401 or 403."""
    if not has_session(connection):
        require_admin_key(connection, handler)


def require_admin_session_for_changes(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Like `require_admin_session`, but a state-changing request authenticated by the cookie alone must also carry
    `X-Kvbox-Dashboard: 1` (else 403); a Bearer admin key needs no header."""
    if has_session(connection) and (connection.scope.get("method", "GET") in _SAFE_METHODS
                                    or connection.headers.get(CSRF_HEADER) == "1"):
        return
    try:
        require_admin_key(connection, handler)
    except APIError:
        if has_session(connection):
            raise APIError(403, f"A change through the dashboard's session needs the header '{CSRF_HEADER}: 1'.",
                           code="csrf_header_missing") from None
        raise


def access(connection: ASGIConnection) -> Literal["open", "ok", "login", "disabled"]:
    """What a page load of the dashboard gets: no keys at all (open), a valid session or admin key (ok), the login
    form, or a refusal because only API keys are configured (disabled)."""
    server = connection.app.state.supervisor.config.server
    if not server.admin_keys:
        return "disabled" if server.api_keys else "open"
    if has_session(connection) or matching_key(_bearer(connection), server.admin_keys) is not None:
        return "ok"
    return "login"


def has_session(connection: ASGIConnection) -> bool:
    keys = connection.app.state.supervisor.config.server.admin_keys
    token = connection.cookies.get(COOKIE_NAME)
    return bool(keys and token) and token_is_valid(token, keys)


def matching_key(given: str, keys: tuple[str, ...]) -> str | None:
    """The configured key equal to `given`, compared in constant time (hashed to equal length, every key compared,
    no early exit)."""
    digest = hashlib.sha256(given.encode()).digest()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest()):
            found = key
    return found if given else None


def make_token(key: str, now: float | None = None, ttl_s: int = SESSION_TTL_S) -> str:
    expires = int(now if now is not None else time.time()) + ttl_s
    return f"{expires}.{_sign(key, expires)}"


def token_is_valid(token: str, keys: tuple[str, ...], now: float | None = None) -> bool:
    expires, _, signature = token.partition(".")
    if not expires.isdigit() or len(expires) > 12 or int(expires) < (now if now is not None else time.time()):
        return False
    signature_bytes = signature.encode("ascii", "replace")
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(signature_bytes, _sign(key, int(expires)).encode())
    return valid


def _sign(key: str, expires: int) -> str:
    return hmac.new(key.encode(), f"kvbox-dashboard-session:{expires}".encode(), hashlib.sha256).hexdigest()


def _bearer(connection: ASGIConnection) -> str:
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
