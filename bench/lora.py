"""Multi-LoRA throughput and adapter load time: N prompts of IN random tokens and OUT output tokens each (no early
stop), spread round-robin over ADAPTERS LoRA adapters of rank RANK on q/k/v/o/gate/up/down, against the same
workload on the base model without LoRA, in the same run.

    python bench/lora.py --shape llama-3.1-8b --num-prompts 200 --input-len 1024 --output-len 128
    python bench/lora.py --shape tiny-llama --device cpu --num-prompts 8 --input-len 32 --output-len 8  # smoke

Prints output tokens/s for the base model (an engine without LoRA) and with the adapters (an engine with LoRA,
every adapter in a GPU slot: --max-loras defaults to --num-adapters), their ratio (the target is at least 0.8), and
the median time to load one more adapter of that rank into the running engine (`EngineCore.add_lora`: read, check,
arrange in host memory; the target is under 1 s). The adapters are random (A and B both non-zero), written by this
script in PEFT's layout to a temporary folder, so the load times read files from the page cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (SHAPES, add_workload_args, free, profile_kernels, random_prompts,  # noqa: E402
                          run_workload, shape_folder)
from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIN_RATIO = 0.8
MAX_LOAD_S = 1.0


def write_adapter(folder: Path, shape: str, rank: int, seed: int) -> str:
    """A PEFT adapter folder (adapter_config.json, adapter_model.safetensors) for every layer's TARGET_MODULES, in
    the shape's dtype, with random A and B."""
    c = SHAPES[shape]
    h, q, kv = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    sizes = {"q_proj": ("self_attn", h, q), "k_proj": ("self_attn", h, kv), "v_proj": ("self_attn", h, kv),
             "o_proj": ("self_attn", q, h), "gate_proj": ("mlp", h, c["intermediate_size"]),
             "up_proj": ("mlp", h, c["intermediate_size"]), "down_proj": ("mlp", c["intermediate_size"], h)}
    dtype = getattr(torch, c["torch_dtype"])
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(c["num_hidden_layers"]):
        for module, (parent, in_features, out_features) in sizes.items():
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            # Small values: the adapter changes the logits without driving random activations to overflow.
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator)
                                                  / in_features ** 0.5).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator)
                                                  / rank ** 0.5 * 0.1).to(dtype)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "bias": "none", "target_modules": list(TARGET_MODULES)}))
    return str(folder)


def make_core(args, model_folder: str, lora: bool) -> EngineCore:
    # max_cpu_loras: one more than the workload's adapters, for the adapter whose load is timed
    options = {"enable_lora": True, "max_loras": args.max_loras, "max_lora_rank": args.rank,
               "max_cpu_loras": args.num_adapters + 1} if lora else {}
    return EngineCore(EngineConfig(
        model=model_folder, load_format="dummy", dtype=SHAPES[args.shape]["torch_dtype"], device=args.device,
        max_model_len=args.input_len + args.output_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False, **options))


def run(core: EngineCore, args, prompts: list[list[int]], lora_names: list[str | None]) -> float:
    """Seconds for the workload, after a warm-up that puts every adapter in its GPU slot."""
    warmup = random_prompts(len(set(lora_names)), args.input_len, SHAPES[args.shape]["vocab_size"], seed=1)
    for i, (prompt, name) in enumerate(zip(warmup, dict.fromkeys(lora_names))):
        core.add_request(f"warmup-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                         lora_name=name)
    while core.has_unfinished_requests():
        core.step()
    return run_workload(core, args, prompts, lora_names)


def report(name: str, seconds: float, args) -> dict:
    n = args.num_prompts
    row = {"system": name, "seconds": round(seconds, 2), "requests_per_s": round(n / seconds, 2),
           "output_tokens_per_s": round(n * args.output_len / seconds, 1)}
    print(f"{name:24s} {row['requests_per_s']:8.2f} req/s {row['output_tokens_per_s']:10.1f} out tok/s "
          f"({seconds:.1f} s)")
    return row


def gpu_profile(args, model_folder: str, paths: list[str], prompts: list[list[int]]) -> None:
    """The workload's kernels by total GPU time, and the share of the LoRA kernels in it."""
    core = make_core(args, model_folder, lora=True)
    for i, path in enumerate(paths):
        core.add_lora(f"adapter-{i}", path)
    names = [f"adapter-{i % args.num_adapters}" for i in range(len(prompts))]
    run(core, args, prompts[:8], names[:8])  # compiles and fills the slots outside the profile
    profile = profile_kernels(lambda: run(core, args, prompts, names), args.device)
    lora = sum(s for name, s in profile["kernels"].items() if "shrink" in name or "expand" in name)
    print(f"of which LoRA shrink/expand {lora:.2f} s ({lora / max(profile['kernel_s'], 1e-9):.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--max-loras", type=int, help="GPU slots (default: --num-adapters)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-loads", type=int, default=5, help="timed adapter loads")
    parser.add_argument("--gpu-profile", action="store_true",
                        help="only profile the LoRA workload's GPU kernels (torch.profiler) and print where time goes")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.max_loras = args.max_loras or args.num_adapters
    model_folder = shape_folder(args.shape)

    prompts = random_prompts(args.num_prompts, args.input_len, SHAPES[args.shape]["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="kvbox-lora-bench-") as tmp:
        paths = [write_adapter(Path(tmp) / f"adapter-{i}", args.shape, args.rank, seed=i)
                 for i in range(args.num_adapters + 1)]
        if args.gpu_profile:
            gpu_profile(args, model_folder, paths[:-1], prompts)
            return
        base_s = run(make_core(args, model_folder, lora=False), args, prompts, [None] * len(prompts))
        free(args.device)
        core = make_core(args, model_folder, lora=True)
        for i, path in enumerate(paths[:-1]):
            core.add_lora(f"adapter-{i}", path)
        lora_s = run(core, args, prompts, [f"adapter-{i % args.num_adapters}" for i in range(len(prompts))])
        load_seconds = []
        for _ in range(args.num_loads):  # each load replaces the last: a new version, read from the files again
            start = time.perf_counter()
            core.add_lora("timed", paths[-1])
            load_seconds.append(time.perf_counter() - start)

    rows = [report("base model (no LoRA)", base_s, args),
            report(f"{args.num_adapters} LoRA adapters (r{args.rank})", lora_s, args)]
    ratio = base_s / lora_s  # the same output tokens in both
    load_s = statistics.median(load_seconds)
    print(f"LoRA / base output throughput: {ratio:.3f} (target >= {MIN_RATIO})")
    print(f"adapter load (rank {args.rank}, {'/'.join(m.removesuffix('_proj') for m in TARGET_MODULES)}): "
          f"median {load_s * 1e3:.1f} ms of {len(load_seconds)} (target < {MAX_LOAD_S * 1e3:.0f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "rows": rows, "ratio": ratio,
            "load_seconds": {"median": load_s, "all": load_seconds}}, indent=2))


if __name__ == "__main__":
    main()
