"""Beam search throughput: kvbox's `LLM.beam_search` next to transformers' `generate(num_beams=...)`, on random
weights at a real shape, the same prompts, every beam running the whole `--output-len` (no early stop).

    python bench/beam.py --shape llama-3.1-8b --beam-width 4 --peer           # the GPU figure (issue #20: >= 3x)
    python bench/beam.py --shape tiny-llama --device cpu --num-prompts 2 --input-len 8 --output-len 4 --peer  # smoke

kvbox keeps the beams' shared prefix in shared KV blocks (copy-on-write at each fork) and runs every prompt's beams
in one batch a step; transformers runs `--peer-batch-size` prompts at a time, each as `beam_width` rows of a padded
batch with its own cache. The two models' random weights differ (each library initializes its own), so only the
rates compare: output tokens per second count `num_prompts x beam_width x output_len`, the tokens of every beam.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import SHAPES, free, peer_model, random_prompts, shape_folder, sync  # noqa: E402
from engine import LLM  # noqa: E402
from engine.beam_search import BeamSearchParams  # noqa: E402


def run_kvbox(args, prompts: list[list[int]]) -> dict:
    llm = LLM(shape_folder(args.shape), load_format="dummy", dtype=SHAPES[args.shape]["torch_dtype"],
              device=args.device, max_model_len=args.input_len + args.output_len)
    params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.output_len, ignore_eos=True)
    llm.beam_search(prompts[:1], BeamSearchParams(beam_width=args.beam_width, max_tokens=2, ignore_eos=True))
    sync(args.device)
    start = time.perf_counter()
    outputs = llm.beam_search(prompts, params)
    sync(args.device)
    seconds = time.perf_counter() - start
    assert all(len(o.sequences) == args.beam_width for o in outputs), "every prompt keeps beam_width sequences"
    llm.shutdown()
    return report("kvbox beam_search", seconds, args)


def run_peer(args, prompts: list[list[int]]) -> dict:
    import torch
    from transformers import GenerationConfig

    model = peer_model(args.shape, args.device)
    config = GenerationConfig(num_beams=args.beam_width, num_return_sequences=args.beam_width, do_sample=False,
                              max_new_tokens=args.output_len, min_new_tokens=args.output_len, early_stopping=False,
                              length_penalty=1.0, eos_token_id=None, pad_token_id=0)

    def generate(batch_prompts):
        batch = torch.tensor(batch_prompts, device=args.device)
        with torch.no_grad():
            return model.generate(batch, attention_mask=torch.ones_like(batch), generation_config=config)

    generate(prompts[:1])  # warm-up
    sync(args.device)
    start = time.perf_counter()
    for i in range(0, len(prompts), args.peer_batch_size):
        out = generate(prompts[i:i + args.peer_batch_size])
        assert out.shape[1] == args.input_len + args.output_len
    sync(args.device)
    return report(f"transformers generate(num_beams={args.beam_width}, bs {args.peer_batch_size})",
                  time.perf_counter() - start, args)


def report(name: str, seconds: float, args) -> dict:
    tokens = args.num_prompts * args.beam_width * args.output_len
    row = {"system": name, "seconds": round(seconds, 3), "prompts_per_s": round(args.num_prompts / seconds, 3),
           "beam_tokens_per_s": round(tokens / seconds, 1)}
    print(f"{name:45s} {row['prompts_per_s']:8.3f} prompts/s  {row['beam_tokens_per_s']:9.1f} beam tok/s  "
          f"({seconds:.2f} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--peer", action="store_true", help="also transformers' beam search on the same prompts")
    parser.add_argument("--peer-batch-size", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    prompts = random_prompts(args.num_prompts, args.input_len, SHAPES[args.shape]["vocab_size"])
    rows = [run_kvbox(args, prompts)]
    free(args.device)
    if args.peer:
        rows.append(run_peer(args, prompts))
        print(f"kvbox / transformers: {rows[0]['beam_tokens_per_s'] / rows[1]['beam_tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
