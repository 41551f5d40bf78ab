#!/usr/bin/env bash
# bf16 and each quantized format side by side (Llama-3.1-8B shape, dummy weights): batch-1 decode (latency.py) and
# the offline workload (throughput.py, 200 x 1024/128), and bf16 with the FP8 KV cache offline, then one table.
# About 10 minutes on an H200.
#
#   bash bench/quantization.sh [OUT_DIR]
set -u
out=${1:-bench-out/quantization}
mkdir -p "$out"
cd "$(dirname "$0")/.."
for q in none gptq-w4a16 awq-w4a16 fp8 int8 int8-asym; do
    echo "== $q"
    # Five batches, median: on a fresh machine one batch of two could pay a multi-second compile (bench/RESULTS.md).
    timeout 150 python3 bench/latency.py --quantization "$q" --iters 5 --json "$out/latency-$q.json" 2>&1 | grep kvbox
    timeout 150 python3 bench/throughput.py --quantization "$q" --json "$out/throughput-$q.json" 2>&1 | grep kvbox
done
echo "== bf16, FP8 KV cache"
timeout 150 python3 bench/throughput.py --kv-cache-dtype fp8 --json "$out/throughput-none-fp8kv.json" 2>&1 | grep kvbox
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
load = lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else None
base_lat, base_thr = load("latency-none.json"), load("throughput-none.json")
print(f"{'format':12s} {'weights GB':>10s} {'decode tok/s':>12s} {'x bf16':>7s} {'req/s':>7s} {'x bf16':>7s}")
for q in ("none", "gptq-w4a16", "awq-w4a16", "fp8", "int8", "int8-asym"):
    lat, thr = load(f"latency-{q}.json"), load(f"throughput-{q}.json")
    rate = lat["kvbox"]["decode_tokens_per_s"] if lat else float("nan")
    rps = thr["rows"][0]["requests_per_s"] if thr else float("nan")
    gb = (lat or {}).get("kvbox", {}).get("weight_gb", float("nan"))
    lat_x = rate / base_lat["kvbox"]["decode_tokens_per_s"] if base_lat else float("nan")
    thr_x = rps / base_thr["rows"][0]["requests_per_s"] if base_thr else float("nan")
    print(f"{q:12s} {gb:10.2f} {rate:12.1f} {lat_x:7.2f} {rps:7.2f} {thr_x:7.2f}")
kv = load("throughput-none-fp8kv.json")
if kv and base_thr:
    rps = kv["rows"][0]["requests_per_s"]
    print(f"{'fp8 KV':12s} {'':10s} {'':12s} {'':7s} {rps:7.2f} {rps / base_thr['rows'][0]['requests_per_s']:7.2f}")
PY
