"""Soak: many requests across two models with random parameters and random client disconnects.

Checks, over the run: no request lost (each got a complete response, an error in OpenAI's shape, or was dropped by
its own client on purpose), the supervisor's and engines' RSS flat after warm-up (within --rss-tolerance), and every
KV block free at the end (GET /admin/models). Launches a server with two tiny models on the CPU:

    PYTHONPATH=.:tests python bench/soak.py --requests 10000 --json soak.json

tests/test_soak.py runs it with 300 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.load import rss_mib  # noqa: E402

MODELS = ("llama", "qwen")
PROMPTS = ("Once upon a time", "The quick brown fox", "Hello", "A list of prime numbers: 2, 3, 5,", "x " * 100)


def random_request(rng: random.Random) -> tuple[str, dict]:
    """A route and a body with random sampling parameters, all valid but for a few over the server's `n` cap."""
    body = {"model": rng.choice(MODELS), "max_tokens": rng.randint(1, 48), "stream": rng.random() < 0.5,
            "temperature": rng.choice([0.0, 0.7, 1.0, 1.5]), "top_p": rng.choice([1.0, 0.9, 0.5]),
            "n": rng.choice([1, 1, 1, 2]), "seed": rng.choice([None, rng.randint(0, 2**31)])}
    if rng.random() < 0.03:  # over the server's max_n: a 400 to tell from the rest
        body["n"] = 99
    if rng.random() < 0.3:
        body["top_k"] = rng.randint(1, 50)
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(["\n", ".", " the"])]
    if rng.random() < 0.2:
        body["presence_penalty"] = rng.uniform(-1, 1)
    if rng.random() < 0.5:
        if rng.random() < 0.3:
            body["logprobs"] = rng.randint(0, 5)
        return "/v1/completions", {**body, "prompt": rng.choice(PROMPTS)}
    if rng.random() < 0.3:
        body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}


async def one_request(client: httpx.AsyncClient, rng: random.Random, disconnect_rate: float) -> str:
    """complete | error | dropped (by this client on purpose) | lost: <why>."""
    route, body = random_request(rng)
    drop_after = rng.randint(0, 3) if rng.random() < disconnect_rate else None
    if not body["stream"]:
        try:
            response = await asyncio.wait_for(client.post(route, json=body),
                                              None if drop_after is None else 0.005 + drop_after * 0.01)
        except TimeoutError:
            return "dropped"
        return _judge_body(response)
    async with client.stream("POST", route, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return _judge_body(response)
        events = []
        async for line in response.aiter_lines():
            if line:
                events.append(line)
                if drop_after is not None and len(events) > drop_after:
                    return "dropped"  # leaving the block closes the connection mid-stream
    if not events or events[-1] != "data: [DONE]":
        return f"lost: stream ended without [DONE] ({events[-2:]})"
    return "error" if any(e.startswith('data: {"error"') for e in events) else "complete"


def _judge_body(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return f"lost: {response.status_code} with a body that is not JSON"
    if response.status_code == 200:
        return "complete" if payload["choices"] and all(c["finish_reason"] for c in payload["choices"]) else \
            f"lost: 200 without a finish_reason ({payload})"
    if response.status_code >= 500 and response.status_code != 503 or "message" not in payload.get("error", {}):
        return f"lost: {response.status_code} {payload}"
    return "error"


class RssSampler:
    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.samples: list[dict[str, float]] = []

    def sample(self) -> None:
        self.samples.append({name: rss_mib(pid) for name, pid in self.pids.items()})

    def growth(self, warm_index: int) -> dict[str, dict[str, float]]:
        """Per process: RSS at the end of warm-up, at the end, the highest after warm-up, and the growth in %."""
        warm, rest = self.samples[warm_index], self.samples[warm_index:]
        return {name: {"warm_mib": round(warm[name], 1), "end_mib": round(rest[-1][name], 1),
                       "max_mib": round(max(s[name] for s in rest), 1),
                       "growth_pct": round((max(s[name] for s in rest) / warm[name] - 1) * 100, 2)}
                for name in self.pids}


async def soak(server, num_requests: int, concurrency: int, disconnect_rate: float, seed: int,
               num_samples: int = 20) -> dict:
    from helpers_server import API_KEY

    rng = random.Random(seed)
    pids = {"supervisor": server.process.pid, **{f"engine {name}": m["replicas"][0]["pid"]
                                                 for name, m in server.admin_models().items()}}
    sampler, outcomes = RssSampler(pids), {}
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        # An engine loads its grammar tokenizer in the background once it is up (tens of MB: transformers' tokenizer
        # classes, xgrammar's index), and a constrained request waits for it: one per model first, so that this
        # one-time load lands before the first sample instead of reading as growth after the warm-up one.
        for name in server.admin_models():
            response = await client.post("/v1/completions", json={
                "model": name, "prompt": "Pick one:", "max_tokens": 4, "structured_outputs": {"choice": ["a", "b"]}})
            assert response.status_code == 200, response.text
        started = time.monotonic()
        sampler.sample()
        async def guarded(i: int) -> None:
            async with semaphore:
                try:
                    outcome = await asyncio.wait_for(one_request(client, random.Random(rng.random()),
                                                                 disconnect_rate), 120)
                except Exception as e:  # a hang or a broken connection the client did not ask for
                    outcome = f"lost: {type(e).__name__} {e}"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if (i + 1) % max(1, num_requests // num_samples) == 0:
                    sampler.sample()

        await asyncio.gather(*(guarded(i) for i in range(num_requests)))
    return {"requests": num_requests, "seconds": round(time.monotonic() - started, 1), "outcomes": outcomes,
            "rss": sampler.growth(warm_index=max(1, len(sampler.samples) // 10)),
            "kv_blocks_in_use_at_end": await asyncio.to_thread(blocks_in_use_when_idle, server)}


def blocks_in_use_when_idle(server, timeout_s: float = 10) -> dict[str, int]:
    """Per model, the KV blocks still held once the engines have reported themselves idle (several times a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = {name: m["replicas"][0]["stats"] for name, m in server.admin_models().items()}
        in_use = {name: s["num_kv_blocks"] - s["num_free_blocks"] for name, s in stats.items()}
        if not any(in_use.values()) or time.monotonic() > deadline:
            return in_use
        time.sleep(0.25)


def soak_config(model_paths: dict[str, str]) -> dict:
    from helpers_server import model_config, server_config

    return server_config([model_config(name, path, queue_cap=256, scheduler={"max_num_seqs": 4})
                          for name, path in model_paths.items()], max_tokens=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--disconnect-rate", type=float, default=0.1)
    parser.add_argument("--rss-tolerance", type=float, default=10.0, help="most RSS growth after warm-up, in %%")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    from engine.tools.tiny_model import build_tiny_model
    from helpers_server import run_server

    workdir = Path(tempfile.mkdtemp(prefix="kvbox-soak-"))
    paths = {"llama": str(build_tiny_model("llama", workdir / "llama", max_position_embeddings=512)),
             "qwen": str(build_tiny_model("qwen3", workdir / "qwen"))}
    with run_server(soak_config(paths), workdir) as server:
        report = asyncio.run(soak(server, args.requests, args.concurrency, args.disconnect_rate, args.seed))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    lost = [o for o in report["outcomes"] if o.startswith("lost")]
    grown = [name for name, r in report["rss"].items() if r["growth_pct"] > args.rss_tolerance]
    sys.exit(1 if lost or grown or any(report["kv_blocks_in_use_at_end"].values()) else 0)


if __name__ == "__main__":
    main()
