"""Load: many concurrent streams against a queue cap, slow readers and slowloris connections, with their figures.

Every response must be 200 or 429 (with Retry-After), every 200 stream must end with `[DONE]` and no error event,
none may hang; readers that stop reading mid-stream must not stall the others nor grow the server's memory without
bound; connections that never finish their request must be closed. Against a server this script launches (tiny
models on the CPU, `queue_cap` 50, four running slots) or one at --url:

    PYTHONPATH=.:tests python bench/load.py                       # 200 streams, 8 slow readers, 20 slowloris
    PYTHONPATH=.:tests python bench/load.py --url http://host:8000 --model NAME --api-key KEY

tests/test_load.py runs a bounded version (60 streams, queue_cap 10, in process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


@dataclass
class FloodResult:
    outcomes: dict[str, int] = field(default_factory=dict)  # "completed", "429", or what went wrong
    latencies_s: list[float] = field(default_factory=list)  # request sent -> stream ended, for completed ones

    def note(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


async def _one_stream(client: httpx.AsyncClient, body: dict, result: FloodResult) -> None:
    start = time.monotonic()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            shaped = "error" in response.json()
            retry = response.headers.get("Retry-After")
            result.note(str(response.status_code) if shaped and (response.status_code != 429 or retry)
                        else f"{response.status_code} without Retry-After or error object")
            return
        events = [line async for line in response.aiter_lines() if line]
    if events[-1] != "data: [DONE]":
        result.note("stream without [DONE]")
    elif any('"error"' in e for e in events):
        result.note("stream with an error event")
    else:
        result.note("completed")
        result.latencies_s.append(time.monotonic() - start)


async def flood(base_url: str, model: str, num_streams: int, max_tokens: int = 16, api_key: str | None = None,
                timeout_s: float = 300) -> FloodResult:
    """`num_streams` streams at once, each on its own connection; a stream not over after `timeout_s` is a hang."""
    result = FloodResult()
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=num_streams)) as client:
        tasks = [asyncio.create_task(_one_stream(client, body, result)) for _ in range(num_streams)]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
        result.note("hung")
    for task in done:
        if task.exception() is not None:
            result.note(f"client error: {type(task.exception()).__name__}")
    return result


async def stalled_reader(base_url: str, model: str, max_tokens: int, api_key: str | None = None, **extra
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Opens a stream (`extra`: more request fields), reads its first byte, then stops reading. Its socket's receive
    buffer is small and fixed (left to autotuning on loopback it absorbs megabytes before the server notices), and so
    is its StreamReader's (by default it reads on up to 128 KiB into memory)."""
    url = urlsplit(base_url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (url.hostname, url.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": True, **extra}).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {url.hostname}\r\n{auth}Content-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    first = await asyncio.wait_for(reader.read(1), 60)
    assert first == b"H", first
    return reader, writer


async def slowloris(base_url: str, partial: bytes, wait_s: float) -> float | None:
    """Sends `partial` (an unfinished request) and waits; returns the seconds until the server closed the
    connection, or None if it was still open after `wait_s`."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    start = time.monotonic()
    writer.write(partial)
    try:
        while await asyncio.wait_for(reader.read(4096), wait_s - (time.monotonic() - start)):
            pass
        return time.monotonic() - start
    except TimeoutError:
        return None
    finally:
        writer.close()


SLOWLORIS = {  # name -> what the client sends before going quiet
    "silent": b"",
    "half a head": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app",
    "half a body": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"",
}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


async def run(base_url: str, model: str, args, server_pid: int | None) -> dict:
    report: dict = {}
    if server_pid:
        report["server_rss_mib_before"] = round(rss_mib(server_pid), 1)
    stalled = [await stalled_reader(base_url, model, args.slow_tokens, args.api_key) for _ in range(args.slow_readers)]
    lorises = [asyncio.create_task(slowloris(base_url, SLOWLORIS[name], args.slowloris_wait_s))
               for name in SLOWLORIS for _ in range(max(1, args.slowloris // len(SLOWLORIS)))]
    result = await flood(base_url, model, args.streams, args.max_tokens, args.api_key)
    closed_after = await asyncio.gather(*lorises)
    if server_pid:
        report["server_rss_mib_with_stalled_readers"] = round(rss_mib(server_pid), 1)
    for _, writer in stalled:
        writer.close()
    latencies = sorted(result.latencies_s)
    report.update(outcomes=result.outcomes, max_latency_s=round(latencies[-1], 2) if latencies else None,
                  p50_latency_s=round(latencies[len(latencies) // 2], 2) if latencies else None,
                  slowloris_closed=sum(s is not None for s in closed_after), slowloris_total=len(closed_after),
                  slowloris_max_s=round(max((s for s in closed_after if s is not None), default=0), 2))
    return report


def _launched(args):
    from engine.tools.tiny_model import build_tiny_model
    from helpers_server import API_KEY, model_config, run_server, server_config

    workdir = Path(tempfile.mkdtemp(prefix="kvbox-load-"))
    model = str(build_tiny_model("llama", workdir / "model", max_position_embeddings=2048))
    config = server_config([model_config("tiny", model, queue_cap=50, scheduler={"max_num_seqs": 4})],
                           request_read_timeout_s=args.read_timeout_s)
    args.api_key, args.model = API_KEY, "tiny"
    return run_server(config, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: launch one with a tiny model, queue_cap 50)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--api-key")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slow-readers", type=int, default=8)
    parser.add_argument("--slow-tokens", type=int, default=1500, help="max_tokens of each slow reader's stream")
    parser.add_argument("--slowloris", type=int, default=21)
    parser.add_argument("--read-timeout-s", type=float, default=5.0, help="request_read_timeout_s when launching")
    parser.add_argument("--slowloris-wait-s", type=float, default=60.0)
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args()
    if args.url:
        report = asyncio.run(run(args.url.rstrip("/"), args.model, args, None))
    else:
        with _launched(args) as server:
            report = asyncio.run(run(server.base_url, args.model, args, server.process.pid))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    bad = set(report["outcomes"]) - {"completed", "429"}
    sys.exit(1 if bad or report["slowloris_closed"] < report["slowloris_total"] else 0)


if __name__ == "__main__":
    main()
