"""The CPU fast paths of another revision against this tree's, in one engine: rounds alternate the two op sets (the
order flips every round), so that a noisy shared host moves both alike. One request (or --batch) of 128 prompt
tokens, then --decode-steps decode steps timed per round; medians and ranges per op set.

    python bench/cpu_ops_ab.py --baseline HEAD~1 --dtype bfloat16 --rounds 8
    python bench/cpu_ops_ab.py --baseline HEAD~1 --dtype float32 --batch 32 --rounds 4

The baseline is `engine/kernels/cpu.py` as `git show REV:...` prints it, loaded beside this tree's; ops it lacks
fall back to the references, as the torch backend does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

import torch  # noqa: E402

from bench.common import module_at  # noqa: E402
from bench.perplexity import float_checkpoint  # noqa: E402
from engine import LLM, SamplingParams, kernels  # noqa: E402
from engine.kernels import cpu, reference  # noqa: E402


def op_set(module) -> SimpleNamespace:
    return SimpleNamespace(**{op: getattr(module, op, getattr(reference, op)) for op in vars(kernels._active.ops)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a git revision")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(float_checkpoint(args.model), device="cpu", dtype=args.dtype, max_model_len=256,
              enable_prefix_caching=False, max_num_seqs=args.batch)
    core = llm.core
    ops = {"baseline": op_set(module_at(args.baseline, "engine/kernels/cpu.py")), "tree": op_set(cpu)}
    prompts = [[(7 * i + 13 * j) % (core.vocab_size - 20) + 10 for j in range(128)] for i in range(args.batch)]

    def ms_per_step() -> float:
        params = SamplingParams(temperature=0.0, max_tokens=args.decode_steps + 1, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            core.add_request(f"{time.monotonic_ns()}-{i}", prompt, params)
        core.step()  # the prefill
        start, steps = time.perf_counter(), 0
        while core.has_unfinished_requests():
            core.step()
            steps += 1
        return (time.perf_counter() - start) / steps * 1e3

    times: dict[str, list[float]] = {name: [] for name in ops}
    for r in range(args.rounds + 1):  # round 0 warms both up
        for name in (("baseline", "tree") if r % 2 == 0 else ("tree", "baseline")):
            kernels._active.ops = ops[name]
            ms = ms_per_step()
            if r:
                times[name].append(ms)
    for name, values in times.items():
        print(f"{args.dtype}, batch {args.batch}, {name:8s}: median {statistics.median(values):7.2f} ms per decode "
              f"step ({min(values):.2f}-{max(values):.2f} over {len(values)} rounds)")


if __name__ == "__main__":
    main()
