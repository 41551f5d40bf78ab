"""The CPU paged attention alone: the torch reference (kernels/reference.py) against its fast path (kernels/cpu.py).

    python bench/cpu_attention.py --threads 1

SmolLM2-135M's heads (9 query, 3 KV, 64 wide), blocks of 16 shuffled in the pool; decodes of 160 cached tokens and
prefills of 128, at batch 32, 8 and 1; the best of --iters calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from engine.kernels import cpu, reference  # noqa: E402

HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 9, 3, 64, 16
CASES = ((32, 160, 1), (8, 160, 1), (1, 160, 1), (32, 128, 128), (1, 128, 128))  # batch, tokens cached, queries


def best_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def inputs(batch: int, seq_len: int, q_len: int, dtype: torch.dtype) -> dict:
    blocks_per_seq = -(-seq_len // BLOCK_SIZE)
    pool = batch * blocks_per_seq + 10
    key_cache = torch.randn(pool, BLOCK_SIZE, KV_HEADS, HEAD_SIZE, dtype=dtype)
    return dict(query=torch.randn(batch * q_len, HEADS, HEAD_SIZE, dtype=dtype), key_cache=key_cache,
                value_cache=torch.randn_like(key_cache),
                block_tables=torch.randperm(pool)[:batch * blocks_per_seq].view(batch, -1).int(),
                seq_lens=torch.full((batch,), seq_len, dtype=torch.int32),
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32) * q_len, scale=HEAD_SIZE**-0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'dtype':<9} {'batch':>5} {'cached':>6} {'queries':>7} {'reference ms':>12} {'fast path ms':>12}")
    for dtype in (torch.float32, torch.bfloat16):
        for batch, seq_len, q_len in CASES:
            batch_inputs = inputs(batch, seq_len, q_len, dtype)
            ref = best_ms(lambda: reference.paged_attention(**batch_inputs), args.iters)
            fast = best_ms(lambda: cpu.paged_attention(**batch_inputs), args.iters)
            print(f"{str(dtype).removeprefix('torch.'):<9} {batch:>5} {seq_len:>6} {q_len:>7} {ref:>12.2f} {fast:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
