"""Single-request latency: one request at a time, IN random tokens in, OUT tokens out (no early stop).

    python bench/latency.py --shape llama-3.1-8b --input-len 128 --output-len 128 --peer
    python bench/latency.py --shape tiny-llama --device cpu --iters 2  # smoke
    python bench/latency.py --input-len 32768 --output-len 128 --iters 2  # long context: one 32k prompt
    python bench/latency.py --shape llama-3.1-8b --speculative replay:4 --batch 32 [--eager]
    python bench/latency.py --shape llama-3.1-8b --speculative draft:llama-3.2-1b:4
    python bench/latency.py --shape tiny-llama --device cpu --iters 2 --output-len 16 --speculative draft:tiny-llama:2

Prints the time to first token and the decode rate (tokens/s after the first) for kvbox, and with --peer for
transformers' `generate` at batch 1; on a GPU, the roofline of both (`bench.common.single_stream_roofline`: the
prefill's FLOPs at the measured matmul rate; the weights and the mean context's K/V read once a token at the copy
bandwidth).
`--batch B` sends B requests at a time (the rate is then theirs together). `--speculative ngram:K` runs again with
n-gram speculation of K tokens, `replay:K` with a bench-only proposer that replays the greedy continuation of the
run without it (acceptance 1.0: the draft-free upper bound), and prints both rates, the speedup and the acceptance.
`draft:SHAPE:K` drafts K tokens with a draft model of that shape (dummy weights, so its drafts are hardly ever
accepted): it prints the cost of one verified step (K drafts drawn, K + 1 positions verified) against one plain
decode step, and the break-even acceptance rate, the per-draft rate at which speculation starts to pay; with CUDA
graphs, again with the draft's forwards eager (the target's graphs kept), which is what the draft's graphs save.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repo root replaces bench/; imported, the path stays as it is
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (QUANTIZATIONS, SHAPES, add_online_args, add_parallel_args, free, measure_card,  # noqa: E402
                          online_options, parallel_options, peer_generate, peer_model, quantized_shape_folder,
                          random_prompts, shape_folder, single_stream_roofline, steady, sync)
from bench.replay_proposer import ReplayProposer  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.step_trace import StepTrace, print_summary  # noqa: E402

_REPLAY_PASSES = 8  # the most replay passes (each one the timed prompts again)


def make_core(args, speculative_tokens: int | None = None, draft_shape: str | None = None) -> EngineCore:
    speculative = None
    if draft_shape is not None:
        speculative = {"model": shape_folder(draft_shape), "num_speculative_tokens": speculative_tokens}
    elif speculative_tokens is not None:
        speculative = {"method": "ngram", "num_speculative_tokens": speculative_tokens, "prompt_lookup_min": 1,
                       "prompt_lookup_max": 4}
    free(args.device)  # the engine measured before this one, else both caches claim the device's memory
    return steady(EngineCore(EngineConfig(
        model=quantized_shape_folder(args.shape, args.quantization), load_format="dummy",
        dtype=SHAPES[args.shape]["torch_dtype"],
        device=args.device, max_model_len=args.input_len + args.output_len, enable_prefix_caching=False,
        max_num_seqs=max(8, args.batch), max_num_batched_tokens=max(2048, args.input_len * args.batch),
        async_scheduling=False if args.sync_scheduling else None, speculative_config=speculative,
        cuda_graphs=not args.eager, **online_options(args), **parallel_options(args))))


def run_kvbox(args, prompts, profiler=None, core: EngineCore | None = None) -> tuple[float, float, dict, int]:
    """Median time to first token (s) and decode tokens/s over batches of `args.batch` prompts (the first batch
    warms up), each prompt + its output, and the engine's weight bytes; `profiler` (cProfile) watches the timed
    batches."""
    core = core or make_core(args)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    ttfts, rates, sequences = [], [], {str(i): list(prompt) for i, prompt in enumerate(prompts)}
    for b in range(0, len(prompts), args.batch):
        if b == args.batch and profiler is not None:  # after the warm-up batch, which compiles kernels
            profiler.enable()
        sync(args.device)
        start = time.perf_counter()
        for i in range(b, b + args.batch):
            core.add_request(str(i), prompts[i], params)
        outputs = core.step()
        sync(args.device)
        first = time.perf_counter()
        while core.has_unfinished_requests():
            outputs += core.step()
        sync(args.device)
        end = time.perf_counter()
        for output in outputs:
            sequences[output.request_id] += output.new_token_ids
        if b > 0:
            ttfts.append(first - start)
            rates.append(args.batch * (args.output_len - 1) / (end - first))
    if profiler is not None:
        profiler.disable()
    return statistics.median(ttfts), statistics.median(rates), sequences, core.weight_bytes


def decode_step_seconds(args, core: EngineCore, prompts) -> float:
    """The median over batches (the first warms up) of the time of one decode step, the prefill's step excluded."""
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    per_step = []
    for b in range(0, len(prompts), args.batch):
        for i in range(b, b + args.batch):
            core.add_request(str(i), prompts[i], params)
        core.step()
        sync(args.device)
        start, num_steps = time.perf_counter(), 0
        while core.has_unfinished_requests():
            core.step()
            num_steps += 1
        sync(args.device)
        if b > 0:
            per_step.append((time.perf_counter() - start) / num_steps)
    return statistics.median(per_step)


