"""The supervisor <-> engine framing (appliance/ipc.py): whole frames round-trip, and a length prefix beyond
MAX_FRAME_BYTES is refused by both ends with FrameTooLarge before any payload is read or allocated."""

import asyncio
import socket
import struct

import pytest

from appliance import ipc
from engine import contract


def oversized_header() -> bytes:
    return struct.pack(">I", ipc.MAX_FRAME_BYTES + 1)


async def async_recv(data: bytes) -> bytes | None:
    """What the supervisor's end receives when the engine's end sends `data` and closes."""
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(data)
    channel = await ipc.AsyncChannel.open(ours)
    try:
        return await channel.recv()
    finally:
        channel.close()


def blocking_recv(data: bytes) -> bytes | None:
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(data)
    with ours:
        return ipc.BlockingChannel(ours).recv()


@pytest.mark.parametrize("recv", [blocking_recv, lambda data: asyncio.run(async_recv(data))], ids=["blocking", "async"])
def test_frames_round_trip_and_end_at_close(recv):
    payload = recv(ipc.frame(contract.AbortRequests(["a", "b"])))
    assert ipc.decode_to_engine(payload) == contract.AbortRequests(["a", "b"])
    assert recv(b"") is None
    assert recv(ipc.frame(contract.Shutdown())[:-1]) is None  # cut short: the other end died mid-frame


@pytest.mark.parametrize("recv", [blocking_recv, lambda data: asyncio.run(async_recv(data))], ids=["blocking", "async"])
def test_oversized_length_prefix_is_refused(recv):
    # Only the 4-byte header is sent: a reader that trusted it would wait for (or allocate) 256 MiB.
    with pytest.raises(ipc.FrameTooLarge) as info:
        recv(oversized_header())
    assert info.value.size == ipc.MAX_FRAME_BYTES + 1
    assert str(info.value) == (f"IPC frame of {ipc.MAX_FRAME_BYTES + 1} bytes exceeds the limit of "
                               f"{ipc.MAX_FRAME_BYTES} bytes (MAX_FRAME_BYTES)")


def test_oversized_message_is_not_sent(monkeypatch):
    monkeypatch.setattr(ipc, "MAX_FRAME_BYTES", 16)
    assert len(ipc.frame(contract.Shutdown())) <= 4 + 16
    with pytest.raises(ipc.FrameTooLarge, match="of [0-9]+ bytes exceeds the limit of 16 bytes"):
        ipc.frame(contract.AbortRequests(["x" * 20]))
