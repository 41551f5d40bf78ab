"""The built-in SmolLM2 GGUF on the CPU kept packed (`gguf_dequantize: matmul`, the default) against dequantized
once at load (`load`): decode tok/s alone and beside other streams, and the bytes its weights hold.

    python bench/gguf_cpu.py                          # float32 and bf16, 1 and 16 streams, each mode twice
    python bench/gguf_cpu.py --dtypes bfloat16 --streams 1 --rounds 1

Each configuration runs in its own process (so one's heap and threads do not touch the next), alternating the two
modes; greedy, --tokens new tokens a stream, no early stop, after one warm-up generation. The token ids of both
modes are compared (packed and dequantized weights are the same numbers, the matmuls sum in other orders).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The history of the printing press begins"


def child(mode: str, dtype: str, streams: int, tokens: int) -> dict:
    sys.path[0] = str(ROOT)
    from engine import LLM, SamplingParams

    llm = LLM("builtin:smollm2-135m-instruct", device="cpu", dtype=dtype, max_model_len=512, gguf_dequantize=mode)
    weight_bytes = llm.core.weight_bytes  # what the engine reports (the dashboard's weights)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompts = [f"{PROMPT} {i}" for i in range(streams)]
    llm.generate(prompts, params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"tok_s": streams * tokens / seconds, "weight_mb": weight_bytes / 1e6,
            "tokens": [o.outputs[0].token_ids for o in outputs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, dtype, streams, tokens = args.child
        print(json.dumps(child(mode, dtype, int(streams), int(tokens))))
        return 0
    print(f"{'dtype':<9} {'streams':>7} {'mode':<7} {'tok/s':>8} {'weights MB':>10}  same tokens")
    for dtype in args.dtypes.split(","):
        for streams in args.streams.split(","):
            for _ in range(args.rounds):
                results = {}
                for mode in ("matmul", "load"):
                    run = subprocess.run([sys.executable, __file__, "--child", mode, dtype, streams, str(args.tokens)],
                                         capture_output=True, text=True, check=True)
                    results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
                same = results["matmul"]["tokens"] == results["load"]["tokens"]
                for mode, r in results.items():
                    print(f"{dtype:<9} {streams:>7} {mode:<7} {r['tok_s']:>8.1f} {r['weight_mb']:>10.1f}  {same}",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
