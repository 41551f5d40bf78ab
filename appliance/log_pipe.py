"""Engine processes' log lines into the server's log ring (`appliance.log_ring`): the supervisor opens a pipe per
engine process and names its write end in `KVBOX_LOG_FD`; the engine's `PipeHandler` writes one JSON line per
record there (besides its own stderr, which the terminal keeps), and `forward_engine_logs` reads them into the ring
until the process exits.

The write end is non-blocking and each line at most `PIPE_BUF` bytes (written whole or not at all): a supervisor too
busy to read costs the engine dropped log lines, never a stalled step loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select

from appliance.log_ring import RING, LogRing, level_name

ENV_FD = "KVBOX_LOG_FD"
_MAX_LINE = select.PIPE_BUF


class PipeHandler(logging.Handler):
    def __init__(self, fd: int):
        super().__init__()
        os.set_blocking(fd, False)
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            entry = {"time": record.created, "level": level_name(record.levelno), "logger": record.name}
            data = _line(entry, message)
            while len(data) > _MAX_LINE:  # escapes can make a line several times its message's length
                message = message[: len(message) // 2] + " [...]"
                data = _line(entry, message)
            os.write(self.fd, data)
        except BlockingIOError:
            pass  # the pipe is full: this line is dropped for the dashboard (stderr has it)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def _line(entry: dict, message: str) -> bytes:
    return json.dumps({**entry, "message": message}, ensure_ascii=False).encode() + b"\n"


def open_pipe() -> tuple[int, int]:
    """(read end, write end) for one engine process; pass the write end and close it here once it is started."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)
    return read_fd, write_fd


async def forward_engine_logs(read_fd: int, source: str, ring: LogRing = RING) -> None:
    """Reads an engine's lines into the ring until the engine process (the only writer) is gone."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=4 * _MAX_LINE)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(read_fd, "rb", buffering=0))
    try:
        while line := await reader.readline():
            try:
                entry = json.loads(line)
                ring.add(entry["level"], entry["logger"], entry["message"], source, entry["time"])
            except (ValueError, KeyError, TypeError):
                ring.add("warning", "kvbox.logs", f"an unreadable log line from {source}", source)
    finally:
        transport.close()
