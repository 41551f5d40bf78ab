#!/usr/bin/env bash
# Runs the benchmarks behind bench/RESULTS.md one after another on a GPU machine, cheapest first, so that a session
# short of device time still gets the first ones; each writes its JSON to OUT_DIR (default bench-out/).
#
#   bash bench/all.sh [OUT_DIR]          # PEER=1 also runs transformers (on 64 prompts for the offline workload)
set -u
out=${1:-bench-out}
mkdir -p "$out"
cd "$(dirname "$0")/.."

run() {
    local name=$1
    shift
    echo "== $name: python3 $*"
    timeout "${LIMIT_S:-300}" python3 "$@" --json "$out/$name.json" 2>&1 | grep -vE '^\s*$' | tail -n 14
}

peer=()
if [ "${PEER:-0}" = 1 ]; then peer=(--peer); fi
# A fresh machine's first start compiles every Triton kernel (cold); the second finds them in Triton's cache (warm).
run startup_cold bench/serve.py --launch llama-3.1-8b --startup-only
run startup_warm bench/serve.py --launch llama-3.1-8b --startup-only
run latency bench/latency.py --iters 3 "${peer[@]}"
run throughput bench/throughput.py --repeat 2 "${peer[@]}" --peer-num-prompts 64
run serve_c64 bench/serve.py --launch llama-3.1-8b --num-prompts 200 --concurrency 64
run serve bench/serve.py --launch llama-3.1-8b --num-prompts 200 --step-trace "${peer[@]}"
run lora bench/lora.py
