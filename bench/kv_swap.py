"""Preemption by swap vs by recompute, side by side on one preemption-heavy workload (a KV cache too small for the
batch): the same prompts through an engine that recomputes preempted requests and one that swaps their K/V to host
memory (`host_swap_bytes`), with their throughput, preemptions and blocks moved.

    python bench/kv_swap.py --shape llama-3.1-8b --num-prompts 256 --input-len 1024 --output-len 256 \\
        --num-kv-blocks 2048 --host-swap-gib 16
    python bench/kv_swap.py --shape tiny-llama --device cpu --num-prompts 8 --input-len 48 --output-len 32 \\
        --num-kv-blocks 12 --host-swap-gib 0.01  # smoke

The KV cache must hold one full sequence (input + output); far fewer blocks than the batch needs make it preempt.
Both engines run greedy on dummy weights and their tokens are compared: in float32 every prompt's must match; in
bf16 a near tie of random weights flips between differently composed batches, so `--reference` adds a third engine
whose cache holds the whole batch (no preemption) and compares both to it: a right swap agrees with it as often and
as long (leading tokens in common) as recompute does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import SHAPES, add_workload_args, free, random_prompts, shape_folder, sync  # noqa: E402
from engine.config import EngineConfig, engine_default  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def run(args, prompts: list[list[int]], system: str, host_swap_bytes: int | None = None,
        num_kv_blocks: int | None = None) -> tuple[dict, list[list[int]]]:
    """One engine through the workload (after a short warm-up): its figures and each prompt's tokens."""
    core = EngineCore(EngineConfig(
        model=shape_folder(args.shape), load_format="dummy", dtype=args.dtype or SHAPES[args.shape]["torch_dtype"],
        device=args.device, max_model_len=args.input_len + args.output_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=num_kv_blocks,
        enable_prefix_caching=False, host_swap_bytes=host_swap_bytes))
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    core.add_request("warmup", prompts[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while core.has_unfinished_requests():
        core.step()
    sync(args.device)
    before = core.stats()
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        core.add_request(str(i), prompt, params)
    while core.has_unfinished_requests():
        for output in core.step():
            tokens[output.request_id].extend(output.new_token_ids)
    sync(args.device)
    seconds = time.perf_counter() - start
    stats = core.stats()
    row = {"system": system, "seconds": round(seconds, 3),
           "output_tokens_per_s": round(len(prompts) * args.output_len / seconds, 1),
           "preemptions": stats.num_preemptions - before.num_preemptions,
           "swapped_out_blocks": stats.swap.num_swapped_out_blocks if stats.swap else 0,
           "swapped_in_blocks": stats.swap.num_swapped_in_blocks if stats.swap else 0,
           "host_blocks": stats.swap.num_host_blocks if stats.swap else 0}
    print(f"{row['system']:10s} {row['output_tokens_per_s']:10.1f} out tok/s  {row['preemptions']:6d} preemptions  "
          f"{row['swapped_out_blocks']:8d} blocks out  {row['swapped_in_blocks']:8d} in  ({seconds:.2f} s)")
    return row, [tokens[str(i)] for i in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser)
    parser.add_argument("--num-kv-blocks", type=int, required=True, help="the cramped device cache, in blocks")
    parser.add_argument("--host-swap-gib", type=float, required=True, help="the swap engine's host pool, in GiB")
    parser.add_argument("--dtype", help="the weights' dtype (default: the shape's)")
    parser.add_argument("--reference", action="store_true",
                        help="also run an engine whose cache holds the whole batch and compare both to it")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    prompts = random_prompts(args.num_prompts, args.input_len, SHAPES[args.shape]["vocab_size"])
    recompute, recompute_tokens = run(args, prompts, "recompute", num_kv_blocks=args.num_kv_blocks)
    free(args.device)
    swap, swap_tokens = run(args, prompts, "swap", int(args.host_swap_gib * 2**30), args.num_kv_blocks)
    result = {"args": vars(args), "rows": [recompute, swap],
              "swap_vs_recompute": agreement(swap_tokens, recompute_tokens)}
    print(f"swap / recompute throughput: {swap['output_tokens_per_s'] / recompute['output_tokens_per_s']:.2f}x; "
          f"swap vs recompute: {result['swap_vs_recompute']}")
    if args.reference:
        free(args.device)
        # Every sequence at full length at once, and a margin: nothing is ever preempted.
        blocks = len(prompts) * -(-(args.input_len + args.output_len) // engine_default("block_size")) + 64
        reference, reference_tokens = run(args, prompts, "no preemption", num_kv_blocks=blocks)
        result["rows"].append(reference)
        for name, tokens in (("recompute", recompute_tokens), ("swap", swap_tokens)):
            result[f"{name}_vs_reference"] = agreement(tokens, reference_tokens)
            print(f"{name} vs no preemption: {result[f'{name}_vs_reference']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """How many prompts' tokens are identical, and the mean count of leading tokens in common."""
    leading = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
               for x, y in zip(tokens, reference)]
    return {"identical_prompts": sum(x == y for x, y in zip(tokens, reference)), "prompts": len(reference),
            "mean_leading_tokens_in_common": round(sum(leading) / len(leading), 1)}


if __name__ == "__main__":
    main()
