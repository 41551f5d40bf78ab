"""The dashboard's pages under `ui.path` (default `/ui`): the dashboard, its login form, logout and static assets.

The page is rendered on the server by a sandboxed, autoescaping jinja2 environment from the same snapshot that
`GET /admin/stats` returns, embedded as JSON; `static/dashboard.js` then keeps it live from
`GET /admin/stats/stream` (server-sent events), falling back to polling `GET /admin/stats`. The LoRA card loads and
unloads adapters through the admin API (`/admin/models/{model}/loras`) with the session cookie and the
`X-Kvbox-Dashboard: 1` header that cookie-authenticated changes need. The log view (`static/logs.js`) polls
`GET /admin/logs` the same way; the playground (`static/playground.js`) calls the public API with the key the
operator types into it (the session cookie opens no `/v1` route). No build step, no CDN:
the assets are the files in `static/`, served from the installed package. This module knows the stats' shape, not
the engine: it reads `app.state.stats` (the appliance's `StatsHub`) and the supervisor's redacted config.

Every page carries a strict Content-Security-Policy (own scripts and styles only, no inline script) and may not be
framed.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import mimetypes
from typing import Any

import yaml
from jinja2 import PackageLoader, StrictUndefined, select_autoescape
from jinja2.sandbox import ImmutableSandboxedEnvironment
from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie
from litestar.enums import MediaType
from litestar.params import FromPath
from litestar.response import Redirect

from appliance.errors import APIError
from ui import session

STATS_PATH = "/admin/stats"
LOGS_PATH = "/admin/logs"  # the log view (static/logs.js)
CHAT_PATH = "/v1/chat/completions"  # the playground (static/playground.js), with the key the operator types
STREAM_PATH = "/admin/stats/stream"
LORAS_PATH = "/admin/models/{model}/loras"  # the LoRA card's load (POST) and, + "/{name}", unload (DELETE)
FAILED_LOGIN_DELAY_S = 0.5  # slows down guessing; the keys themselves should be long and random
_SELF = {session.SELF_AUTHENTICATED: True}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_env = ImmutableSandboxedEnvironment(loader=PackageLoader("ui", "templates"),
                                     autoescape=select_autoescape(default=True), undefined=StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True)


def _load_static() -> dict[str, tuple[bytes, str, str]]:
    """name -> (content, media type, version), read once from the package."""
    files = {}
    for entry in importlib.resources.files("ui").joinpath("static").iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            content = entry.read_bytes()
            media_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if media_type.startswith("text/") or media_type.endswith(("javascript", "json")):
                media_type += "; charset=utf-8"
            files[entry.name] = (content, media_type, hashlib.sha256(content).hexdigest()[:12])
    return files


_STATIC = _load_static()


def ui_router(path: str) -> Router:
    base = path.rstrip("/") or ""

    def static_url(name: str) -> str:
        return f"{base}/static/{name}?v={_STATIC[name][2]}"

    def page(template: str, status_code: int = 200, cookies: list[Cookie] | None = None, **context: Any) -> Response:
        html = _env.get_template(template).render(base=base, static=static_url, **context)
        return Response(html, media_type=MediaType.HTML, status_code=status_code, headers=_HEADERS, cookies=cookies)

    @get("/", opt=_SELF, sync_to_thread=False, include_in_schema=False)
    def dashboard(request: Request) -> Response:
        allowed = session.access(request)
        if allowed == "login":
            return Redirect(f"{base}/login", status_code=303, headers=_HEADERS)
        if allowed == "disabled":
            return page("disabled.html", status_code=403)
        snapshot = request.app.state.stats.snapshot()
        specs = {spec["name"]: spec for spec in request.app.state.supervisor.config.redacted()["models"]}
        configs = {name: yaml.safe_dump(spec, sort_keys=False, default_flow_style=False, allow_unicode=True)
                   for name, spec in specs.items()}
        boot = {"stats_url": STATS_PATH, "stream_url": STREAM_PATH, "login_url": f"{base}/login",
                "loras_url": LORAS_PATH, "csrf_header": session.CSRF_HEADER, "snapshot": snapshot}
        return page("dashboard.html", models=snapshot["models"], configs=configs, boot=boot,
                    can_logout=allowed == "ok" and session.has_session(request), logs_url=LOGS_PATH,
                    playground=_playground(request.app.state.supervisor.config, snapshot))

    @get("/login", opt=_SELF, sync_to_thread=False, include_in_schema=False)
    def login_form(request: Request) -> Response:
        if session.access(request) in ("ok", "open"):
            return Redirect(base or "/", status_code=303, headers=_HEADERS)
        return page("login.html", error=None)

    @post("/login", opt=_SELF, include_in_schema=False)
    async def login(request: Request) -> Response:
        server = request.app.state.supervisor.config.server
        form = await request.form()
        given = form.get("key", "")
        key = session.matching_key(given if isinstance(given, str) else "", server.admin_keys)
        if key is None:
            await asyncio.sleep(FAILED_LOGIN_DELAY_S)
            message = "That is not an admin key." if server.admin_keys else "This server has no admin keys."
            return page("login.html", status_code=401, error=message)
        cookie = Cookie(key=session.COOKIE_NAME, value=session.make_token(key), max_age=session.SESSION_TTL_S,
                        path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return Redirect(base or "/", status_code=303, headers=_HEADERS, cookies=[cookie])

    @post("/logout", opt=_SELF, sync_to_thread=False, include_in_schema=False)
    def logout() -> Response:
        cookie = Cookie(key=session.COOKIE_NAME, value="", max_age=0, path="/", httponly=True, samesite="strict")
        return Redirect(f"{base}/login", status_code=303, headers=_HEADERS, cookies=[cookie])

    @get("/static/{name:str}", opt=_SELF, sync_to_thread=False, include_in_schema=False)
    def static(name: FromPath[str]) -> Response:
        found = _STATIC.get(name)
        if found is None:
            raise APIError(404, f"no such file {name!r}")
        content, media_type, _ = found
        # URLs carry the content's hash (?v=), so a cached copy is never stale.
        return Response(content, media_type=media_type, headers={
            "Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})

    return Router(path=base or "/", route_handlers=[dashboard, login_form, login, logout, static])


def _playground(config, snapshot: dict) -> dict:
    """What the playground can chat with (generating models and their adapters) and whether it needs an API key."""
    generating = {m.name for m in config.models if m.task == "generate"}
    names = [name for m in snapshot["models"] if m["name"] in generating
             for name in (m["name"], *(a["name"] for a in m["lora"].get("adapters", ())))]
    return {"models": names, "chat_url": CHAT_PATH, "needs_key": bool(config.server.api_keys or config.server.admin_keys)}
