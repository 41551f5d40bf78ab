"""The soak, bounded for CI (bench/soak.py runs 10,000): 300 requests across two models with random parameters and
random client disconnects against the real server. None lost, RSS flat after warm-up, every KV block free."""

import asyncio
import sys
from pathlib import Path

from helpers_server import run_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.soak import soak, soak_config  # noqa: E402

pytest_plugins = ["helpers_server"]


def test_300_random_requests_with_disconnects_lose_nothing_and_leak_nothing(tiny_model, tmp_path):
    config = soak_config({"llama": tiny_model("llama"), "qwen": tiny_model("qwen3")})
    with run_server(config, tmp_path) as server:
        report = asyncio.run(soak(server, num_requests=300, concurrency=16, disconnect_rate=0.15, seed=1))
    print("\n", report)
    assert not [o for o in report["outcomes"] if o.startswith("lost")], report["outcomes"]
    assert report["outcomes"].get("complete", 0) > 200 and report["outcomes"].get("dropped", 0) > 10
    assert report["outcomes"].get("error", 0) > 0  # the requests over max_n, answered with an error
    assert report["kv_blocks_in_use_at_end"] == {"llama": 0, "qwen": 0}
    for name, rss in report["rss"].items():
        assert rss["growth_pct"] < 10, (name, rss)
