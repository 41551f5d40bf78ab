"""Times each Triton kernel against its torch reference on one Llama-3.1-8B layer's shapes (bf16, CUDA only).

Paged attention is also timed against torch's scaled_dot_product_attention on the same tokens with contiguous K/V.
Each time is the median of many runs timed with CUDA events, with L2 flushed before each run. Bandwidth counts the
fewest bytes each op must move (inputs read once, outputs written once) and is compared with the card's measured
device-to-device copy bandwidth (bytes read + written).

    python bench/kernel_speed.py [--out FILE] [--sweep] [--linear]

--sweep also times launch configurations of paged attention (block sizes, split-K, warps) to pick the heuristics;
--linear times decode-sized linears, cuBLAS against `kernels/gemv.py` and its launch configurations.
--chain times a batch-1 decode step's dense kernels captured in one CUDA graph, the skinny kernel's default launch
configurations against others (`--chain-config gate_up_proj+lm_head:64,128,4,3`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.kernels import reference  # noqa: E402
from engine.kernels.activation import gelu_tanh_and_mul, silu_and_mul  # noqa: E402
from engine.kernels.kv_store import rotary_store_kv, store_kv  # noqa: E402
from engine.kernels.norm import fused_add_rms_norm, rms_norm  # noqa: E402
from engine.kernels.rotary import rotary_embedding  # noqa: E402
from engine.kernels import attention  # noqa: E402

# Llama-3.1-8B
NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, HIDDEN, INTERMEDIATE = 32, 8, 128, 4096, 14336
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
DEV = torch.device("cuda")
NUM_ELEMENTWISE_TOKENS = 16384
_flush = None


def time_ms(fn, iters=100, warmup=5) -> float:
    """Median milliseconds of `fn` on the GPU, L2 flushed before each run."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEV)
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        _flush.zero_()
        torch.cuda._sleep(400_000)  # keeps the GPU busy while Python launches, so launch gaps stay out of the time
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of a 2 GiB copy."""
    src = torch.randn(2**29, device=DEV)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=50)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def read_bandwidth() -> float:
    """Read-only bandwidth in bytes/s: a float32 sum over 2 GiB of bf16, what a decode step's weight stream is."""
    src = torch.randn(2**30, device=DEV, dtype=torch.bfloat16)
    ms = time_ms(lambda: src.sum(dtype=torch.float32), iters=50)
    return src.numel() * src.element_size() / (ms * 1e-3)


def paged_batch(q_lens, seq_lens, gen):
    """A batch over a shuffled block pool, the query a strided view of a fused qkv tensor (as the model gives it)."""
    blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 16
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    key_cache = torch.randn(shape, device=DEV, dtype=DTYPE, generator=gen)
    value_cache = torch.randn(shape, device=DEV, dtype=DTYPE, generator=gen)
    perm = torch.randperm(num_blocks, device=DEV, generator=gen).to(torch.int32)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32, device=DEV)
    used = 0
    for seq, n in enumerate(blocks_per_seq):
        block_tables[seq, :n] = perm[used:used + n]
        used += n
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    num_tokens = sum(q_lens)
    qkv = torch.randn(num_tokens, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_SIZE, device=DEV, dtype=DTYPE, generator=gen)
    query = qkv[:, :NUM_HEADS * HEAD_SIZE].view(num_tokens, NUM_HEADS, HEAD_SIZE)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    return (query, key_cache, value_cache, block_tables, seq_lens_t, qsl)