def break_even_acceptance(cost_ratio: float, k: int) -> float | None:
    """The per-draft acceptance rate a at which a verified step, which emits (1 - a^(k+1)) / (1 - a) tokens on
    average, emits as many tokens per second as plain decoding; None when even a = 1 (k + 1 tokens) falls short."""
    if cost_ratio >= k + 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(50):
        a = (low + high) / 2
        low, high = (a, high) if sum(a ** i for i in range(k + 1)) < cost_ratio else (low, a)
    return low


def run_draft_model(args, prompts, draft_shape: str, k: int) -> dict:
    """Cost of a verified step with a `draft_shape` draft against a plain decode step, and the break-even rate."""
    plain = decode_step_seconds(args, make_core(args), prompts)
    core = make_core(args, k, draft_shape)
    verified = decode_step_seconds(args, core, prompts)
    stats = core.stats().spec_decoding
    even = break_even_acceptance(verified / plain, k)
    print(f"kvbox + {draft_shape} draft, k={k}: verified step {verified * 1e3:.2f} ms vs decode step "
          f"{plain * 1e3:.2f} ms ({verified / plain:.2f}x); break-even acceptance "
          + (f"{even:.2f} per draft" if even is not None else f"none (beyond k + 1 = {k + 1} tokens per step)")
          + f"; acceptance of these dummy weights {stats.num_accepted_tokens / max(stats.num_draft_tokens, 1):.2f}")
    result = {"method": "draft", "draft_shape": draft_shape, "k": k, "verified_step_ms": verified * 1e3,
              "decode_step_ms": plain * 1e3, "cost_ratio": verified / plain, "break_even_acceptance": even}
    if core.runner.use_cuda_graphs:  # the same engine with the draft's forwards eager: what its graphs save
        core.runner.draft_model.cuda_graphs.release()
        eager = decode_step_seconds(args, core, prompts)
        print(f"  the draft's forwards eager (the target's graphs kept): verified step {eager * 1e3:.2f} ms "
              f"({eager / plain:.2f}x)")
        result["verified_step_ms_draft_eager"] = eager * 1e3
    return result


