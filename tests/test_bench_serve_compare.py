"""bench/serve.py's comparisons on the CPU with the tiny shape: one call launches two servers one after the other on
the same prompts and reports both runs and their ratio (the real figures come from the GPU)."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_shared_prefix_with_and_without_prefix_caching(tmp_path):
    out = tmp_path / "result.json"
    printed = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--launch", "tiny-llama", "--device",
                              "cpu", "--num-prompts", "6", "--shared-prefix-len", "64", "--input-len", "8",
                              "--output-len", "4", "--client-processes", "1", "--compare-prefix-caching",
                              "--json", str(out)], check=True, timeout=300, capture_output=True, text=True).stdout
    result = json.loads(out.read_text())
    off, on = result["runs"]
    assert (off["label"], on["label"]) == ("prefix caching off", "prefix caching on")
    assert off["completed"] == on["completed"] == 6 and off["failed"] == on["failed"] == 0
    assert result["prefix_caching_speedup"] == on["output_tokens_per_s"] / off["output_tokens_per_s"] > 0
    assert "prefix_cache" not in off  # no lookups with the cache off
    # the cache is looked up by full blocks of 16 (the 72-token prompts' first 64 tokens, the shared ones): the
    # first prompt computes them, the 5 others find them
    assert on["prefix_cache"]["query_tokens"] == 6 * 64 and on["prefix_cache"]["hit_tokens"] == 5 * 64
    for run in (off, on):  # every prompt is the prefix and its own 8 tokens
        assert run["total_tokens_per_s"] == (6 * 4 + 6 * 72) / run["seconds"]
        assert run["itl_ms"]["p99"] >= run["itl_ms"]["p50"] > 0 and run["ttft_ms"]["p99"] > 0
    ratio = re.search(r"^prefix caching on / prefix caching off: output throughput ([\d.]+) ", printed, re.MULTILINE)
    assert ratio and float(ratio[1]) == round(result["prefix_caching_speedup"], 3), printed


def test_routing_by_load_then_by_cached_prefix_over_two_replicas(tmp_path):
    out = tmp_path / "result.json"
    printed = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--launch", "tiny-llama", "--device",
                              "cpu", "--data-parallel", "2", "--num-prompts", "8", "--shared-prefix-len", "64",
                              "--prefix-groups", "2", "--input-len", "8", "--output-len", "2", "--concurrency", "1",
                              "--client-processes", "1", "--compare-routing", "--json", str(out)],
                             check=True, timeout=300, capture_output=True, text=True).stdout
    result = json.loads(out.read_text())
    load, prefix = result["runs"]
    assert load["label"].startswith("routing load") and prefix["label"].startswith("routing prefix")
    assert load["completed"] == prefix["completed"] == 8 and load["failed"] == prefix["failed"] == 0
    # One request at a time: each group's first prompt computes its 64-token prefix, every later one finds it on the
    # replica the router sends it to.
    assert prefix["prefix_cache"]["query_tokens"] == 8 * 64
    assert prefix["prefix_cache"]["hit_tokens"] == (8 - 2) * 64  # the seeded draw uses both prefixes
    assert result["prefix_routing_speedup"] == prefix["output_tokens_per_s"] / load["output_tokens_per_s"] > 0
    assert re.search(r"routing prefix .*prefix cache hit rate 75\.0%", printed), printed
