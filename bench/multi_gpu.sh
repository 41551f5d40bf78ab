#!/usr/bin/env bash
# Issue #26's figures on a machine of several GPUs (nvidia-h200-x2 or -x4), each beside its one-GPU baseline in the
# same call; a step needing more GPUs than are visible says so and is skipped. Dummy weights throughout.
#
#   bash bench/multi_gpu.sh [OUT_DIR]          # default ./multi-gpu; each step's log and JSON land there
set -u
OUT=${1:-multi-gpu}
PY=${PYTHON:-python}  # the interpreter with torch (PYTHON=.venv/bin/python)
mkdir -p "$OUT"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "visible GPUs: $GPUS"

step() {  # step NAME GPUS_NEEDED command...
    local name=$1 need=$2
    shift 2
    if [ "$GPUS" -lt "$need" ]; then echo "== $name: skipped (needs $need GPUs)"; return; fi
    echo "== $name: $*"
    local start=$SECONDS
    "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    echo "   rc=$? in $((SECONDS - start)) s"
    grep -E "req/s|tokens/s|roofline|ready in|^nccl|busy\)" "$OUT/$name.log" | sed 's/^/   /'
}

# Equivalence on NCCL: tp=2, tp=4, dp=2 and pp=2 (also with tp=2) against one GPU, tiny llama / qwen2 (MQA) / gemma2.
"$PY" -m pytest -q tests/test_parallel_gpu.py tests/test_pipeline_parallel.py -k "gpu or cuda" 2>&1 | tail -3

# Llama-3.1-8B shape: batch-1 decode tp=1 / 2 / 4 (goal tp=2 >= 1.7x tp=1), the all-reduce's share from rank 0's
# kernels; offline 200 x 1024/128 dp=1 / 2 (goal >= 1.9x).
step latency-8b-tp1 1 "$PY" bench/latency.py
step latency-8b-tp2 2 "$PY" bench/latency.py --tensor-parallel-size 2
step latency-8b-tp4 4 "$PY" bench/latency.py --tensor-parallel-size 4
step latency-8b-tp2-kernels 2 "$PY" bench/latency.py --tensor-parallel-size 2 --gpu-profile
step throughput-8b-dp1 1 "$PY" bench/throughput.py
step throughput-8b-dp2 2 "$PY" bench/throughput.py --data-parallel-size 2

# Llama-3.1-70B shape (141 GB in bf16): start, serve, batch-1 decode against the aggregate bandwidth roofline
# (goal >= 80%), offline throughput; pp=2 against tp=2; start-up to ready (goal < 60 s warm: run it twice).
step latency-70b-tp2 2 "$PY" bench/latency.py --shape llama-3.1-70b --tensor-parallel-size 2 --iters 3
step latency-70b-tp4 4 "$PY" bench/latency.py --shape llama-3.1-70b --tensor-parallel-size 4 --iters 3
step latency-70b-pp2 2 "$PY" bench/latency.py --shape llama-3.1-70b --pipeline-parallel-size 2 --iters 3
step throughput-70b-tp2 2 "$PY" bench/throughput.py --shape llama-3.1-70b --tensor-parallel-size 2
step throughput-70b-pp2 2 "$PY" bench/throughput.py --shape llama-3.1-70b --pipeline-parallel-size 2
step throughput-70b-tp4 4 "$PY" bench/throughput.py --shape llama-3.1-70b --tensor-parallel-size 4
step startup-70b-tp2-cold 2 "$PY" bench/serve.py --launch llama-3.1-70b --tensor-parallel 2 --startup-only
step startup-70b-tp2-warm 2 "$PY" bench/serve.py --launch llama-3.1-70b --tensor-parallel 2 --startup-only
