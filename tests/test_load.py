"""Load, bounded for CI (bench/load.py is the long run): 60 streams against a queue cap of 10, readers that stop
reading mid-stream, and slowloris connections, on one in-process server."""

import asyncio
import re
import socket
import sys
import time
from pathlib import Path

import pytest
from helpers_server import API_KEY, long_llama, model_config, run_inprocess, server_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appliance.http_protocol import DeadlineH11Protocol  # noqa: E402
from bench.load import SLOWLORIS, flood, slowloris, stalled_reader  # noqa: E402

pytest_plugins = ["helpers_server"]
READ_TIMEOUT_S = 1.0
WRITE_STALL_S = 0.5


@pytest.fixture(scope="module")
def capped(tiny_model):
    config = server_config([model_config("capped", long_llama(tiny_model), queue_cap=10,
                                         scheduler={"max_num_seqs": 4})], request_read_timeout_s=READ_TIMEOUT_S,
                           write_stall_timeout_s=WRITE_STALL_S)
    with run_inprocess(config) as server:
        yield server


def kv_in_use(server) -> int:
    stats = server.admin_models()["capped"]["replicas"][0]["stats"]
    return stats["num_kv_blocks"] - stats["num_free_blocks"]


def busy(server) -> bool:
    """The API still serves a request, or the engine holds KV blocks (its stats lag by up to a quarter second)."""
    return server.admin_models()["capped"]["num_inflight"] > 0 or kv_in_use(server) > 0


def aborts(server) -> float:
    with server.http() as http:
        found = re.search(r'^vllm:request_success_total{finished_reason="abort",model_name="capped"} (\S+)$',
                          http.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def test_60_streams_against_a_queue_cap_of_10_each_complete_or_429_none_hangs(capped):
    result = asyncio.run(flood(capped.base_url, "capped", 60, max_tokens=16, api_key=API_KEY, timeout_s=120))
    print(f"\n60 streams, queue cap 10 + 4 running: {result.outcomes}, "
          f"max latency {max(result.latencies_s):.2f} s")
    assert set(result.outcomes) <= {"completed", "429"}, result.outcomes
    assert result.outcomes.get("completed", 0) >= 14 and result.outcomes.get("429", 0) > 0


def test_readers_that_stop_reading_stall_neither_the_engine_nor_other_streams(capped):
    """Two streams of 1500 tokens whose clients read one byte and stop: other streams complete meanwhile, and the
    stalled ones' engine requests end and free their KV blocks although nobody reads them (until the response
    pauses, their output merges into one pending update in the request's OutputSink; once paused for
    write_stall_timeout_s, the connection is dropped and the request aborted)."""
    async def scenario():
        stalled = [await stalled_reader(capped.base_url, "capped", 1500, API_KEY) for _ in range(2)]
        try:
            others = await flood(capped.base_url, "capped", 4, max_tokens=16, api_key=API_KEY, timeout_s=60)
            deadline = time.monotonic() + 60
            while busy(capped):  # the unread requests ended in the engine (run to their end, or aborted)
                assert time.monotonic() < deadline, "the stalled streams' engine requests did not finish"
                await asyncio.sleep(0.2)
            return others
        finally:
            for _, writer in stalled:
                writer.close()

    others = asyncio.run(scenario())
    assert others.outcomes == {"completed": 4}, others.outcomes


@pytest.mark.parametrize("name", SLOWLORIS)
def test_connections_that_never_finish_their_request_are_closed(capped, name):
    closed_after = asyncio.run(slowloris(capped.base_url, SLOWLORIS[name], wait_s=READ_TIMEOUT_S + 5))
    assert closed_after is not None and READ_TIMEOUT_S - 0.1 <= closed_after < READ_TIMEOUT_S + 2, closed_after


def test_the_read_deadline_does_not_cut_streams_longer_than_it(capped):
    result = asyncio.run(flood(capped.base_url, "capped", 1, max_tokens=1500, api_key=API_KEY, timeout_s=120))
    assert result.outcomes == {"completed": 1} and result.latencies_s[0] > READ_TIMEOUT_S, result


def test_a_reader_stalled_past_the_write_deadline_is_dropped_and_its_request_aborted(capped, monkeypatch):
    """A stream whose client stops reading: once the buffers between it and the server are full, the server's send
    pauses, and after write_stall_timeout_s the connection is dropped and the request aborted, so the client never
    gets to [DONE] however long it reads afterwards. The buffers are held small (on loopback the kernel grows a send
    buffer to 4 MB, and the transport's own holds 64 KiB) so that the pause begins within the first few dozen of
    2000 tokens, and the deadline falls long before a tiny model could write them all."""
    def connection_made(self, transport):
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        made(self, transport)
        transport.set_write_buffer_limits(high=4096)

    made = DeadlineH11Protocol.connection_made
    monkeypatch.setattr(DeadlineH11Protocol, "connection_made", connection_made)

    async def scenario() -> tuple[float, bytes]:
        reader, writer = await stalled_reader(capped.base_url, "capped", 2000, API_KEY, logprobs=5)
        start = time.monotonic()
        try:
            while busy(capped):
                assert time.monotonic() - start < 60, "the stalled stream was neither dropped nor finished"
                await asyncio.sleep(0.2)
            freed_after = time.monotonic() - start
            received = b""
            try:
                while chunk := await asyncio.wait_for(reader.read(1 << 16), 10):
                    received += chunk
            except ConnectionResetError:
                pass
            return freed_after, received
        finally:
            writer.close()

    aborts_before = aborts(capped)
    freed_after, received = asyncio.run(scenario())
    assert aborts(capped) == aborts_before + 1, ("the request ran to its end", freed_after)
    assert b"data: [DONE]" not in received, (len(received), freed_after)
    assert freed_after >= WRITE_STALL_S - 0.1, freed_after
