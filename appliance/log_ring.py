"""The dashboard's log view: the last `RING_LINES` log lines of the server and its engine processes, kept in memory
in a bounded ring with secrets redacted before they are stored, read by `GET /admin/logs`.

Redaction removes what looks like a credential (`Authorization` headers, Bearer tokens, `sk-...` keys,
`api_key=...`-style assignments) and every value the config marks secret (API and admin keys), which the app
registers with `remember_secrets` at start and on each read; a key once registered stays redacted after a reload
rotates it out.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from typing import Any

RING_LINES = 2000
MAX_MESSAGE_CHARS = 4000  # a traceback longer than this is cut; the terminal's stream has it whole
LEVELS = ("debug", "info", "warning", "error", "critical")
REDACTED = "***"
_PATTERNS = [
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(?:(bearer|basic)\s+)?[^\s\"',;}]+"),
     lambda m: f"{m.group(1)}{m.group(2) + ' ' if m.group(2) else ''}{REDACTED}"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{4,}"), lambda m: f"{m.group(1)} {REDACTED}"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), lambda m: f"sk-{REDACTED}"),
    (re.compile(r"(?i)\b((?:api|admin)[_-]?keys?|token|secret|password)([\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+"),
     lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}"),
]


class LogRing:
    """Entries `{seq, time, level, logger, source, message}`; `seq` grows by one per line, so a reader asks for
    what came after the last one it has."""

    def __init__(self, max_lines: int = RING_LINES):
        self._lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_lines)
        self._secrets: frozenset[str] = frozenset()
        self._lock = threading.Lock()  # records arrive from any thread (engine threads in tests, pipe readers)
        self._seq = 0

    def remember_secrets(self, values) -> None:
        new = frozenset(v for v in values if v)
        if not new <= self._secrets:
            self._secrets = self._secrets | new

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern, replace in _PATTERNS:
            text = pattern.sub(replace, text)
        return text

    def add(self, level: str, logger: str, message: str, source: str = "server", created: float | None = None):
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + " [...]"
        entry = {"time": created if created is not None else time.time(), "level": level.lower(), "logger": logger,
                 "source": source, "message": self.redact(message)}
        with self._lock:
            self._seq += 1
            entry["seq"] = self._seq
            self._lines.append(entry)

    def read(self, after: int = 0, min_level: str = "debug", limit: int = RING_LINES) -> dict[str, Any]:
        """The lines after `after` at `min_level` or above (the last `limit` of them), and the seq to ask after
        next. Stored lines are redacted again with the secrets known now."""
        rank = LEVELS.index(min_level)
        with self._lock:
            lines = [e for e in self._lines if e["seq"] > after]
            last = self._seq
        lines = [e for e in lines if LEVELS.index(e["level"]) >= rank][-limit:]
        if self._secrets:
            lines = [{**e, "message": self.redact(e["message"])} for e in lines]
        return {"lines": lines, "last": last}


def level_name(levelno: int) -> str:
    name = logging.getLevelName(levelno).lower()
    return name if name in LEVELS else "info"


class RingHandler(logging.Handler):
    """Puts this process's records into the ring, formatted as the message and its exception, if any."""

    def __init__(self, ring: LogRing, source: str = "server"):
        super().__init__()
        self.ring, self.source = ring, source

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self.ring.add(level_name(record.levelno), record.name, message, self.source, record.created)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def secret_values(plain: Any, redacted: Any) -> list[str]:
    """The strings of `plain` (a config as plain data) that its redacted twin replaces by '***'."""
    if redacted == REDACTED and isinstance(plain, str):
        return [plain]
    if isinstance(plain, dict) and isinstance(redacted, dict):
        return [s for k in plain.keys() & redacted.keys() for s in secret_values(plain[k], redacted[k])]
    if isinstance(plain, (list, tuple)) and isinstance(redacted, (list, tuple)):
        return [s for p, r in zip(plain, redacted) for s in secret_values(p, r)]
    return []


# The one ring of the process: the server's logging feeds it, the engine processes' lines join it via the pipes.
RING = LogRing()
