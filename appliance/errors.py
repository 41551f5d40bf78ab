"""Every failure as OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, with its HTTP status.

`to_api_error` is the one mapping from exceptions (ours, the engine's, the supervisor's, litestar's) to `APIError`;
the exception handler uses it for plain responses and the streaming code for the error event that ends a stream.
Unexpected exceptions become a 500 that says nothing about internals; their traceback goes to the log.
"""

from __future__ import annotations

import logging

from litestar import Request, Response
from litestar.exceptions import HTTPException

from appliance.engines import EngineDeadError
from appliance.openai.protocol import ErrorBody, ErrorDetail
from appliance.supervisor import ModelNotFoundError, ModelUnavailableError
from engine.sampling_params import InvalidParameterError

logger = logging.getLogger("kvbox.api")

# Seconds a client should wait before retrying: a full queue drains fast, a restarting engine takes a while.
RETRY_QUEUE_FULL_S = 1
RETRY_UNAVAILABLE_S = 5

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None, allow: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.allow = allow  # a 405's methods, for its Allow header

    @classmethod
    def invalid(cls, param: str | None, message: str) -> APIError:
        return cls(400, message, param=param)

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")


def to_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidParameterError):
        return APIError.invalid(exc.param, exc.message)
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, f"The model `{exc.args[0]}` does not exist.", param="model", code="model_not_found")
    if isinstance(exc, ModelUnavailableError):
        return APIError(503, f"{exc}; retry later", code="model_unavailable", retry_after=RETRY_UNAVAILABLE_S)
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"{exc}; retry later", code="engine_unavailable", retry_after=RETRY_UNAVAILABLE_S)
    if isinstance(exc, HTTPException):
        allow = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow")
        return APIError(exc.status_code, exc.detail, code="request_too_large" if exc.status_code == 413 else None,
                        allow=allow)
    logger.error("unhandled error", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


def error_body(error: APIError) -> ErrorBody:
    return ErrorBody(ErrorDetail(error.message, error.type, error.param, error.code))


def handle_exception(request: Request, exc: Exception) -> Response:
    error = to_api_error(exc)
    if error.status >= 500:
        logger.warning("request %s: answered %d: %s", request.state.get("request_id"), error.status, error.message)
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if error.allow is not None:
        headers["Allow"] = error.allow
    return Response(error_body(error), status_code=error.status, headers=headers or None)