def run_speculative(args, prompts, sequences: dict[str, list[int]], rate: float) -> dict:
    """The same prompts with speculation (`ngram:K` or `replay:K`); prints and returns its rate beside `rate`."""
    method, _, k = args.speculative.partition(":")
    if method == "draft":
        draft_shape, _, k = k.partition(":")
        if draft_shape not in SHAPES or not k.isdigit():
            raise SystemExit(f"--speculative draft:SHAPE:K with SHAPE one of {', '.join(sorted(SHAPES))}")
        return run_draft_model(args, prompts, draft_shape, int(k))
    if method not in ("replay", "ngram"):
        raise SystemExit(f"--speculative: expected ngram:K, replay:K or draft:SHAPE:K, got {args.speculative!r}")
    core = make_core(args, int(k))
    # Replay: each pass replays every greedy output recorded so far (bench.replay_proposer), until a pass's output
    # is one of them for every prompt: then every step of that pass had drafts to verify. The plain engine's output
    # is only the first source: verification steps (k + 1 query tokens a sequence: other GEMM shapes) round
    # differently from decode steps in bf16 and flip the near-tied argmaxes of random weights.
    sources, passes = {req: [seq] for req, seq in sequences.items()}, 0
    while True:
        if method == "replay":
            core.scheduler.drafter.proposer = ReplayProposer(list(sources.values()), args.input_len)
        core.step_trace = StepTrace() if args.step_trace else None  # the last pass's
        before = core.stats().spec_decoding
        ttft, spec_rate, spec_sequences, _ = run_kvbox(args, prompts, core=core)
        passes += 1
        reproduced = all(seq in sources[req] for req, seq in spec_sequences.items())
        if method == "ngram" or reproduced or passes == _REPLAY_PASSES:
            break
        for req, seq in spec_sequences.items():
            sources[req].append(seq)
    stats = core.stats().spec_decoding
    drafts, accepted = (stats.num_draft_tokens - before.num_draft_tokens,
                        stats.num_accepted_tokens - before.num_accepted_tokens)
    acceptance = accepted / max(drafts, 1)
    label = "replay (draft-free upper bound)" if method == "replay" else "n-gram"
    same = spec_sequences == sequences
    print(f"kvbox + {label} speculation, k={k}: decode {spec_rate:.1f} tokens/s ({spec_rate / rate:.2f}x), "
          f"acceptance {acceptance:.2f}, {accepted / max(stats.num_drafts - before.num_drafts, 1):.2f} accepted "
          f"drafts per verification; greedy outputs {'identical' if same else 'DIFFER'} from the plain engine's"
          + (f" (replay pass {passes}; {'a' if reproduced else 'no'} recorded source reproduced)"
             if method == "replay" else ""))
    if core.step_trace is not None:
        print_summary(core.step_trace.summary())
    return {"method": method, "k": int(k), "ttft_ms": ttft * 1e3, "decode_tokens_per_s": spec_rate,
            "speedup": spec_rate / rate, "acceptance": acceptance, "identical": same, "replay_passes": passes}


