"""Pipeline parallel: throughput with one batch in flight against one per stage (vLLM's virtual engines), on one
engine in one run, the two modes alternating so that a shared machine's load falls on both alike.

    python bench/pipeline.py --device cpu --stages 2 --repeat 2   # gloo, a shape where compute dominates
    python bench/pipeline.py --device cuda --stages 2 --hidden 4096 --layers 32 --num-prompts 256  # NCCL, 2 GPUs

Dummy weights of a Llama shape (--hidden, --layers; intermediate 4x hidden). Prints output tokens/s per run, and
from the stages' timelines (`engine.distributed.stage_trace`) how many steps the first stage ran while the last one
still ran an earlier step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import SHAPES, random_prompts, shape_folder  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.distributed import stage_trace  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def model_folder(args) -> str:
    return shape_folder("pipeline", {
        **SHAPES["tiny-llama"], "vocab_size": 8000, "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64, "num_key_value_heads": 4,
        "head_dim": 64, "torch_dtype": "float32" if args.device == "cpu" else "bfloat16"})


def run(core: EngineCore, prompts: list[list[int]], output_len: int, tag: str) -> tuple[float, tuple[int, int]]:
    """Seconds for every prompt to produce `output_len` tokens, and the ids of the first and last step run."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    first_step = core.num_steps + 1
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        core.add_request(f"{tag}-{i}", prompt, params)
    while core.has_unfinished_requests():
        core.step()
    return time.perf_counter() - start, (first_step, core.num_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each mode, alternating")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    trace_prefix = os.path.join(tempfile.mkdtemp(prefix="kvbox-stages-"), "trace")
    os.environ[stage_trace.ENV] = trace_prefix  # the workers inherit it
    core = EngineCore(EngineConfig(
        model=model_folder(args), load_format="dummy", device=args.device, pipeline_parallel_size=args.stages,
        max_model_len=args.input_len + args.output_len, max_num_seqs=args.num_prompts, enable_prefix_caching=False))
    prompts = random_prompts(args.num_prompts, args.input_len, 8000)
    rows = []
    try:
        run(core, prompts[:2], 4, "warmup")
        for repeat in range(args.repeat):
            for in_flight in (1, args.stages):
                core.max_in_flight = in_flight  # what async_scheduling false / on (the default with stages) set
                seconds, steps = run(core, prompts, args.output_len, f"{repeat}-{in_flight}")
                rows.append({"batches_in_flight": in_flight, "seconds": round(seconds, 2), "steps": steps,
                             "output_tokens_per_s": round(args.num_prompts * args.output_len / seconds, 1)})
                print(f"{in_flight} batch(es) in flight: {rows[-1]['output_tokens_per_s']:8.1f} out tok/s "
                      f"({seconds:.1f} s, {steps[1] - steps[0] + 1} steps)", flush=True)
    finally:
        core.shutdown()
    first, last = (stage_trace.read(f"{trace_prefix}.rank{rank}.json") for rank in (0, args.stages - 1))
    for row in rows:
        lo, hi = row.pop("steps")
        row["steps_overlapping"] = stage_trace.overlaps(*({s: t for s, t in timeline.items() if lo <= s <= hi}
                                                          for timeline in (first, last)))
        print(f"{row['batches_in_flight']} in flight: the first stage ran {row['steps_overlapping']} of "
              f"{hi - lo + 1} steps while the last stage still ran an earlier one")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
