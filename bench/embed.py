"""Embedding throughput: kvbox's engine (task embed) next to transformers' batched forward, in one call.

Inputs: `--num-inputs` random token sequences of lengths uniform in [--min-len, --max-len]. kvbox gets them all at
once (continuous batching, padding-free); transformers gets them sorted by length in padded batches, at each of
`--peer-batch-sizes`, and its best is reported. Both pool (CLS for BERT, last token for the decoder) and normalize.
Random weights at real shapes (BERT-base, E5-Mistral-7B); `tiny-bert` / `tiny-mistral` are the CPU smoke shapes.

    python bench/embed.py --shape bert-base --peer
    python bench/embed.py --shape e5-mistral-7b --peer --peer-batch-sizes 16,64
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free, measure_card, shape_folder, sync  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.contract import PoolingParams  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.pooling.inputs import POOLING_SAMPLING  # noqa: E402

_BERT = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
         "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512,
         "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0,
         "torch_dtype": "bfloat16"}
_MISTRAL = {"architectures": ["MistralModel"], "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "rope_theta": 10000.0,
            "sliding_window": None, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16"}
_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 512, "torch_dtype": "float32"}
SHAPES = {"bert-base": _BERT, "e5-mistral-7b": _MISTRAL, "tiny-bert": {**_BERT, **_TINY},
          "tiny-mistral": {**_MISTRAL, **_TINY, "num_key_value_heads": 2, "head_dim": 16}}


def random_inputs(num: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000 if vocab_size > 2000 else 5, vocab_size) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(num)]


def run_kvbox(folder: str, args, inputs: list[list[int]]) -> dict:
    core = EngineCore(EngineConfig(model=folder, task="embed", load_format="dummy", device=args.device,
                                   max_model_len=args.max_len, max_num_batched_tokens=args.max_num_batched_tokens,
                                   max_num_seqs=args.max_num_seqs))
    for i, ids in enumerate(inputs[:8]):  # warm-up: kernels compiled, allocator primed
        core.add_request(f"w{i}", ids, POOLING_SAMPLING, pooling=PoolingParams())
    while core.has_unfinished_requests():
        core.step()
    sync(args.device)
    start = time.perf_counter()
    for i, ids in enumerate(inputs):
        core.add_request(str(i), ids, POOLING_SAMPLING, pooling=PoolingParams())
    num_done = 0
    while core.has_unfinished_requests():
        num_done += sum(1 for o in core.step() if o.pooled is not None)
    sync(args.device)
    seconds = time.perf_counter() - start
    assert num_done == len(inputs)
    del core
    free(args.device)
    return _rates("kvbox", inputs, seconds)


@torch.inference_mode()
def run_peer(folder: str, args, inputs: list[list[int]], batch_size: int, decoder: bool) -> dict:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(folder)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    with torch.device(args.device):
        model = AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    ordered = sorted(inputs, key=len)
    _peer_batch(model, ordered[-batch_size:], decoder, args.device)  # warm-up (as kvbox's): kernels, allocator
    sync(args.device)
    start = time.perf_counter()
    for first in range(0, len(ordered), batch_size):
        _peer_batch(model, ordered[first:first + batch_size], decoder, args.device)
    sync(args.device)
    seconds = time.perf_counter() - start
    del model
    free(args.device)
    return {**_rates("transformers", inputs, seconds), "batch_size": batch_size}


def _peer_batch(model, batch: list[list[int]], decoder: bool, device: str) -> torch.Tensor:
    """One padded batch (sorted by length: the last is the longest) through the model, pooled and normalized."""
    width = len(batch[-1])
    # Left padding for the decoder, so that every sequence's last token is the batch's last column.
    ids = torch.zeros(len(batch), width, dtype=torch.int64)
    mask = torch.zeros(len(batch), width, dtype=torch.int64)
    for row, seq in enumerate(batch):
        cols = slice(width - len(seq), width) if decoder else slice(0, len(seq))
        ids[row, cols], mask[row, cols] = torch.tensor(seq), 1
    hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    return F.normalize(hidden[:, -1 if decoder else 0].float(), dim=-1).cpu()


def model_flops(config: dict, inputs: list[list[int]]) -> float:
    """The forward's matmul FLOPs over every input, padding-free: the linear layers per token, and attention's
    QK^T and PV per pair of positions (all pairs for an encoder, the causal half for a decoder)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * config.get(
        "head_dim", h // config["num_attention_heads"])
    gated = config["model_type"] != "bert"
    linear = 2 * (h * (q + 2 * kv) + q * h + (3 if gated else 2) * h * inter)
    pairs = sum(n * (n + 1) // 2 if gated else n * n for n in map(len, inputs))
    return layers * (linear * sum(map(len, inputs)) + 4 * q * pairs)


def _rates(system: str, inputs: list[list[int]], seconds: float) -> dict:
    num_tokens = sum(map(len, inputs))
    return {"system": system, "seconds": round(seconds, 3), "inputs_per_s": round(len(inputs) / seconds, 1),
            "tokens_per_s": round(num_tokens / seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="bert-base", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-inputs", type=int, default=10000)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--peer", action="store_true", help="also run transformers' batched forward")
    parser.add_argument("--peer-batch-sizes", default="32,128")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    config = SHAPES[args.shape]
    folder = shape_folder(args.shape, config)
    inputs = random_inputs(args.num_inputs, args.min_len, args.max_len, config["vocab_size"])
    rows = [run_kvbox(folder, args, inputs)]
    if args.peer:
        peers = [run_peer(folder, args, inputs, int(b), config["model_type"] != "bert")
                 for b in args.peer_batch_sizes.split(",")]
        rows.append(max(peers, key=lambda r: r["inputs_per_s"]))
        rows[0]["speedup"] = round(rows[1]["seconds"] / rows[0]["seconds"], 2)
    result = {"shape": args.shape, "device": args.device, "num_inputs": args.num_inputs,
              "num_tokens": sum(map(len, inputs)), "rows": rows, "peer_batches": peers if args.peer else []}
    if args.device == "cuda":  # the roofline: every row's matmul FLOPs against the card's measured bf16 rate
        card, flops = measure_card(), model_flops(config, inputs)
        result["roofline"] = {"card": card, "flops": flops,
                              "inputs_per_s": round(len(inputs) * card["bf16_flops_per_s"] / flops, 1)}
        for row in rows:
            row["share_of_bf16_peak"] = round(flops / row["seconds"] / card["bf16_flops_per_s"], 3)
    print(f"{args.num_inputs} inputs of {args.min_len}-{args.max_len} tokens ({result['num_tokens']} in all), "
          f"{args.shape} on {args.device}:")
    for row in rows:
        print(f"  {row['system']:12s} {row['inputs_per_s']:10.1f} inputs/s {row['tokens_per_s']:10d} tokens/s"
              + (f"  (batch size {row['batch_size']}, the best of {args.peer_batch_sizes})" if "batch_size" in row
                 else f"  ({row['speedup']}x transformers)" if "speedup" in row else "")
              + (f"  {row['share_of_bf16_peak']:.0%} of the bf16 matmul peak" if "share_of_bf16_peak" in row else ""))
    if "roofline" in result:
        print(f"  roofline     {result['roofline']['inputs_per_s']:10.1f} inputs/s at "
              f"{result['roofline']['card']['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s ({result['roofline']['card']['name']})")
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
