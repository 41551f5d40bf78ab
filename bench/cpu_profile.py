"""Where kvbox's CPU time goes, per step kind: a prefill step, a decode step of a full batch, a decode step of one.

    python bench/cpu_profile.py --dtype float32
    python bench/cpu_profile.py --dtype bfloat16 --kvbox-options '{"enforce_eager": false}' --top 15

For each step kind it times --steps steps of the engine (the scheduler, runner and sampler; wall clock), then runs
them again under torch.profiler with every kernel entry point (`engine.kernels.*`), the model's forward, its logits and the
sampler labelled, and prints each part's share of the step: GEMMs (linear layers), attention (the paged attention
op), KV store + rotary, norms and activations, logits (the LM head), sampling, and what is left: Python and the
engine's bookkeeping outside any op. Then the top ops by their own time. Same model and prompts as cpu_peer.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from engine import kernels  # noqa: E402
from engine.kernels import reference  # noqa: E402
from bench.perplexity import float_checkpoint  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402

PARTS = {  # label -> kernels ops or model calls under it
    "gemm": ("linear", "wna16_linear", "gguf_linear", "w8a8_linear"),
    "attention": ("paged_attention",),
    "kv store + rotary": ("rotary_store_kv", "store_kv"),
    "norms + activations": ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "gelu_tanh_and_mul"),
}


def label_ops() -> None:
    """Wraps the active backend's ops so that the profiler names each call's part."""
    ops = kernels._active.ops
    for part, names in PARTS.items():
        for name in names:
            fn = getattr(ops, name)
            setattr(ops, name, functools.wraps(fn)(functools.partial(_labelled, part, fn)))


def _labelled(part, fn, *args, **kwargs):
    with record_function(part):
        return fn(*args, **kwargs)


def label_method(obj, name: str, part: str) -> None:
    fn = getattr(obj, name)
    setattr(obj, name, functools.partial(_labelled, part, fn))


def step_kinds(llm: LLM, args) -> dict:
    """name -> a function that adds its requests and returns how many steps to profile after `ready` steps."""
    vocab_size = llm.core.vocab_size
    prompts = [[(7 * i + 13 * j) % (vocab_size - 20) + 10 for j in range(args.input_len)]
               for i in range(args.num_prompts)]
    core = llm.core

    def add(n: int, max_tokens: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for i, prompt in enumerate(prompts[:n]):
            core.add_request(f"{time.monotonic_ns()}-{i}", prompt, params)

    return {f"prefill ({args.num_prompts} x {args.input_len} tokens)": (lambda: add(args.num_prompts, 2), 0, 1),
            f"decode, batch {args.num_prompts}": (lambda: add(args.num_prompts, 64), 4, args.steps),
            "decode, batch 1": (lambda: add(1, 64), 4, args.steps),
            f"prefill (1 x {args.input_len} tokens)": (lambda: add(1, 2), 0, 1)}


def drain(core) -> None:
    while core.has_unfinished_requests():
        core.step()


def timed_steps(core, add, ready: int, steps: int, around=contextlib.nullcontext) -> float:
    """Seconds per step of the `steps` steps after `ready` ones, those run inside `around()` (the profiler)."""
    add()
    for _ in range(ready):
        core.step()
    with around():
        start = time.perf_counter()
        for _ in range(steps):
            core.step()
        seconds = (time.perf_counter() - start) / steps
    drain(core)
    return seconds


def breakdown(prof, steps: int, step_s: float) -> dict[str, float]:
    """ms per step of each labelled part, and of the time outside every part (Python, bookkeeping)."""
    totals = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    parts = {part: totals.get(part, 0.0) for part in [*PARTS, "logits", "sampling"]}
    forward = totals.get("forward", 0.0)
    parts["model forward, other ops"] = forward - sum(parts[p] for p in PARTS)
    parts["outside (Python, scheduler, inputs)"] = step_s * 1e3 - forward - parts["logits"] - parts["sampling"]
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="rows of the top-ops table per step kind")
    parser.add_argument("--kvbox-options", default="{}", help="extra engine options for kvbox, as JSON")
    parser.add_argument("--reference-ops", action="store_true",
                        help="the plain references (engine.kernels.reference), not their CPU fast paths (engine.kernels.cpu)")
    parser.add_argument("--json", help="write the breakdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(float_checkpoint(args.model), device="cpu", dtype=args.dtype, max_model_len=args.input_len + 128,
              enable_prefix_caching=False, max_num_seqs=args.num_prompts, **json.loads(args.kvbox_options))
    core, runner = llm.core, llm.core.runner
    if args.reference_ops:
        kernels._active.ops = SimpleNamespace(**{op: getattr(reference, op) for op in vars(kernels._active.ops)})
    label_ops()
    label_method(runner, "_forward", "forward")
    label_method(runner.model, "compute_logits", "logits")
    label_method(runner, "sampler", "sampling")
    results = {}
    for name, (add, ready, steps) in step_kinds(llm, args).items():
        timed_steps(core, add, ready, steps)  # warm-up
        step_s = timed_steps(core, add, ready, steps)
        prof = profile(activities=[ProfilerActivity.CPU])
        profiled_s = timed_steps(core, add, ready, steps, lambda: prof)
        parts = breakdown(prof, steps, profiled_s)
        results[name] = {"step_ms": step_s * 1e3, "profiled_step_ms": profiled_s * 1e3, "parts_ms": parts}
        print(f"\n== {name}: {step_s * 1e3:.1f} ms per step ({profiled_s * 1e3:.1f} ms profiled, whose parts follow)")
        for part, ms in parts.items():
            print(f"   {part:<38} {ms:8.2f} ms  {ms / (profiled_s * 1e3):6.1%}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
