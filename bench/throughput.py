"""Offline throughput: N prompts of IN random tokens and OUT output tokens each (no early stop).

    python bench/throughput.py --shape llama-3.1-8b --num-prompts 200 --input-len 1024 --output-len 128 --peer
    python bench/throughput.py --shape tiny-llama --device cpu --num-prompts 8 --input-len 32 --output-len 8  # smoke
    python bench/throughput.py --data-parallel-size 2       # replicas on cuda:0 and cuda:1 (issue #26)
    python bench/throughput.py --shape llama-3.1-70b --tensor-parallel-size 4

Prints requests/s, output tokens/s and total tokens/s for kvbox; with --peer, the same workload through
transformers' `generate` (static batches) and `generate_batch` (continuous batching) in the same run; on a GPU, the
roofline for the workload from the card's measured copy bandwidth and matmul rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (QUANTIZATIONS, SHAPES, add_online_args, add_parallel_args, add_workload_args,  # noqa: E402
                          free, measure_card, online_options, parallel_options, peer_generate, peer_generate_batch,
                          peer_model, profile_kernels, random_prompts, run_workload, quantized_shape_folder, steady,
                          sync, workload_roofline)
from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.data_parallel import DataParallelCores  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.step_trace import StepTrace, print_summary  # noqa: E402


def warm_core(args) -> EngineCore | DataParallelCores:
    """An engine for the workload, its kernels compiled first by the workload's own shapes: as many prompts of the
    same length (other tokens), three tokens out, so that the measured run's prefill chunks and full-batch decodes
    meet no kernel variant still to compile (on a fresh machine those compiles cost the first run a third of its
    rate)."""
    dtype = SHAPES[args.shape]["torch_dtype"]
    config = EngineConfig(
        model=quantized_shape_folder(args.shape, args.quantization), load_format="dummy", dtype=dtype, device=args.device,
        max_model_len=args.input_len + args.output_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
        async_scheduling=False if args.sync_scheduling else None,
        max_prefill_tokens_while_decoding=args.max_prefill_tokens_while_decoding or None,
        kv_cache_dtype=args.kv_cache_dtype, **online_options(args), **parallel_options(args))
    core = steady(DataParallelCores(config) if config.data_parallel_size > 1 else EngineCore(config))
    warmup = random_prompts(args.num_prompts, args.input_len, SHAPES[args.shape]["vocab_size"], seed=1)
    for i, prompt in enumerate(warmup):
        core.add_request(f"warmup-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    while core.has_unfinished_requests():
        core.step()
    sync(args.device)
    return core


def report(name: str, seconds: float, args, num_prompts: int | None = None) -> dict:
    n = num_prompts or args.num_prompts
    row = {"system": name, "prompts": n, "seconds": round(seconds, 2), "requests_per_s": round(n / seconds, 2),
           "output_tokens_per_s": round(n * args.output_len / seconds, 1),
           "total_tokens_per_s": round(n * (args.input_len + args.output_len) / seconds, 1)}
    print(f"{name:28s} {row['requests_per_s']:8.2f} req/s {row['output_tokens_per_s']:10.1f} out tok/s "
          f"{row['total_tokens_per_s']:10.1f} total tok/s  ({seconds:.1f} s)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser)
    parser.add_argument("--sync-scheduling", action="store_true",
                        help="wait for each step before scheduling the next (to see what async scheduling gains)")
    parser.add_argument("--max-prefill-tokens-while-decoding", type=int,
                        default=EngineConfig.max_prefill_tokens_while_decoding,
                        help="the prefill cap beside decodes (0: none; default: the engine's)")
    parser.add_argument("--peer", action="store_true", help="also run transformers on the same workload")
    parser.add_argument("--quantization", default="none", choices=sorted(QUANTIZATIONS),
                        help="dummy weights in this checkpoint format (bench.common.QUANTIZATIONS)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
                        help="the KV cache's storage (fp8: twice the blocks in the same memory)")
    parser.add_argument("--peer-batch-size", type=int, default=64)
    parser.add_argument("--peer-num-prompts", type=int,
                        help="run the peer on the first N prompts only (it is slow); its rates are per its prompts")
    parser.add_argument("--repeat", type=int, default=1, help="run the workload this many times on the same engine")
    parser.add_argument("--gpu-profile", action="store_true",
                        help="only run kvbox under torch.profiler and print where the GPU time goes")
    parser.add_argument("--step-trace", action="store_true",
                        help="print each run's step timeline summary (engine.step_trace)")
    parser.add_argument("--json", help="write the results here")
    add_online_args(parser)
    add_parallel_args(parser, data=True)
    args = parser.parse_args()
    if args.data_parallel_size > 1 and (args.step_trace or args.gpu_profile):
        parser.error("--step-trace and --gpu-profile follow one engine: leave --data-parallel-size at 1")

    prompts = random_prompts(args.num_prompts, args.input_len, SHAPES[args.shape]["vocab_size"])
    core = warm_core(args)
    if args.gpu_profile:
        profile_kernels(lambda: run_workload(core, args, prompts), args.device)
        return
    engine = core.replicas[0] if isinstance(core, DataParallelCores) else core
    results = {"args": vars(args), "rows": [], "weight_gb": core.weight_bytes / 1e9,
               "replicas": len(core.replicas) if isinstance(core, DataParallelCores) else 1,
               "ranks": engine.config.tensor_parallel_size * engine.config.pipeline_parallel_size}
    print(f"kvbox ({args.online or args.quantization}, KV cache {args.kv_cache_dtype}): weights "
          f"{core.weight_bytes / 1e9:.2f} GB, "
          f"{engine.kv_manager.pool.num_blocks} KV blocks")
    for i in range(args.repeat):
        core.step_trace = StepTrace() if args.step_trace else None
        results["rows"].append(report("kvbox" if args.repeat == 1 else f"kvbox (run {i + 1})",
                                      run_workload(core, args, prompts), args))
        if core.step_trace is not None:
            results["rows"][-1]["step_trace"] = core.step_trace.summary()
            print_summary(results["rows"][-1]["step_trace"])
    core = None
    free(args.device)
    if args.device.startswith("cuda"):
        results["roofline"] = workload_roofline(args.shape, args.num_prompts, args.input_len, args.output_len,
                                                args.max_num_seqs, measure_card(),
                                                args.tensor_parallel_size * args.pipeline_parallel_size,
                                                args.data_parallel_size)
    if args.peer:
        model = peer_model(args.shape)
        peer_prompts = prompts[:args.peer_num_prompts or len(prompts)]
        results["rows"].append(report(f"transformers generate (bs {args.peer_batch_size})",
                                      peer_generate(model, peer_prompts, args.output_len, args.peer_batch_size),
                                      args, len(peer_prompts)))
        batch = peer_generate_batch(model, peer_prompts, args.output_len)
        results["rows"].append({**report("transformers generate_batch", batch["seconds"], args, len(peer_prompts)),
                                "wall_s_with_warmup": round(batch["wall_s"], 2)})
        print(f"  (from its first request's admission to its last token; {batch['wall_s']:.1f} s with its "
              f"start-up and CUDA-graph warm-up)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
