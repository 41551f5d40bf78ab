"""uvicorn's h11 protocol with deadlines on slow clients: one for reading each request (slowloris), one for a reader
that stopped reading.

uvicorn times out only idle keep-alive connections between requests (`timeout_keep_alive`): a connection that
opens and sends nothing, or trickles a request's head or body a byte at a time, holds a socket and its buffers
for ever. Here a request's head and body must arrive whole within `server.request_read_timeout_s` of the
connection opening or of its first byte; once it has, the deadline is off, so responses (long streams included)
are not limited. A connection past its deadline is closed.

A client that stops reading a stream fills the socket's buffers, then the transport's (uvicorn pauses the response,
so no more than ~64 KiB wait there, and the request's outputs merge in its `OutputSink`): the stream holds its
connection and its memory while paused. Paused for `server.write_stall_timeout_s`, the connection is dropped, and
the request is aborted as for any client that went away.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("kvbox.http")
# h11 states in which the client has not finished sending its request.
_READING = (h11.IDLE, h11.SEND_BODY)


class DeadlineH11Protocol(H11Protocol):
    read_timeout_s: float = 30.0
    write_stall_timeout_s: float = 60.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in _READING:
            if self._read_deadline is None:  # the first byte of a next request on a kept-alive connection
                self._arm_read()
        else:
            self._disarm_read()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.write_stall_timeout_s, self._on_write_stall)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm_write()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read()
        self._disarm_write()
        super().connection_lost(exc)

    def _arm_read(self) -> None:
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._on_read_deadline)

    def _disarm_read(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _disarm_write(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _on_read_deadline(self) -> None:
        self._read_deadline = None
        if self.conn.their_state in _READING and not self.transport.is_closing():
            logger.info("%s: request not received within %.0f s; closing the connection", self._peer(),
                        self.read_timeout_s)
            self.transport.close()

    def _on_write_stall(self) -> None:
        self._write_deadline = None
        logger.info("%s: not reading its response for %.0f s; dropping the connection", self._peer(),
                    self.write_stall_timeout_s)
        self.transport.abort()  # close() would wait for the buffer to drain, which it never does

    def _peer(self) -> str:
        return "%s:%d" % self.client[:2] if self.client else "client"


def protocol_class(read_timeout_s: float, write_stall_timeout_s: float) -> type[DeadlineH11Protocol]:
    """uvicorn builds protocols itself (`Config(http=cls)`): the deadlines travel as class attributes."""
    return type("KvboxH11Protocol", (DeadlineH11Protocol,), {"read_timeout_s": read_timeout_s,
                                                              "write_stall_timeout_s": write_stall_timeout_s})
