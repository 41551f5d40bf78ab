"""The access log (logger `kvbox.access`): one line per HTTP request when its response ends, with the request id,
method, path, status and latency, and for generation requests the model, adapter and prompt/output tokens, which the
request path adds with `note()`. Scrapes, probes and the dashboard's polling (`quiet_paths`) stay out of it unless
they fail, so that the log shows traffic rather than monitoring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextvars import ContextVar

from litestar.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("kvbox.access")
# The fields of the request being handled; a dict shared with copies of the context (streams, worker threads).
_fields: ContextVar[dict | None] = ContextVar("kvbox_access_fields", default=None)
ResponseHook = Callable[[str, str, int, dict], None]


def note(**fields) -> None:
    """Adds fields to the current request's access line (nothing outside a request)."""
    current = _fields.get()
    if current is not None:
        current.update(fields)


def access_log_middleware(quiet_paths: frozenset[str], on_response: ResponseHook | None = None):
    """`on_response(request id, path, status, fields)` also sees every response that is logged (the dashboard's
    request table and status counts)."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started, fields = time.perf_counter(), {}
            _fields.set(fields)
            status = [0]

            async def capture(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, capture)
            finally:
                if status[0] >= 400 or scope["path"] not in quiet_paths:
                    _log(scope, status[0] or 500, time.perf_counter() - started, fields)
                    if on_response is not None:
                        on_response(scope.get("state", {}).get("request_id", "-"), scope["path"], status[0] or 500,
                                    fields)

        return middleware

    return wrap


def _log(scope: Scope, status: int, seconds: float, fields: dict) -> None:
    request_id = scope.get("state", {}).get("request_id", "-")
    extra = "".join(f" {k}={v}" for k, v in fields.items() if v is not None)
    record = {"request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
              "latency_ms": round(seconds * 1000, 1), **fields}
    logger.info("%s %s %s %d %.0f ms%s", request_id, scope["method"], scope["path"], status, seconds * 1000, extra,
                extra={"fields": record})
