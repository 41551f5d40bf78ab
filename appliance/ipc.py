"""Every message that crosses the boundary between the supervisor and an engine process, and their framing.

Messages are msgspec Structs (tagged unions), encoded as msgpack and sent as length-prefixed frames over a Unix
socket pair that the supervisor creates and hands to the engine process as an inherited file descriptor. Nothing is
pickled and nothing listens on a network port.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import msgspec

from engine.config import EngineConfig
from engine.lora.manager import LoraInfo
from engine.contract import EngineCoreOutput, SchedulerStats
from engine.sampling_params import SamplingParams

_HEADER = struct.Struct(">I")
# Far above any real message; a length beyond it means a corrupt or hostile stream, refused before reading a byte.
MAX_FRAME_BYTES = 256 << 20


class FrameTooLarge(ValueError):
    """A frame whose length prefix exceeds MAX_FRAME_BYTES, received or about to be sent."""

    def __init__(self, size: int):
        super().__init__(f"IPC frame of {size} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes (MAX_FRAME_BYTES)")
        self.size = size


# ---- supervisor -> engine ----
class StartEngine(msgspec.Struct, tag=True):
    engine_config: EngineConfig


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    lora_name: str | None = None  # a loaded LoRA adapter's name (None: the base model)


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]  # parent request ids


class FinishSamples(msgspec.Struct, tag=True):
    sample_ids: list[str]  # samples the front end found finished (a stop string)


class LoadLora(msgspec.Struct, tag=True):
    """Loads (or atomically replaces) the adapter `name`; answered by one `LoraResult`."""
    name: str
    path: str


class UnloadLora(msgspec.Struct, tag=True):
    """Removes the adapter `name` (running requests keep it until they finish); answered by one `LoraResult`."""
    name: str


class Shutdown(msgspec.Struct, tag=True):
    pass


# ---- engine -> supervisor ----
class EngineReady(msgspec.Struct, tag=True):
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    num_kv_blocks: int
    block_size: int
    device: str
    dtype: str
    kernel_backend: str


class StepOutputs(msgspec.Struct, tag=True):
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats | None = None  # attached at most a few times a second
    step_seconds: float = 0.0
    loras: list[LoraInfo] | None = None  # with LoRA enabled, attached with the block map (about once a second)


class RequestRejected(msgspec.Struct, tag=True):
    request_id: str
    param: str
    message: str


class EngineFailed(msgspec.Struct, tag=True):
    message: str


class LoraResult(msgspec.Struct, tag=True):
    """The answer to a LoadLora or UnloadLora, in the order they were sent; `loras`: the adapters served after it."""
    name: str
    ok: bool
    message: str = ""
    loras: list[LoraInfo] = []


ToEngine = StartEngine | AddRequest | AbortRequests | FinishSamples | LoadLora | UnloadLora | Shutdown
FromEngine = EngineReady | StepOutputs | RequestRejected | EngineFailed | LoraResult

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

    def send(self, message: msgspec.Struct) -> None:
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