def contiguous_kv(batch, seq_lens):
    """The same K/V gathered into [num_seqs, kv_heads, seq_len, head_size] for SDPA (all seq_lens equal)."""
    _, key_cache, value_cache, block_tables, _, _ = batch
    seq_len = seq_lens[0]
    n = -(-seq_len // BLOCK_SIZE)

    def gather(cache):
        x = cache[block_tables[:, :n].long()]  # [num_seqs, n, block_size, kv_heads, D]
        return x.flatten(1, 2)[:, :seq_len].transpose(1, 2).contiguous()

    return gather(key_cache), gather(value_cache)


def sdpa_fn(query, k, v, q_len, causal):
    num_seqs = k.shape[0]
    q = query.reshape(num_seqs, q_len, NUM_HEADS, HEAD_SIZE).transpose(1, 2)  # [B, H, q_len, D]
    try:
        F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except RuntimeError:  # no GQA support in this torch: repeat the KV heads (4x the K/V bytes)
        group = NUM_HEADS // NUM_KV_HEADS
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attention_bytes(q_lens, seq_lens):
    kv = sum(seq_lens) * NUM_KV_HEADS * HEAD_SIZE * 2 * 2
    q_out = sum(q_lens) * NUM_HEADS * HEAD_SIZE * 2 * 2
    return kv + q_out


def attention_flops(q_lens, seq_lens):
    """Multiply-adds of QK^T and PV over visible (causal) pairs, 2 FLOPs each."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(q_lens, seq_lens))
    return 2 * 2 * pairs * NUM_HEADS * HEAD_SIZE


def run(args):
    gen = torch.Generator(DEV).manual_seed(0)
    props = torch.cuda.get_device_properties(DEV)
    copy_bw = copy_bandwidth()
    rows = []  # (op, shape, kernel ms, reference ms, other, bytes/s, % of copy)

    def add(op, shape, kernel, ref, nbytes, other=None, other_name="", ref_iters=20, flops=None):
        k_ms = time_ms(kernel)
        r_ms = time_ms(ref, iters=ref_iters, warmup=1) if ref is not None else float("nan")
        o_ms = time_ms(other) if other is not None else float("nan")
        bw = nbytes / (k_ms * 1e-3)
        extra = f"{flops / (k_ms * 1e-3) / 1e12:.0f} TFLOP/s" if flops else ""
        rows.append((op, shape, k_ms, r_ms, other_name, o_ms, bw, bw / copy_bw, extra))
        print(f"  {op:28s} {shape:28s} {k_ms * 1e3:9.1f} us  {bw / 1e12:5.2f} TB/s ({bw / copy_bw:4.0%}) {extra}",
              flush=True)

    scale = HEAD_SIZE**-0.5
    # ---- paged attention
    for name, q_lens, seq_lens, causal in (
        ("paged decode", [1] * 64, [2048] * 64, False),
        ("paged decode split-K", [1], [32768], False),
        ("paged decode", [1] * 8, [8192] * 8, False),
        ("paged prefill", [2048] * 4, [2048] * 4, True),
    ):
        batch = paged_batch(q_lens, seq_lens, gen)
        out = torch.empty_like(batch[0])
        kernel = lambda b=batch, o=out: attention.paged_attention(*b, scale, out=o)  # noqa: E731
        ref = lambda b=batch: reference.paged_attention(*b, scale)  # noqa: E731
        k, v = contiguous_kv(batch, seq_lens)
        sdpa = sdpa_fn(batch[0], k, v, q_lens[0], causal)
        # correctness on the benched shapes
        err = (kernel().float() - ref().float()).abs().max().item()
        assert err < 3e-2, f"{name}: max error {err}"
        shape = f"{len(q_lens)}x{q_lens[0]}q/{seq_lens[0]}kv"
        add(name, shape, kernel, ref, attention_bytes(q_lens, seq_lens), sdpa, "sdpa", ref_iters=3,
            flops=attention_flops(q_lens, seq_lens) if causal else None)

    # ---- fused elementwise ops
    t = NUM_ELEMENTWISE_TOKENS
    x = torch.randn(t, HIDDEN, device=DEV, dtype=DTYPE, generator=gen)
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, device=DEV, dtype=DTYPE, generator=gen)
    e = x.element_size()
    add("rms_norm", f"{t}x{HIDDEN}", lambda: rms_norm(x, weight, 1e-5), lambda: reference.rms_norm(x, weight, 1e-5),
        2 * t * HIDDEN * e)
    add("fused_add_rms_norm", f"{t}x{HIDDEN}", lambda: fused_add_rms_norm(x, residual, weight, 1e-5),
        lambda: reference.fused_add_rms_norm(x, residual, weight, 1e-5), 4 * t * HIDDEN * e)
    gate_up = torch.randn(t, 2 * INTERMEDIATE, device=DEV, dtype=DTYPE, generator=gen)
    add("silu_and_mul", f"{t}x{2 * INTERMEDIATE}", lambda: silu_and_mul(gate_up),
        lambda: reference.silu_and_mul(gate_up), 3 * t * INTERMEDIATE * e)
    add("gelu_tanh_and_mul", f"{t}x{2 * INTERMEDIATE}", lambda: gelu_tanh_and_mul(gate_up),
        lambda: reference.gelu_tanh_and_mul(gate_up), 3 * t * INTERMEDIATE * e)

    qkv = torch.randn(t, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_SIZE, device=DEV, dtype=DTYPE, generator=gen)
    q = qkv[:, :NUM_HEADS * HEAD_SIZE].view(t, NUM_HEADS, HEAD_SIZE)
    kk = qkv[:, NUM_HEADS * HEAD_SIZE:(NUM_HEADS + NUM_KV_HEADS) * HEAD_SIZE].view(t, NUM_KV_HEADS, HEAD_SIZE)
    vv = qkv[:, (NUM_HEADS + NUM_KV_HEADS) * HEAD_SIZE:].view(t, NUM_KV_HEADS, HEAD_SIZE)
    positions = torch.randint(0, 8192, (t,), device=DEV, generator=gen)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_SIZE, 2, device=DEV, dtype=torch.float32) / HEAD_SIZE)
    freqs = torch.outer(torch.arange(8192, device=DEV, dtype=torch.float32), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    add("rotary (neox)", f"{t}x({NUM_HEADS}+{NUM_KV_HEADS})x{HEAD_SIZE}",
        lambda: rotary_embedding(positions, q, kk, cos_sin, True),
        lambda: reference.rotary_embedding(positions, q, kk, cos_sin, True),
        2 * t * (NUM_HEADS + NUM_KV_HEADS) * HEAD_SIZE * e)

    num_blocks = 2 * t // BLOCK_SIZE
    kc = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, device=DEV, dtype=DTYPE, generator=gen)
    vc = torch.randn_like(kc)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEV, generator=gen)[:t]
    add("store_kv", f"{t}x{NUM_KV_HEADS}x{HEAD_SIZE}", lambda: store_kv(kk, vv, kc, vc, slots),
        lambda: reference.store_kv(kk, vv, kc, vc, slots), 4 * t * NUM_KV_HEADS * HEAD_SIZE * e)
    add("rotary_store_kv", f"{t}x({NUM_HEADS}+{NUM_KV_HEADS})x{HEAD_SIZE}",
        lambda: rotary_store_kv(positions, q, kk, vv, cos_sin, True, kc, vc, slots),
        lambda: reference.rotary_store_kv(positions, q, kk, vv, cos_sin, True, kc, vc, slots),
        (2 * (NUM_HEADS + NUM_KV_HEADS) + 3 * NUM_KV_HEADS) * t * HEAD_SIZE * e)  # q, k in place; v, K/V stored

    lines = [
        f"card: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"measured copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)",
        "shapes: Llama-3.1-8B layer (32 q heads, 8 kv heads, head 128, hidden 4096, intermediate 14336), bf16, "
        f"KV block size {BLOCK_SIZE}; times are medians with L2 flushed",
        "",
        f"| {'op':22s} | {'shape':26s} | {'triton us':>9s} | {'torch ref us':>12s} | {'sdpa us':>8s} "
        f"| {'TB/s':>5s} | {'% copy':>6s} | note |",
        f"|{'-' * 24}|{'-' * 28}|{'-' * 11}|{'-' * 14}|{'-' * 10}|{'-' * 7}|{'-' * 8}|------|",
    ]
    for op, shape, k_ms, r_ms, _, o_ms, bw, frac, extra in rows:
        sdpa = f"{o_ms * 1e3:8.1f}" if o_ms == o_ms else f"{'':8s}"
        lines.append(f"| {op:22s} | {shape:26s} | {k_ms * 1e3:9.1f} | {r_ms * 1e3:12.1f} | {sdpa} "
                     f"| {bw / 1e12:5.2f} | {frac:6.0%} | {extra} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def sweep(args):
    """Launch configurations of paged attention on the benched shapes: the data behind `_config`'s heuristics."""
    gen = torch.Generator(DEV).manual_seed(1)
    copy_bw = copy_bandwidth()
    scale = HEAD_SIZE**-0.5
    out_lines = []
    cases = [
        ("decode 64x2048", [1] * 64, [2048] * 64,
         [dict(num_splits=s, tile_n=t, num_warps=w, num_stages=st)
          for s in (1, 2) for t in (64, 128) for w in (4, 8) for st in (2, 3)]),
        ("decode 1x32768", [1], [32768] * 1,
         [dict(num_splits=s, tile_n=t, num_warps=w) for s in (16, 32, 64) for t in (64, 128) for w in (4, 8)]),
        ("decode 1x256", [1], [256],
         [dict(num_splits=s, tile_n=t, num_warps=w, num_stages=st)
          for s in (1, 2, 4, 8) for t in (16, 32, 64) for w in (2, 4) for st in (2, 3) if s * t <= 256]),
        ("decode 1x1024", [1], [1024],
         [dict(num_splits=s, tile_n=t, num_warps=4, num_stages=2) for s in (1, 2, 4, 8, 16) for t in (32, 64)]),
        ("decode 8x8192", [1] * 8, [8192] * 8,
         [dict(num_splits=s, tile_n=128, num_warps=4) for s in (2, 4, 8, 16)]),
    ]
    prefill_configs = [dict(block_m=m, tile_n=t, num_warps=w, num_stages=st)
                       for m in (64, 128) for t in (64, 128) for w in (4, 8) for st in (2, 3)]
    cases += [
        ("prefill 4x2048", [2048] * 4, [2048] * 4, prefill_configs),
        ("prefill 8x1024", [1024] * 8, [1024] * 8, prefill_configs),  # bench/throughput.py's prefill steps
        ("prefill 8192@32k", [8192], [32768], prefill_configs),  # a 32k prompt's last chunk
    ]
    for name, q_lens, seq_lens, configs in cases:
        if args.cases and not any(name.startswith(prefix) for prefix in args.cases):
            continue
        batch = paged_batch(q_lens, seq_lens, gen)
        out = torch.empty_like(batch[0])
        default = attention._config(len(q_lens) if q_lens[0] == 1 else sum(q_lens), len(q_lens), NUM_KV_HEADS,
                                    NUM_HEADS // NUM_KV_HEADS, HEAD_SIZE, batch[3].shape[1] * BLOCK_SIZE, DEV)
        if q_lens[0] > 1 and q_lens == seq_lens:  # a fresh prefill: FlashAttention through SDPA, for scale
            ms = time_ms(sdpa_fn(batch[0], *contiguous_kv(batch, seq_lens), q_lens[0], True), iters=30)
            tflops = attention_flops(q_lens, seq_lens) / (ms * 1e-3) / 1e12
            out_lines.append(f"{name:16s} {ms * 1e3:8.1f} us {tflops:6.0f} TFLOP/s  SDPA (contiguous K/V)")
            print(out_lines[-1], flush=True)
        for cfg in [{}] + configs:
            try:
                ms = time_ms(lambda: attention._paged_attention(*batch, scale, out=out, **cfg), iters=30)
            except Exception as exc:  # a config that does not compile (shared memory) is skipped
                out_lines.append(f"{name:16s} {cfg} FAILED {type(exc).__name__}: {str(exc)[:80]}")
                print(out_lines[-1], flush=True)
                continue
            bw = attention_bytes(q_lens, seq_lens) / (ms * 1e-3)
            flops = attention_flops(q_lens, seq_lens) / (ms * 1e-3) / 1e12
            label = cfg or f"default {default}"
            out_lines.append(f"{name:16s} {ms * 1e3:8.1f} us {bw / copy_bw:5.0%} copy {flops:6.0f} TFLOP/s  {label}")
            print(out_lines[-1], flush=True)
    if args.out:
        Path(args.out).with_suffix(".sweep.txt").write_text("\n".join(out_lines) + "\n")


LINEAR_SHAPES = {  # name: (N, K) of the weight, Llama-3.1-8B
    "qkv_proj": ((NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_SIZE, HIDDEN),
    "o_proj": (HIDDEN, NUM_HEADS * HEAD_SIZE),
    "gate_up_proj": (2 * INTERMEDIATE, HIDDEN),
    "down_proj": (HIDDEN, INTERMEDIATE),
    "lm_head": (128256, HIDDEN),
}


def linear_sweep(args):
    """Decode-sized linears: cuBLAS (F.linear) against the skinny kernel's launch configurations, per weight shape
    and row count; the data behind `kernels.gemv._config` and `_wins`."""
    from engine.kernels.gemv import skinny_linear

    gen = torch.Generator(DEV).manual_seed(2)
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    print(f"copy {copy_bw / 1e12:.2f} TB/s (read + write), read {read_bw / 1e12:.2f} TB/s; percentages: of the read",
          flush=True)
    configs = ([dict(block_n=n, block_k=k, num_warps=w, num_stages=st)
                for n in (16, 32, 64) for k in (128, 256, 512) for w in (4, 8) for st in (3, 5)]
               if not args.quick else
               [dict(block_n=n, block_k=k, num_warps=w, num_stages=st)
                for n in (16, 32) for k in (256, 512) for w in (4, 8) for st in (4, 6)])
    out_lines = []
    for name, (n, k) in LINEAR_SHAPES.items():
        weight = torch.randn(n, k, device=DEV, dtype=DTYPE, generator=gen) * 0.02
        for m in args.rows:
            x = torch.randn(m, k, device=DEV, dtype=DTYPE, generator=gen)
            nbytes = (n * k + m * k + m * n) * 2
            torch.testing.assert_close(skinny_linear(x, weight), F.linear(x, weight), atol=2e-2, rtol=2e-2)
            cublas = time_ms(lambda: F.linear(x, weight), iters=30)
            default = time_ms(lambda: skinny_linear(x, weight), iters=30)
            timed = []
            for cfg in configs:
                try:
                    timed.append((time_ms(lambda: skinny_linear(x, weight, **cfg), iters=30), cfg))
                except Exception as exc:  # shared memory overflow and the like
                    print(f"{name} m={m} {cfg} FAILED {type(exc).__name__}", flush=True)
            best_ms, best = min(timed, key=lambda t: t[0])

            def show(ms):
                return f"{ms * 1e3:7.1f} us ({nbytes / (ms * 1e-3) / read_bw:4.0%})"

            line = (f"{name:13s} {n:6d}x{k:5d} m={m:2d}  cublas {show(cublas)}  default {show(default)}"
                    f"  best {show(best_ms)} {best}")
            out_lines.append(line)
            print(line, flush=True)
    if args.out:
        Path(args.out).with_suffix(".linear.txt").write_text("\n".join(out_lines) + "\n")


def decode_chain(args):
    """A batch-1 decode step's dense kernels over 32 layers (add + norm, qkv, o, add + norm, gate/up, SiLU, down; no
    attention) and the LM head, each layer with its own weights (15 GB: nothing stays in L2), captured in one CUDA
    graph per variant: the skinny kernel's default launches, then each `--chain-config` applied on top. Replays
    alternate between variants; bandwidth = weight bytes / time, against the card's read bandwidth. Unlike
    `--linear` (one kernel, L2 flushed with dirty lines), this is the kernels as a decode graph runs them: back to
    back, each one's start behind the last one's tail."""
    from engine.kernels.activation import silu_and_mul
    from engine.kernels.gemv import skinny_linear

    gen = torch.Generator(DEV).manual_seed(3)

    def weight(name):
        n, k = LINEAR_SHAPES[name]
        return torch.randn(n, k, device=DEV, dtype=DTYPE, generator=gen) * 0.02

    stack = [{name: weight(name) for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")} for _ in range(32)]
    head = weight("lm_head")
    norm_w = torch.ones(HIDDEN, device=DEV, dtype=DTYPE)
    x = torch.randn(1, HIDDEN, device=DEV, dtype=DTYPE, generator=gen)
    nbytes = sum(w.numel() * 2 for layer in stack for w in layer.values()) + head.numel() * 2

    def step(configs):
        def lin(inp, name, w):
            return skinny_linear(inp, w, **configs.get(name, {}))
        h, residual = x, x
        for layer in stack:
            y, residual = fused_add_rms_norm(h, residual, norm_w, 1e-5)
            qkv = lin(y, "qkv_proj", layer["qkv_proj"])
            y, residual = fused_add_rms_norm(lin(qkv[:, :HIDDEN], "o_proj", layer["o_proj"]), residual, norm_w, 1e-5)
            h = lin(silu_and_mul(lin(y, "gate_up_proj", layer["gate_up_proj"])), "down_proj", layer["down_proj"])
        return lin(rms_norm(h, norm_w, 1e-5), "lm_head", head)

    variants = {"default": {}}
    for spec in args.chain_config:  # SHAPE[+SHAPE]:BLOCK_N,BLOCK_K,WARPS,STAGES
        shapes, numbers = spec.split(":")
        cfg = dict(zip(("block_n", "block_k", "num_warps", "num_stages"), (int(v) for v in numbers.split(","))))
        variants[spec] = {name: cfg for name in shapes.split("+")}
    graphs, outputs = {}, {}
    for name, configs in variants.items():
        step(configs)  # compiles
        torch.cuda.synchronize()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin()
            outputs[name] = step(configs)
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        graphs[name] = graph
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, graph in graphs.items():
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / 5)
    read_bw = read_bandwidth()
    print(f"read bandwidth {read_bw / 1e12:.2f} TB/s; {nbytes / 1e9:.2f} GB of weights a step", flush=True)
    for name in variants:
        ms = statistics.median(times[name])
        close = torch.allclose(outputs[name].float(), outputs["default"].float(), atol=1e-2, rtol=1e-2)
        print(f"{name:44s} {ms:7.3f} ms a step  {nbytes / (ms * 1e-3) / 1e12:5.2f} TB/s "
              f"({nbytes / (ms * 1e-3) / read_bw:4.0%} of read)  output close to default: {close}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--sweep", action="store_true", help="also sweep paged-attention launch configurations")
    parser.add_argument("--cases", nargs="*", help="with --sweep: only the cases whose names start so, then stop")
    parser.add_argument("--linear", action="store_true",
                        help="only sweep decode-sized linears (cuBLAS against the skinny kernel)")
    parser.add_argument("--rows", type=lambda s: [int(r) for r in s.split(",")], default=[1, 4, 16],
                        help="with --linear: the batch rows to time")
    parser.add_argument("--quick", action="store_true", help="with --linear: 16 launch configurations, not 36")
    parser.add_argument("--chain", action="store_true",
                        help="only time a batch-1 decode step's dense kernels in one CUDA graph")
    parser.add_argument("--chain-config", action="append", default=[],
                        help="with --chain: SHAPE[+SHAPE]:BLOCK_N,BLOCK_K,WARPS,STAGES, a variant to time (repeatable)")
    parser.add_argument("--rounds", type=int, default=10, help="with --chain: alternating timing rounds")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_speed.py needs a CUDA device")
    if args.linear:
        linear_sweep(args)
        return
    if args.chain:
        decode_chain(args)
        return
    if args.sweep:
        sweep(args)
        if args.cases:
            return
    run(args)


if __name__ == "__main__":
    main()
