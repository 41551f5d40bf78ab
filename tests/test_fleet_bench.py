"""bench/fleet.py on the CPU with the tiny shape, bounded: 20 level-1 sleep/wake cycles leave the server's and its
engine's resident memory where they were (the leak check), and the wake and round-robin modes run end to end."""

import json
import subprocess
import sys

import pytest
from test_bench_smoke import ROOT

KV_BLOCKS = 8192  # x 8 KiB a block (tiny llama, float32) = 64 MiB: a cache leaked per cycle would stand out
KV_BYTES = KV_BLOCKS * 8192
# Allocator and interpreter noise over 19 cycles measured ~0.3 MiB; a leaked cache would add 64 MiB per cycle.
RSS_GROWTH_MARGIN = 16 << 20


def run_fleet(tmp_path, mode, *args):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "fleet.py"), mode, "--shape", "tiny", "--device", "cpu",
                    "--input-len", "16", "--output-len", "4", "--json", str(out), *args], check=True, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_sleep_wake_cycles_do_not_leak(tmp_path):
    result = run_fleet(tmp_path, "cycles", "--cycles", "20", "--level", "1", "--num-kv-blocks", str(KV_BLOCKS))
    assert result["identical"]
    assert result["awake_rss_bytes"] - result["asleep_rss_bytes"] > KV_BYTES * 3 // 4  # the cache is freed
    assert result["after_first"]["asleep"] == result["after_last"]["asleep"]
    assert result["after_last"]["asleep"]["kv_cache_bytes"] == 0
    assert abs(result["rss_growth_bytes"]) < RSS_GROWTH_MARGIN


@pytest.mark.slow
def test_wake_and_round_robin_modes_run(tmp_path):
    wake = run_fleet(tmp_path, "wake", "--reps", "1")
    for level in ("level_1", "level_2"):
        assert wake[level]["ttft_s"] >= wake[level]["wake_s"] > 0
    assert wake["level_1"]["wake_s"] < wake["level_2"]["wake_s"]  # a copy back beats a new engine
    # Level 2's round-robin runs the same code as level 1's (bench/fleet.py run_round_robin): one level, to keep CI short.
    rr = run_fleet(tmp_path, "round-robin", "--requests", "2", "--models", "2", "--max-active", "1",
                   "--systems", "level1", "restarts")
    assert set(rr) - {"mode", "shape", "device"} == {"kvbox_sleep_level_1", "restart_processes"}
    for system in ("kvbox_sleep_level_1", "restart_processes"):
        assert rr[system]["requests_per_s"] > 0 and rr[system]["ttft_p99_s"] >= rr[system]["ttft_p50_s"] > 0
