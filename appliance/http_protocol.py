"""uvicorn's h11 protocol with a deadline on reading each request: slow or silent clients (slowloris) are dropped.

uvicorn times out only idle keep-alive connections between requests (`timeout_keep_alive`): a connection that
opens and sends nothing, or trickles a request's head or body a byte at a time, holds a socket and its buffers
for ever. Here a request's head and body must arrive whole within `server.request_read_timeout_s` of the
connection opening or of its first byte; once it has, the deadline is off, so responses (long streams included)
are not limited. A connection past its deadline is closed.
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in _READING:
            if self._read_deadline is None:  # the first byte of a next request on a kept-alive connection
                self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._on_deadline)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _on_deadline(self) -> None:
        self._read_deadline = None
        if self.conn.their_state in _READING and not self.transport.is_closing():
            logger.info("%s: request not received within %.0f s; closing the connection",
                        "%s:%d" % self.client if self.client else "client", self.read_timeout_s)
            self.transport.close()


def protocol_class(read_timeout_s: float) -> type[DeadlineH11Protocol]:
    """uvicorn builds protocols itself (`Config(http=cls)`): the deadline travels as a class attribute."""
    return type("KvboxH11Protocol", (DeadlineH11Protocol,), {"read_timeout_s": read_timeout_s})
