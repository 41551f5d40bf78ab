"""One log format for every process of kvbox (the server, uvicorn's loggers, the engine processes): text lines, or
JSON lines (`--log-format json`) for log shippers.

The server's choice reaches the engine processes through the environment (`KVBOX_LOG_FORMAT`, `KVBOX_LOG_LEVEL`),
which they inherit, so that `configure_logging()` with no arguments there formats alike. An engine process also
sends its records to the server's log ring (the dashboard's log view) through the pipe that `KVBOX_LOG_FD` names
(`appliance.log_pipe`).
"""

from __future__ import annotations

import json
import logging
import os
import time

from appliance.log_pipe import ENV_FD, PipeHandler

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))  # structured fields, e.g. the access log's
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Sets the root logger's one handler; uvicorn's and litestar's loggers propagate to it."""
    level = level or os.environ.get("KVBOX_LOG_LEVEL", "info")
    fmt = fmt or os.environ.get("KVBOX_LOG_FORMAT", "text")
    os.environ["KVBOX_LOG_LEVEL"], os.environ["KVBOX_LOG_FORMAT"] = level, fmt
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if (fd := os.environ.pop(ENV_FD, None)) is not None:  # popped: the engine's own children have no such pipe
        root.addHandler(PipeHandler(int(fd)))
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
