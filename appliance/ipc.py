"""The framing of the messages between the supervisor and an engine process (the messages themselves are in
`engine.contract`).

Messages are msgspec Structs (tagged unions), encoded as msgpack and sent as length-prefixed frames over a Unix
socket pair that the supervisor creates and hands to the engine process as an inherited file descriptor. Nothing is
pickled and nothing listens on a network port.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import msgspec

from engine.contract import FromEngine, ToEngine

_HEADER = struct.Struct(">I")
# Far above any real message; a length beyond it means a corrupt or hostile stream, refused before reading a byte.
MAX_FRAME_BYTES = 256 << 20


class FrameTooLarge(ValueError):
    """A frame whose length prefix exceeds MAX_FRAME_BYTES, received or about to be sent."""

    def __init__(self, size: int):
        super().__init__(f"IPC frame of {size} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes (MAX_FRAME_BYTES)")
        self.size = size


_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_from_engine = msgspec.msgpack.Decoder(FromEngine)


def frame(message: msgspec.Struct) -> bytes:
    payload = _encoder.encode(message)
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameTooLarge(len(payload))
    return _HEADER.pack(len(payload)) + payload


def _payload_size(header: bytes) -> int:
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise FrameTooLarge(size)
    return size


def decode_to_engine(payload: bytes) -> ToEngine:
    return _to_engine.decode(payload)


def decode_from_engine(payload: bytes) -> FromEngine:
    return _from_engine.decode(payload)


class BlockingChannel:
    """The engine process's end: blocking reads (on a reader thread) and writes of whole frames."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._file = sock.makefile("rb")
        self._sending = threading.Lock()  # the step loop and a watchdog thread (a lost rank's report) both send

    def send(self, message: msgspec.Struct) -> None:
        with self._sending:
            self.sock.sendall(frame(message))

    def recv(self) -> bytes | None:
        """The next frame's payload, or None when the other end has closed; FrameTooLarge for an oversized one."""
        header = self._file.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        size = _payload_size(header)
        payload = self._file.read(size)
        return payload if len(payload) == size else None


class AsyncChannel:
    """The supervisor's end, on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> AsyncChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME_BYTES)
        return cls(reader, writer)

    def send(self, message: msgspec.Struct) -> None:
        self.writer.write(frame(message))

    async def recv(self) -> bytes | None:
        """The next frame's payload, or None when the other end has closed; FrameTooLarge for an oversized one."""
        try:
            header = await self.reader.readexactly(_HEADER.size)
            size = _payload_size(header)
            return await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        self.writer.close()
