"""One id per HTTP request, from the client's `X-Request-Id` header or made here, echoed in the response's header.

The same id names the request everywhere: the response's `id` (`cmpl-<id>`, `chatcmpl-<id>`), its engine requests
(`<id>-<prompt index>`, so that one grep finds every prompt's lines) and the log lines about it. A client's id must
be 1 to 128 of A-Z a-z 0-9 . _ : - (it reaches log lines and engine ids, so nothing that could forge either).
"""

from __future__ import annotations

import re
import uuid

from litestar import Request
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.errors import APIError

HEADER = "X-Request-Id"
_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(request: Request) -> str:
    return request.state.request_id


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        if given is None:
            request_id = uuid.uuid4().hex
        else:
            request_id = given.decode("latin-1")
            if not _VALID.fullmatch(request_id):
                raise APIError.invalid(HEADER, f"{HEADER} must be 1 to 128 of A-Z a-z 0-9 . _ : -")
        scope.setdefault("state", {})["request_id"] = request_id
        echo = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), echo]
            await send(message)

        await app(scope, receive, send_with_id)

    return middleware