def gpu_profile(args, prompts) -> None:
    """Decodes one request under torch.profiler: when the kernel time per step is close to the wall time per step,
    the step loop keeps the GPU busy and only faster kernels help."""
    from torch.profiler import ProfilerActivity, profile

    core = make_core(args)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    if args.speculative:  # verification steps, replaying the plain engine's greedy continuation of both prompts
        method, _, k = args.speculative.partition(":")
        if method != "replay":
            raise SystemExit("--gpu-profile takes --speculative replay:K")
        _, _, sequences, _ = run_kvbox(args, prompts[:2] * 2, core=core)
        del core
        free(args.device)  # the plain engine's cache, before the speculating engine sizes its own
        core = make_core(args, int(k))
        core.scheduler.drafter.proposer = ReplayProposer([[sequences["2"]], [sequences["3"]]], args.input_len)
    core.add_request("warm-up", prompts[0], params)
    while core.has_unfinished_requests():
        core.step()
    core.add_request("timed", prompts[1], params)
    core.step()  # the prefill, outside the profile
    sync(args.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        num_steps = 0
        while core.has_unfinished_requests():
            core.step()
            num_steps += 1
        sync(args.device)
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernel_us = sum(e.self_device_time_total for e in events)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
    print(f"{'verified' if args.speculative else 'decode'}: {num_steps} steps, wall {wall / num_steps * 1e3:.3f} "
          f"ms/step, GPU kernels {kernel_us / num_steps / 1e3:.3f} ms/step ({kernel_us / 1e6 / wall:.0%} busy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--quantization", default="none", choices=sorted(QUANTIZATIONS),
                        help="dummy weights in this checkpoint format (bench.common.QUANTIZATIONS)")
    parser.add_argument("--batch", type=int, default=1, help="requests sent together")
    parser.add_argument("--speculative", help="also run with speculation: ngram:K, replay:K (the draft-free "
                                              "upper bound: replays the greedy continuation, bench only), or "
                                              "draft:SHAPE:K (a draft model's step cost and break-even acceptance)")
    parser.add_argument("--sync-scheduling", action="store_true",
                        help="wait for each step before scheduling the next (to see what async scheduling gains)")
    parser.add_argument("--eager", action="store_true",
                        help="no CUDA graphs (to see what graphs of decode and verify steps gain)")
    parser.add_argument("--peer", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print where the host time of the steps goes")
    parser.add_argument("--step-trace", action="store_true",
                        help="print the step timeline's summary of the plain run and of the speculative one")
    parser.add_argument("--gpu-profile", action="store_true",
                        help="print the GPU kernel time per decode step next to the wall time (torch.profiler)")
    parser.add_argument("--json")
    add_online_args(parser)
    add_parallel_args(parser)
    args = parser.parse_args()

    prompts = random_prompts((args.iters + 1) * args.batch, args.input_len, SHAPES[args.shape]["vocab_size"])
    if args.gpu_profile:
        gpu_profile(args, prompts[:2])
        return
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        ttft, rate, sequences, weights = run_kvbox(args, prompts, profiler)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    else:
        core = make_core(args)
        core.step_trace = StepTrace() if args.step_trace else None
        ttft, rate, sequences, weights = run_kvbox(args, prompts, core=core)
        if core.step_trace is not None:
            print_summary(core.step_trace.summary())
        del core
    print(f"kvbox ({args.online or args.quantization}, weights {weights / 1e9:.2f} GB): time to first token "
          f"{ttft * 1e3:.1f} ms, decode {rate:.1f} tokens/s (batch {args.batch})")
    results = {"args": vars(args), "kvbox": {"ttft_ms": ttft * 1e3, "decode_tokens_per_s": rate,
                                             "weight_gb": weights / 1e9}}
    if args.speculative:
        results["speculative"] = run_speculative(args, prompts, sequences, rate)
    if args.device.startswith("cuda"):
        card = measure_card()
        # `weights` are one rank's; with stages a token passes each in turn, reading every stage's (about as many).
        bound = single_stream_roofline(args.shape, args.input_len, args.output_len,
                                       weights * args.pipeline_parallel_size, card, args.tensor_parallel_size)
        print(f"roofline ({card['name']}, {card['copy_bytes_per_s'] / 1e12:.2f} TB/s copy, "
              f"{card['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s bf16): decode {bound['decode_tokens_per_s']:.1f} "
              f"tokens/s at batch 1 (weights and the mean context's K/V read once a token), kvbox reaches "
              f"{rate / bound['decode_tokens_per_s']:.0%}; time to first token {bound['ttft_s'] * 1e3:.1f} ms "
              f"(the prefill's FLOPs), kvbox takes {ttft / bound['ttft_s']:.2f}x")
        results["roofline"] = {**bound, "card": card}
    if args.peer:
        model = peer_model(args.shape)
        peer_generate(model, prompts[:1], args.output_len, 1)  # warm-up
        seconds = peer_generate(model, prompts[1:3], args.output_len, 1) / 2
        print(f"transformers generate (batch 1): {args.output_len / seconds:.1f} tokens/s (prefill included)")
        results["peer"] = {"tokens_per_s": args.output_len / seconds}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
