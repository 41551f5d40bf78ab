"""Does torch.compile (inductor, CPU) of the decoder's forward pay on the CPU engine? An A/B of two engines in one
process, eager (the engine as it is) against compiled, interleaved round by round; medians reported.

    python bench/cpu_compile.py --dtype bfloat16 --rounds 3
    python bench/cpu_compile.py --dtype bfloat16 --linear freeze    # inductor packs the bf16 weights itself
    python bench/cpu_compile.py --rounds 0                            # compile time and numerics only

The compiled engine runs the model's forward through `torch.compile(fullgraph=True)` with the token and sequence
dimensions dynamic (`backed_size_oblivious`, so that sizes 1 and N share a graph where inductor allows it). What
inductor cannot see into stays opaque, as custom ops (`torch.library.custom_op`): the K/V store and paged attention in
one op (their host-side grouping by `.tolist()` would break the graph), and with `--linear custom` the bf16 linears
over oneDNN-prepacked weights (inductor lowers `mkldnn._linear_pointwise` only for weights it froze itself, and a
prepacked weight's `is_mkldnn` reads False while tracing). RoPE, RMSNorm, residual adds and SiLU-mul are traced and
fused by inductor. Same model, prompts and measures as cpu_peer.py: --num-prompts x 128 in / 64 out, one request's
prefill of 128 and its 128-token decode. Also printed: compile time, greedy tokens and sampled-token logprobs of
eager vs compiled (up to the first diverging token), recompiles.

Measured 2026-12-03 on the 2-core AMD EPYC VM (avx512_bf16), torch 2.13.0+cpu, SmolLM2-135M, 2 threads, with
another engineer's tests on the same cores (load 1.4-3.1: single rounds moved by up to 5x, so read the medians as
+-15%). Medians of interleaved rounds:

| run | dtype | linears | rounds | out tok/s eager / compiled | prefill 128 ms | decode tok/s |
|---|---|---|---|---|---|---|
| A | bfloat16 | custom op | 3 | 176.4 / 201.1 | 152.6 / 142.8 | 24.4 / 24.6 |
| B | bfloat16 | custom op | 4 | 149.2 / 167.6 | 154.0 / 166.8 | 20.4 / 20.5 |
| C | bfloat16 | freeze | 3 | 168.7 / 189.8 | 163.4 / 158.8 | 21.2 / 24.7 |
| D | bfloat16 | freeze | 6 | 171.9 / 181.2 | 153.7 / 150.4 | 22.2 / 24.3 |
| E | float32 | (MKL, traced) | 3 | 99.1 / 105.3 | 284.3 / 358.9 | 13.7 / 13.6 |
| F | float32 | (MKL, traced) | 3 | 83.3 / 103.6 | 371.0 / 328.8 | 12.2 / 11.7 |

A and E come from an earlier form of this script (one engine whose forward was switched between eager and
compiled); A's eager median includes a 62.5 s round against 10.1-11.6 s for its others. Compile: two graphs (token
count 1 is specialised despite backed_size_oblivious; >= 2 shares one), 44-60 s each cold, 100-117 s per dtype; warm
(inductor's FX graph cache in /tmp/torchinductor_$USER, a second process): 9.5 + 7.8 s with custom-op linears, but
no faster with --linear freeze (frozen graphs are not cached: 59 + 54 s). Numerics: float32 greedy tokens identical
(8 x 32 and 1 x 128), sampled-token logprobs within 2.2e-5; bf16 the 1 x 128 tokens identical with logprobs within
0.28-0.44, 4-5 of 8 rows identical for 32 tokens (inductor's fused norms and residual adds round differently).

Verdict: it does not clearly pay. Throughput gains of 5-14% in bf16 and 6% / 24% in the two float32 runs, a
single-stream decode gain of 0% (custom-op linears, either dtype) or 10-16% (freeze, whose warm restart still
compiles for two minutes) sit within this machine's noise around the 15% bar, against 100-117 s of cold compile per
dtype. The batch-32 throughput is the case worth measuring again on a quiet machine.
Compiling around the paged-attention op leaves what the step spends inside it (its host-side grouping, the gathers,
a masked SDPA per layer) and the GEMMs (float32: MKL at one row) as they were; those are where the gap is.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench.perplexity import float_checkpoint  # noqa: E402
from engine import LLM, SamplingParams, kernels  # noqa: E402
from engine.kernels import cpu  # noqa: E402
from engine.models import attention as attention_module  # noqa: E402


@torch.library.custom_op("kvbox_bench::attention", mutates_args=("kv_cache",))
def attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 query_start_loc: torch.Tensor, scale: float, sliding_window: int, soft_cap: float,
                 k_scale: float, v_scale: float) -> torch.Tensor:
    cpu.store_kv(key, value, kv_cache[0], kv_cache[1], slot_mapping, k_scale, v_scale)
    return cpu.paged_attention(query, kv_cache[0], kv_cache[1], block_tables, seq_lens, query_start_loc, scale,
                               sliding_window, soft_cap, None, k_scale, v_scale)


@attention_op.register_fake
def _(query, *rest):
    return torch.empty_like(query)


@torch.library.custom_op("kvbox_bench::mkldnn_linear", mutates_args=())
def mkldnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@mkldnn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def rope(positions, query, key, cos_sin_cache):
    """Neox RoPE out of place, as inductor fuses it (the CPU kernel's in-place writes into qkv views would not)."""
    rotary_dim = cos_sin_cache.shape[1]
    half = rotary_dim // 2
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = []
    for x in (query, key):
        f1, f2 = x[..., :half].float(), x[..., half:rotary_dim].float()
        parts = [(f1 * cos - f2 * sin).to(x.dtype), (f2 * cos + f1 * sin).to(x.dtype), x[..., rotary_dim:]]
        rotated.append(torch.cat(parts, dim=-1))
    return rotated


_eager_attention = attention_module.Attention.forward
_eager_linear = cpu.linear


def attention_forward(self, query, key, value, metadata, positions=None, rotary_emb=None):
    if not torch.compiler.is_compiling():
        return _eager_attention(self, query, key, value, metadata, positions, rotary_emb)
    n = query.shape[0]
    q = query.view(n, self.num_heads, self.head_size)
    k = key.view(n, self.num_kv_heads, self.head_size)
    v = value.view(n, self.num_kv_heads, self.head_size)
    if rotary_emb is not None:
        q, k = rope(positions, q, k, rotary_emb.cos_sin_cache)
    out = torch.ops.kvbox_bench.attention(q, k, v, self.kv_cache, metadata.slot_mapping, metadata.block_tables,
                                          metadata.seq_lens, metadata.query_start_loc, self.scale,
                                          self.sliding_window, self.soft_cap, self.k_scale, self.v_scale)
    return out.view(n, self.num_heads * self.head_size)


def linear(x, weight, bias=None):
    # While tracing, a prepacked weight is known by its dtype only: on a CPU only bf16 weights are prepacked.
    if torch.compiler.is_compiling() and weight.dtype == torch.bfloat16 and not _LINEAR["freeze"]:
        return torch.ops.kvbox_bench.mkldnn_linear(x, weight, bias)
    return _eager_linear(x, weight, bias)


_LINEAR = {"freeze": False}


def build(args, compiled: bool) -> LLM:
    options = dict(device="cpu", dtype=args.dtype, max_model_len=256, enable_prefix_caching=False,
                   max_num_seqs=args.num_prompts, num_kv_blocks=args.num_prompts * 16 + 16)
    prepack = cpu.prepack
    if compiled and args.linear == "freeze":
        cpu.prepack = lambda weight: None  # plain weights: inductor's freezing packs them
    try:
        llm = LLM(args.model, **options)
    finally:
        cpu.prepack = prepack
    if compiled:
        compile_runner(llm.core.runner, args)
    return llm


def compile_runner(runner, args) -> None:
    _LINEAR["freeze"] = args.linear == "freeze"
    torch._inductor.config.freezing = args.linear == "freeze"
    torch.fx.experimental._config.backed_size_oblivious = True
    compiled = torch.compile(runner.model, fullgraph=True)
    runner.compile_seconds = []

    def forward(num_tokens, metadata, **extra_inputs):
        input_ids, positions = runner.batch.input_ids.device[:num_tokens], runner.batch.positions.device[:num_tokens]
        for tensor in (input_ids, positions, metadata.slot_mapping, metadata.seq_lens, metadata.query_start_loc,
                       metadata.block_tables):
            torch._dynamo.mark_dynamic(tensor, 0)
        start = time.perf_counter()
        hidden = compiled(input_ids, positions, metadata)
        runner.compile_seconds.append(time.perf_counter() - start)
        return hidden

    runner._forward = forward


def generate(llm: LLM, prompts, max_tokens: int, logprobs: int | None = None):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    return llm.generate(prompts, params, use_tqdm=False)


def compare(eager: LLM, compiled: LLM, prompts) -> None:
    """Greedy tokens and sampled-token logprobs, eager against compiled, up to each row's first diverging token."""
    for label, batch, steps in (("8 prompts x 32 tokens", prompts[:8], 32), ("1 prompt x 128 tokens", prompts[:1], 128)):
        rows = [[(o.outputs[0].token_ids, [lp.logprobs[0] for lp in o.outputs[0].logprobs])
                 for o in generate(llm, batch, steps, logprobs=0)] for llm in (eager, compiled)]
        same, worst = 0, 0.0
        for (tokens_a, lps_a), (tokens_b, lps_b) in zip(*rows):
            same += tokens_a == tokens_b
            n = next((i for i, (a, b) in enumerate(zip(tokens_a, tokens_b)) if a != b), len(tokens_a))
            worst = max([worst, *(abs(a - b) for a, b in zip(lps_a[:n + 1], lps_b[:n + 1]))])
        print(f"numerics, {label}: {same}/{len(batch)} rows identical, sampled-token logprobs within {worst:.2e} "
              f"(up to the first diverging token)", flush=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(engines: dict[str, LLM], prompts, args) -> dict[str, dict[str, list[float]]]:
    times = {name: {"throughput": [], "prefill": [], "single": []} for name in engines}
    for round_ in range(args.rounds):
        order = list(engines) if round_ % 2 == 0 else list(engines)[::-1]
        for name in order:
            llm, row = engines[name], times[name]
            row["throughput"].append(timed(lambda: generate(llm, prompts, 64)))
            row["prefill"].append(timed(lambda: generate(llm, prompts[:1], 1)))
            row["single"].append(timed(lambda: generate(llm, prompts[:1], 128)))
            print(f"round {round_} {name:<9}", {k: round(v[-1], 3) for k, v in row.items()}, flush=True)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--linear", choices=("custom", "freeze"), default="custom",
                        help="bf16 linears: the engine's prepacked weights through a custom op, or plain weights "
                             "that inductor freezes and packs itself")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="0: compile and compare only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.model = float_checkpoint(args.model)
    attention_module.Attention.forward = attention_forward
    cpu.linear = linear
    engines = {"eager": build(args, False), "compiled": build(args, True)}
    kernels.set_backend("torch")  # the runners set it at start-up; both read the patched cpu.linear
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 49142) for _ in range(128)] for _ in range(args.num_prompts)]
    start = time.perf_counter()
    generate(engines["compiled"], prompts[:1], 2)
    generate(engines["compiled"], prompts[:4], 3)
    seconds = engines["compiled"].core.runner.compile_seconds
    print(f"compile: {time.perf_counter() - start:.1f} s to the first steps of each shape; calls over 1 s: "
          f"{[round(s, 1) for s in seconds if s > 1]}", flush=True)
    compare(engines["eager"], engines["compiled"], prompts)
    if not args.rounds:
        return 0
    times = bench(engines, prompts, args)
    print(f"SUMMARY {args.dtype}, linear {args.linear}, medians of {args.rounds} rounds, load "
          f"{os.getloadavg()[0]:.2f}")
    for name, row in times.items():
        throughput, prefill, single = (statistics.median(row[k]) for k in ("throughput", "prefill", "single"))
        print(f"  {name:<9} {args.num_prompts * 64 / throughput:7.1f} out tok/s   prefill {prefill * 1e3:6.1f} ms   "
              f"decode {127 / (single - prefill):5.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
